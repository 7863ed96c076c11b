"""Forged webhooks must not block genuine ones: the bad-signature limiter counts only failed
checks, and a correctly signed Twilio or Meta request is taken whatever the address it
comes from has sent before (behind the compose proxy every provider shares one address)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import httpx
from sqlalchemy import select
from twilio.request_validator import RequestValidator

from router.models import Conversation, Message
from router.runtime import Runtime
from tests.channels.test_twilio_sms import sms_params
from tests.fakes.meta import PAGE_ID, FakeGraphServer, messenger_text, meta_json_bytes, sign_meta
from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilioServer
from tests.router.test_pipeline import settle
from tests.support import client_for, make_settings, started_runtime

RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"
META_SECRET = "app-secret-0123456789"


async def twilio_sms(
    runtime: Runtime, client: httpx.AsyncClient, params: dict[str, str], token: str
) -> httpx.Response:
    path = "/webhooks/twilio/tw/sms"
    url = runtime.settings.public_base_url + path
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-twilio-signature": RequestValidator(token).compute_signature(url, params),
    }
    return await client.post(path, content=urlencode(params).encode(), headers=headers)


async def meta_event(client: httpx.AsyncClient, text: str, secret: str) -> httpx.Response:
    body = meta_json_bytes(messenger_text(text))
    headers = {"content-type": "application/json", "x-hub-signature-256": sign_meta(secret, body)}
    return await client.post("/webhooks/meta/main", content=body, headers=headers)


async def test_forged_webhooks_never_block_correctly_signed_ones(
    tmp_path: Path, db_url: str
) -> None:
    with FakeTwilioServer() as twilio, FakeGraphServer(access_token="EAAG-token") as graph:
        channels = {
            "version": 1,
            "meta_apps": {"main": {"app_secret": META_SECRET, "verify_token": "verify-me-please"}},
            "inboxes": {
                "tw": {
                    "channel": "sms",
                    "provider": "twilio",
                    "account_sid": DEFAULT_ACCOUNT_SID,
                    "auth_token": DEFAULT_AUTH_TOKEN,
                    "from_number": "+15550000000",
                    "api_base_url": twilio.url,
                },
                "fb": {
                    "channel": "messenger",
                    "provider": "meta",
                    "app": "main",
                    "page_id": PAGE_ID,
                    "access_token": "EAAG-token",
                    "api_base_url": graph.url,
                },
            },
        }
        settings = make_settings(
            tmp_path / "conf", db_url, rules=RULES, channels=json.dumps(channels)
        )
        async with started_runtime(settings) as runtime, client_for(runtime) as client:
            # a burst of forgeries from one address, at both providers' endpoints
            forged = [
                (await twilio_sms(runtime, client, sms_params("forged"), "y" * 32)).status_code
                for _ in range(15)
            ] + [
                (await meta_event(client, "forged", "not-the-secret")).status_code
                for _ in range(15)
            ]
            assert forged[:20] == [403] * 20 and set(forged[20:]) == {429}
            # the genuine ones from the same address: taken and stored
            ok = await twilio_sms(runtime, client, sms_params("genuine sms"), DEFAULT_AUTH_TOKEN)
            assert ok.status_code == 200
            assert (await meta_event(client, "genuine messenger", META_SECRET)).status_code == 200
            # ... while forgeries from there still hear 429
            assert (await meta_event(client, "forged", "not-the-secret")).status_code == 429
            await settle(runtime)
            rows = await runtime.db.read(
                lambda c: c.execute(
                    select(Message.text, Conversation.channel).join(
                        Conversation, Conversation.id == Message.conversation_id
                    )
                ).all()
            )
    assert sorted(map(tuple, rows)) == [("genuine messenger", "messenger"), ("genuine sms", "sms")]
