"""Provider webhooks: verify the signature on the raw bytes before anything else (403 and
nothing stored otherwise), persist every item, answer, and only then route.

The URL a signature covers is the configured public base URL plus the path (never the Host
header, which a proxy may change), so signatures verify behind load balancers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import parse_qsl

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import Response

from channels.base import Channel, WebhookRequest
from channels.calls import CallChannel
from channels.meta import MetaChannel, entries, handshake, route, verify_signature
from router import policy
from router.api.deps import declare, get_runtime
from router.channels_config import MetaApp
from router.exceptions import NotFound
from router.pipeline import quarantine
from router.runtime import Runtime

router = APIRouter(prefix="/webhooks", tags=["webhooks"], dependencies=[declare(policy.WEBHOOK)])
log = logging.getLogger(__name__)


async def webhook_request(request: Request, public_base_url: str) -> WebhookRequest:
    body = await request.body()
    url = (
        public_base_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    )
    form: dict[str, str] = {}
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    return WebhookRequest(
        method=request.method,
        url=url,
        headers={k.lower(): v for k, v in request.headers.items()},
        body=body,
        query=dict(request.query_params),
        form=form,
        remote=request.client.host if request.client else "",
    )


async def verified(
    runtime: Runtime, channel: Channel, request: Request
) -> WebhookRequest | Response:
    """The request, if its signature checks out; else the refusal to answer with."""
    return await checked(runtime, request, channel.provider, channel.slug, channel.verify)


async def checked(
    runtime: Runtime,
    request: Request,
    provider: str,
    target: str,
    verify: Callable[[WebhookRequest], bool],
) -> WebhookRequest | Response:
    hook = await webhook_request(request, runtime.settings.public_base_url)
    # The signature is checked first (an HMAC over a body already bounded by the size
    # limit: cheap): a correctly signed request is never refused because others failed,
    # even from the same address (behind a proxy every provider may share one).
    if verify(hook):
        return hook
    if not runtime.bad_signatures.allow(hook.remote):
        # a source that keeps failing the check hears 429 for a while instead of 403
        runtime.metrics.webhook_rejected.labels(provider, "rate").inc()
        return Response("too many bad signatures", status_code=429)
    runtime.metrics.webhook_rejected.labels(provider, "signature").inc()
    log.warning("webhook for %s refused: bad or missing signature (from %s)", target, hook.remote)
    return Response("forbidden", status_code=403)


async def handle(
    runtime: Runtime, channel: Channel, request: Request, background: BackgroundTasks
) -> Response:
    hook = await verified(runtime, channel, request)
    if isinstance(hook, Response):
        return hook
    inbox = runtime.inboxes[channel.slug]
    try:
        items = await channel.parse_async(hook)
    except Exception as exc:  # a parser bug must not lose the request: keep it raw
        log.exception("parsing a %s webhook failed; quarantined", channel.slug)
        await runtime.db.write(
            quarantine, inbox.id, "webhook", f"parse failed: {type(exc).__name__}: {exc}", hook.body
        )
        runtime.metrics.quarantined.labels("webhook").inc()
        items = []
    outcomes = await runtime.ingest(channel.slug, items)
    background.add_task(runtime.after_ingest, outcomes)  # route after the provider has its answer
    ack = channel.ack(hook)
    return Response(ack.body, status_code=ack.status, media_type=ack.content_type)


def inbox_channel(runtime: Runtime, slug: str, provider: str) -> Channel:
    channel = runtime.channels.get(slug)
    if channel is None or channel.provider != provider or not runtime.inboxes[slug].enabled:
        raise NotFound(f"no {provider} inbox {slug!r}")
    return channel


@router.post(
    "/fake/{inbox}", summary="The fake channel's signed JSON webhook (tests, demos, benchmarks)"
)
async def fake_webhook(
    inbox: str,
    request: Request,
    background: BackgroundTasks,
    runtime: Runtime = Depends(get_runtime),
) -> Response:
    return await handle(runtime, inbox_channel(runtime, inbox, "fake"), request, background)


@router.post(
    "/twilio/{inbox}/{kind}",
    summary="Twilio webhooks, signed with X-Twilio-Signature. SMS inboxes: sms, sms-status. "
    "Voice inboxes: voice, voice-status, voice-gather, hold, voicemail, participant-status, "
    "recording, transcription",
)
async def twilio_webhook(
    inbox: str,
    kind: str,
    request: Request,
    background: BackgroundTasks,
    runtime: Runtime = Depends(get_runtime),
) -> Response:
    channel = inbox_channel(runtime, inbox, "twilio")
    if kind not in channel.webhook_kinds:
        raise NotFound(f"no Twilio {channel.channel_id} webhook {kind!r}")
    if isinstance(channel, CallChannel) and kind in channel.call_kinds:
        hook = await verified(runtime, channel, request)
        if isinstance(hook, Response):
            return hook
        answer = await runtime.calls.webhook(channel, kind, hook)
        return Response(answer.body, status_code=answer.status, media_type=answer.content_type)
    return await handle(runtime, channel, request, background)


def _meta_app(runtime: Runtime, app: str) -> MetaApp:
    found = runtime.channels_config.meta_apps.get(app)
    if found is None:
        raise NotFound(f"no Meta app {app!r}")
    return found


@router.get("/meta/{app}", summary="Meta's subscription handshake (hub.mode, hub.verify_token)")
async def meta_handshake(
    app: str, request: Request, runtime: Runtime = Depends(get_runtime)
) -> Response:
    secrets = _meta_app(runtime, app)
    challenge = handshake(dict(request.query_params), secrets.verify_token.get_secret_value())
    if challenge is None:
        runtime.metrics.webhook_rejected.labels("meta", "handshake").inc()
        return Response("forbidden", status_code=403)
    return Response(challenge, media_type="text/plain")


@router.post(
    "/meta/{app}",
    summary="Messenger and WhatsApp webhooks of a Meta app, signed with X-Hub-Signature-256",
)
async def meta_webhook(
    app: str,
    request: Request,
    background: BackgroundTasks,
    runtime: Runtime = Depends(get_runtime),
) -> Response:
    """Verify the app's signature on the raw bytes, split the delivery into events, hand
    each inbox its own (by page id or phone number id), persist, answer 200, then route.
    Events no inbox claims are counted and dropped; what cannot be parsed is quarantined."""
    secret = _meta_app(runtime, app).app_secret.get_secret_value()
    hook = await checked(
        runtime,
        request,
        "meta",
        f"meta app {app}",
        lambda h: verify_signature(secret, h.body, h.headers.get("x-hub-signature-256")),
    )
    if isinstance(hook, Response):
        return hook
    try:
        units = entries(hook.body)
    except ValueError as exc:
        await runtime.db.write(quarantine, None, "webhook", f"meta app {app}: {exc}", hook.body)
        runtime.metrics.quarantined.labels("webhook").inc()
        return Response("", status_code=200)
    channels = [
        channel
        for slug, channel in runtime.channels.items()
        if isinstance(channel, MetaChannel)
        and channel.meta_config.app == app
        and runtime.inboxes[slug].enabled
    ]
    groups, unclaimed = route(units, channels)
    if unclaimed:
        runtime.metrics.webhook_rejected.labels("meta", "no_inbox").inc(len(unclaimed))
    outcomes = []
    for channel, its_units in groups.items():
        inbox = runtime.inboxes[channel.slug]
        try:
            items = await channel.parse_items_async(its_units)
        except Exception as exc:  # a parser bug must not lose the events: keep them raw
            log.exception("parsing Meta events for %s failed; quarantined", channel.slug)
            for unit in its_units:
                await runtime.db.write(
                    quarantine, inbox.id, "webhook", f"parse failed: {exc}", unit.raw()
                )
            continue
        outcomes.extend(await runtime.ingest(channel.slug, items))
    background.add_task(runtime.after_ingest, outcomes)
    return Response("", status_code=200)
