"""The REST side of writing a reply: canned responses rendered for the conversation, the
identities and inboxes a reply can go to, tags, and attachments served as downloads."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from channels.fake import FakeChannel
from router.auth import create_user
from router.db import Tx
from router.models import Conversation, Message
from router.runtime import Runtime
from tests.router.test_identity import auth, contact_of, inbound
from tests.router.test_live import make_agent
from tests.router.test_pipeline import settle
from tests.support import (
    CHANNELS,
    WEB_CHANNELS,
    CommandError,
    client_for,
    connect_agent,
    connect_visitor,
    fake_message,
    live_server,
    make_settings,
    post_fake,
    started_runtime,
)

RULES = """\
version: 1
queues:
  general: {}
templates:
  welcome: "Hi {contact.name|there}, thanks for writing to us."
  refund: "Your refund is on its way."
default: {queue: general}
"""


@pytest.fixture
async def api(
    tmp_path: Path, db_url: str
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, dict[str, str]]]:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        tokens: dict[str, str] = {}
        _, tokens["anna"] = await make_agent(runtime, "anna", capacity="sms=3,email=3,total=5")
        _, tokens["ben"] = await make_agent(runtime, "ben", capacity="sms=3,email=3,total=5")
        tokens["supervisor"] = await runtime.db.write(
            lambda tx: create_user(tx, "sue", "supervisor")[1]
        )
        yield runtime, client, tokens


async def conversation_of(runtime: Runtime, external_id: str) -> int:
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(Message.conversation_id).where(Message.external_id == external_id)
            ).scalar_one()
        )
    )


async def assign(runtime: Runtime, conversation_id: int, agent: str) -> None:
    from router.agents import agent_by_name

    agent_id = await runtime.db.read(agent_by_name, agent)

    def write(tx: Tx) -> None:
        tx.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(state="assigned", assigned_agent_id=agent_id)
        )

    await runtime.db.write(write)


async def test_canned_responses_are_rendered_and_searched(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", "+4917012345678", "hello", name="Vera", runtime=runtime)
    cid = await conversation_of(runtime, "s1")
    every = (
        await client.get(f"/api/conversations/{cid}/canned", headers=auth(tokens["anna"]))
    ).json()
    assert every == [
        {"name": "refund", "text": "Your refund is on its way."},
        {"name": "welcome", "text": "Hi Vera, thanks for writing to us."},
    ]
    found = await client.get(
        f"/api/conversations/{cid}/canned?q=THANKS", headers=auth(tokens["anna"])
    )
    assert [c["name"] for c in found.json()] == ["welcome"]
    missing = await client.get("/api/conversations/999/canned", headers=auth(tokens["anna"]))
    assert missing.status_code == 404


async def test_reply_options_list_what_a_reply_can_reach(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", "+4917012345678", "text", runtime=runtime)
    await inbound(client, "mail", "m1", "ann@example.com", "mail", verified=False, runtime=runtime)
    phone = await contact_of(runtime, "phone", "+4917012345678")
    claim = await contact_of(runtime, "email", "ann@example.com", verified=False)
    merged = await client.post(
        f"/api/contacts/{phone}/merge",
        json={"from_contact": claim},
        headers=auth(tokens["supervisor"]),
    )
    assert merged.status_code == 200
    cid = await conversation_of(runtime, "s1")
    options = (
        await client.get(f"/api/conversations/{cid}/reply-options", headers=auth(tokens["anna"]))
    ).json()
    by_kind: dict[str, Any] = {o["kind"]: o for o in options["identities"]}
    assert options["default_identity_id"] == by_kind["phone"]["identity_id"]
    assert by_kind["phone"]["allowed"] and by_kind["phone"]["verified"]
    assert [(i["inbox"], i["default"], i["window"]) for i in by_kind["phone"]["inboxes"]] == [
        ("sms", True, "open")
    ]
    # an unverified claim that did not write here is listed, but not allowed
    assert not by_kind["email"]["allowed"]
    assert [i["inbox"] for i in by_kind["email"]["inboxes"]] == ["mail"]


async def test_tags_are_set_by_the_assigned_agent(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", "+4917012345678", "hello", runtime=runtime)
    cid = await conversation_of(runtime, "s1")
    await assign(runtime, cid, "anna")
    path = f"/api/conversations/{cid}/tags"
    done = await client.put(
        path, json={"tags": ["vip", " refund ", "vip"]}, headers=auth(tokens["anna"])
    )
    assert done.json() == {"tags": ["vip", "refund"]}
    other = await client.put(path, json={"tags": ["x"]}, headers=auth(tokens["ben"]))
    assert other.status_code == 409
    bad = await client.put(path, json={"tags": ["<script>"]}, headers=auth(tokens["anna"]))
    assert bad.status_code == 422 and "invalid tag" in bad.text
    boss = await client.put(path, json={"tags": []}, headers=auth(tokens["supervisor"]))
    assert boss.json() == {"tags": []}


async def test_attachments_download_as_files(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", "+4917012345678", "see attached", runtime=runtime)
    assert runtime.blobs is not None
    key = await runtime.blobs.put(b"<html><script>alert(1)</script></html>", "text/html", "x.html")

    def attach(tx: Tx) -> None:
        tx.execute(
            update(Message)
            .where(Message.external_id == "s1")
            .values(
                attachments=[
                    {"filename": '../evil".html', "content_type": "text/html", "blob_key": key},
                    {"filename": "gone.pdf", "content_type": "application/pdf"},
                ]
            )
        )

    await runtime.db.write(attach)
    message_id = await runtime.db.read(
        lambda c: c.execute(select(Message.id).where(Message.external_id == "s1")).scalar_one()
    )
    got = await client.get(
        f"/api/messages/{message_id}/attachments/0", headers=auth(tokens["anna"])
    )
    assert got.status_code == 200 and got.content.startswith(b"<html>")
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"] == 'attachment; filename="..evil.html"'
    assert "sandbox" in got.headers["content-security-policy"]
    kept_no_file = await client.get(
        f"/api/messages/{message_id}/attachments/1", headers=auth(tokens["anna"])
    )
    assert kept_no_file.status_code == 404
    assert (await client.get(f"/api/messages/{message_id}/attachments/0")).status_code == 401


async def test_a_reply_carries_uploaded_files_where_the_channel_can(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    mail = await post_fake(
        client, "mail", fake_message("m1", "ann@example.com", "send me the invoice", kind="email")
    )
    assert mail.status_code == 200
    await settle(runtime)
    cid = await conversation_of(runtime, "m1")
    await assign(runtime, cid, "anna")
    uploaded = await client.post(
        "/api/uploads",
        files={"file": ("invoice 42.pdf", b"%PDF-1.4 fake", "application/pdf")},
        headers=auth(tokens["anna"]),
    )
    assert uploaded.status_code == 200, uploaded.text
    item = uploaded.json()
    assert (item["filename"], item["size"], item["content_type"]) == (
        "invoice 42.pdf",
        13,
        "application/pdf",
    )
    sent = await client.post(
        f"/api/conversations/{cid}/messages",
        json={"text": "Here it is.", "attachments": [item]},
        headers=auth(tokens["anna"]),
    )
    assert sent.status_code == 200, sent.text
    await runtime.outbox.process_due()
    channel = runtime.channels["mail"]
    assert isinstance(channel, FakeChannel)
    (out,) = [m for m in channel.sent if m.text == "Here it is."]
    assert [(a.filename, a.blob_key) for a in out.attachments] == [
        ("invoice 42.pdf", item["blob_key"])
    ]
    assert await runtime.blobs.get(item["blob_key"]) == b"%PDF-1.4 fake"  # type: ignore[union-attr]
    forged = await client.post(
        f"/api/conversations/{cid}/messages",
        json={"text": "x", "attachments": [{"blob_key": "../../etc/passwd"}]},
        headers=auth(tokens["anna"]),
    )
    assert forged.status_code == 422 and "blob_key" in forged.text
    empty = await client.post(
        "/api/uploads", files={"file": ("e.txt", b"", "text/plain")}, headers=auth(tokens["anna"])
    )
    assert empty.status_code == 422


async def test_a_channel_without_attachments_refuses_them_clearly(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=WEB_CHANNELS)
    async with started_runtime(settings) as runtime, live_server(runtime) as base:
        _, token = await make_agent(runtime, "anna", capacity="webchat=3,total=3")
        visitor, _ = await connect_visitor(base)
        await visitor.send({"type": "message", "client_id": str(uuid.uuid4()), "text": "hi"})
        await visitor.wait_for(lambda f: f["type"] == "ack")
        agent, _ = await connect_agent(base, token)
        offer = await agent.wait_for(lambda f: f.get("type") == "offer")
        accepted = await agent.command("accept", offer_id=offer["offer_id"])
        key = await runtime.blobs.put(b"data", "text/plain", "a.txt")  # type: ignore[union-attr]
        with pytest.raises(CommandError, match="the webchat channel cannot send attachments"):
            await agent.command(
                "reply",
                conversation_id=accepted["conversation_id"],
                text="see attached",
                attachments=[{"blob_key": key, "filename": "a.txt"}],
            )
