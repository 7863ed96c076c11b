"""Phone calls through a Twilio voice inbox, against the local fake Twilio (Conferences,
Participants, Calls, Recordings). Webhooks are signed exactly as Twilio signs them (the
full URL, query included, plus the sorted form); TwiML is asserted by parsing it.

The flows: an incoming call waits in its own conference and hears its queue position; an
accepted offer rings the agent's phone and the conversation is assigned only when that leg
answers; a leg that is not answered sends the caller to the next agent; a caller who hangs
up during an offer is abandoned (capacity freed, the ringing leg hung up); a long wait
goes to voicemail, whose recording and transcript become messages of a callback; the IVR
choice routes; a transfer brings the new agent in before the old one leaves."""

from __future__ import annotations

import asyncio
import json
import secrets
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from sqlalchemy import select, update
from twilio.request_validator import RequestValidator

from adapters.clock import FakeClock
from router.auth import create_user
from router.models import Agent, Conversation, ConversationEvent, Message, Offer
from router.runtime import Runtime
from router.types import AgentPresence
from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilioServer
from tests.router.test_live import make_agent
from tests.router.test_pipeline import count, settle
from tests.support import client_for, make_settings, started_runtime

OUR_NUMBER = "+15550000000"
CALLER = "+14155550100"
RULES = """\
version: 1
hours:
  holidays_only:
    timezone: UTC
    weekly: {mon-sun: ["00:00-00:01"]}
    holidays: ["2026-11-25"]
queues:
  general: {offer_timeout: 20s, voicemail_after: 2m}
  billing: {offer_timeout: 20s}
  night: {hours: holidays_only}
rules:
  - id: billing-by-ivr
    when: {ivr.choice: "1"}
    then: {queue: billing}
  - id: night-line
    when: {ivr.choice: "9"}
    then: {queue: night}
default: {queue: general}
"""

Call = tuple[Runtime, httpx.AsyncClient, FakeTwilioServer, FakeClock]


def voice_settings(tmp_path: Path, db_url: str, server: FakeTwilioServer, **extra: Any) -> Any:
    inbox = {
        "channel": "voice",
        "provider": "twilio",
        "account_sid": DEFAULT_ACCOUNT_SID,
        "auth_token": DEFAULT_AUTH_TOKEN,
        "number": OUR_NUMBER,
        "api_base_url": server.url,  # test-only: the local fake instead of api.twilio.com
        "media_hosts": ["127.0.0.1"],
        "allow_insecure_media_for_tests": True,
        **extra,
    }
    channels = json.dumps({"version": 1, "inboxes": {"phone": inbox}})
    return make_settings(tmp_path / "conf", db_url, rules=RULES, channels=channels)


@pytest.fixture
async def phone(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Call]:
    with FakeTwilioServer() as server:
        async with (
            started_runtime(voice_settings(tmp_path, db_url, server), clock) as runtime,
            client_for(runtime) as client,
        ):
            yield runtime, client, server, clock


async def hook(
    runtime: Runtime,
    client: httpx.AsyncClient,
    kind: str,
    form: dict[str, str],
    query: dict[str, Any] | None = None,
    token: str = DEFAULT_AUTH_TOKEN,
    inbox: str = "phone",
) -> httpx.Response:
    """POST a webhook signed as Twilio signs it: over the full public URL and the form."""
    path = f"/webhooks/twilio/{inbox}/{kind}" + (f"?{urlencode(query)}" if query else "")
    url = runtime.settings.public_base_url.rstrip("/") + path
    signature = RequestValidator(token).compute_signature(url, form)
    headers = {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": signature}
    return await client.post(path, content=urlencode(form).encode(), headers=headers)


async def signed_get_url(
    runtime: Runtime, client: httpx.AsyncClient, url: str, form: dict[str, str]
) -> httpx.Response:
    """POST to a URL we handed Twilio (a wait URL, a status callback), signed over it."""
    parts = urlsplit(url)
    kind = parts.path.rsplit("/", 1)[-1]
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return await hook(runtime, client, kind, form, query)


def call_form(sid: str, status: str = "ringing", **extra: str) -> dict[str, str]:
    return {
        "AccountSid": DEFAULT_ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": sid,
        "CallStatus": status,
        "Called": OUR_NUMBER,
        "Caller": CALLER,
        "Direction": "inbound",
        "From": CALLER,
        "To": OUR_NUMBER,
        **extra,
    }


def new_sid(prefix: str = "CA") -> str:
    return prefix + secrets.token_hex(16)


def twiml(response: httpx.Response) -> ET.Element:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    root = ET.fromstring(response.content)
    assert root.tag == "Response"
    return root


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.05)


async def agent_with_phone(runtime: Runtime, name: str, number: str) -> int:
    return (await agent_and_token(runtime, name, number))[0]


async def agent_and_token(runtime: Runtime, name: str, number: str) -> tuple[int, str]:
    agent, token = await make_agent(runtime, name, "", "voice=1,sms=1,total=2")
    await runtime.db.write(
        lambda tx: tx.execute(update(Agent).where(Agent.id == agent).values(phone=number))
    )
    await runtime.assignment.set_status(agent, AgentPresence.ONLINE, "test")
    return agent, token


async def conversation(runtime: Runtime, cid: int) -> Any:
    return await runtime.db.read(
        lambda c: c.execute(select(Conversation).where(Conversation.id == cid)).one()
    )


async def pending_offer(runtime: Runtime, agent: int) -> int:
    async def find() -> int | None:
        return await runtime.db.read(
            lambda c: c.execute(
                select(Offer.id).where(Offer.agent_id == agent, Offer.state == "pending")
            ).scalar_one_or_none()
        )

    return int(await eventually(find))


async def events(runtime: Runtime, cid: int) -> list[Any]:
    return list(
        await runtime.db.read(
            lambda c: c.execute(
                select(ConversationEvent.kind, ConversationEvent.agent_id, ConversationEvent.data)
                .where(ConversationEvent.conversation_id == cid)
                .order_by(ConversationEvent.id)
            ).all()
        )
    )


async def incoming(runtime: Runtime, client: httpx.AsyncClient, sid: str) -> tuple[int, str]:
    """A call comes in: returns the conversation id and the conference's wait URL."""
    root = twiml(await hook(runtime, client, "voice", call_form(sid)))
    conference = root.find("./Dial/Conference")
    assert conference is not None, ET.tostring(root)
    assert conference.get("startConferenceOnEnter") == "false"
    assert conference.get("endConferenceOnExit") == "true"
    name = conference.text or ""
    assert name.startswith("conv-")
    wait_url = conference.get("waitUrl") or ""
    assert "/webhooks/twilio/phone/hold?conversation=" in wait_url
    return int(name.removeprefix("conv-")), wait_url


def participants(server: FakeTwilioServer, conference: str) -> list[dict[str, Any]]:
    with server.fake.lock:
        return [
            p
            for p in server.fake.participants
            if (c := server.fake.get_conference(p["conference_sid"])) is not None
            and c["friendly_name"] == conference
        ]


async def test_a_call_waits_hears_its_position_and_is_assigned_when_the_agent_answers(
    phone: Call,
) -> None:
    runtime, client, server, _ = phone
    sid = new_sid()
    forged = await hook(runtime, client, "voice", call_form(sid), token="x" * 32)
    assert forged.status_code == 403 and await count(runtime, Message) == 0
    cid, wait_url = await incoming(runtime, client, sid)
    assert await count(runtime, Message) == 1
    # a retried webhook joins the same call
    assert (await incoming(runtime, client, sid))[0] == cid
    assert await count(runtime, Message) == 1
    # the hold announces omniroute's own position
    second_sid = new_sid()
    second, second_wait = await _second_caller(runtime, client, second_sid)
    say = twiml(await signed_get_url(runtime, client, second_wait, call_form(second_sid)))
    assert "number 2 in the queue" in (say.findtext("Say") or "")
    assert say.find("Play") is not None
    first = twiml(await signed_get_url(runtime, client, wait_url, call_form(sid)))
    assert "number 1 in the queue" in (first.findtext("Say") or "")
    # an agent accepts: their phone rings into the caller's conference
    anna = await agent_with_phone(runtime, "anna", "+15557770001")
    offer = await pending_offer(runtime, anna)
    result = await runtime.assignment.accept(anna, offer)
    assert result["connect"]["to"] == "+15557770001"
    (leg,) = participants(server, f"conv-{cid}")
    form = leg["form"]
    assert (form["To"], form["From"], form["Timeout"]) == ("+15557770001", OUR_NUMBER, "20")
    assert form["EndConferenceOnExit"].lower() == "false"
    status_url = form["StatusCallback"]
    assert (await conversation(runtime, cid)).state == "offered"  # not before it answers
    # the leg answers: assigned
    answered = call_form(leg["call_sid"], "in-progress", Direction="outbound-api")
    assert (await signed_get_url(runtime, client, status_url, answered)).status_code == 200
    row = await conversation(runtime, cid)
    assert (row.state, row.assigned_agent_id) == ("assigned", anna)
    assert row.data["call"]["stage"] == "connected"
    assert row.data["call"]["legs"] == {str(anna): leg["call_sid"]}
    # the caller hangs up after talking: recorded, not abandoned
    done = call_form(sid, "completed", CallDuration="42")
    assert (await hook(runtime, client, "voice-status", done)).status_code == 200
    row = await conversation(runtime, cid)
    assert row.state == "assigned" and row.data["call"]["seconds"] == "42"
    kinds = [e.kind for e in await events(runtime, cid)]
    assert "abandoned" not in kinds and kinds.count("assigned") == 1
    assert second != cid


async def _second_caller(runtime: Runtime, client: httpx.AsyncClient, sid: str) -> tuple[int, str]:
    form = call_form(sid, From="+14155550199", Caller="+14155550199")
    root = twiml(await hook(runtime, client, "voice", form))
    conference = root.find("./Dial/Conference")
    assert conference is not None
    return int((conference.text or "").removeprefix("conv-")), conference.get("waitUrl") or ""


async def test_an_unanswered_leg_sends_the_caller_to_the_next_agent(phone: Call) -> None:
    runtime, client, server, _ = phone
    sid = new_sid()
    cid, _ = await incoming(runtime, client, sid)
    anna = await agent_with_phone(runtime, "anna", "+15557770001")
    await runtime.assignment.accept(anna, await pending_offer(runtime, anna))
    (leg,) = participants(server, f"conv-{cid}")
    bob = await agent_with_phone(runtime, "bob", "+15557770002")
    no_answer = call_form(leg["call_sid"], "no-answer", Direction="outbound-api")
    await signed_get_url(runtime, client, leg["form"]["StatusCallback"], no_answer)
    # the caller is offered again (to Bob: Anna let it ring), still holding
    offer = await pending_offer(runtime, bob)
    row = await conversation(runtime, cid)
    assert row.state == "offered" and row.data["call"]["stage"] == "queued"
    await runtime.assignment.accept(bob, offer)
    legs = participants(server, f"conv-{cid}")
    assert [p["form"]["To"] for p in legs] == ["+15557770001", "+15557770002"]
    answered = call_form(legs[1]["call_sid"], "in-progress", Direction="outbound-api")
    await signed_get_url(runtime, client, legs[1]["form"]["StatusCallback"], answered)
    row = await conversation(runtime, cid)
    assert (row.state, row.assigned_agent_id) == ("assigned", bob)
    rejected = await runtime.db.read(
        lambda c: c.execute(select(Offer.state, Offer.reason).where(Offer.agent_id == anna)).one()
    )
    assert tuple(rejected) == ("rejected", "phone no-answer")


async def test_a_caller_who_hangs_up_while_an_agent_rings_is_abandoned(phone: Call) -> None:
    runtime, client, server, clock = phone
    sid = new_sid()
    cid, _ = await incoming(runtime, client, sid)
    anna = await agent_with_phone(runtime, "anna", "+15557770001")
    await runtime.assignment.accept(anna, await pending_offer(runtime, anna))
    (leg,) = participants(server, f"conv-{cid}")
    ringing = call_form(leg["call_sid"], "ringing", Direction="outbound-api")
    await signed_get_url(runtime, client, leg["form"]["StatusCallback"], ringing)
    clock.advance(timedelta(seconds=35))
    await hook(runtime, client, "voice-status", call_form(sid, "completed", CallDuration="35"))
    row = await conversation(runtime, cid)
    assert row.state == "closed" and row.data["call"]["abandoned"] is True
    (abandoned,) = [e for e in await events(runtime, cid) if e.kind == "abandoned"]
    assert abandoned.data["wait_seconds"] == pytest.approx(35, abs=1)
    offer_state = await runtime.db.read(
        lambda c: c.execute(select(Offer.state).where(Offer.agent_id == anna)).scalar_one()
    )
    assert offer_state == "withdrawn"
    # the ringing phone was hung up, and Anna's capacity is free for the next caller
    with server.fake.lock:
        hung = [c for c in server.fake.calls if c["sid"] == leg["call_sid"]]
    assert hung and any(u.get("Status") == "completed" for u in hung[0]["updates"])
    nxt, _ = await _second_caller(runtime, client, new_sid())
    await pending_offer(runtime, anna)
    assert nxt != cid


async def test_a_long_wait_goes_to_voicemail_which_becomes_a_callback(phone: Call) -> None:
    runtime, client, server, clock = phone
    # the caller's call as Twilio has it (so that it can be redirected)
    sid = server.fake.add_participant("lobby", from_=CALLER, to=OUR_NUMBER)["call_sid"]
    cid, wait_url = await incoming(runtime, client, sid)
    clock.advance(timedelta(minutes=3))  # past the queue's voicemail_after (2m)
    response = twiml(await signed_get_url(runtime, client, wait_url, call_form(sid)))
    assert response.find("Pause") is not None
    with server.fake.lock:
        (call,) = [c for c in server.fake.calls if c["sid"] == sid]
        voicemail_url = call["updates"][-1]["Url"]
    assert "/webhooks/twilio/phone/voicemail?" in voicemail_url
    prompt = twiml(await signed_get_url(runtime, client, voicemail_url, call_form(sid)))
    record = prompt.find("Record")
    assert record is not None and record.get("transcribe") == "true"
    assert (await conversation(runtime, cid)).data["call"]["stage"] == "voicemail"
    # the recording (fetched from the fake's media host) and its transcript arrive
    recording = server.fake.add_recording("RE" + secrets.token_hex(16), call_sid=sid)
    media_url = (
        f"{server.url}/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Recordings/{recording['sid']}"
    )
    rec_form = {
        "AccountSid": DEFAULT_ACCOUNT_SID,
        "CallSid": sid,
        "RecordingSid": recording["sid"],
        "RecordingUrl": media_url,
        "RecordingStatus": "completed",
        "RecordingDuration": "3",
    }
    assert (
        await signed_get_url(runtime, client, record.get("recordingStatusCallback") or "", rec_form)
    ).status_code == 200
    transcript = {
        "AccountSid": DEFAULT_ACCOUNT_SID,
        "CallSid": sid,
        "RecordingSid": recording["sid"],
        "TranscriptionSid": "TR" + secrets.token_hex(16),
        "TranscriptionStatus": "completed",
        "TranscriptionText": "Please call me back about my invoice",
    }
    await signed_get_url(runtime, client, record.get("transcribeCallback") or "", transcript)
    await settle(runtime)
    rows = await runtime.db.read(
        lambda c: c.execute(
            select(Message.text, Message.attachments, Message.conversation_id).order_by(Message.id)
        ).all()
    )
    assert [r.conversation_id for r in rows] == [cid, cid, cid]
    assert rows[1].text == "Voicemail (3 s)" and rows[1].attachments[0]["blob_key"]
    assert rows[2].text.endswith("call me back about my invoice")
    # the callback is offered; accepting it assigns at once (no call to ring into)
    anna, token = await agent_and_token(runtime, "anna", "+15557770001")
    result = await runtime.assignment.accept(anna, await pending_offer(runtime, anna))
    assert "connect" not in result
    assert (await conversation(runtime, cid)).state == "assigned"
    assert participants(server, f"conv-{cid}") == []
    # Anna calls back: the customer is called into the conference, her phone rung in
    auth = {"authorization": f"Bearer {token}"}
    called = await client.post(f"/api/conversations/{cid}/call-back", headers=auth)
    assert called.status_code == 200, called.text
    with server.fake.lock:
        (customer,) = [c for c in server.fake.calls if c["sid"] == called.json()["customer_call"]]
    assert customer["to"] == CALLER and f">conv-{cid}</Conference>" in customer["twiml"]
    (leg,) = participants(server, f"conv-{cid}")
    assert leg["form"]["To"] == "+15557770001"
    row = await conversation(runtime, cid)
    assert row.data["call"]["stage"] == "connected"
    again = await client.post(f"/api/conversations/{cid}/call-back", headers=auth)
    assert again.status_code == 409  # the call is in progress
    # a supervisor listens in, muted
    _, boss = await runtime.db.write(lambda tx: create_user(tx, "sue", "supervisor"))
    listen = await client.post(
        f"/api/conversations/{cid}/monitor",
        json={"to": "+15557770009"},
        headers={"authorization": f"Bearer {boss}"},
    )
    assert listen.status_code == 200, listen.text
    muted = [p for p in participants(server, f"conv-{cid}") if p["form"]["To"] == "+15557770009"]
    assert muted and muted[0]["muted"] is True
    forbidden = await client.post(
        f"/api/conversations/{cid}/monitor", json={"to": "+15557770009"}, headers=auth
    )
    assert forbidden.status_code == 403


async def test_the_ivr_choice_routes_and_out_of_hours_goes_to_voicemail(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    ivr = {"prompt": "For billing press 1.", "timeout": 4}
    with FakeTwilioServer() as server:
        settings = voice_settings(tmp_path, db_url, server, ivr=ivr)
        async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
            sid = new_sid()
            menu = twiml(await hook(runtime, client, "voice", call_form(sid)))
            gather = menu.find("Gather")
            assert gather is not None and gather.get("numDigits") == "1"
            assert gather.findtext("Say") == "For billing press 1."
            assert await count(runtime, Message) == 0  # stored once the caller has chosen
            chosen = call_form(sid, Digits="1")
            root = twiml(await signed_get_url(runtime, client, gather.get("action") or "", chosen))
            cid = int((root.findtext("./Dial/Conference") or "").removeprefix("conv-"))
            assert (await conversation(runtime, cid)).queue == "billing"
            # the night queue is never open: straight to voicemail
            night = new_sid()
            await hook(runtime, client, "voice", call_form(night, From="+14155550123"))
            root = twiml(
                await hook(
                    runtime,
                    client,
                    "voice-gather",
                    call_form(night, Digits="9", From="+14155550123"),
                )
            )
            assert root.find("Record") is not None and root.find("Dial") is None


async def test_a_transfer_rings_the_new_agent_before_the_old_one_leaves(phone: Call) -> None:
    runtime, client, server, _ = phone
    sid = new_sid()
    cid, _ = await incoming(runtime, client, sid)
    anna = await agent_with_phone(runtime, "anna", "+15557770001")
    await runtime.assignment.accept(anna, await pending_offer(runtime, anna))
    (anna_leg,) = participants(server, f"conv-{cid}")
    answered = call_form(anna_leg["call_sid"], "in-progress", Direction="outbound-api")
    await signed_get_url(runtime, client, anna_leg["form"]["StatusCallback"], answered)
    bob = await agent_with_phone(runtime, "bob", "+15557770002")
    await runtime.assignment.transfer(anna, cid, to_queue=None, to_agent=bob, note="billing")
    await runtime.assignment.accept(bob, await pending_offer(runtime, bob))
    legs = participants(server, f"conv-{cid}")
    bob_leg = legs[-1]
    assert bob_leg["form"]["To"] == "+15557770002"
    assert anna_leg["status"] != "complete"  # Anna stays until Bob answers
    answered = call_form(bob_leg["call_sid"], "in-progress", Direction="outbound-api")
    await signed_get_url(runtime, client, bob_leg["form"]["StatusCallback"], answered)
    row = await conversation(runtime, cid)
    assert (row.state, row.assigned_agent_id) == ("assigned", bob)
    assert row.data["call"]["legs"] == {str(bob): bob_leg["call_sid"]}
    with server.fake.lock:
        assert anna_leg["status"] == "complete"  # taken out of the conference


async def test_a_leg_whose_callback_never_comes_expires_and_a_late_answer_is_hung_up(
    phone: Call,
) -> None:
    runtime, client, server, clock = phone
    cid, _ = await incoming(runtime, client, new_sid())
    anna = await agent_with_phone(runtime, "anna", "+15557770001")
    await runtime.assignment.accept(anna, await pending_offer(runtime, anna))
    (leg,) = participants(server, f"conv-{cid}")
    # no status callback: the offer ends after the ring time plus a grace, never before
    clock.advance(timedelta(seconds=40))
    await runtime.assignment.tick()
    assert (await conversation(runtime, cid)).state == "offered"
    clock.advance(timedelta(seconds=15))
    await runtime.assignment.tick()
    states = await runtime.db.read(
        lambda c: c.execute(select(Offer.state).order_by(Offer.id)).scalars().all()
    )
    assert states[0] == "expired"
    # the caller is still waiting (offered again: Anna is the only agent)
    assert (await conversation(runtime, cid)).data["call"]["stage"] == "queued"
    # the phone answers after all: too late, it is hung up, nothing is assigned by it
    late = call_form(leg["call_sid"], "in-progress", Direction="outbound-api")
    await signed_get_url(runtime, client, leg["form"]["StatusCallback"], late)
    with server.fake.lock:
        (call,) = [c for c in server.fake.calls if c["sid"] == leg["call_sid"]]
        assert any(u.get("Status") == "completed" for u in call["updates"])
    assert (await conversation(runtime, cid)).assigned_agent_id is None
