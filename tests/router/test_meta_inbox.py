"""Messenger and WhatsApp inboxes wired into the server, against the local fake Graph API:
the app's webhook verified on the raw bytes (403 and nothing stored otherwise), each event
handed to the inbox of its page or phone number, deduplicated by message id; replies out
through the Send API; the 24-hour windows enforced with a clear error, a template choice
on WhatsApp, and no automatic message outside the window."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from adapters.clock import FakeClock
from router.exceptions import Conflict
from router.messaging import agent_write
from router.models import Contact, Conversation, ConversationEvent, Message
from router.outbox import enqueue_message
from router.runtime import Runtime
from router.types import Actor, AgentPresence
from tests.fakes.meta import (
    PAGE_ID,
    PHONE_NUMBER_ID,
    PSID,
    WA_ID,
    FakeGraphServer,
    messenger_read,
    messenger_text,
    meta_json_bytes,
    sign_meta,
    wa_status,
    wa_text,
)
from tests.router.test_live import make_agent
from tests.router.test_pipeline import count, settle
from tests.support import client_for, make_settings, started_runtime

TOKEN = "EAAG-test-page-token"
SECRET = "app-secret-0123456789"
VERIFY = "verify-me-please"
RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"

Meta = tuple[Runtime, httpx.AsyncClient, FakeGraphServer, FakeClock]


@pytest.fixture
async def meta(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Meta]:
    approved = {"order_update": ["en_US"]}
    with FakeGraphServer(access_token=TOKEN, templates=approved) as server:
        common = {
            "provider": "meta",
            "app": "main",
            "access_token": TOKEN,
            "api_base_url": server.url,  # test-only: the local fake instead of Meta
        }
        channels = {
            "version": 1,
            "meta_apps": {"main": {"app_secret": SECRET, "verify_token": VERIFY}},
            "inboxes": {
                "fb": {"channel": "messenger", "page_id": PAGE_ID, **common},
                "wa": {
                    "channel": "whatsapp",
                    "phone_number_id": PHONE_NUMBER_ID,
                    "templates": [{"name": "order_update", "language": "en_US", "params": 1}],
                    **common,
                },
            },
        }
        settings = make_settings(
            tmp_path / "conf", db_url, rules=RULES, channels=json.dumps(channels)
        )
        async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
            yield runtime, client, server, clock


async def deliver(
    client: httpx.AsyncClient, payload: Any, secret: str = SECRET, tamper: bool = False
) -> httpx.Response:
    body = meta_json_bytes(payload)
    headers = {"content-type": "application/json", "x-hub-signature-256": sign_meta(secret, body)}
    if tamper:
        body = body.replace(b"hello", b"hellO")
    return await client.post("/webhooks/meta/main", content=body, headers=headers)


def ms(clock: FakeClock) -> int:
    return int(clock.now().timestamp() * 1000)


async def test_the_handshake_and_signed_events_reach_their_inbox_once(meta: Meta) -> None:
    runtime, client, _, clock = meta
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"}
    ok = await client.get("/webhooks/meta/main", params=query)
    assert (ok.status_code, ok.text) == (200, "1158201444")
    wrong = await client.get("/webhooks/meta/main", params={**query, "hub.verify_token": "no"})
    assert wrong.status_code == 403
    assert (await client.get("/webhooks/meta/other", params=query)).status_code == 404
    payload = messenger_text("hello there", timestamp=ms(clock))
    # wrong secret, one changed byte, no header: 403 and nothing stored
    assert (await deliver(client, payload, secret="not-the-secret")).status_code == 403
    assert (await deliver(client, payload, tamper=True)).status_code == 403
    unsigned = await client.post("/webhooks/meta/main", content=meta_json_bytes(payload))
    assert unsigned.status_code == 403
    assert await count(runtime, Message) == 0
    assert (await deliver(client, payload)).status_code == 200
    assert (await deliver(client, payload)).status_code == 200  # Meta's retry
    # a WhatsApp message to the number's inbox; a page nobody serves is counted and dropped
    assert (await deliver(client, wa_text("hello from WhatsApp"))).status_code == 200
    other_page = messenger_text("hello, stranger", page_id="999000000000001")
    assert (await deliver(client, other_page)).status_code == 200
    await settle(runtime)
    rows = await runtime.db.read(
        lambda c: c.execute(
            select(Message.text, Conversation.channel).join(
                Conversation, Conversation.id == Message.conversation_id
            )
        ).all()
    )
    assert sorted(map(tuple, rows)) == [
        ("hello from WhatsApp", "whatsapp"),
        ("hello there", "messenger"),
    ]
    rejected = runtime.metrics.webhook_rejected.labels("meta", "no_inbox")._value.get()
    assert rejected == 1


async def reply_setup(runtime: Runtime, channel: str) -> tuple[int, int]:
    cid = await runtime.db.read(
        lambda c: c.execute(
            select(Conversation.id).where(Conversation.channel == channel)
        ).scalar_one()
    )
    anna, _ = await make_agent(runtime, "anna", "", "messenger=2,whatsapp=2,total=4")
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Conversation)
            .where(Conversation.id == cid)
            .values(state="assigned", assigned_agent_id=anna)
        )
    )
    await runtime.assignment.set_status(anna, AgentPresence.AWAY, "test")
    return cid, anna


async def test_replies_go_out_and_whatsapp_status_moves_forward(meta: Meta) -> None:
    runtime, client, server, clock = meta
    await deliver(client, wa_text("where is my order?", timestamp=str(ms(clock) // 1000)))
    await settle(runtime)
    cid, anna = await reply_setup(runtime, "whatsapp")
    await runtime.db.write(agent_write, anna, cid, "It ships today")
    await runtime.outbox.process_due()
    (sent,) = await server.graph.wait_for_sent(1)
    assert sent["recipient"].lstrip("+") == WA_ID
    wamid = await runtime.db.read(
        lambda c: c.execute(
            select(Message.external_id).where(Message.direction == "out")
        ).scalar_one()
    )
    assert wamid
    await deliver(client, wa_status(wamid, "delivered"))
    await deliver(client, wa_status(wamid, "sent"))  # late and older: ignored
    status = await runtime.db.read(
        lambda c: c.execute(
            select(Message.delivery_status).where(Message.external_id == wamid)
        ).scalar_one()
    )
    assert status == "delivered"


async def test_the_windows_refuse_clearly_offer_templates_and_skip_automatic_messages(
    meta: Meta,
) -> None:
    runtime, client, server, clock = meta
    await deliver(client, wa_text("hello", timestamp=str(ms(clock) // 1000)))
    await deliver(client, messenger_text("hello", timestamp=ms(clock)))
    await settle(runtime)
    wa_cid, anna = await reply_setup(runtime, "whatsapp")
    fb_cid = await runtime.db.read(
        lambda c: c.execute(
            select(Conversation.id).where(Conversation.channel == "messenger")
        ).scalar_one()
    )
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Conversation)
            .where(Conversation.id == fb_cid)
            .values(state="assigned", assigned_agent_id=anna)
        )
    )
    clock.advance(timedelta(hours=25))
    # WhatsApp: only a template now, and the agent is told which
    with pytest.raises(Conflict) as refused:
        await runtime.db.write(agent_write, anna, wa_cid, "Any news?")
    assert "order_update" in str(refused.value)
    template = {"name": "order_update", "language": "en_US", "params": ["A-1001"]}
    await runtime.db.write(agent_write, anna, wa_cid, "Order update", template=template)
    await runtime.outbox.process_due()
    (sent,) = await server.graph.wait_for_sent(1)
    assert sent["json"]["type"] == "template"
    assert sent["json"]["template"]["name"] == "order_update"
    # Messenger without the HUMAN_AGENT tag: closed, said so
    with pytest.raises(Conflict, match="24 hours"):
        await runtime.db.write(agent_write, anna, fb_cid, "Still there?")
    # an automatic message is never sent outside the window, and the reason is recorded
    skipped = await runtime.db.write(
        lambda tx: enqueue_message(tx, fb_cid, "We are closed", author=Actor.SYSTEM, is_auto=True)
    )
    assert skipped is None
    kinds = await runtime.db.read(
        lambda c: (
            c.execute(
                select(ConversationEvent.data).where(
                    ConversationEvent.conversation_id == fb_cid,
                    ConversationEvent.kind == "auto_skipped",
                )
            )
            .scalars()
            .all()
        )
    )
    assert kinds and "window is closed" in kinds[0]["reason"]


async def test_a_messenger_read_watermark_marks_every_earlier_reply_read(meta: Meta) -> None:
    runtime, client, server, clock = meta
    await deliver(client, messenger_text("hello", timestamp=ms(clock)))
    await settle(runtime)
    cid, anna = await reply_setup(runtime, "messenger")
    for text in ("One moment", "Found it"):
        await runtime.db.write(agent_write, anna, cid, text)
    await runtime.outbox.process_due()
    await server.graph.wait_for_sent(2)
    clock.advance(timedelta(seconds=5))
    later = await runtime.db.write(agent_write, anna, cid, "Anything else?")
    await runtime.outbox.process_due()
    # read up to before the third reply: the first two are read, the third is not
    watermark = ms(clock) - 1000
    await deliver(client, messenger_read(watermark, timestamp=ms(clock)))
    rows = await runtime.db.read(
        lambda c: c.execute(
            select(Message.id, Message.delivery_status)
            .where(Message.direction == "out")
            .order_by(Message.id)
        ).all()
    )
    assert [r.delivery_status for r in rows] == ["read", "read", "sent"]
    assert rows[-1].id == later["message_id"]


async def test_a_messenger_sender_gets_their_profile_name_once(meta: Meta) -> None:
    runtime, client, server, clock = meta
    with server.graph.lock:
        server.graph.profiles[PSID] = {"first_name": "Ada", "last_name": "Lovelace"}
    await deliver(client, messenger_text("hello", timestamp=ms(clock)))
    await deliver(client, messenger_text("hello again", timestamp=ms(clock)))
    await settle(runtime)
    name = await runtime.db.read(lambda c: c.execute(select(Contact.name)).scalar_one())
    assert name == "Ada Lovelace"
    with server.graph.lock:
        lookups = [r for r in server.graph.requests if r.get("path", "").endswith(f"/{PSID}")]
    assert len(lookups) == 1
