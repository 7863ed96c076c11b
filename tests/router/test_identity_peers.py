"""One customer across email, SMS and web chat, end to end with real peers: the mail comes
from Dovecot over IMAP carrying our MX's DMARC pass, the SMS is a signed Twilio webhook, the
visitor proves the email with the code that reaches the SMTP sink and the phone with the
code that reaches the fake Twilio API. Everything ends on one contact with one ordered
timeline, and the agent who accepts the chat receives the earlier messages. A mail without
a trusted pass and a visitor without the codes link nothing."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from channels.email import EmailChannel
from channels.webchat import visitor_address
from router.models import Message
from router.runtime import Runtime
from tests import peers
from tests.channels.test_email import conversation_of, eventually, mail
from tests.channels.test_twilio_sms import CUSTOMER, sms_params
from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilioServer
from tests.router.test_identity import contact_of
from tests.router.test_live import make_agent
from tests.router.test_twilio_inbox import OUR_NUMBER, post
from tests.support import client_for, connect_agent, connect_visitor, live_server, make_settings

USER, PASSWORD = "support@example.com", "secret"
RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"
TRUSTED = "mx.example.com"


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Dovecot]:
    server = peers.need(
        lambda: peers.Dovecot.start(tmp_path_factory.mktemp("dovecot"), {USER: PASSWORD})
    )
    with server:
        yield server


def channels(dovecot: peers.Dovecot, sink: peers.SmtpSink, twilio: FakeTwilioServer) -> str:
    inboxes = {
        "support": {
            "channel": "email",
            "provider": "imap",
            "address": USER,
            "allow_plaintext": True,
            "full_poll": "1h",
            "trusted_authserv_ids": [TRUSTED],
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.port,
                "security": "plain",
                "user": USER,
                "password": PASSWORD,
            },
            "smtp": {"host": "127.0.0.1", "port": sink.port, "security": "plain", "auth": "none"},
        },
        "tw": {
            "channel": "sms",
            "provider": "twilio",
            "account_sid": DEFAULT_ACCOUNT_SID,
            "auth_token": DEFAULT_AUTH_TOKEN,
            "from_number": OUR_NUMBER,
            "api_base_url": twilio.url,
        },
        "web": {
            "channel": "webchat",
            "provider": "omniroute",
            "allowed_origins": ["https://shop.example"],
            "verify_email_inbox": "support",
            "verify_sms_inbox": "tw",
        },
    }
    return json.dumps({"version": 1, "inboxes": inboxes})


@pytest.fixture
async def world(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot
) -> AsyncIterator[tuple[Runtime, str, peers.SmtpSink, FakeTwilioServer]]:
    with peers.SmtpSink() as sink, FakeTwilioServer() as twilio:
        settings = make_settings(
            tmp_path / "conf",
            db_url,
            rules=RULES,
            channels=channels(dovecot, sink, twilio),
            worker_interval=0.2,
            outbox_interval=0.1,
        )
        runtime = Runtime(settings)
        await runtime.start(workers=True)
        try:
            channel = runtime.channels["support"]
            assert isinstance(channel, EmailChannel)
            await asyncio.wait_for(channel.connected.wait(), 10)
            async with live_server(runtime) as base:
                yield runtime, base, sink, twilio
        finally:
            await runtime.stop()


def code_in(text: str) -> str:
    found = re.search(r"verification code is (\d{6})", text)
    assert found, text
    return found.group(1)


def mailed_code(sink: peers.SmtpSink, to: str) -> str:
    raw = next(m.raw for m in reversed(sink.messages) if to in m.rcpt_tos)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_body(("plain",))
    assert body is not None
    return code_in(body.get_content())


async def prove(visitor: Any, kind: str, address: str, code: Any) -> dict[str, Any]:
    await visitor.send({"type": "verify_start", "kind": kind, "address": address})
    sent = await visitor.wait_for(lambda f: f["type"] in ("verify_sent", "error"), timeout=20)
    assert sent["type"] == "verify_sent", sent
    await visitor.send({"type": "verify_code", "code": await code()})
    return await visitor.wait_for(lambda f: f["type"] in ("verified", "error"))


async def test_email_sms_and_chat_become_one_customer(
    world: tuple[Runtime, str, peers.SmtpSink, FakeTwilioServer], dovecot: peers.Dovecot
) -> None:
    runtime, base, sink, twilio = world
    _, token = await make_agent(runtime, "anna", capacity="webchat=2,total=2")
    # Monday: an email our MX authenticated (DMARC pass)
    passed = f"Authentication-Results: {TRUSTED}; dkim=pass header.d=example.com; dmarc=pass header.from=example.com\r\n"
    await dovecot.append(
        USER,
        PASSWORD,
        mail("ann@example.com", "Order 1", "<o1@example.com>", "Where is order 1?", passed),
    )
    # and one whose pass comes from a server we do not trust: a claim, kept apart
    forged = "Authentication-Results: mx.attacker.example; dmarc=pass header.from=example.com\r\n"
    await dovecot.append(
        USER, PASSWORD, mail("bob@example.com", "Order 2", "<o2@example.com>", "I am Bob", forged)
    )
    await eventually(lambda: conversation_of(runtime, "<o2@example.com>"), timeout=20)
    ann = await contact_of(runtime, "email", "ann@example.com")
    await contact_of(runtime, "email", "bob@example.com", verified=False)
    # Tuesday: a text from her phone (a signed Twilio webhook)
    async with client_for(runtime) as client:
        response = await post(runtime, client, "sms", sms_params("Any news on order 1?"))
        assert response.status_code == 200, response.text
    phone = await contact_of(runtime, "phone", CUSTOMER)
    assert phone != ann  # nothing links an email and a number by itself
    # Today: the web chat. She proves the email and the phone with the codes that arrive.
    agent, _ = await connect_agent(base, token)
    visitor, hello = await connect_visitor(base)
    await visitor.send({"type": "message", "client_id": str(uuid.uuid4()), "text": "Hi, it's Ann"})
    offer = await agent.wait_for(lambda f: f.get("type") == "offer", timeout=20)

    async def by_mail() -> str:
        await eventually(
            lambda: _async(any("ann@example.com" in m.rcpt_tos for m in sink.messages))
        )
        return mailed_code(sink, "ann@example.com")

    async def by_sms() -> str:
        await eventually(lambda: _async(any(m["to"] == CUSTOMER for m in twilio.fake.messages)))
        return code_in(
            next(m["body"] for m in reversed(twilio.fake.messages) if m["to"] == CUSTOMER)
        )

    assert (await prove(visitor, "email", "ann@example.com", by_mail))["type"] == "verified"
    assert (await prove(visitor, "phone", CUSTOMER, by_sms))["type"] == "verified"
    me = await contact_of(runtime, "webchat", visitor_address(hello["token"]) or "")
    assert (
        me
        == await contact_of(runtime, "email", "ann@example.com")
        == await contact_of(runtime, "phone", CUSTOMER)
    )
    # one ordered timeline, and the agent who accepts the chat receives all of it
    accepted = await agent.command("accept", offer_id=offer["offer_id"])
    texts = [m["text"].strip() for m in accepted["timeline"]["messages"] if m["direction"] == "in"]
    assert texts == ["Where is order 1?", "Any news on order 1?", "Hi, it's Ann"]
    channels_seen = [
        m["channel"] for m in accepted["timeline"]["messages"] if m["direction"] == "in"
    ]
    assert channels_seen == ["email", "sms", "webchat"]
    # the visitor sees only the chat; Bob's unverified mail is still nobody's
    _, back = await connect_visitor(base, token=hello["token"])
    assert [m["text"] for m in back["history"] if m["direction"] == "in"] == ["Hi, it's Ann"]
    bob = await contact_of(runtime, "email", "bob@example.com", verified=False)
    assert bob != me
    # a second visitor who asks for Ann's code but never has it: nothing linked or revealed
    stranger, hello2 = await connect_visitor(base)
    await stranger.send({"type": "verify_start", "kind": "email", "address": "ann@example.com"})
    await stranger.wait_for(lambda f: f["type"] == "verify_sent", timeout=20)
    await stranger.send({"type": "verify_code", "code": "000000"})
    await stranger.wait_for(lambda f: f["type"] == "error")
    assert await contact_of(runtime, "webchat", visitor_address(hello2["token"]) or "") != me
    assert hello2["history"] == []
    rows = await runtime.db.read(
        lambda c: c.execute(select(Message.text).where(Message.direction == "in")).scalars().all()
    )
    assert len(rows) == 4  # two mails, the SMS, the chat: nothing lost or doubled


async def _async(value: Any) -> Any:
    return value
