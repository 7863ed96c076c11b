"""A Twilio SMS inbox wired into the server: signed webhooks in (403 and nothing stored when
the signature is wrong), replies out through the local fake Twilio REST API, delivery status
forward only, STOP honoured for agents' replies and automatic messages alike."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from sqlalchemy import select
from twilio.request_validator import RequestValidator

from adapters.clock import FakeClock
from router.exceptions import Conflict
from router.messaging import agent_write
from router.models import ContactIdentity, Conversation, Message, Offer, Outbox, Quarantine
from router.runtime import Runtime
from router.settings import Settings
from router.types import AgentPresence
from tests.channels.test_twilio_sms import sms_params, status_params
from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilio, FakeTwilioServer
from tests.router.test_api import admin_token
from tests.router.test_live import make_agent
from tests.router.test_pipeline import count, rows, settle
from tests.support import client_for, make_settings, started_runtime

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"
OUR_NUMBER = "+15550000000"


def twilio_settings(
    tmp_path: Path,
    db_url: str,
    server: FakeTwilioServer,
    extra: dict[str, Any] | None = None,
    **settings: Any,
) -> Settings:
    inbox = {
        "channel": "sms",
        "provider": "twilio",
        "account_sid": DEFAULT_ACCOUNT_SID,
        "auth_token": DEFAULT_AUTH_TOKEN,
        "from_number": OUR_NUMBER,
        "api_base_url": server.url,  # test-only: the local fake instead of api.twilio.com
        **(extra or {}),
    }
    channels = json.dumps({"version": 1, "inboxes": {"tw": inbox}})
    return make_settings(tmp_path / "conf", db_url, rules=RULES, channels=channels, **settings)


@pytest.fixture
async def twilio(
    tmp_path: Path, db_url: str
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, FakeTwilioServer]]:
    with FakeTwilioServer() as server:
        settings = twilio_settings(tmp_path, db_url, server, outbox_interval=0.1)
        async with (
            started_runtime(settings, workers=True) as runtime,
            client_for(runtime) as client,
        ):
            yield runtime, client, server


async def post(
    runtime: Runtime, client: httpx.AsyncClient, kind: str, params: dict[str, str], **kw: Any
) -> httpx.Response:
    path = f"/webhooks/twilio/tw/{kind}" + (f"?{kw['query']}" if kw.get("query") else "")
    url = runtime.settings.public_base_url.rstrip("/") + path
    token = kw.get("token", DEFAULT_AUTH_TOKEN)
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-twilio-signature": RequestValidator(token).compute_signature(url, params),
    }
    return await client.post(path, content=urlencode(params).encode(), headers=headers)


async def test_signed_sms_in_reply_out_status_and_stop(
    twilio: tuple[Runtime, httpx.AsyncClient, FakeTwilioServer],
) -> None:
    runtime, client, server = twilio
    # a wrong signature: 403, nothing stored
    bad = await post(runtime, client, "sms", sms_params("hi", From="+14155550100"), token="x" * 32)
    assert bad.status_code == 403 and await count(runtime, Message) == 0
    ok = await post(runtime, client, "sms", sms_params("hi", From="+14155550100"))
    assert ok.status_code == 200 and b"<Response" in ok.content
    replay = await post(runtime, client, "sms", sms_params("hi", From="+14155550100"))
    assert replay.status_code == 200
    await settle(runtime)
    assert await count(runtime, Message) == 1  # the replay was deduplicated by MessageSid
    cid = await runtime.db.read(lambda c: c.execute(select(Conversation.id)).scalar_one())
    anna, _ = await make_agent(runtime, "anna", "", "sms=2,total=2")
    await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
    offer = await runtime.db.read(lambda c: c.execute(select(Offer.id)).scalar_one())
    await runtime.assignment.accept(anna, offer)
    mid = (await runtime.db.write(agent_write, anna, cid, "Hello from Anna"))["message_id"]
    runtime.outbox.wake()

    async def sent() -> Any:
        rows = await runtime.db.read(
            lambda c: c.execute(
                select(Message.external_id, Message.delivery_status).where(
                    Message.direction == "out"
                )
            ).all()
        )
        return rows if rows and rows[0].external_id else None

    for _ in range(100):
        rows = await sent()
        if rows:
            break
        await asyncio.sleep(0.1)
    ((sid, status),) = rows
    form = server.fake.messages[0]["form"]
    assert (form["To"], form["From"], form["Body"]) == (
        "+14155550100",
        OUR_NUMBER,
        "Hello from Anna",
    )
    assert form["StatusCallback"].endswith(f"/webhooks/twilio/tw/sms-status?message={mid}")
    # delivery status moves forward only
    for reported in ("delivered", "sent"):
        response = await post(
            runtime, client, "sms-status", status_params(reported, MessageSid=sid)
        )
        assert response.status_code == 200
    status = await runtime.db.read(
        lambda c: c.execute(
            select(Message.delivery_status).where(Message.external_id == sid)
        ).scalar_one()
    )
    assert status == "delivered"
    # STOP: the identity is opted out; an agent's reply is refused with the reason
    await post(
        runtime, client, "sms", sms_params("STOP", From="+14155550100", MessageSid="SM" + "b" * 32)
    )
    await settle(runtime)
    data = await runtime.db.read(lambda c: c.execute(select(ContactIdentity.data)).scalar_one())
    assert "opted_out_at" in data
    with pytest.raises(Conflict, match="opted out"):
        await runtime.db.write(agent_write, anna, cid, "Are you still there?")
    # START opts back in
    await post(
        runtime, client, "sms", sms_params("START", From="+14155550100", MessageSid="SM" + "c" * 32)
    )
    await settle(runtime)
    await runtime.db.write(agent_write, anna, cid, "Welcome back")


async def test_a_signed_sms_without_message_sid_is_quarantined_and_answered(
    twilio: tuple[Runtime, httpx.AsyncClient, FakeTwilioServer],
) -> None:
    runtime, client, _ = twilio
    drop = ("MessageSid", "SmsMessageSid", "SmsSid")
    params = {k: v for k, v in sms_params("lost?", From="+14155550100").items() if k not in drop}
    response = await post(runtime, client, "sms", params)
    assert response.status_code == 200 and b"<Response" in response.content
    await settle(runtime)
    assert await count(runtime, Message) == 0
    (item,) = await rows(runtime, Quarantine)
    assert "MessageSid" in item.reason and item.inbox_id == runtime.inboxes["tw"].id
    raw = dict(parse_qsl(item.raw.decode(), keep_blank_values=True))
    assert raw == params  # the raw form, for an admin


async def test_duplicate_deliveries_of_an_mms_fetch_its_media_once(
    tmp_path: Path, db_url: str
) -> None:
    with FakeTwilioServer() as server:
        fake = server.fake
        media = {f"ME{digit * 32}": PNG + digit.encode() for digit in "12"}
        for sid, data in media.items():
            fake.add_recording(sid, data, "image/png")
        base = f"{server.url}/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Recordings"
        extra = {"media_hosts": ["127.0.0.1"], "allow_insecure_media_for_tests": True}
        settings = twilio_settings(tmp_path, db_url, server, extra)
        params = sms_params("photos", From="+14155550100", NumMedia="2")
        for index, sid in enumerate(media):
            params |= {f"MediaUrl{index}": f"{base}/{sid}", f"MediaContentType{index}": "image/png"}
        async with started_runtime(settings) as runtime, client_for(runtime) as client:
            for _ in range(20):  # Twilio's retries of one delivery
                assert (await post(runtime, client, "sms", params)).status_code == 200
            await settle(runtime)
            (message,) = await rows(runtime, Message)
        assert [a["size"] for a in message.attachments] == [len(d) for d in media.values()]
        for sid in media:
            fetches = [r for r in fake.requests if r.path.endswith(f"/Recordings/{sid}")]
            assert len(fetches) == 1, sid


async def test_a_source_sending_bad_signatures_is_rate_limited(
    twilio: tuple[Runtime, httpx.AsyncClient, FakeTwilioServer],
) -> None:
    runtime, client, _ = twilio
    statuses = [
        (await post(runtime, client, "sms", sms_params("x"), token="y" * 32)).status_code
        for _ in range(25)
    ]
    assert statuses[:20] == [403] * 20 and set(statuses[20:]) == {429}
    assert await count(runtime, Message) == 0
    # a correctly signed request from that same source is still taken: others' failures
    # never lock out a genuine provider (behind a proxy they all share one address)
    assert (await post(runtime, client, "sms", sms_params("x"))).status_code == 200
    assert await count(runtime, Message) == 1
    metrics = (await client.get("/metrics")).text
    assert 'omniroute_webhook_rejected_total{provider="twilio",reason="signature"} 20.0' in metrics


async def test_sends_survive_429_500_and_a_hang_without_duplicates(
    tmp_path: Path, db_url: str
) -> None:
    clock = FakeClock()
    with FakeTwilioServer() as server:
        settings = twilio_settings(
            tmp_path,
            db_url,
            server,
            # the look-up after the hang comes 200 s (clock) after its create: long after
            # the fake Twilio lands it (2.5 s real, some 50 s on this test's clock)
            {"request_timeout": 1, "check_delay": 200},
            outbox_interval=0.05,
            outbox_backoff_base=1,
            outbox_backoff_max=300,  # above check_delay: waiting for it is one attempt
        )
        async with started_runtime(settings, clock, workers=True) as runtime:
            async with client_for(runtime) as client:
                await post(runtime, client, "sms", sms_params("hi", From="+14155550100"))
            await settle(runtime)
            cid = await runtime.db.read(lambda c: c.execute(select(Conversation.id)).scalar_one())
            anna, _ = await make_agent(runtime, "anna", "", "sms=2,total=2")
            await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
            offer = await runtime.db.read(lambda c: c.execute(select(Offer.id)).scalar_one())
            await runtime.assignment.accept(anna, offer)
            server.fake.fail_next(2, 429, resource="Messages")
            server.fake.fail_next(1, 500, resource="Messages")
            server.fake.hang_next(1, 2.5, resource="Messages")  # created after we gave up
            texts = [f"reply {i}" for i in range(5)]
            for text in texts:
                await runtime.db.write(agent_write, anna, cid, text)
            runtime.outbox.wake()
            for _ in range(400):  # the clock moves the retries' due times along
                statuses = await runtime.db.read(
                    lambda c: (
                        c.execute(select(Message.delivery_status).where(Message.direction == "out"))
                        .scalars()
                        .all()
                    )
                )
                if statuses and all(s == "sent" for s in statuses):
                    break
                clock.advance(1)
                runtime.outbox.wake()
                await asyncio.sleep(0.05)
            assert statuses == ["sent"] * 5
            bodies = sorted(m["form"]["Body"] for m in server.fake.messages)
            assert bodies == sorted(texts)  # each exactly once: the hung one was found, not resent
            assert server.fake.pending_faults == 0


# -- sends whose outcome Twilio left unclear -----------------------------------------
async def _reply_pending(runtime: Runtime, client: httpx.AsyncClient, text: str) -> tuple[int, str]:
    """A customer wrote; Anna accepted and replied ``text``: ``(message id, Anna's token)``."""
    await post(runtime, client, "sms", sms_params("hi", From="+14155550100"))
    await settle(runtime)
    cid = await runtime.db.read(lambda c: c.execute(select(Conversation.id)).scalar_one())
    anna, token = await make_agent(runtime, "anna", "", "sms=2,total=2")
    await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
    offer = await runtime.db.read(lambda c: c.execute(select(Offer.id)).scalar_one())
    await runtime.assignment.accept(anna, offer)
    written = await runtime.db.write(agent_write, anna, cid, text)
    runtime.outbox.wake()
    return int(written["message_id"]), token


async def _drive(
    runtime: Runtime, clock: FakeClock, until: Callable[[Outbox], bool], step: float = 1
) -> Outbox:
    """Move the clock along (the retries' due times) until the reply's outbox row passes."""
    for _ in range(600):
        (row,) = await rows(runtime, Outbox)
        if until(row):
            return row
        clock.advance(step)
        runtime.outbox.wake()
        await asyncio.sleep(0.02)
    raise AssertionError(f"outbox row stuck: {row.state} after {row.attempts} attempts")


def _unclear_settings(
    tmp_path: Path, db_url: str, server: FakeTwilioServer, **inbox: Any
) -> Settings:
    return twilio_settings(
        tmp_path,
        db_url,
        server,
        {"request_timeout": 0.5, **inbox},
        outbox_interval=0.05,
        outbox_backoff_base=1,
        outbox_backoff_max=120,
    )


async def test_a_create_that_hangs_past_the_timeout_and_lands_later_is_sent_once(
    tmp_path: Path, db_url: str
) -> None:
    clock = FakeClock()
    with FakeTwilioServer(FakeTwilio(clock=clock.now)) as server:
        fake = server.fake
        lands = threading.Event()
        fake.hang_next(1, 60, resource="Messages", method="POST", until=lands)
        settings = _unclear_settings(tmp_path, db_url, server, check_delay=30)
        async with started_runtime(settings, clock, workers=True) as runtime:
            async with client_for(runtime) as client:
                message_id, _ = await _reply_pending(runtime, client, "Your refund is on its way")
            # the first attempt gives up on Twilio (the clock stands still meanwhile) ...
            await _drive(runtime, clock, lambda r: r.attempts == 1 and r.state == "queued", 0)
            clock.advance(5)  # ... and the outbox tries again seconds later: it waits
            await _drive(
                runtime,
                clock,
                lambda r: r.state == "queued" and "looking it up" in (r.last_error or ""),
                0,
            )
            lands.set()  # Twilio finally creates the message the first attempt asked for
            for _ in range(250):
                if fake.messages:
                    break
                await asyncio.sleep(0.02)
            row = await _drive(runtime, clock, lambda r: r.state in ("sent", "failed"))
            (message,) = await rows(runtime, Message, Message.id == message_id)
    assert [m["form"]["Body"] for m in fake.messages] == ["Your refund is on its way"]
    assert (row.state, row.uncertain_resends) == ("sent", 0)
    assert message.external_id == fake.messages[0]["sid"]  # found by the look-up
    assert not (message.data or {}).get("possible_duplicate")


async def test_waiting_for_the_look_up_uses_no_attempts(tmp_path: Path, db_url: str) -> None:
    """The wait before the look-up is no attempt: with a backoff ceiling (2 s) and attempts
    (3) far below check_delay (30 s), the message that did reach Twilio is found and sent,
    not failed after its attempts ran out while it waited (bench/crash.py's slow-provider
    phase saw 24 delivered replies marked failed so)."""
    clock = FakeClock()
    with FakeTwilioServer(FakeTwilio(clock=clock.now)) as server:
        fake = server.fake
        lands = threading.Event()
        fake.hang_next(1, 60, resource="Messages", method="POST", until=lands)
        settings = _unclear_settings(tmp_path, db_url, server, check_delay=30).model_copy(
            update={"outbox_backoff_max": 2, "outbox_max_attempts": 3}
        )
        async with started_runtime(settings, clock, workers=True) as runtime:
            async with client_for(runtime) as client:
                message_id, _ = await _reply_pending(runtime, client, "Back in stock")
            await _drive(runtime, clock, lambda r: r.attempts == 1 and r.state == "queued", 0)
            lands.set()
            for _ in range(250):
                if fake.messages:
                    break
                await asyncio.sleep(0.02)
            row = await _drive(runtime, clock, lambda r: r.state in ("sent", "failed"))
            (message,) = await rows(runtime, Message, Message.id == message_id)
    assert (row.state, row.uncertain_resends) == ("sent", 0)
    assert [m["form"]["Body"] for m in fake.messages] == ["Back in stock"]
    assert message.external_id == fake.messages[0]["sid"]


async def test_a_create_that_lands_after_the_look_up_is_counted_and_reported(
    tmp_path: Path, db_url: str
) -> None:
    clock = FakeClock()
    with FakeTwilioServer(FakeTwilio(clock=clock.now)) as server:
        fake = server.fake
        lands = threading.Event()
        fake.hang_next(1, 60, resource="Messages", method="POST", until=lands)
        settings = _unclear_settings(tmp_path, db_url, server, check_delay=5)
        async with started_runtime(settings, clock, workers=True) as runtime:
            async with client_for(runtime) as client:
                message_id, token = await _reply_pending(runtime, client, "See you Monday")
                # Twilio still holds the first create when the look-up finds nothing
                row = await _drive(runtime, clock, lambda r: r.state in ("sent", "failed"))
                assert (row.state, row.uncertain_resends) == ("sent", 1)  # a possible duplicate
                shown = await client.get(
                    f"/api/messages/{message_id}", headers={"authorization": f"Bearer {token}"}
                )
                assert shown.json()["possible_duplicate"] is True
                lands.set()  # ... and then lands: the customer gets it twice
                for _ in range(250):
                    if len(fake.messages) == 2:
                        break
                    await asyncio.sleep(0.02)
                kept = row.provider_id
                late = next(m for m in fake.messages if m["sid"] != kept)
                # Twilio reports on both copies to the callback each create named
                for record in fake.messages:
                    callback = urlsplit(record["form"]["StatusCallback"])
                    assert callback.query == f"message={message_id}"
                    response = await post(
                        runtime,
                        client,
                        "sms-status",
                        status_params("delivered", MessageSid=record["sid"]),
                        query=callback.query,
                    )
                    assert response.status_code == 200
            (message,) = await rows(runtime, Message, Message.id == message_id)
            (row,) = await rows(runtime, Outbox)
    assert [m["form"]["Body"] for m in fake.messages] == ["See you Monday"] * 2
    assert (message.external_id, message.delivery_status) == (kept, "delivered")
    assert message.data["possible_duplicate"] is True
    assert message.data["duplicate_ids"] == [late["sid"]]
    assert row.uncertain_resends == 1  # counted once: when it was resent


async def test_a_look_up_that_keeps_failing_converges_to_a_counted_resend(
    tmp_path: Path, db_url: str
) -> None:
    clock = FakeClock()
    with FakeTwilioServer(FakeTwilio(clock=clock.now)) as server:
        fake = server.fake
        fake.fail_next(1, 500, resource="Messages", method="POST")  # the create: unclear
        fake.fail_next(1000, 503, resource="Messages", method="GET")  # Twilio cannot list
        settings = _unclear_settings(tmp_path, db_url, server, check_delay=5)
        async with (
            started_runtime(settings, clock, workers=True) as runtime,
            client_for(runtime) as client,
        ):
            message_id, token = await _reply_pending(runtime, client, "Ticket 4711 closed")
            row = await _drive(runtime, clock, lambda r: r.state in ("sent", "failed"))
            shown = await client.get(
                f"/api/messages/{message_id}", headers={"authorization": f"Bearer {token}"}
            )
            admin = await admin_token(runtime)
            report = await client.get(
                "/api/admin/outbox", headers={"authorization": f"Bearer {admin}"}
            )
    assert (row.state, row.uncertain_resends) == ("sent", 1)
    assert row.attempts < runtime.settings.outbox_max_attempts
    assert [m["form"]["Body"] for m in fake.messages] == ["Ticket 4711 closed"]
    assert [r.method for r in fake.requests if r.path.endswith("/Messages.json")].count("GET") == 3
    assert shown.json()["possible_duplicate"] is True
    assert [(o["message_id"], o["uncertain_resends"]) for o in report.json()] == [(message_id, 1)]
