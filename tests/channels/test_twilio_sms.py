"""The Twilio SMS channel: webhooks built exactly as Twilio builds them (form-encoded, signed
with ``RequestValidator``), sends against the local Twilio fake over real HTTP, MMS media
through the SSRF-safe fetcher, and the fetcher's refusals checked against a local server
that counts every request it gets."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from pydantic import ValidationError
from twilio.request_validator import RequestValidator

from adapters.clock import FakeClock
from channels.base import (
    Attachment,
    ChannelContext,
    InboundMessage,
    OutboundMessage,
    PermanentSendError,
    Reject,
    Sender,
    StatusUpdate,
    TemporarySendError,
    WebhookRequest,
)
from channels.safe_fetch import MediaRefused, check_address, fetch_media
from channels.twilio_sms import (
    EMPTY_TWIML,
    TwilioSmsChannel,
    TwilioSmsConfig,
    normalize_e164,
    opt_out_keyword,
    split_text,
)
from tests.fakes.server import ThreadedASGIServer
from tests.fakes.twilio import (
    DEFAULT_ACCOUNT_SID,
    DEFAULT_AUTH_TOKEN,
    FakeTwilio,
    FakeTwilioServer,
)

ACCOUNT = DEFAULT_ACCOUNT_SID
TOKEN = DEFAULT_AUTH_TOKEN
OUR_NUMBER = "+15550000000"
CUSTOMER = "+14155550123"
SERVICE = "MG" + "1" * 32
PUBLIC = "https://omni.example.com"
SLUG = "sms-main"
SMS_URL = f"{PUBLIC}/webhooks/twilio/{SLUG}/sms"
STATUS_URL = f"{PUBLIC}/webhooks/twilio/{SLUG}/sms-status"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


# -- plumbing -----------------------------------------------------------------------
class MemoryBlobs:
    def __init__(self) -> None:
        self.items: dict[str, tuple[bytes, str, str | None]] = {}

    async def put(self, data: bytes, content_type: str, filename: str | None = None) -> str:
        key = f"mem:{len(self.items)}"
        self.items[key] = (data, content_type, filename)
        return key

    async def get(self, key: str) -> bytes:
        return self.items[key][0]


def twilio_request(
    url: str, params: dict[str, str], *, token: str = TOKEN, signature: str | None = None
) -> WebhookRequest:
    """A webhook as Twilio sends it: form-encoded body, signature over URL + sorted params."""
    body = urlencode(params).encode()
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "i-twilio-idempotency-token": "x",
    }
    sig = (
        signature
        if signature is not None
        else RequestValidator(token).compute_signature(url, params)
    )
    if sig:
        headers["x-twilio-signature"] = sig
    return WebhookRequest("POST", url, headers, body, form=dict(params), remote="54.1.2.3")


def sms_params(
    body: str = "Hello there", sid: str = "SM" + "a" * 32, **extra: str
) -> dict[str, str]:
    """The fields of a real inbound SMS webhook."""
    params = {
        "ToCountry": "US",
        "ToState": "CA",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "ToCity": "",
        "FromZip": "94105",
        "SmsSid": sid,
        "FromState": "CA",
        "SmsStatus": "received",
        "FromCity": "SAN FRANCISCO",
        "Body": body,
        "FromCountry": "US",
        "To": OUR_NUMBER,
        "ToZip": "",
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": ACCOUNT,
        "From": CUSTOMER,
        "ApiVersion": "2010-04-01",
    }
    params.update(extra)
    return params


def config(**overrides: Any) -> TwilioSmsConfig:
    values: dict[str, Any] = {
        "account_sid": ACCOUNT,
        "auth_token": TOKEN,
        "from_number": OUR_NUMBER,
    }
    values.update(overrides)
    return TwilioSmsConfig(**values)


def outbound(text: str = "Hi from support", **overrides: Any) -> OutboundMessage:
    values: dict[str, Any] = {
        "message_id": 7,
        "conversation_id": 3,
        "recipient": Sender("phone", CUSTOMER, True),
        "text": text,
    }
    values.update(overrides)
    return OutboundMessage(**values)


ChannelFactory = Callable[..., TwilioSmsChannel]


@pytest.fixture
async def make_channel() -> AsyncIterator[ChannelFactory]:
    made: list[TwilioSmsChannel] = []

    def make(
        blobs: MemoryBlobs | None = None, options: dict[str, Any] | None = None, **overrides: Any
    ) -> TwilioSmsChannel:
        context = ChannelContext(
            slug=SLUG,
            public_base_url=PUBLIC,
            now=lambda: datetime.now(UTC),
            blobs=blobs if blobs is not None else MemoryBlobs(),
            options=options or {},
        )
        channel = TwilioSmsChannel(SLUG, config(**overrides), context)
        made.append(channel)
        return channel

    yield make
    for channel in made:
        await channel.stop()


@pytest.fixture(scope="module")
def twilio_server() -> Iterator[FakeTwilioServer]:
    with FakeTwilioServer() as server:
        yield server


@pytest.fixture
def fake(twilio_server: FakeTwilioServer) -> FakeTwilio:
    twilio_server.fake = FakeTwilio()
    return twilio_server.fake


@pytest.fixture
def api_channel(make_channel: ChannelFactory, twilio_server: FakeTwilioServer) -> ChannelFactory:
    """A factory of channels whose REST calls go to the fake."""

    def make(**overrides: Any) -> TwilioSmsChannel:
        overrides.setdefault("api_base_url", twilio_server.url)
        overrides.setdefault("request_timeout", 2.0)
        return make_channel(**overrides)

    return make


@dataclass
class Hit:
    path: str
    host: str
    authorization: str | None


@dataclass
class MediaServer:
    """A tiny ASGI app that records every request (the SSRF tests' tripwire)."""

    hits: list[Hit] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        query = scope["query_string"].decode()
        self.hits.append(Hit(path, headers.get("host", ""), headers.get("authorization")))
        status, content_type, chunks, extra = 200, "image/png", [PNG], []
        if path == "/redirect":
            status, chunks = 302, [b""]
            extra = [(b"location", query.removeprefix("to=").encode())]
        elif path == "/loop":
            status, chunks, extra = 302, [b""], [(b"location", b"/loop")]
        elif path == "/html":
            content_type, chunks = "text/html", [b"<html></html>"]
        elif path == "/svg":
            content_type, chunks = "image/svg+xml", [b"<svg onload='alert(1)'/>"]
        elif path == "/big":
            chunks = [b"\x00" * 65536] * 40  # 2.5 MiB with a Content-Length
        elif path == "/stream":
            chunks = [b"\x00" * 65536] * 40  # the same without a Content-Length
        response_headers = [(b"content-type", content_type.encode()), *extra]
        if path != "/stream":
            total = sum(len(c) for c in chunks)
            response_headers.append((b"content-length", str(total).encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        for index, chunk in enumerate(chunks):
            more = index < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    def count(self, path: str) -> int:
        return sum(1 for hit in self.hits if hit.path == path)


@pytest.fixture(scope="module")
def media_server() -> Iterator[tuple[ThreadedASGIServer, MediaServer]]:
    app = MediaServer()
    with ThreadedASGIServer(app, name="media-server") as server:  # type: ignore[arg-type]
        yield server, app


@pytest.fixture
def media(
    media_server: tuple[ThreadedASGIServer, MediaServer],
) -> tuple[int, MediaServer]:
    server, app = media_server
    app.hits.clear()
    assert server.port is not None
    return server.port, app


class StubResolver:
    """DNS as the test says; counts lookups."""

    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        if host not in self.table:
            raise MediaRefused(f"cannot resolve {host}")
        return self.table[host]


# -- inbound: SMS -------------------------------------------------------------------
def test_inbound_sms_verifies_and_parses(make_channel: ChannelFactory) -> None:
    channel = make_channel()
    request = twilio_request(SMS_URL, sms_params("Where is my order #123?"))
    assert channel.verify(request)
    [item] = channel.parse(request)
    assert isinstance(item, InboundMessage)
    assert item.external_id == "SM" + "a" * 32
    assert item.sender == Sender("phone", CUSTOMER, True, verified_by="twilio")
    assert item.text == "Where is my order #123?"
    assert item.attachments == []
    assert item.data == {"to": OUR_NUMBER, "num_segments": "1"}
    assert not item.no_auto_reply
    ack = channel.ack(request)
    assert (ack.status, ack.body, ack.content_type) == (200, EMPTY_TWIML, "text/xml")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+14155550123", "+14155550123"),
        (" +1 (415) 555-0123 ", "+14155550123"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+49.170.1234567", "+491701234567"),
    ],
)
def test_sender_is_normalised_to_e164(
    make_channel: ChannelFactory, raw: str, expected: str
) -> None:
    assert normalize_e164(raw) == expected
    [item] = make_channel().parse(twilio_request(SMS_URL, sms_params(From=raw)))
    assert isinstance(item, InboundMessage)
    assert item.sender.address == expected


@pytest.mark.parametrize(
    "raw", ["", "not-a-number", "4155550123", "+1", "whatsapp:+14155550123", "+1 415 555 0123 ext"]
)
def test_bad_from_is_rejected_with_the_raw_body(make_channel: ChannelFactory, raw: str) -> None:
    request = twilio_request(SMS_URL, sms_params(From=raw))
    [item] = make_channel().parse(request)
    assert isinstance(item, Reject)
    assert item.raw == request.body
    assert item.external_id == "SM" + "a" * 32
    assert "From" in item.reason


def test_messaging_service_webhook_is_valid(make_channel: ChannelFactory) -> None:
    channel = make_channel(from_number=None, messaging_service_sid=SERVICE)
    request = twilio_request(SMS_URL, sms_params(MessagingServiceSid=SERVICE))
    assert channel.verify(request)
    [item] = channel.parse(request)
    assert isinstance(item, InboundMessage)
    assert item.data["messaging_service_sid"] == SERVICE


# -- the signature matrix -----------------------------------------------------------
def _wrong_token() -> WebhookRequest:
    return twilio_request(SMS_URL, sms_params(), token="0" * 32)


def _changed_parameter() -> WebhookRequest:
    good = twilio_request(SMS_URL, sms_params())
    form = dict(good.form, Body="Send the refund to me instead")
    return WebhookRequest("POST", good.url, good.headers, urlencode(form).encode(), form=form)


def _other_url() -> WebhookRequest:
    good = twilio_request(SMS_URL, sms_params())
    other = f"{PUBLIC}/webhooks/twilio/other-inbox/sms"
    return WebhookRequest("POST", other, good.headers, good.body, form=good.form)


def _missing_header() -> WebhookRequest:
    return twilio_request(SMS_URL, sms_params(), signature="")


def _garbage_header() -> WebhookRequest:
    return twilio_request(SMS_URL, sms_params(), signature="bm90IGEgc2lnbmF0dXJl")


@pytest.mark.parametrize(
    "build", [_wrong_token, _changed_parameter, _other_url, _missing_header, _garbage_header]
)
def test_signature_matrix_refuses(
    make_channel: ChannelFactory, build: Callable[[], WebhookRequest]
) -> None:
    assert make_channel().verify(build()) is False


def test_signature_accepts_valid_and_explicit_port(make_channel: ChannelFactory) -> None:
    channel = make_channel()
    assert channel.verify(twilio_request(SMS_URL, sms_params()))
    # Twilio may sign with or without the default port; the validator accepts both.
    with_port = SMS_URL.replace("omni.example.com", "omni.example.com:443")
    signed = twilio_request(with_port, sms_params())
    assert channel.verify(
        WebhookRequest("POST", SMS_URL, signed.headers, signed.body, form=signed.form)
    )
    # Query strings are part of what Twilio signs.
    assert channel.verify(twilio_request(SMS_URL + "?tenant=1", sms_params()))


# -- status callbacks and unknown payloads ------------------------------------------
def status_params(status: str, **extra: str) -> dict[str, str]:
    params = {
        "SmsSid": "SM" + "b" * 32,
        "SmsStatus": status,
        "MessageStatus": status,
        "To": CUSTOMER,
        "MessageSid": "SM" + "b" * 32,
        "AccountSid": ACCOUNT,
        "From": OUR_NUMBER,
        "ApiVersion": "2010-04-01",
    }
    params.update(extra)
    return params


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (status_params("sent"), StatusUpdate("SM" + "b" * 32, "sent")),
        (status_params("delivered"), StatusUpdate("SM" + "b" * 32, "delivered")),
        (
            status_params("undelivered", ErrorCode="30003", ErrorMessage="Unreachable handset"),
            StatusUpdate("SM" + "b" * 32, "undelivered", "30003: Unreachable handset"),
        ),
        (
            status_params("failed", ErrorCode="30007"),
            StatusUpdate(
                "SM" + "b" * 32, "failed", "30007: https://www.twilio.com/docs/errors/30007"
            ),
        ),
    ],
)
def test_status_callbacks(
    make_channel: ChannelFactory, params: dict[str, str], expected: StatusUpdate
) -> None:
    channel = make_channel()
    request = twilio_request(STATUS_URL, params)
    assert channel.verify(request)
    assert channel.parse(request) == [expected]
    assert channel.ack(request).body == EMPTY_TWIML


@pytest.mark.parametrize(
    ("url", "params"),
    [
        (SMS_URL, {"AccountSid": ACCOUNT, "Foo": "bar"}),
        (STATUS_URL, {"AccountSid": ACCOUNT, "MessageSid": "SM" + "c" * 32}),
        (f"{PUBLIC}/webhooks/twilio/{SLUG}/voice", {"CallSid": "CA" + "1" * 32}),
    ],
)
async def test_unknown_payloads_are_ignored(
    make_channel: ChannelFactory, url: str, params: dict[str, str]
) -> None:
    channel = make_channel()
    request = twilio_request(url, params)
    assert channel.verify(request)
    assert channel.parse(request) == []
    assert await channel.parse_async(request) == []
    assert channel.ack(request).body == EMPTY_TWIML


async def test_a_signed_message_without_message_sid_is_rejected_raw_and_logged(
    make_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    channel = make_channel()
    drop = ("MessageSid", "SmsMessageSid", "SmsSid")
    params = {k: v for k, v in sms_params("where is my order").items() if k not in drop}
    request = twilio_request(SMS_URL, params)
    assert channel.verify(request)
    with caplog.at_level("WARNING", logger="channels.twilio_sms"):
        [item] = channel.parse(request)
    assert isinstance(item, Reject) and item.raw == request.body
    assert "MessageSid" in item.reason
    (line,) = [r.getMessage() for r in caplog.records if "without MessageSid" in r.getMessage()]
    assert SLUG in line and TOKEN not in line and "where is my order" not in line
    assert await channel.reimport(request.body, "") == [Reject(item.reason, request.body)]
    assert channel.ack(request).body == EMPTY_TWIML  # answered, so Twilio does not retry


async def test_reimport_tells_messages_from_statuses_by_their_fields(
    make_channel: ChannelFactory,
) -> None:
    channel = make_channel()
    message = twilio_request(SMS_URL, sms_params("again"))
    [item] = await channel.reimport(message.body, "SM" + "a" * 32) or []
    assert isinstance(item, InboundMessage) and item.text == "again"
    status = twilio_request(STATUS_URL, status_params("delivered"))
    assert await channel.reimport(status.body, "x") == [StatusUpdate("SM" + "b" * 32, "delivered")]


# -- opt-out ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        *[(word, "stop") for word in ("STOP", "stopall", "Unsubscribe", "CANCEL", "end", "QUIT")],
        ("revoke", "stop"),
        ("OPTOUT", "stop"),
        ("  Stop.  ", "stop"),
        ("START", "start"),
        ("yes", "start"),
        ("Unstop", "start"),
        ("HELP", "help"),
        ("info", "help"),
        ("stop sending me ads", None),
        ("please stop", None),
        ("Hello", None),
        ("", None),
    ],
)
def test_opt_out_keywords(make_channel: ChannelFactory, body: str, expected: str | None) -> None:
    assert opt_out_keyword(body) == expected
    [item] = make_channel().parse(twilio_request(SMS_URL, sms_params(body)))
    assert isinstance(item, InboundMessage)
    assert item.data.get("opt_out") == expected
    assert item.no_auto_reply == (expected in ("stop", "help"))


@pytest.mark.parametrize(
    ("opt_out_type", "expected"), [("STOP", "stop"), ("START", "start"), ("HELP", "help")]
)
def test_opt_out_type_wins_over_the_body(
    make_channel: ChannelFactory, opt_out_type: str, expected: str
) -> None:
    # Advanced Opt-Out: a custom keyword ("arret") still carries Twilio's OptOutType.
    params = sms_params("arret", OptOutType=opt_out_type)
    [item] = make_channel().parse(twilio_request(SMS_URL, params))
    assert isinstance(item, InboundMessage)
    assert item.data["opt_out"] == expected


def test_help_is_answered_with_help_text_only_when_self_managed(
    make_channel: ChannelFactory,
) -> None:
    text = 'Acme support: reply STOP to opt out. <Rates & "fees" may apply>'
    managed = make_channel(self_managed_opt_out=True, help_text=text)
    ack = managed.ack(twilio_request(SMS_URL, sms_params("help")))
    assert ack.content_type == "text/xml"
    assert ack.body == (
        b'<?xml version="1.0" encoding="UTF-8"?><Response><Message>'
        b'Acme support: reply STOP to opt out. &lt;Rates &amp; "fees" may apply&gt;'
        b"</Message></Response>"
    )
    via_type = managed.ack(twilio_request(SMS_URL, sms_params("aide", OptOutType="HELP")))
    assert b"<Message>" in via_type.body
    assert managed.ack(twilio_request(SMS_URL, sms_params("hello"))).body == EMPTY_TWIML
    assert managed.ack(twilio_request(SMS_URL, sms_params("STOP"))).body == EMPTY_TWIML
    # Twilio answers HELP itself unless opt-out is self-managed.
    twilio_managed = make_channel(help_text=text)
    assert twilio_managed.ack(twilio_request(SMS_URL, sms_params("help"))).body == EMPTY_TWIML


# -- MMS ----------------------------------------------------------------------------
async def test_mms_media_is_fetched_into_the_blob_store(
    make_channel: ChannelFactory, twilio_server: FakeTwilioServer, fake: FakeTwilio
) -> None:
    fake.add_recording("ME" + "1" * 32, PNG, "image/png")
    fake.add_recording("ME" + "2" * 32, b"<html>", "text/html")
    base = f"{twilio_server.url}/2010-04-01/Accounts/{ACCOUNT}/Recordings"
    blobs = MemoryBlobs()
    channel = make_channel(
        blobs,
        api_base_url=twilio_server.url,
        media_hosts=["127.0.0.1"],
        allow_insecure_media_for_tests=True,
    )
    params = sms_params(
        "look",
        NumMedia="3",
        MediaUrl0=f"{base}/ME{'1' * 32}",
        MediaContentType0="image/png",
        MediaUrl1=f"{base}/ME{'2' * 32}",
        MediaContentType1="image/jpeg",  # what Twilio claims; the fetch sees text/html
        MediaUrl2="https://evil.example/steal.jpg",
        MediaContentType2="image/jpeg",
    )
    request = twilio_request(SMS_URL, params)
    assert channel.verify(request)

    # parse (sync) leaves the media as URLs.
    [plain] = channel.parse(request)
    assert isinstance(plain, InboundMessage)
    assert [(a.url, a.blob_key) for a in plain.attachments] == [
        (params[f"MediaUrl{i}"], None) for i in range(3)
    ]

    [item] = await channel.parse_async(request)
    assert isinstance(item, InboundMessage)
    stored, wrong_type, foreign = item.attachments
    assert stored == Attachment(f"ME{'1' * 32}.png", "image/png", len(PNG), blob_key="mem:0")
    assert blobs.items["mem:0"] == (PNG, "image/png", f"ME{'1' * 32}.png")
    assert (wrong_type.blob_key, wrong_type.url) == (None, params["MediaUrl1"])
    assert (foreign.blob_key, foreign.url) == (None, params["MediaUrl2"])
    errors = item.data["media_errors"]
    assert [e["url"] for e in errors] == [params["MediaUrl1"], params["MediaUrl2"]]
    assert "text/html" in errors[0]["reason"]
    assert "not an allowed media host" in errors[1]["reason"]
    # The media requests carried our Basic auth (the fake insists), to the API host only.
    media_requests = [r for r in fake.requests if "/Recordings/" in r.path]
    assert len(media_requests) == 2
    assert all(r.username == ACCOUNT for r in media_requests)


async def test_copies_of_an_mms_fetch_each_medium_once(
    make_channel: ChannelFactory, twilio_server: FakeTwilioServer, fake: FakeTwilio
) -> None:
    sids = [f"ME{digit * 32}" for digit in "34"]
    for sid in sids:
        fake.add_recording(sid, PNG + sid.encode(), "image/png")
    base = f"{twilio_server.url}/2010-04-01/Accounts/{ACCOUNT}/Recordings"
    stored: set[str] = set()

    async def is_stored(external_id: str) -> bool:
        return external_id in stored

    channel = make_channel(
        api_base_url=twilio_server.url,
        media_hosts=["127.0.0.1"],
        allow_insecure_media_for_tests=True,
    )
    channel.context.stored = is_stored
    params = sms_params("two photos", NumMedia="2")
    for index, sid in enumerate(sids):
        params |= {f"MediaUrl{index}": f"{base}/{sid}", f"MediaContentType{index}": "image/png"}
    request = twilio_request(SMS_URL, params)

    def fetches() -> list[int]:
        return [sum(r.path.endswith(f"/Recordings/{sid}") for r in fake.requests) for sid in sids]

    # 20 copies at once (Twilio retrying while we are slow): one fetch per medium, shared
    copies = await asyncio.gather(*(channel.parse_async(request) for _ in range(20)))
    assert fetches() == [1, 1]
    keys = set()
    for [item] in copies:
        assert isinstance(item, InboundMessage)
        keys.add(tuple(a.blob_key for a in item.attachments))
    assert len(keys) == 1 and None not in next(iter(keys))
    # copies after the message is stored are not fetched at all, even by a fresh process
    stored.add(params["MessageSid"])
    again = make_channel(
        api_base_url=twilio_server.url,
        media_hosts=["127.0.0.1"],
        allow_insecure_media_for_tests=True,
    )
    again.context.stored = is_stored
    for _ in range(20):
        [item] = await again.parse_async(request)
        assert isinstance(item, InboundMessage) and all(
            a.blob_key is None for a in item.attachments
        )
    assert fetches() == [1, 1]


async def test_a_failed_media_fetch_is_tried_again_by_the_next_copy(
    make_channel: ChannelFactory, twilio_server: FakeTwilioServer, fake: FakeTwilio
) -> None:
    sid = "ME" + "5" * 32
    base = f"{twilio_server.url}/2010-04-01/Accounts/{ACCOUNT}/Recordings"
    channel = make_channel(
        api_base_url=twilio_server.url,
        media_hosts=["127.0.0.1"],
        allow_insecure_media_for_tests=True,
    )
    params = sms_params("photo", NumMedia="1", MediaUrl0=f"{base}/{sid}")
    request = twilio_request(SMS_URL, params)
    [first] = await channel.parse_async(request)  # not there yet: 404, refused
    assert isinstance(first, InboundMessage) and first.data["media_errors"]
    fake.add_recording(sid, PNG, "image/png")
    [second] = await channel.parse_async(request)
    assert isinstance(second, InboundMessage) and second.attachments[0].blob_key is not None


async def test_mms_without_blob_store_keeps_urls(make_channel: ChannelFactory) -> None:
    channel = make_channel()
    channel.context.blobs = None
    url = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Messages/MM1/Media/ME1"
    params = sms_params("", NumMedia="1", MediaUrl0=url, MediaContentType0="image/jpeg")
    [item] = await channel.parse_async(twilio_request(SMS_URL, params))
    assert isinstance(item, InboundMessage)
    assert item.attachments == [Attachment("ME1.jpg", "image/jpeg", 0, url=url)]
    assert item.data["media_errors"] == [{"url": url, "reason": "no blob store configured"}]


async def test_twilio_media_redirect_to_cdn_over_https_is_pinned_and_auth_stays_home(
    make_channel: ChannelFactory,
) -> None:
    """The production path: https, DNS checked and pinned, Basic auth only to api.twilio.com."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers["host"] == "api.twilio.com":
            return httpx.Response(307, headers={"location": "https://mms.twiliocdn.com/a/b.jpg"})
        return httpx.Response(200, content=b"jpeg!", headers={"content-type": "image/jpeg"})

    resolver = StubResolver({"api.twilio.com": ["54.172.60.10"], "mms.twiliocdn.com": ["3.5.6.7"]})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        blobs = MemoryBlobs()
        channel = make_channel(blobs, options={"media_resolver": resolver, "media_client": client})
        url = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Messages/MM1/Media/ME9"
        params = sms_params("", NumMedia="1", MediaUrl0=url, MediaContentType0="image/jpeg")
        [item] = await channel.parse_async(twilio_request(SMS_URL, params))
    assert isinstance(item, InboundMessage)
    assert item.attachments == [Attachment("ME9.jpg", "image/jpeg", 5, blob_key="mem:0")]
    first, second = seen
    assert (first.url.scheme, first.url.host) == ("https", "54.172.60.10")  # pinned
    assert first.extensions["sni_hostname"] == "api.twilio.com"  # TLS checks the name
    assert first.headers["authorization"].startswith("Basic ")
    assert (second.url.host, second.headers["host"]) == ("3.5.6.7", "mms.twiliocdn.com")
    assert "authorization" not in second.headers
    assert resolver.calls == ["api.twilio.com", "mms.twiliocdn.com"]


# -- send ---------------------------------------------------------------------------
async def test_send_creates_a_message_with_status_callback(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    channel = api_channel()
    receipt = await channel.send(outbound("Your order shipped"))
    [record] = fake.messages
    assert receipt.provider_id == record["sid"]
    assert receipt.status == "queued"
    assert record["form"] == {
        "To": CUSTOMER,
        "From": OUR_NUMBER,
        "Body": "Your order shipped",
        # the message id rides along: Twilio's reports on any copy of it name it
        "StatusCallback": f"{PUBLIC}/webhooks/twilio/{SLUG}/sms-status?message=7",
    }
    request = fake.requests[-1]
    assert request.username == ACCOUNT  # HTTP Basic with the account SID and token
    assert request.headers["authorization"].startswith("Basic ")
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"


async def test_send_through_messaging_service_with_media(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    channel = api_channel(from_number=None, messaging_service_sid=SERVICE)
    attachments = (
        Attachment("a.png", "image/png", 10, url="https://files.example.com/a.png"),
        Attachment("b.pdf", "application/pdf", 10, url="https://files.example.com/b.pdf"),
    )
    receipt = await channel.send(outbound("see attached", attachments=attachments))
    [record] = fake.messages
    assert receipt.status == "accepted"  # a Messaging Service picks the sender later
    assert record["form"]["MessagingServiceSid"] == SERVICE
    assert "From" not in record["form"]
    assert record["form_lists"]["MediaUrl"] == [a.url for a in attachments]


async def test_attachment_without_public_url_fails_permanently(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    blob_only = (Attachment("a.png", "image/png", 10, blob_key="sha256:00"),)
    with pytest.raises(PermanentSendError) as caught:
        await api_channel().send(outbound(attachments=blob_only))
    assert caught.value.code == "media_url"
    assert fake.messages == []


async def test_long_bodies_are_split(api_channel: ChannelFactory, fake: FakeTwilio) -> None:
    words = " ".join(f"word{i:04d}" for i in range(450))  # 4049 characters
    receipt = await api_channel().send(outbound(words))
    bodies = [m["body"] for m in fake.messages]
    assert len(bodies) == 3
    assert all(len(b) <= 1600 for b in bodies)
    assert " ".join(bodies) == words
    assert receipt.provider_id == fake.messages[0]["sid"]
    assert receipt.data["part_ids"] == [m["sid"] for m in fake.messages[1:]]
    assert all(m["form"]["StatusCallback"].endswith("/sms-status?message=7") for m in fake.messages)


async def test_long_bodies_are_refused_when_configured(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    with pytest.raises(PermanentSendError) as caught:
        await api_channel(long_messages="refuse").send(outbound("x" * 1601))
    assert caught.value.code == "too_long"
    assert fake.messages == [] and fake.requests == []
    await api_channel(long_messages="refuse").send(outbound("x" * 1600))
    assert len(fake.messages) == 1


def test_split_text_never_loses_text_or_breaks_a_character() -> None:
    assert split_text("short") == ["short"]
    assert split_text("") == [""]
    assert split_text("a" * 3300) == ["a" * 1600, "a" * 1600, "a" * 100]
    accented = "e\u0301" * 1000  # e + combining acute: never split between them
    parts = split_text(accented)
    assert "".join(parts) == accented
    assert all(not p.startswith("\u0301") for p in parts)
    lines = "\n".join(["line " * 50] * 20)
    assert all(len(p) <= 1600 for p in split_text(lines))


async def test_a_failed_part_resumes_without_resending_earlier_parts(
    api_channel: ChannelFactory, fake: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = api_channel()
    real_create = channel._create
    calls = 0

    async def flaky(to: str, body: str, media: Sequence[str], mid: int) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TemporarySendError("network blip")
        return await real_create(to, body, media, mid)

    monkeypatch.setattr(channel, "_create", flaky)
    message = outbound("a" * 3000)
    with pytest.raises(TemporarySendError) as caught:
        await channel.send(message)
    assert len(fake.messages) == 1
    assert caught.value.progress is not None  # the outbox keeps it with the row
    # another process (nothing in memory) resumes from what the row kept
    receipt = await api_channel().send(dataclasses.replace(message, progress=caught.value.progress))
    assert [m["body"] for m in fake.messages] == ["a" * 1600, "a" * 1400]
    assert receipt.provider_id == fake.messages[0]["sid"]
    assert receipt.uncertain_resends == 0


async def test_429_is_temporary_with_retry_after(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=429, retry_after=7, resource="Messages")
    with pytest.raises(TemporarySendError) as caught:
        await api_channel().send(outbound())
    assert caught.value.retry_after == 7
    assert "20429" in caught.value.reason
    assert fake.messages == []


def clocked(channel: TwilioSmsChannel, fake: FakeTwilio, clock: FakeClock) -> TwilioSmsChannel:
    """The channel and the fake Twilio on one movable clock (date_created included)."""
    channel.context.now = clock.now
    fake._clock = clock.now
    return channel


async def test_500_is_temporary_and_the_retry_checks_first(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    clock = FakeClock(datetime.now(UTC))
    channel = clocked(api_channel(), fake, clock)
    fake.fail_next(1, status=500, resource="Messages")
    with pytest.raises(TemporarySendError) as caught:
        await channel.send(outbound())
    assert caught.value.retry_after is None
    # a 5xx may hide a created message: the retry looks it up, but not before check_delay
    with pytest.raises(TemporarySendError) as waiting:
        await channel.send(outbound())
    assert waiting.value.retry_after == pytest.approx(60, abs=1)
    assert [r.method for r in fake.requests] == ["POST"]
    clock.advance(60)
    receipt = await channel.send(outbound())
    assert len(fake.messages) == 1 and receipt.provider_id == fake.messages[0]["sid"]
    assert [r.method for r in fake.requests] == ["POST", "GET", "POST"]
    assert receipt.uncertain_resends == 1  # not found, created again: a possible duplicate


async def test_a_create_that_lands_after_the_timeout_is_found_not_created_twice(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    clock = FakeClock(datetime.now(UTC))
    channel = clocked(api_channel(request_timeout=0.3, check_delay=45), fake, clock)
    lands = threading.Event()
    fake.hang_next(1, seconds=30, resource="Messages", until=lands)
    with pytest.raises(TemporarySendError) as caught:
        await channel.send(outbound("are you there"))
    assert "ReadTimeout" in caught.value.reason
    # the outbox retries soon (backoff): Twilio is still working on the create, so
    # listing now would find nothing and the resend would duplicate it. Nothing is asked.
    clock.advance(2)
    with pytest.raises(TemporarySendError) as waiting:
        await channel.send(outbound("are you there"))
    assert waiting.value.retry_after == pytest.approx(43, abs=1)
    assert fake.messages == [] and [r.method for r in fake.requests] == ["POST"]
    lands.set()  # Twilio finishes the create
    for _ in range(250):
        if fake.messages:
            break
        await asyncio.sleep(0.02)
    clock.advance(43)
    receipt = await channel.send(outbound("are you there"))
    assert len(fake.messages) == 1 and receipt.provider_id == fake.messages[0]["sid"]
    assert receipt.uncertain_resends == 0  # found, not sent again
    assert [r.method for r in fake.requests] == ["POST", "GET"]


async def test_a_lookup_that_keeps_failing_ends_in_a_counted_resend(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    channel = api_channel(check_delay=0, check_attempts=3)
    fake.fail_next(1, status=502, resource="Messages", method="POST")
    fake.fail_next(1000, status=503, resource="Messages", method="GET")  # lists are down
    message = outbound("hello?")
    with pytest.raises(TemporarySendError) as caught:
        await channel.send(message)
    reasons = []
    for _ in range(2):
        # each attempt may run in another process: only the row's progress carries over
        message = dataclasses.replace(message, progress=caught.value.progress)
        with pytest.raises(TemporarySendError) as caught:
            await api_channel(check_delay=0, check_attempts=3).send(message)
        reasons.append(caught.value.reason)
    assert "look-up 1 of 3" in reasons[0] and "look-up 2 of 3" in reasons[1]
    message = dataclasses.replace(message, progress=caught.value.progress)
    receipt = await api_channel(check_delay=0, check_attempts=3).send(message)
    assert [r.method for r in fake.requests] == ["POST", "GET", "GET", "GET", "POST"]
    assert receipt.provider_id == fake.messages[0]["sid"] and len(fake.messages) == 1
    assert receipt.uncertain_resends == 1


async def test_unreachable_twilio_is_temporary(make_channel: ChannelFactory) -> None:
    channel = make_channel(api_base_url="http://127.0.0.1:9", request_timeout=1.0)
    with pytest.raises(TemporarySendError) as caught:
        await channel.send(outbound())
    assert "ConnectError" in caught.value.reason


async def test_opted_out_recipient_is_permanent_21610(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    fake.opted_out.add(CUSTOMER)
    with pytest.raises(PermanentSendError) as caught:
        await api_channel().send(outbound())
    assert caught.value.code == "21610"
    assert "unsubscribed recipient" in caught.value.reason
    assert fake.messages == []


@pytest.mark.parametrize(
    ("code", "status", "message"),
    [(21211, 400, "Invalid 'To' Phone Number"), (30007, 400, "Message filtered")],
)
async def test_other_4xx_are_permanent_with_twilio_code(
    api_channel: ChannelFactory, fake: FakeTwilio, code: int, status: int, message: str
) -> None:
    fake.fail_next_with(code, status, message, resource="Messages")
    with pytest.raises(PermanentSendError) as caught:
        await api_channel().send(outbound())
    assert caught.value.code == str(code)
    assert message in caught.value.reason


async def test_non_phone_recipient_is_permanent(api_channel: ChannelFactory) -> None:
    with pytest.raises(PermanentSendError):
        await api_channel().send(outbound(recipient=Sender("email", "a@example.com", True)))


# -- find_sent ----------------------------------------------------------------------
async def test_find_sent_matches_body_and_date_created(
    api_channel: ChannelFactory, twilio_server: FakeTwilioServer
) -> None:
    now = [datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC)]
    fake = twilio_server.fake = FakeTwilio(clock=lambda: now[0])
    channel = api_channel()
    await channel.send(outbound("Your refund is on its way"))  # an older, identical text
    now[0] += timedelta(hours=2)
    since = now[0] + timedelta(milliseconds=400)  # the claim, mid-second
    message = outbound("Your refund is on its way", message_id=8)
    assert await channel.find_sent(message, since) is None  # only the old one exists

    await channel.send(outbound("Something else", message_id=9))
    assert await channel.find_sent(message, since) is None

    await channel.send(message)
    found = await channel.find_sent(message, since)
    assert found is not None
    assert found.provider_id == fake.messages[-1]["sid"]
    assert found.status == "queued"
    # A naive ``since`` (SQLite) is read as UTC.
    assert await channel.find_sent(message, since.replace(tzinfo=None)) is not None
    assert await channel.find_sent(message, since + timedelta(seconds=5)) is None


async def test_find_sent_of_a_split_message_matches_its_first_part(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    channel = api_channel()
    since = datetime.now(UTC) - timedelta(seconds=1)
    message = outbound("b" * 2000)
    receipt = await channel.send(message)
    found = await channel.find_sent(message, since)
    assert found is not None and found.provider_id == receipt.provider_id


async def test_find_sent_raises_when_twilio_cannot_be_asked(
    api_channel: ChannelFactory, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=503, resource="Messages")
    with pytest.raises(TemporarySendError):
        await api_channel().find_sent(outbound(), datetime.now(UTC))


# -- configuration ------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"from_number": None},  # neither a number nor a Messaging Service
        {"from_number": "4155550123"},
        {"from_number": "+1 415 555 0123"},  # must be written as E.164
        {"account_sid": "AC123"},
        {"messaging_service_sid": "MGxyz"},
        {"long_messages": "truncate"},
        {"unknown_key": 1},
        {"help_text": "bell\x07"},
    ],
)
def test_config_is_validated(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config(**overrides)


def test_config_defaults() -> None:
    cfg = config()
    assert cfg.channel == "sms" and cfg.provider == "twilio"
    assert cfg.media_hosts == ["api.twilio.com", "mms.twiliocdn.com", "s3-external-1.amazonaws.com"]
    assert cfg.allow_insecure_media_for_tests is False
    assert "image/*" in cfg.media_types and "application/pdf" in cfg.media_types
    assert "secret" not in repr(config(auth_token="secret"))
    assert TwilioSmsChannel.max_text_length == 1600
    assert TwilioSmsChannel.uncertain_policy.value == "check"


# -- the SSRF-safe fetcher ----------------------------------------------------------
BAD_ADDRESSES = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.5",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "0.0.0.0",
    "100.64.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "::1",
    "fd00::1",
    "fc00::2",
    "fe80::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "::",
    "ff02::1",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
async def test_fetch_refuses_non_public_addresses_without_connecting(
    media: tuple[int, MediaServer], address: str
) -> None:
    port, app = media
    resolver = StubResolver({"media.example": [address]})
    with pytest.raises(MediaRefused) as caught:
        await fetch_media(
            f"https://media.example:{port}/count",
            allowed_hosts=["media.example"],
            max_bytes=1_000_000,
            allowed_types=["image/*"],
            resolver=resolver,
        )
    assert "refused address" in caught.value.reason
    assert check_address(address) is not None
    assert resolver.calls == ["media.example"]
    assert app.count("/count") == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:{port}/count",
        "https://[::1]:{port}/count",
        "https://[::ffff:127.0.0.1]:{port}/count",
        "https://169.254.169.254/latest/meta-data/",
    ],
)
async def test_fetch_refuses_ip_literals_even_when_listed(
    media: tuple[int, MediaServer], url: str
) -> None:
    port, app = media
    resolver = StubResolver({})
    with pytest.raises(MediaRefused):
        await fetch_media(
            url.format(port=port),
            allowed_hosts=["127.0.0.1", "::1", "::ffff:127.0.0.1", "169.254.169.254"],
            max_bytes=1_000_000,
            allowed_types=["image/*"],
            resolver=resolver,
        )
    assert resolver.calls == []
    assert app.count("/count") == 0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://api.twilio.com/x.png", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("http://api.twilio.com/x.png", "https only"),
        ("https://api.twilio.com.evil.example/x.png", "not an allowed"),
        ("https://evil.example@api.twilio.com/x.png", "userinfo"),
        ("https://api.twilio.com@evil.example/x.png", "userinfo"),
        ("https://api.twilio.com:443@evil.example/x.png", "userinfo"),
        ("https://evil.example#@api.twilio.com/x.png", "not an allowed"),
        ("https://api.twilio.com\\@evil.example/x.png", "backslash"),
        ("https://аpi.twilio.com/x.png", "not ASCII"),  # Cyrillic "а"
        ("https://xn--pi-7kc.twilio.com/x.png", "not an allowed"),
        ("https://api.twilio.com./x.png", "not a plain DNS name"),
        ("https://api.twilio.com%2eevil.example/x.png", "not a plain DNS name"),
        ("https://api.twilio.com /x.png", "whitespace"),
        ("https:///x.png", "no host"),
        ("https://127.1/x.png", "numeric"),
        ("https://0x7f.1/x.png", "numeric"),
    ],
)
async def test_fetch_refuses_url_tricks_before_resolving(url: str, why: str) -> None:
    resolver = StubResolver({})
    with pytest.raises(MediaRefused) as caught:
        await fetch_media(
            url,
            allowed_hosts=["api.twilio.com", "127.1", "0x7f.1"],
            max_bytes=1_000_000,
            allowed_types=["image/*"],
            resolver=resolver,
        )
    assert why in caught.value.reason
    assert resolver.calls == []


async def test_fetch_refuses_a_name_with_any_private_address(
    media: tuple[int, MediaServer],
) -> None:
    port, app = media
    resolver = StubResolver({"media.example": ["54.172.60.10", "10.0.0.1"]})
    with pytest.raises(MediaRefused):
        await fetch_media(
            f"https://media.example:{port}/count",
            allowed_hosts=["media.example"],
            max_bytes=1000,
            allowed_types=["image/*"],
            resolver=resolver,
        )
    assert app.count("/count") == 0


def insecure_fetch(port: int, path: str, **kwargs: Any) -> Any:
    """A fetch from the local media server as ``media.test`` (test-only insecure mode)."""
    resolver = kwargs.pop(
        "resolver",
        StubResolver(
            {"media.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]}
        ),
    )
    values: dict[str, Any] = {
        "allowed_hosts": ["media.test", "cdn.test"],
        "max_bytes": 1_000_000,
        "allowed_types": ["image/*"],
        "allow_insecure": True,
        "resolver": resolver,
        "auth": ("AC1", "token"),
        "auth_host": "media.test",
    }
    values.update(kwargs)
    return fetch_media(f"http://media.test:{port}{path}", **values)


async def test_fetch_from_an_allowed_host_with_pinned_address(
    media: tuple[int, MediaServer],
) -> None:
    port, app = media
    data, content_type = await insecure_fetch(port, "/img")
    assert (data, content_type) == (PNG, "image/png")
    [hit] = app.hits
    assert hit.host == f"media.test:{port}"  # connected to 127.0.0.1, Host stays the name
    assert hit.authorization is not None and hit.authorization.startswith("Basic ")


async def test_fetch_redirect_to_a_disallowed_host_is_refused(
    media: tuple[int, MediaServer],
) -> None:
    port, app = media
    for target in (f"http://evil.test:{port}/count", f"http://127.0.0.1:{port}/count"):
        with pytest.raises(MediaRefused) as caught:
            await insecure_fetch(port, f"/redirect?to={target}")
        assert "not an allowed media host" in caught.value.reason
    assert app.count("/redirect") == 2
    assert app.count("/count") == 0


async def test_fetch_redirect_between_allowed_hosts_drops_auth(
    media: tuple[int, MediaServer],
) -> None:
    port, app = media
    data, _ = await insecure_fetch(port, f"/redirect?to=http://cdn.test:{port}/img")
    assert data == PNG
    first, second = app.hits
    assert first.authorization is not None
    assert (second.host, second.authorization) == (f"cdn.test:{port}", None)


async def test_fetch_stops_after_five_redirects(media: tuple[int, MediaServer]) -> None:
    port, app = media
    with pytest.raises(MediaRefused) as caught:
        await insecure_fetch(port, "/loop")
    assert "redirects" in caught.value.reason
    assert app.count("/loop") == 6


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/big", "over 1000000"),
        ("/stream", "over 1000000"),
        ("/html", "text/html"),
        ("/svg", "image/svg+xml"),
    ],
)
async def test_fetch_refuses_oversize_and_wrong_types(
    media: tuple[int, MediaServer], path: str, why: str
) -> None:
    port, _ = media
    with pytest.raises(MediaRefused) as caught:
        await insecure_fetch(port, path)
    assert why in caught.value.reason


async def test_insecure_mode_still_refuses_private_addresses(
    media: tuple[int, MediaServer],
) -> None:
    port, app = media
    with pytest.raises(MediaRefused):
        await insecure_fetch(port, "/count", resolver=StubResolver({"media.test": ["10.1.2.3"]}))
    with pytest.raises(MediaRefused):
        await insecure_fetch(
            port, "/count", resolver=StubResolver({"media.test": ["169.254.169.254"]})
        )
    assert app.count("/count") == 0


def test_public_addresses_pass() -> None:
    for address in ("54.172.60.10", "8.8.8.8", "2600:1f18::1"):
        assert check_address(address) is None
