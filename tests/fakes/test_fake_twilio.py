"""The Twilio fake answers the official ``twilio`` package like Twilio does, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import time
import wave
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.rest import Client

from tests.fakes.twilio import (
    FakeTwilio,
    FakeTwilioServer,
    HttpxTwilioClient,
    LocalTwilioHttpClient,
    num_segments,
    rewrite_base_url,
    tiny_wav,
)

AGENT = "+15550000000"
CUSTOMER = "+15551230001"
OTHER = "+15551230002"
RFC2822 = re.compile(r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000$")


@pytest.fixture(scope="module")
def server() -> Iterator[FakeTwilioServer]:
    with FakeTwilioServer() as running:
        yield running


@pytest.fixture
def fake(server: FakeTwilioServer) -> FakeTwilio:
    """A fresh fake per test on the module's server (stopping a server costs ~0.2 s)."""
    server.fake = FakeTwilio()
    return server.fake


@pytest.fixture
def sync_http(server: FakeTwilioServer) -> Iterator[LocalTwilioHttpClient]:
    http = LocalTwilioHttpClient(server.url, timeout=5)
    yield http
    assert http.session is not None
    http.session.close()


@pytest.fixture
def sync_client(fake: FakeTwilio, sync_http: LocalTwilioHttpClient) -> Client:
    return Client(fake.account_sid, fake.auth_token, http_client=sync_http)


@pytest.fixture
async def http(server: FakeTwilioServer) -> AsyncIterator[HttpxTwilioClient]:
    async with HttpxTwilioClient(rewrite_base=server.url, timeout=5) as client:
        yield client


@pytest.fixture
def client(fake: FakeTwilio, http: HttpxTwilioClient) -> Client:
    return Client(fake.account_sid, fake.auth_token, http_client=http)


def last_json(http: HttpxTwilioClient | LocalTwilioHttpClient) -> dict[str, Any]:
    assert http.last_response is not None
    return dict(json.loads(http.last_response.text))


# ---- Messages -----------------------------------------------------------------------------


def test_sync_create_message_has_twilio_shape(
    sync_client: Client, sync_http: LocalTwilioHttpClient, fake: FakeTwilio
) -> None:
    message = sync_client.messages.create(
        to=CUSTOMER, from_=AGENT, body="hello", status_callback="https://example.com/cb"
    )
    assert re.fullmatch(r"SM[0-9a-f]{32}", str(message.sid))
    assert message.status == "queued"
    assert message.to == CUSTOMER and message.from_ == AGENT and message.body == "hello"
    assert message.direction == "outbound-api"
    assert isinstance(message.date_created, datetime)
    assert sync_http.last_response is not None and sync_http.last_response.status_code == 201

    raw = last_json(sync_http)
    for key in ("date_created", "date_updated"):
        assert RFC2822.match(raw[key]), raw[key]
    assert raw["account_sid"] == fake.account_sid
    assert raw["date_sent"] is None and raw["price"] is None
    assert raw["error_code"] is None and raw["error_message"] is None
    assert raw["messaging_service_sid"] is None
    assert raw["num_segments"] == "1"
    assert raw["uri"] == f"/2010-04-01/Accounts/{fake.account_sid}/Messages/{message.sid}.json"

    assert len(fake.messages) == 1
    recorded = fake.messages[0]
    assert recorded["sid"] == message.sid
    assert recorded["form"] == {
        "To": CUSTOMER,
        "From": AGENT,
        "Body": "hello",
        "StatusCallback": "https://example.com/cb",
    }
    fetched = sync_client.messages(str(message.sid)).fetch()
    assert fetched.body == "hello"


async def test_async_create_message_with_media_and_service(
    client: Client, http: HttpxTwilioClient, fake: FakeTwilio
) -> None:
    service = "MG" + "1" * 32
    message = await client.messages.create_async(
        to="whatsapp:" + CUSTOMER,
        messaging_service_sid=service,
        media_url=["https://example.com/a.png", "https://example.com/b.png"],
    )
    # With a Messaging Service Twilio accepts first and picks the sender later.
    assert message.status == "accepted"
    assert message.from_ is None
    assert message.messaging_service_sid == service
    assert message.num_media == "2"
    assert fake.messages[0]["form_lists"]["MediaUrl"] == [
        "https://example.com/a.png",
        "https://example.com/b.png",
    ]
    assert http.last_response is not None
    assert http.last_response.headers["content-type"].startswith("application/json")


def test_segments_follow_gsm7_and_ucs2() -> None:
    assert num_segments("a" * 160) == 1
    assert num_segments("a" * 161) == 2
    assert num_segments("[" * 80) == 1  # extension characters take two septets
    assert num_segments("[" * 81) == 2
    assert num_segments("é" * 160) == 1  # é is in GSM-7
    assert num_segments("Привет" * 11) == 1  # 66 UCS-2 units
    assert num_segments("Привет" * 12) == 2


async def test_list_filters_by_to_and_from_newest_first(
    client: Client, http: HttpxTwilioClient, fake: FakeTwilio
) -> None:
    for i in range(5):
        await client.messages.create_async(to=OTHER, from_=AGENT, body=f"other-{i}")
    await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="customer-1")
    await client.messages.create_async(to=CUSTOMER, from_="+15559999999", body="customer-2")

    to_other = await client.messages.list_async(to=OTHER, page_size=2)
    assert [m.body for m in to_other] == [f"other-{i}" for i in (4, 3, 2, 1, 0)]
    pages = [r for r in fake.requests if r.method == "GET" and r.query.get("To") == OTHER]
    assert len(pages) == 3  # followed next_page_uri twice
    assert all(r.query["PageSize"] == "2" for r in pages)

    mine = await client.messages.list_async(to=CUSTOMER, from_=AGENT)
    assert [m.body for m in mine] == ["customer-1"]
    everything = await client.messages.list_async(limit=3)
    assert [m.body for m in everything] == ["customer-2", "customer-1", "other-4"]


async def test_list_envelope_is_twilio_paging(
    server: FakeTwilioServer, fake: FakeTwilio, client: Client
) -> None:
    for i in range(3):
        await client.messages.create_async(to=CUSTOMER, from_=AGENT, body=str(i))
    base = f"/2010-04-01/Accounts/{fake.account_sid}/Messages.json"
    async with httpx.AsyncClient(
        base_url=server.url, auth=(fake.account_sid, fake.auth_token)
    ) as raw:
        first = (await raw.get(base, params={"To": CUSTOMER, "PageSize": 2})).json()
        assert set(first) == {
            "messages",
            "first_page_uri",
            "next_page_uri",
            "page",
            "page_size",
            "previous_page_uri",
            "uri",
            "start",
            "end",
        }
        assert [m["body"] for m in first["messages"]] == ["2", "1"]
        assert (first["page"], first["page_size"], first["start"], first["end"]) == (0, 2, 0, 1)
        assert first["previous_page_uri"] is None
        assert first["first_page_uri"].startswith(base + "?")
        second = (await raw.get(first["next_page_uri"])).json()
        assert [m["body"] for m in second["messages"]] == ["0"]
        assert (second["page"], second["start"], second["end"]) == (1, 2, 2)
        assert second["next_page_uri"] is None
        assert second["previous_page_uri"] is not None


async def test_date_sent_filter_uses_date_sent() -> None:
    now = [datetime(2026, 11, 24, 9, 0, tzinfo=UTC)]
    fake = FakeTwilio(clock=lambda: now[0])
    with FakeTwilioServer(fake) as server:
        async with HttpxTwilioClient(rewrite_base=server.url, timeout=5) as http:
            client = Client(fake.account_sid, fake.auth_token, http_client=http)
            old = await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="old")
            fake.set_message_status(str(old.sid), "delivered")
            now[0] += timedelta(days=1)
            new = await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="new")
            fake.set_message_status(str(new.sid), "sent")
            await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="queued")

            day2 = await client.messages.list_async(date_sent=datetime(2026, 11, 25, tzinfo=UTC))
            assert [m.body for m in day2] == ["new"]
            before = await client.messages.list_async(
                date_sent_before=datetime(2026, 11, 24, 23, 0, tzinfo=UTC)
            )
            assert [m.body for m in before] == ["old"]
            assert before[0].date_sent == datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


# ---- Errors -------------------------------------------------------------------------------


def test_bad_credentials_raise_401_sync(fake: FakeTwilio, sync_http: LocalTwilioHttpClient) -> None:
    bad = Client(fake.account_sid, "not-the-token", http_client=sync_http)
    with pytest.raises(TwilioRestException) as caught:
        bad.messages.create(to=CUSTOMER, from_=AGENT, body="x")
    assert caught.value.status == 401
    assert caught.value.code == 20003
    assert last_json(sync_http) == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    assert fake.messages == []


async def test_bad_credentials_and_foreign_account_raise_401_async(
    fake: FakeTwilio, http: HttpxTwilioClient, server: FakeTwilioServer
) -> None:
    bad = Client(fake.account_sid, "not-the-token", http_client=http)
    with pytest.raises(TwilioRestException) as caught:
        await bad.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert caught.value.status == 401
    assert http.last_response is not None
    assert http.last_response.headers["www-authenticate"].startswith("Basic")

    # Right credentials, another account's SID in the path.
    foreign = Client(
        fake.account_sid, fake.auth_token, account_sid="AC" + "9" * 32, http_client=http
    )
    with pytest.raises(TwilioRestException) as caught:
        await foreign.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert caught.value.status == 401

    async with httpx.AsyncClient(base_url=server.url) as raw:
        anonymous = await raw.get(f"/2010-04-01/Accounts/{fake.account_sid}/Messages.json")
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == 20003


async def test_api_key_credentials(fake: FakeTwilio, http: HttpxTwilioClient) -> None:
    key = "SK" + "2" * 32
    fake.add_api_key(key, "key-secret")
    client = Client(key, "key-secret", account_sid=fake.account_sid, http_client=http)
    message = await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert message.status == "queued"
    assert fake.requests[-1].username == key


async def test_429_carries_retry_after(
    client: Client, http: HttpxTwilioClient, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=429, retry_after=7)
    with pytest.raises(TwilioRestException) as caught:
        await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert caught.value.status == 429
    assert caught.value.code == 20429
    # TwilioRestException has no headers: read them from the HTTP client's last response.
    assert http.last_response is not None
    assert http.last_response.headers["Retry-After"] == "7"
    assert fake.messages == []
    ok = await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert ok.status == "queued"


def test_429_sync_and_list_errors(
    sync_client: Client, sync_http: LocalTwilioHttpClient, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=429, retry_after=3)
    with pytest.raises(TwilioRestException) as caught:
        sync_client.messages.create(to=CUSTOMER, from_=AGENT, body="x")
    assert caught.value.status == 429
    assert sync_http.last_response is not None
    assert sync_http.last_response.headers["retry-after"] == "3"

    # twilio quirk: a failed list page raises a bare TwilioException, not TwilioRestException.
    fake.fail_next(1, status=429)
    with pytest.raises(TwilioException) as listed:
        sync_client.messages.list()
    assert not isinstance(listed.value, TwilioRestException)
    assert listed.value.args[0] == "Unable to fetch page"
    assert listed.value.args[1].status_code == 429


@pytest.mark.parametrize(("status", "code"), [(500, 20500), (503, 20503)])
async def test_server_error_injection(
    client: Client, fake: FakeTwilio, status: int, code: int
) -> None:
    fake.fail_next(2, status=status)
    for _ in range(2):
        with pytest.raises(TwilioRestException) as caught:
            await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
        assert (caught.value.status, caught.value.code) == (status, code)
    assert fake.pending_faults == 0
    await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert len(fake.messages) == 1


async def test_faults_can_target_one_resource(client: Client, fake: FakeTwilio) -> None:
    fake.fail_next(1, status=500, resource="Calls")
    await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert fake.pending_faults == 1
    with pytest.raises(TwilioRestException) as caught:
        await client.calls.create_async(to=CUSTOMER, from_=AGENT, twiml="<Response/>")
    assert caught.value.status == 500
    with pytest.raises(ValueError):
        fake.fail_next(1, resource="Mesages")


async def test_fail_next_with_specific_error(client: Client, fake: FakeTwilio) -> None:
    fake.fail_next_with(30007, 400, "Message filtered")
    with pytest.raises(TwilioRestException) as caught:
        await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert (caught.value.status, caught.value.code) == (400, 30007)
    assert caught.value.msg == "Unable to create record: Message filtered"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"to": "", "from_": AGENT, "body": "x"}, 21604),
        ({"to": CUSTOMER, "body": "x"}, 21603),
        ({"to": CUSTOMER, "from_": AGENT}, 21602),
        ({"to": "5551230001", "from_": AGENT, "body": "x"}, 21211),
        ({"to": CUSTOMER, "from_": AGENT, "body": "x" * 1601}, 21617),
    ],
)
async def test_message_validation(
    client: Client, fake: FakeTwilio, kwargs: dict[str, str], code: int
) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await client.messages.create_async(**kwargs)
    assert (caught.value.status, caught.value.code) == (400, code)
    assert fake.messages == []


async def test_opted_out_recipient_is_21610(
    client: Client, sync_client: Client, fake: FakeTwilio
) -> None:
    fake.opted_out.add(CUSTOMER)
    with pytest.raises(TwilioRestException) as caught:
        await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="x")
    assert caught.value.code == 21610
    assert "unsubscribed recipient" in caught.value.msg
    with pytest.raises(TwilioRestException) as caught_sync:
        sync_client.messages.create(to=CUSTOMER, from_=AGENT, body="x")
    assert (caught_sync.value.status, caught_sync.value.code) == (400, 21610)
    await client.messages.create_async(to=OTHER, from_=AGENT, body="x")
    assert [m["to"] for m in fake.messages] == [OTHER]


# ---- Timeouts -----------------------------------------------------------------------------


async def test_hang_next_trips_the_client_timeout_and_still_takes_effect(
    server: FakeTwilioServer, fake: FakeTwilio
) -> None:
    fake.hang_next(1, seconds=0.8)
    async with HttpxTwilioClient(rewrite_base=server.url, timeout=0.2) as http:
        client = Client(fake.account_sid, fake.auth_token, http_client=http)
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.messages.create_async(to=CUSTOMER, from_=AGENT, body="slow")
        assert time.monotonic() - started < 0.7
    # Like Twilio, the request the client gave up on is processed anyway.
    for _ in range(250):
        if fake.messages:
            break
        await asyncio.sleep(0.02)
    assert [m["body"] for m in fake.messages] == ["slow"]


def test_hang_next_trips_the_sync_timeout(server: FakeTwilioServer, fake: FakeTwilio) -> None:
    fake.hang_next(1, seconds=2)
    http = LocalTwilioHttpClient(server.url, timeout=0.2)
    try:
        client = Client(fake.account_sid, fake.auth_token, http_client=http)
        with pytest.raises(requests.exceptions.ReadTimeout):
            client.messages.create(to=CUSTOMER, from_=AGENT, body="slow")
    finally:
        assert http.session is not None
        http.session.close()


async def test_per_request_timeout_validation() -> None:
    async with HttpxTwilioClient() as http:
        with pytest.raises(ValueError):
            await http.request("GET", "http://127.0.0.1:9/", timeout=0)
    with pytest.raises(ValueError):
        HttpxTwilioClient(timeout=-1)


# ---- Conferences and participants ---------------------------------------------------------


async def test_participants_by_friendly_name(client: Client, fake: FakeTwilio) -> None:
    conference = fake.ensure_conference("conv-42")
    assert re.fullmatch(r"CF[0-9a-f]{32}", conference["sid"])
    assert conference["status"] == "in-progress"
    assert fake.ensure_conference("conv-42") is conference

    agent = await client.conferences("conv-42").participants.create_async(
        from_=AGENT,
        to="+15557654321",
        label="agent",
        timeout=20,
        status_callback="https://example.com/voice/participant",
        status_callback_event=["initiated", "ringing", "answered", "completed"],
        early_media=True,
        beep="onEnter",
        muted=False,
        coaching=False,
    )
    assert agent.conference_sid == conference["sid"]
    assert agent.status == "queued"
    assert agent.label == "agent"
    assert agent.muted is False and agent.hold is False
    assert re.fullmatch(r"CA[0-9a-f]{32}", str(agent.call_sid))

    recorded = fake.participants[0]
    assert recorded["form"]["Label"] == "agent"
    assert recorded["form"]["Timeout"] == "20"
    assert recorded["form"]["EarlyMedia"] == "true"
    assert recorded["form"]["Beep"] == "onEnter"
    assert recorded["form"]["StatusCallback"] == "https://example.com/voice/participant"
    assert recorded["form_lists"]["StatusCallbackEvent"] == [
        "initiated",
        "ringing",
        "answered",
        "completed",
    ]
    # The participant's outbound call exists in the Calls API too.
    call = await client.calls(str(agent.call_sid)).fetch_async()
    assert (call.to, call.status) == ("+15557654321", "ringing")

    listed = await client.conferences("conv-42").participants.list_async()
    assert [(p.label, p.status) for p in listed] == [("agent", "ringing")]
    by_sid = await client.conferences(conference["sid"]).participants.list_async()
    assert [p.call_sid for p in by_sid] == [agent.call_sid]

    muted = await client.conferences("conv-42").participants("agent").update_async(muted=True)
    assert muted.muted is True
    held = (
        await client.conferences(conference["sid"])
        .participants(str(agent.call_sid))
        .update_async(hold=True, hold_url="https://example.com/hold.mp3")
    )
    assert held.hold is True
    assert recorded["updates"][-1] == {"Hold": "true", "HoldUrl": "https://example.com/hold.mp3"}
    assert [
        p.label for p in await client.conferences("conv-42").participants.list_async(muted=True)
    ] == ["agent"]
    assert await client.conferences("conv-42").participants.list_async(muted=False) == []

    assert await client.conferences("conv-42").participants("agent").delete_async() is True
    assert await client.conferences("conv-42").participants.list_async() == []
    assert recorded["status"] == "complete"  # Twilio's participant enum says "complete"
    assert fake.calls[0]["status"] == "completed"
    with pytest.raises(TwilioRestException) as caught:
        await client.conferences("conv-42").participants("agent").fetch_async()
    assert (caught.value.status, caught.value.code) == (404, 20404)


async def test_simulated_caller_and_participant_errors(client: Client, fake: FakeTwilio) -> None:
    caller = fake.add_participant("conv-7", from_=CUSTOMER, to=AGENT, label="customer")
    assert caller["status"] == "connected"
    conference = fake.get_conference("conv-7")
    assert conference is not None and conference["status"] == "in-progress"
    fetched = await client.conferences("conv-7").participants("customer").fetch_async()
    assert fetched.call_sid == caller["call_sid"]

    with pytest.raises(TwilioRestException) as duplicate:
        await client.conferences("conv-7").participants.create_async(
            from_=AGENT, to=OTHER, label="customer"
        )
    assert duplicate.value.status == 400
    with pytest.raises(TwilioRestException) as unknown:
        await client.conferences("CF" + "e" * 32).participants.create_async(from_=AGENT, to=OTHER)
    assert unknown.value.status == 404
    with pytest.raises(TwilioRestException) as bad_to:
        await client.conferences("conv-7").participants.create_async(from_=AGENT, to="12")
    assert bad_to.value.code == 21211

    # A name nobody is in yet: Twilio creates the conference.
    created = await client.conferences("conv-new").participants.create_async(from_=AGENT, to=OTHER)
    new_conference = fake.get_conference("conv-new")
    assert new_conference is not None
    assert created.conference_sid == new_conference["sid"]
    assert new_conference["status"] == "init"
    fake.set_participant_status("conv-new", str(created.call_sid), "connected")
    assert new_conference["status"] == "in-progress"


async def test_conferences_list_fetch_and_end(client: Client, fake: FakeTwilio) -> None:
    first = fake.ensure_conference("conv-1")
    fake.ensure_conference("conv-2")
    fake.add_participant("conv-1", label="customer")

    listed = await client.conferences.list_async(friendly_name="conv-1", status="in-progress")
    assert [c.sid for c in listed] == [first["sid"]]
    assert [c.friendly_name for c in await client.conferences.list_async()] == [
        "conv-2",
        "conv-1",
    ]
    fetched = await client.conferences(first["sid"]).fetch_async()
    assert (fetched.friendly_name, fetched.status) == ("conv-1", "in-progress")

    ended = await client.conferences(first["sid"]).update_async(status="completed")
    assert ended.status == "completed"
    assert ended.reason_conference_ended == "conference-ended-via-api"
    assert fake.participants[0]["status"] == "complete"
    assert await client.conferences.list_async(friendly_name="conv-1", status="in-progress") == []
    with pytest.raises(TwilioException) as gone:  # a list page error: bare TwilioException
        await client.conferences("conv-1").participants.list_async()
    assert gone.value.args[1].status_code == 404
    # The name is free again: a new caller starts a new conference.
    assert fake.ensure_conference("conv-1")["sid"] != first["sid"]


# ---- Calls --------------------------------------------------------------------------------


async def test_calls_create_fetch_update(client: Client, fake: FakeTwilio) -> None:
    call = await client.calls.create_async(
        to=CUSTOMER,
        from_=AGENT,
        twiml="<Response><Say>hi</Say></Response>",
        status_callback="https://example.com/voice/status",
        status_callback_event=["initiated", "answered", "completed"],
    )
    assert re.fullmatch(r"CA[0-9a-f]{32}", str(call.sid))
    assert call.status == "queued"
    assert fake.calls[0]["form_lists"]["StatusCallbackEvent"] == [
        "initiated",
        "answered",
        "completed",
    ]
    fake.set_call_status(str(call.sid), "in-progress")
    assert (await client.calls(str(call.sid)).fetch_async()).status == "in-progress"

    await client.calls(str(call.sid)).update_async(twiml="<Response><Hangup/></Response>")
    assert fake.calls[0]["twiml"] == "<Response><Hangup/></Response>"
    done = await client.calls(str(call.sid)).update_async(status="completed")
    assert done.status == "completed"
    assert done.end_time is not None and done.duration is not None
    with pytest.raises(TwilioRestException) as caught:
        await client.calls(str(call.sid)).update_async(twiml="<Response/>")
    assert (caught.value.status, caught.value.code) == (400, 21220)

    with pytest.raises(TwilioRestException) as no_instructions:
        await client.calls.create_async(to=CUSTOMER, from_=AGENT)
    assert no_instructions.value.code == 21205
    assert [c.sid for c in await client.calls.list_async(status="completed")] == [call.sid]


def test_sync_call_update_on_participant_call(sync_client: Client, fake: FakeTwilio) -> None:
    caller = fake.add_participant("conv-9", from_=CUSTOMER, to=AGENT, label="customer")
    sync_client.calls(caller["call_sid"]).update(twiml="<Response><Say>bye</Say></Response>")
    # New TwiML takes the call out of the conference; the call itself goes on.
    assert caller["status"] == "complete"
    assert fake.calls[0]["status"] == "in-progress"


# ---- Recordings ---------------------------------------------------------------------------


async def test_recording_media_over_httpx(server: FakeTwilioServer, fake: FakeTwilio) -> None:
    sid = "RE" + "3" * 32
    fake.add_recording(sid, call_sid="CA" + "4" * 32)
    base = f"/2010-04-01/Accounts/{fake.account_sid}/Recordings/{sid}"
    async with httpx.AsyncClient(
        base_url=server.url, auth=(fake.account_sid, fake.auth_token)
    ) as raw:
        media = await raw.get(base)
        assert media.status_code == 200
        assert media.headers["content-type"] == "audio/wav"
        assert media.content == tiny_wav()
        with wave.open(io.BytesIO(media.content), "rb") as w:
            assert (w.getnchannels(), w.getframerate()) == (1, 8000)
        assert (await raw.get(base + ".wav")).content == media.content
        meta = (await raw.get(base + ".json")).json()
        assert meta["sid"] == sid and meta["call_sid"] == "CA" + "4" * 32
        assert "data" not in meta
        missing = await raw.get(base.replace(sid, "RE" + "5" * 32))
        assert (missing.status_code, missing.json()["code"]) == (404, 20404)
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        assert (await anonymous.get(base)).status_code == 401
        fake.media_requires_auth = False
        assert (await anonymous.get(base)).status_code == 200


async def test_recording_metadata_via_twilio(client: Client, fake: FakeTwilio) -> None:
    sid = "RE" + "6" * 32
    fake.add_recording(sid, b"ID3-not-really-mp3", "audio/mpeg", conference_sid="CF" + "7" * 32)
    recording = await client.recordings(sid).fetch_async()
    assert recording.conference_sid == "CF" + "7" * 32
    assert recording.status == "completed"


# ---- Requests log, webhooks ---------------------------------------------------------------


async def test_requests_are_recorded_and_no_webhooks_are_sent(
    client: Client, fake: FakeTwilio
) -> None:
    # Twilio signs the webhooks it sends (X-Twilio-Signature, checked by our server with
    # twilio.request_validator.RequestValidator). The fake sends no webhooks at all and
    # API requests to Twilio are not signed, so RequestValidator plays no part here.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    callback = f"http://127.0.0.1:{listener.getsockname()[1]}/cb"
    try:
        await client.messages.create_async(
            to=CUSTOMER, from_=AGENT, body="x", status_callback=callback
        )
        fake.ensure_conference("conv-1")
        await client.conferences("conv-1").participants.create_async(
            from_=AGENT, to=OTHER, status_callback=callback
        )
        await asyncio.sleep(0.3)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()

    posted = [r for r in fake.requests if r.method == "POST"]
    assert [r.path.rsplit("/", 1)[-1] for r in posted] == ["Messages.json", "Participants.json"]
    assert posted[0].form["StatusCallback"] == callback
    assert posted[0].headers["content-type"] == "application/x-www-form-urlencoded"
    assert posted[0].headers["user-agent"].startswith("twilio-python/")
    assert all("x-twilio-signature" not in r.headers for r in fake.requests)


def test_unknown_paths_and_methods_answer_twilio_json(
    server: FakeTwilioServer, fake: FakeTwilio
) -> None:
    auth = (fake.account_sid, fake.auth_token)
    base = f"{server.url}/2010-04-01/Accounts/{fake.account_sid}"
    nothing = httpx.get(f"{base}/Nothing.json", auth=auth)
    assert (nothing.status_code, nothing.json()["code"]) == (404, 20404)
    wrong_method = httpx.delete(f"{base}/Messages.json", auth=auth)
    assert (wrong_method.status_code, wrong_method.json()["code"]) == (405, 20004)
    assert nothing.headers["twilio-request-id"].startswith("RQ")


# ---- Plumbing -----------------------------------------------------------------------------


def test_rewrite_base_url_keeps_path_and_query() -> None:
    url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?To=%2B1&PageSize=2"
    assert rewrite_base_url(url, "http://127.0.0.1:8000") == (
        "http://127.0.0.1:8000/2010-04-01/Accounts/AC1/Messages.json?To=%2B1&PageSize=2"
    )
    assert rewrite_base_url("https://messaging.twilio.com/v1/Services", "http://h:1/tw/") == (
        "http://h:1/tw/v1/Services"
    )


def test_server_lifecycle() -> None:
    with FakeTwilioServer() as one, FakeTwilioServer() as two:
        assert one.url != two.url
        assert httpx.get(one.url + "/").status_code == 401
        port = one.port
    assert port is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/")
    one.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = FakeTwilioServer().url
    with pytest.raises(ValueError):
        FakeTwilio(account_sid="AC123")


def test_reset_forgets_state(fake: FakeTwilio, sync_client: Client) -> None:
    sync_client.messages.create(to=CUSTOMER, from_=AGENT, body="x")
    fake.fail_next(3)
    fake.reset()
    assert (fake.messages, fake.requests, fake.pending_faults) == ([], [], 0)
