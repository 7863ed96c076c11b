"""A web-chat visitor proves who they are through real sockets: a site-signed customer id
(a forged one links nothing), or a one-time code sent by email or SMS (wrong codes counted,
rate limits); a proof links the visitor's contact to the owner, yet each visitor still sees
only their own chat."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.clock import FakeClock
from channels.fake import FakeChannel
from router.models import ContactIdentity, ContactLink
from router.runtime import Runtime
from tests.router.test_identity import contact_of, inbound
from tests.router.test_live import make_agent
from tests.support import (
    AGENT_RULES,
    CHANNELS,
    CommandError,
    client_for,
    connect_agent,
    connect_visitor,
    live_server,
    make_settings,
    started_runtime,
)

SITE_SECRET = "site-secret-for-signing-customer-ids"
CHAT_CHANNELS = (
    CHANNELS
    + f"""\
  web: {{channel: webchat, provider: omniroute, default_queue: general,
        allowed_origins: ["https://shop.example"], identity_secret: "{SITE_SECRET}",
        verify_email_inbox: mail, verify_sms_inbox: sms}}
"""
)
EMAIL, PHONE = "ann@example.com", "+4917012345678"


@pytest.fixture
async def chat(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[tuple[Runtime, str]]:
    settings = make_settings(
        tmp_path / "conf", db_url, channels=CHAT_CHANNELS, rules=AGENT_RULES, worker_interval=0.2
    )
    async with (
        started_runtime(settings, clock, workers=True) as runtime,
        live_server(runtime) as base,
    ):
        yield runtime, base


def signature(customer_id: str, secret: str = SITE_SECRET) -> str:
    return hmac.new(secret.encode(), customer_id.encode(), hashlib.sha256).hexdigest()


async def say(visitor: Any, text: str) -> None:
    client_id = str(uuid.uuid4())
    await visitor.send({"type": "message", "client_id": client_id, "text": text})
    await visitor.wait_for(lambda f: f["type"] == "ack" and f["client_id"] == client_id)


async def visitor_contact(runtime: Runtime, token: str) -> int:
    from channels.webchat import visitor_address

    return await contact_of(runtime, "webchat", visitor_address(token) or "")


def last_code(runtime: Runtime, inbox: str) -> str:
    channel = runtime.channels[inbox]
    assert isinstance(channel, FakeChannel) and channel.sent
    found = re.search(r"\b(\d{6})\b", channel.sent[-1].text)
    assert found, channel.sent[-1].text
    return found.group(1)


async def test_a_signed_identity_links_and_a_forged_one_links_nothing(
    chat: tuple[Runtime, str],
) -> None:
    runtime, base = chat
    first, hello = await connect_visitor(
        base, identity={"id": "cust-42", "signature": signature("cust-42")}
    )
    await say(first, "hello from my laptop")
    owner = await contact_of(runtime, "external", "web:cust-42")
    assert await visitor_contact(runtime, hello["token"]) == owner
    # the same customer on another device: one contact, but each chat shows only its own
    second, hello2 = await connect_visitor(
        base, identity={"id": "cust-42", "signature": signature("cust-42")}
    )
    assert hello2["history"] == []
    await say(second, "hello from my phone")
    assert await visitor_contact(runtime, hello2["token"]) == owner
    _, again = await connect_visitor(base, token=hello2["token"])
    assert [m["text"] for m in again["history"]] == ["hello from my phone"]
    # forged: another customer's id with a wrong signature, or a signature of another id
    for claim in (
        {"id": "cust-42", "signature": signature("cust-42", "guessed-secret")},
        {"id": "cust-42", "signature": signature("cust-43")},
        {"id": "cust-42"},
        "cust-42",
    ):
        forger, hello3 = await connect_visitor(base, identity=claim)
        rejected = await forger.wait_for(lambda f: f["type"] == "error")
        assert rejected["code"] == "identity_rejected"
        await say(forger, "show me cust-42's orders")
        assert hello3["history"] == []
        assert await visitor_contact(runtime, hello3["token"]) != owner
        await forger.close()
    links = await runtime.db.read(
        lambda c: [
            (r.action, r.actor) for r in c.execute(select(ContactLink).order_by(ContactLink.id))
        ]
    )
    assert links == [("link", "visitor"), ("merge", "visitor")]


async def test_codes_by_email_and_sms_prove_the_visitor(chat: tuple[Runtime, str]) -> None:
    runtime, base = chat
    async with client_for(runtime) as client:
        await inbound(client, "mail", "m1", EMAIL, "my order #1 is late")
        await inbound(client, "sms", "s1", PHONE, "any news on order #1?")
    mail_contact = await contact_of(runtime, "email", EMAIL)
    phone_contact = await contact_of(runtime, "phone", PHONE)
    visitor, hello = await connect_visitor(base)
    await say(visitor, "hi, it's Ann")
    # a code never entered proves nothing; a wrong code is counted
    await visitor.send({"type": "verify_start", "kind": "email", "address": " Ann@Example.com "})
    sent = await visitor.wait_for(lambda f: f["type"] in ("verify_sent", "error"))
    assert sent == {"type": "verify_sent", "kind": "email", "address": EMAIL, "expires_in": 600}
    code = last_code(runtime, "mail")
    assert runtime.channels["mail"].sent[-1].recipient.address == EMAIL  # type: ignore[attr-defined]
    wrong = "000000" if code != "000000" else "111111"
    await visitor.send({"type": "verify_code", "code": wrong})
    refused = await visitor.wait_for(lambda f: f["type"] in ("verified", "error"))
    assert refused["code"] == "wrong_code" and "4 attempts left" in refused["message"]
    assert await visitor_contact(runtime, hello["token"]) not in (mail_contact, phone_contact)
    await visitor.send({"type": "verify_code", "code": code})
    verified = await visitor.wait_for(lambda f: f["type"] in ("verified", "error"))
    assert verified == {"type": "verified", "kind": "email", "address": EMAIL}
    assert await visitor_contact(runtime, hello["token"]) == mail_contact
    # the code is spent
    await visitor.send({"type": "verify_code", "code": code})
    spent = await visitor.wait_for(lambda f: f["type"] in ("verified", "error"))
    assert spent["code"] == "wrong_code" and "no code is pending" in spent["message"]
    # the phone, by SMS: the two contacts become one
    await visitor.send({"type": "verify_start", "kind": "phone", "address": "+49 170 1234 5678"})
    await visitor.wait_for(lambda f: f["type"] == "verify_sent")
    await visitor.send({"type": "verify_code", "code": last_code(runtime, "sms")})
    assert (await visitor.wait_for(lambda f: f["type"] in ("verified", "error")))[
        "type"
    ] == "verified"
    survivor = await visitor_contact(runtime, hello["token"])
    assert survivor in (mail_contact, phone_contact)
    assert (
        await contact_of(runtime, "email", EMAIL)
        == await contact_of(runtime, "phone", PHONE)
        == survivor
    )
    # the visitor still sees only the chat, never the linked mail and SMS
    _, back = await connect_visitor(base, token=hello["token"])
    assert [m["text"] for m in back["history"]] == ["hi, it's Ann"]
    # one more code is the visitor's third this hour: allowed; the fourth is not
    await visitor.send({"type": "verify_start", "kind": "email", "address": "x@example.org"})
    assert (await visitor.wait_for(lambda f: f["type"] in ("verify_sent", "error")))[
        "type"
    ] == "verify_sent"
    await visitor.send({"type": "verify_start", "kind": "email", "address": "y@example.org"})
    limited = await visitor.wait_for(lambda f: f["type"] in ("verify_sent", "error"))
    assert limited["code"] == "rate_limited"
    for bad in ({"kind": "email", "address": "not an address"}, {"kind": "fax", "address": "1"}):
        await visitor.send({"type": "verify_start", **bad})
        assert (await visitor.wait_for(lambda f: f["type"] == "error"))["code"] == "invalid"


async def test_a_stranger_asking_for_codes_links_nothing(chat: tuple[Runtime, str]) -> None:
    runtime, base = chat
    async with client_for(runtime) as client:
        await inbound(client, "mail", "m1", EMAIL, "my order")
    owner = await contact_of(runtime, "email", EMAIL)
    stranger, hello = await connect_visitor(base)
    await stranger.send({"type": "verify_start", "kind": "email", "address": EMAIL})
    await stranger.wait_for(lambda f: f["type"] == "verify_sent")
    for guess in ("123456", "654321", "111111", "222222", "333333", "444444"):
        await stranger.send({"type": "verify_code", "code": guess})
        await stranger.wait_for(lambda f: f["type"] in ("verified", "error"))
    await stranger.send({"type": "verify_code", "code": last_code(runtime, "mail")})
    late = await stranger.wait_for(lambda f: f["type"] in ("verified", "error"))
    assert late["type"] == "error"  # five wrong guesses spend the code, even the right one
    assert await visitor_contact(runtime, hello["token"]) != owner
    owners = await runtime.db.read(
        lambda c: c.execute(
            select(ContactIdentity.contact_id).where(ContactIdentity.address == EMAIL)
        ).all()
    )
    assert [o.contact_id for o in owners] == [owner]


async def test_an_agent_merges_a_suggested_match_over_the_websocket(
    chat: tuple[Runtime, str],
) -> None:
    runtime, base = chat
    async with client_for(runtime) as client:
        await inbound(client, "mail", "m1", EMAIL, "by mail", name="Ann Smith")
        await inbound(client, "sms", "s1", PHONE, "by text", name="Ann Smith")
        await inbound(client, "sms", "s2", "+4917000000001", "someone else", name="Carl")
    mail_contact = await contact_of(runtime, "email", EMAIL)
    phone_contact = await contact_of(runtime, "phone", PHONE)
    carl = await contact_of(runtime, "phone", "+4917000000001")
    _, token = await make_agent(runtime, "alex")
    agent, _ = await connect_agent(base, token)
    with pytest.raises(CommandError) as refused:
        await agent.command("merge_contacts", contact_id=mail_contact, from_contact_id=carl)
    assert refused.value.code == "forbidden"
    merged = await agent.command(
        "merge_contacts", contact_id=mail_contact, from_contact_id=phone_contact, reason="same name"
    )
    assert merged["merged_contact_id"] == phone_contact and merged["contact_id"] == mail_contact
    assert await contact_of(runtime, "phone", PHONE) == mail_contact
    with pytest.raises(CommandError) as bad:
        await agent.command("merge_contacts", contact_id=mail_contact)
    assert bad.value.code == "invalid"
