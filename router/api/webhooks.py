"""Provider webhooks: verify the signature on the raw bytes before anything else (403 and
nothing stored otherwise), persist every item, answer, and only then route.

The routes come from the channel registry (``channels.CHANNELS``, ``channels.WEBHOOK_APPS``):
``POST /webhooks/{provider}/{inbox}``, ``POST /webhooks/{provider}/{inbox}/{kind}`` for a
provider whose channels declare ``webhook_kinds``, and ``GET``/``POST
/webhooks/{provider}/{app}`` for a provider whose one webhook serves several inboxes. A
call channel's call webhooks go to the call handling (``router/calls.py``). Nothing here
knows a vendor.

The URL a signature covers is the configured public base URL plus the path (never the Host
header, which a proxy may change), so signatures verify behind load balancers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from urllib.parse import parse_qsl

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from channels import CHANNELS, WEBHOOK_APPS
from channels.base import Channel, WebhookApp, WebhookRequest, WebhookResponse
from channels.calls import CallChannel
from router import policy
from router.api.deps import declare, get_runtime
from router.exceptions import NotFound
from router.pipeline import quarantine
from router.runtime import Runtime

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
    return _response(channel.ack(hook))


def _response(answer: WebhookResponse) -> Response:
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type)


def inbox_channel(runtime: Runtime, slug: str, provider: str) -> Channel:
    channel = runtime.channels.get(slug)
    if channel is None or channel.provider != provider or not runtime.inboxes[slug].enabled:
        raise NotFound(f"no {provider} inbox {slug!r}")
    return channel


async def handle_kind(
    runtime: Runtime,
    channel: Channel,
    kind: str,
    request: Request,
    background: BackgroundTasks,
) -> Response:
    """A webhook of one kind: a call channel's call webhook is answered by the call
    handling; the rest take the message path."""
    if kind not in channel.webhook_kinds:
        raise NotFound(f"no {channel.provider} {channel.channel_id} webhook {kind!r}")
    if isinstance(channel, CallChannel) and kind in channel.call_kinds:
        hook = await verified(runtime, channel, request)
        if isinstance(hook, Response):
            return hook
        return _response(await runtime.calls.webhook(channel, kind, hook))
    return await handle(runtime, channel, request, background)


def _app_settings(runtime: Runtime, provider: str, kind: type[WebhookApp], app: str) -> BaseModel:
    found = runtime.channels_config.apps.get(provider, {}).get(app)
    if found is None:
        raise NotFound(f"no {kind.title} app {app!r}")
    return found


async def app_handshake(
    runtime: Runtime, provider: str, kind: type[WebhookApp], app: str, request: Request
) -> Response:
    settings = _app_settings(runtime, provider, kind, app)
    challenge = kind.handshake(settings, dict(request.query_params))
    if challenge is None:
        runtime.metrics.webhook_rejected.labels(provider, "handshake").inc()
        return Response("forbidden", status_code=403)
    return Response(challenge, media_type="text/plain")


async def app_delivery(
    runtime: Runtime,
    provider: str,
    kind: type[WebhookApp],
    app: str,
    request: Request,
    background: BackgroundTasks,
) -> Response:
    """Verify the app's signature on the raw bytes, split the delivery into events, hand
    each inbox its own (for a Meta app: by page id or phone number id), persist, answer
    200, then route. Events no inbox claims are counted and dropped; what cannot be parsed
    is quarantined."""
    settings = _app_settings(runtime, provider, kind, app)
    hook = await checked(
        runtime, request, provider, f"{provider} app {app}", lambda h: kind.verify(settings, h)
    )
    if isinstance(hook, Response):
        return hook
    try:
        units = kind.split(hook.body)
    except ValueError as exc:
        await runtime.db.write(
            quarantine, None, "webhook", f"{provider} app {app}: {exc}", hook.body
        )
        runtime.metrics.quarantined.labels("webhook").inc()
        return Response("", status_code=200)
    channels = [
        channel
        for slug, channel in runtime.channels.items()
        if channel.provider == provider
        and getattr(channel.config, kind.inbox_key, None) == app
        and runtime.inboxes[slug].enabled
    ]
    groups, unclaimed = kind.route(units, channels)
    if unclaimed:
        runtime.metrics.webhook_rejected.labels(provider, "no_inbox").inc(len(unclaimed))
    outcomes = []
    for channel, its_units in groups.items():
        inbox = runtime.inboxes[channel.slug]
        try:
            items = await kind.parse(channel, its_units)
        except Exception as exc:  # a parser bug must not lose the events: keep them raw
            log.exception("parsing %s events for %s failed; quarantined", provider, channel.slug)
            for unit in its_units:
                await runtime.db.write(
                    quarantine, inbox.id, "webhook", f"parse failed: {exc}", unit.raw()
                )
            continue
        outcomes.extend(await runtime.ingest(channel.slug, items))
    background.add_task(runtime.after_ingest, outcomes)
    return Response("", status_code=200)


# -- the routes, one set per provider of the registry ------------------------------------
def _inbox_route(router: APIRouter, provider: str, summary: str) -> None:
    async def webhook(
        inbox: str,
        request: Request,
        background: BackgroundTasks,
        runtime: Runtime = Depends(get_runtime),
    ) -> Response:
        return await handle(runtime, inbox_channel(runtime, inbox, provider), request, background)

    router.add_api_route(
        f"/{provider}/{{inbox}}",
        webhook,
        methods=["POST"],
        summary=summary,
        name=f"{provider}_webhook",
    )


def _kind_route(router: APIRouter, provider: str, summary: str) -> None:
    async def webhook(
        inbox: str,
        kind: str,
        request: Request,
        background: BackgroundTasks,
        runtime: Runtime = Depends(get_runtime),
    ) -> Response:
        channel = inbox_channel(runtime, inbox, provider)
        return await handle_kind(runtime, channel, kind, request, background)

    router.add_api_route(
        f"/{provider}/{{inbox}}/{{kind}}",
        webhook,
        methods=["POST"],
        summary=summary,
        name=f"{provider}_webhook",
    )


def _app_routes(router: APIRouter, provider: str, kind: type[WebhookApp]) -> None:
    async def handshake(
        app: str, request: Request, runtime: Runtime = Depends(get_runtime)
    ) -> Response:
        return await app_handshake(runtime, provider, kind, app, request)

    async def delivery(
        app: str,
        request: Request,
        background: BackgroundTasks,
        runtime: Runtime = Depends(get_runtime),
    ) -> Response:
        return await app_delivery(runtime, provider, kind, app, request, background)

    path = f"/{provider}/{{app}}"
    router.add_api_route(
        path,
        handshake,
        methods=["GET"],
        summary=kind.handshake_summary,
        name=f"{provider}_handshake",
    )
    router.add_api_route(
        path, delivery, methods=["POST"], summary=kind.summary, name=f"{provider}_webhook"
    )


def _summary(classes: list[type[Channel]]) -> str:
    """What a provider's route says: its classes' summary, and the kinds per channel."""
    said = next((c.webhook_summary for c in classes if c.webhook_summary), "")
    kinds = [
        f"{channel_id} inboxes: {', '.join(sorted(cls.webhook_kinds))}"
        for cls in classes
        if cls.webhook_kinds
        for channel_id in cls.channel_ids
    ]
    return ". ".join([said, *kinds]) if kinds else said


def routes(
    channels: Mapping[str, Mapping[str, type[Channel]]] | None = None,
    apps: Mapping[str, type[WebhookApp]] | None = None,
) -> APIRouter:
    """The webhook routes of every provider of the registry (``channels.CHANNELS`` and
    ``channels.WEBHOOK_APPS`` unless given): a provider added there is served here."""
    router = APIRouter(
        prefix="/webhooks", tags=["webhooks"], dependencies=[declare(policy.WEBHOOK)]
    )
    apps = WEBHOOK_APPS if apps is None else apps
    for provider, classes in (CHANNELS if channels is None else channels).items():
        hooked = list(dict.fromkeys(c for c in classes.values() if c.webhook))
        if provider in apps:
            _app_routes(router, provider, apps[provider])
        elif any(c.webhook_kinds for c in hooked):
            _kind_route(router, provider, _summary(hooked))
        elif hooked:
            _inbox_route(router, provider, _summary(hooked))
    return router
