"""The Meta channel (Messenger and WhatsApp Cloud API): every recorded webhook fixture
replayed through ``entries`` and the parser, the signature and handshake matrices, sends
against the local Graph fake over real HTTP, media through the SSRF-safe fetcher (the
WhatsApp two-step download, Messenger CDN URLs, ``*.domain`` allow-list entries), the
WhatsApp number quirks and the messaging windows."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from channels.base import (
    Attachment,
    ChannelContext,
    InboundMessage,
    OutboundMessage,
    ParsedItem,
    PermanentSendError,
    Reject,
    Sender,
    StatusUpdate,
    TemporarySendError,
    UncertainPolicy,
    WebhookRequest,
)
from channels.meta import (
    MetaChannel,
    MetaConfig,
    Unit,
    WatermarkStatus,
    entries,
    handshake,
    normalize_wa_id,
    route,
    verify_signature,
    window_state,
)
from channels.meta import graph as meta
from tests.channels.test_twilio_sms import MemoryBlobs, StubResolver
from tests.fakes.meta import (
    PAGE_ID,
    PHONE_NUMBER_ID,
    PSID,
    WA_ID,
    FakeGraph,
    FakeGraphServer,
    batched,
    messenger_attachment,
    messenger_text,
    meta_json_bytes,
    sign_meta,
    signed_request,
    wa_image,
    wa_media,
    wa_text,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "meta"
TOKEN = "EAAG-test-page-token"
APP_SECRET = "app-secret-0123456789"
VERIFY_TOKEN = "verify-me-please"
PUBLIC = "https://omni.example.com"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg bytes" * 8

# ids that appear in the fixtures
CUSTOMER = Sender("messenger", PSID, True, verified_by="meta")
WA_CUSTOMER = Sender("whatsapp", "+16505551234", True, name="Kerry Fisher", verified_by="meta")
MID_TEXT = (
    "m_AG5Hz2Uq7tuwNEhXfYYKj8mJEM_QPpz5jdCK48PnKAjSdjfipqxqMvK8ma6AC8fplwlqLP_5cgXIbu7I3rBN0P"
)
MID_QUICK = "m_Ff2gH5jK8lZ1xC4vB7nM0qW3eR6tY9uI2oP5aS8dF1gH4jK7lZ0xC3vB6nM9qW2eR5tY8uI1oP4aS7dF0gH"
MID_ECHO = "m_Ee5rT8yU1iO4pA7sD0fG3hJ6kL9zX2cV5bN8mQ1wE4rT7yU0iO3pA6sD9fG2hJ5kL8zX1cV4bN7mQ0wE3rT"
MID_TAIL = "1fX9pQw2Le8NzRyT5uVb3kHs7aJm0gOi4WqEr6YtUp1AsDf8GhJk2Lz5XcVb9NmQw3Er7Ty1Ui4Op6As0D"
WAMID = "wamid.HBgLMTY1MDU1NTEyMzQVAgARGBQ"
OUR_WAMID = WAMID + "0QzhGN0U2RDVDNEIzQTI5MTgwNwA="


def ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


def sec(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


# -- plumbing -----------------------------------------------------------------------


def config(channel: str = "messenger", **overrides: Any) -> MetaConfig:
    values: dict[str, Any] = {"channel": channel, "app": "main", "access_token": TOKEN}
    if channel == "messenger":
        values["page_id"] = PAGE_ID
    else:
        values["phone_number_id"] = PHONE_NUMBER_ID
    values.update(overrides)
    return MetaConfig(**values)


ChannelFactory = Callable[..., MetaChannel]


@pytest.fixture
async def make_channel() -> AsyncIterator[ChannelFactory]:
    made: list[MetaChannel] = []

    def make(
        channel: str = "messenger",
        *,
        blobs: MemoryBlobs | None = None,
        options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> MetaChannel:
        context = ChannelContext(
            slug=f"meta-{channel}",
            public_base_url=PUBLIC,
            now=lambda: datetime.now(UTC),
            blobs=blobs if blobs is not None else MemoryBlobs(),
            options=options if options is not None else {"app_secret": APP_SECRET},
        )
        made.append(MetaChannel(f"meta-{channel}", config(channel, **overrides), context))
        return made[-1]

    yield make
    for channel in made:
        await channel.stop()


@pytest.fixture(scope="module")
def graph_server() -> Iterator[FakeGraphServer]:
    with FakeGraphServer(access_token=TOKEN) as server:
        yield server


@pytest.fixture
def fake(graph_server: FakeGraphServer) -> FakeGraph:
    """The module's fake, with its records and per-test state cleared."""
    graph = graph_server.graph
    graph.reset()
    with graph.lock:
        for name in (
            "window_closed",
            "human_agent_expired",
            "blocked",
            "bad_recipients",
            "bad_urls",
            "outside_window",
            "not_on_whatsapp",
        ):
            getattr(graph, name).clear()
        graph.wa_id_map.clear()
        graph.templates = {"hello_world": ["en_US"]}
        graph.app_secret = None
        graph.window_error_mode = "sync"
    return graph


@pytest.fixture
def api_channel(make_channel: ChannelFactory, graph_server: FakeGraphServer) -> ChannelFactory:
    """A factory of channels whose Graph calls (and media fetches) go to the fake."""

    def make(channel: str = "messenger", **overrides: Any) -> MetaChannel:
        overrides.setdefault("api_base_url", graph_server.url)
        overrides.setdefault("request_timeout", 2.0)
        overrides.setdefault("media_hosts", ["127.0.0.1"])
        overrides.setdefault("allow_insecure_media_for_tests", True)
        return make_channel(channel, **overrides)

    return make


def outbound(text: str = "Hi from support", **overrides: Any) -> OutboundMessage:
    values: dict[str, Any] = {
        "message_id": 42,
        "conversation_id": 7,
        "recipient": Sender("messenger", PSID, True),
        "text": text,
    }
    values.update(overrides)
    return OutboundMessage(**values)


def wa_outbound(text: str = "Hi from support", **overrides: Any) -> OutboundMessage:
    overrides.setdefault("recipient", Sender("whatsapp", "+16505551234", True))
    return outbound(text, **overrides)


def units_of(payload: dict[str, Any]) -> list[Unit]:
    return entries(meta_json_bytes(payload))


def webhook(payload: dict[str, Any], secret: str = APP_SECRET) -> WebhookRequest:
    body, headers = signed_request(secret, payload)
    return WebhookRequest(
        "POST",
        f"{PUBLIC}/webhooks/meta/main",
        {k.lower(): v for k, v in headers.items()},
        body,
    )


# -- fixture replay -------------------------------------------------------------------
def brief(item: ParsedItem) -> tuple[Any, ...]:
    """An item in a form a table can spell out."""
    if isinstance(item, InboundMessage):
        return (
            "message",
            item.external_id,
            item.sender,
            item.text,
            [(a.filename, a.content_type, a.url) for a in item.attachments],
            item.provider_ts,
            item.references,
            item.data,
        )
    if isinstance(item, WatermarkStatus):
        return ("watermark", item.recipient, item.status, item.at)
    if isinstance(item, StatusUpdate):
        return ("status", item.provider_id, item.status, item.error, item.at)
    return ("reject", item.reason, item.external_id)


def m_message(
    mid: str,
    text: str = "",
    at: int = 0,
    attachments: list[tuple[str, str, str]] | None = None,
    data: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    return ("message", mid, CUSTOMER, text, attachments or [], ms(at), [], data or {})


def wa_message(
    tail: str,
    text: str = "",
    at: int = 0,
    attachments: list[tuple[str, str, str]] | None = None,
    references: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    full = {"wa_id": WA_ID, **(data or {})}
    return (
        "message",
        WAMID + tail,
        WA_CUSTOMER,
        text,
        attachments or [],
        sec(at),
        references or [],
        full,
    )


GRAPH = "https://graph.facebook.com/v21.0"
FBCDN = "https://scontent.xx.fbcdn.net/v"
LOCATION_URL = (
    "https://l.facebook.com/l.php?u=https%3A%2F%2Fwww.bing.com%2Fmaps%2Fdefault.aspx%3Fv%3D2"
    "%26pc%3DFACEBK%26mid%3D8100%26where1%3D52.3676%252C%2B4.9041"
)
REFERRAL = {"ref": "spring-sale", "source": "SHORTLINK", "type": "OPEN_THREAD"}
TEXT = m_message(MID_TEXT, "Hi, where is my order #1234?", 1718000000000)
QUICK = m_message(
    MID_QUICK,
    "Talk to a person",
    1718000004000,
    data={"event": "quick_reply", "payload": "HANDOFF"},
)
WA_TEXT = wa_message("zRUIwQTFCMkMzRDRFNUY2MDcxOAA=", "Hi, I need help with my order", 1718000000)
WA_DELIVERED = ("status", OUR_WAMID, "delivered", None, sec(1718000062))

EXPECTED: dict[str, list[tuple[Any, ...]]] = {
    "messenger_text.json": [TEXT],
    "messenger_text_unicode.json": [
        m_message(
            "m_Bk7eT0lqR3fW9mYpZcXhUa1gNd2sVo6LjQyIr8KbHt4EwMuCxPz5FnDv0Ai3Ys7Ge9Jq2Ol1Rw8Tb6Mk4Xh",
            "Grüße — 請幫我 🙂 <b>50% off</b> @support https://example.com/a",
            1718000001000,
        )
    ],
    "messenger_image.json": [
        m_message(
            "m_Cd" + MID_TAIL,
            at=1718000002000,
            attachments=[
                (
                    "448_n.jpg",
                    "image/jpeg",
                    f"{FBCDN}/t1.15752-9/448_n.jpg?_nc_cat=1&ccb=1-7&oh=00_AfB&oe=66A0",
                )
            ],
        )
    ],
    "messenger_file.json": [
        m_message(
            "m_Fi" + MID_TAIL,
            at=1718000002100,
            attachments=[
                (
                    "invoice.pdf",
                    "application/pdf",
                    "https://cdn.fbsbx.com/v/t59.2708-21/invoice.pdf/invoice.pdf"
                    "?_nc_cat=1&oh=03_Q7&oe=66A0",
                )
            ],
        )
    ],
    "messenger_audio.json": [
        m_message(
            "m_Au" + MID_TAIL,
            at=1718000002200,
            attachments=[
                (
                    "audioclip-1718000002200.mp4",
                    "audio/mp4",  # an .mp4 that Meta calls audio
                    "https://cdn.fbsbx.com/v/t59.3654-21/audioclip-1718000002200.mp4"
                    "?_nc_cat=1&oh=03_A1&oe=66A0",
                )
            ],
        )
    ],
    "messenger_video.json": [
        m_message(
            "m_Vi" + MID_TAIL,
            at=1718000002300,
            attachments=[
                (
                    "clip.mp4",
                    "video/mp4",
                    "https://video.xx.fbcdn.net/v/t42.3356-2/clip.mp4?_nc_cat=1&oh=00_V1&oe=66A0",
                )
            ],
        )
    ],
    "messenger_sticker.json": [  # sticker + legacy image of the same URL: one attachment
        m_message(
            "m_St" + MID_TAIL,
            at=1718000002600,
            attachments=[
                (
                    "851557_369239266556155_759568595_n.png",
                    "image/png",
                    f"{FBCDN}/t39.1997-6/851557_369239266556155_759568595_n.png"
                    "?_nc_cat=1&oh=00_S1&oe=66A0",
                )
            ],
            data={"sticker_id": 369239263222822},
        )
    ],
    "messenger_location.json": [
        m_message(
            "m_Lo" + MID_TAIL,
            "Location: Pinned Location (52.3676, 4.9041)",
            1718000002400,
            data={
                "location": {
                    "latitude": 52.3676,
                    "longitude": 4.9041,
                    "name": "Pinned Location",
                    "url": LOCATION_URL,
                }
            },
        )
    ],
    "messenger_fallback.json": [
        m_message(
            "m_Fb" + MID_TAIL,
            "look at this https://example.com/article",
            1718000002500,
            data={
                "links": [
                    {
                        "type": "fallback",
                        "url": "https://example.com/article",
                        "title": "Example Domain",
                    }
                ]
            },
        )
    ],
    "messenger_quick_reply.json": [QUICK],
    "messenger_postback.json": [
        m_message(
            "m_Gg9hJ2kL5zX8cV1bN4mQ7wE0rT3yU6iO9pA2sD5fG8hJ1kL4zX7cV0bN3mQ6wE9rT2yU5iO8pA1sD4fG7h",
            "Talk to an agent",
            1718000003000,
            data={"event": "postback", "payload": "AGENT"},
        )
    ],
    "messenger_get_started_referral.json": [
        m_message(
            "m_Gs9hJ2kL5zX8cV1bN4mQ7wE0rT3yU6iO9pA2sD5fG8hJ1kL4zX7cV0bN3mQ6wE9rT2yU5iO8pA1sD4fG7h",
            "Get Started",
            1718000003100,
            data={"event": "postback", "payload": "GET_STARTED", "referral": REFERRAL},
        )
    ],
    "messenger_referral.json": [  # no mid: the key is the person and the moment
        m_message(
            f"referral:{PSID}:1718000003200",
            at=1718000003200,
            data={"event": "referral", "referral": REFERRAL},
        )
    ],
    "messenger_echo.json": [],  # our own message coming back
    "messenger_echo_page_inbox.json": [],  # a person answering in Meta's Page Inbox
    "messenger_standby_echo.json": [],  # standby (another app owns the thread): ignored
    "messenger_delivery.json": [("status", MID_ECHO, "delivered", None, ms(1718000005000))],
    "messenger_delivery_no_mids.json": [("watermark", PSID, "delivered", ms(1718000005000))],
    "messenger_read.json": [("watermark", PSID, "read", ms(1718000005000))],
    "messenger_batched.json": [TEXT, QUICK, ("watermark", PSID, "read", ms(1718000005000))],
    "messenger_batched_same_entry.json": [TEXT, QUICK],
    "messenger_feed_change.json": [],  # page feed, not messaging
    "unknown_object.json": [],  # instagram: not ours
    "whatsapp_account_update.json": [],  # not a messages change
    "whatsapp_text.json": [WA_TEXT],
    "whatsapp_text_reply_context.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcxOQA=", "Yes, that one", 1718000005, references=[OUR_WAMID]
        )
    ],
    "whatsapp_image.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyMAA=",
            "my receipt",
            1718000010,
            attachments=[("1043287463409218.jpg", "image/jpeg", f"{GRAPH}/1043287463409218")],
        )
    ],
    "whatsapp_audio_voice.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyMQA=",
            at=1718000011,
            attachments=[("1002764438271669.ogg", "audio/ogg", f"{GRAPH}/1002764438271669")],
            data={"voice": True},
        )
    ],
    "whatsapp_document.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyMgA=",
            "the invoice",
            1718000012,
            attachments=[("invoice-1234.pdf", "application/pdf", f"{GRAPH}/1219612649946680")],
        )
    ],
    "whatsapp_interactive_button_reply.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyMwA=",
            "Talk to an agent",
            1718000020,
            references=[OUR_WAMID],
            data={"event": "button_reply", "payload": "agent"},
        )
    ],
    "whatsapp_interactive_list_reply.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyNAA=",
            "Billing",
            1718000021,
            references=[OUR_WAMID],
            data={
                "event": "list_reply",
                "payload": "billing",
                "description": "Invoices and payments",
            },
        )
    ],
    "whatsapp_template_button_reply.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyNQA=",
            "Stop promotions",
            1718000022,
            references=[OUR_WAMID],
            data={"event": "button", "payload": "STOP"},
        )
    ],
    "whatsapp_location.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyNgA=",
            "Location: Pablo Morales, 1 Hacker Way, Menlo Park, CA 94025 (37.483307, -122.148981)",
            1718000030,
            data={
                "location": {
                    "latitude": 37.483307,
                    "longitude": -122.148981,
                    "name": "Pablo Morales",
                    "address": "1 Hacker Way, Menlo Park, CA 94025",
                }
            },
        )
    ],
    "whatsapp_contacts.json": [
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyNwA=",
            "Contact: Barbara Johnson, +1 (415) 555-0123, bjohnson@example.com",
            1718000031,
            data={
                "contacts": [
                    {
                        "name": {
                            "formatted_name": "Barbara Johnson",
                            "first_name": "Barbara",
                            "last_name": "Johnson",
                        },
                        "phones": [
                            {"phone": "+1 (415) 555-0123", "wa_id": "14155550123", "type": "MOBILE"}
                        ],
                        "emails": [{"email": "bjohnson@example.com", "type": "WORK"}],
                    }
                ]
            },
        )
    ],
    "whatsapp_unsupported.json": [  # kept, so the agent knows something came
        wa_message(
            "zRUIwQTFCMkMzRDRFNUY2MDcyOAA=",
            at=1718000040,
            data={
                "unsupported": {
                    "type": "poll_creation",
                    "error": "131051 Message type unknown: Message type is currently not supported.",
                }
            },
        )
    ],
    "whatsapp_status_sent.json": [("status", OUR_WAMID, "sent", None, sec(1718000060))],
    "whatsapp_status_delivered.json": [WA_DELIVERED],
    "whatsapp_status_read.json": [("status", OUR_WAMID, "read", None, sec(1718000090))],
    "whatsapp_status_failed.json": [
        (
            "status",
            WAMID + "0QzhGN0U2RDVDNEIzQTI5MTgwOAA=",
            "failed",
            "131047 Re-engagement message: Message failed to send because more than 24 hours"
            " have passed since the customer last replied to this number.",
            sec(1718000061),
        )
    ],
    "whatsapp_status_failed_undeliverable.json": [
        (
            "status",
            "wamid.HBgLMTU1NTAwMDExMTEVAgARGBQ0QzhGN0U2RDVDNEIzQTI5MTgwOQA=",
            "failed",
            "131026 Message undeliverable: Unable to deliver message. Reasons can include:"
            " The recipient phone number is not a WhatsApp phone number.",
            sec(1718000063),
        )
    ],
    "whatsapp_batched.json": [WA_TEXT, WA_DELIVERED],
}


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_fixture_replay(make_channel: ChannelFactory, name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    messenger, whatsapp = make_channel("messenger"), make_channel("whatsapp")
    units = entries(body)
    routed, unclaimed = route(units, [messenger, whatsapp])
    assert unclaimed == []
    items = [item for channel, mine in routed.items() for item in channel.parse_items(mine)]
    assert [brief(item) for item in items] == EXPECTED[name]
    # The per-inbox contract gives the same from the whole (signed) body.
    request = WebhookRequest(
        "POST",
        f"{PUBLIC}/webhooks/meta/main",
        {"x-hub-signature-256": sign_meta(APP_SECRET, body)},
        body,
    )
    for channel in (messenger, whatsapp):
        assert channel.verify(request)
        mine = channel.parse(request)
        assert [brief(i) for i in mine] == [
            brief(i)
            for i in channel.parse_items(u for u in units if u.channel == channel.channel_id)
        ]


def test_entries_splits_batches_into_one_event_units() -> None:
    body = (FIXTURES / "messenger_batched.json").read_bytes()
    units = entries(body)
    assert [(u.channel, u.key) for u in units] == [("messenger", PAGE_ID)] * 4
    for unit in units:  # each unit is a webhook body of one event, parsable on its own
        assert entries(unit.raw()) == [unit]
        assert len(unit.item["entry"][0]["messaging"]) == 1
    same = entries((FIXTURES / "messenger_batched_same_entry.json").read_bytes())
    assert len(same) == 2
    wa = entries((FIXTURES / "whatsapp_batched.json").read_bytes())
    assert [(u.channel, u.key) for u in wa] == [("whatsapp", PHONE_NUMBER_ID)] * 2
    message_value = wa[0].item["entry"][0]["changes"][0]["value"]
    assert message_value["contacts"][0]["wa_id"] == WA_ID and len(message_value["messages"]) == 1
    assert "contacts" not in wa[1].item["entry"][0]["changes"][0]["value"]


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"page"', b"\xff\xfe"])
def test_entries_refuses_what_is_not_a_json_object(body: bytes) -> None:
    with pytest.raises(ValueError):
        entries(body)


def test_route_groups_by_inbox_and_returns_the_unclaimed(make_channel: ChannelFactory) -> None:
    other_page = messenger_text("to another page", page_id="999000000000001", mid="m_other")
    mine = messenger_text("to us", mid="m_mine", timestamp=1)
    messenger, whatsapp = make_channel("messenger"), make_channel("whatsapp")
    units = units_of(batched(mine, other_page)) + units_of(wa_text("hola", phone_number_id="77"))
    routed, unclaimed = route(units, [messenger, whatsapp])
    assert list(routed) == [messenger]
    assert [u.key for u in routed[messenger]] == [PAGE_ID]
    assert [(u.channel, u.key) for u in unclaimed] == [
        ("messenger", "999000000000001"),
        ("whatsapp", "77"),
    ]
    # parse() on the whole body keeps only this inbox's events.
    [item] = messenger.parse(webhook(batched(mine, other_page)))
    assert isinstance(item, InboundMessage) and item.external_id == "m_mine"


def test_a_bad_item_is_rejected_with_its_raw_unit_and_the_rest_goes_on(
    make_channel: ChannelFactory,
) -> None:
    channel = make_channel("whatsapp")
    good = wa_text("fine", wamid="wamid.good", timestamp=1718000000)
    bad = wa_text("from nowhere", wamid="wamid.bad", wa_id="12", timestamp=1718000001)
    weird = wa_text("x", wamid="wamid.weird", timestamp=1718000002)
    weird["entry"][0]["changes"][0]["value"]["messages"][0]["type"] = "hologram"
    payload = {
        "object": "whatsapp_business_account",
        "entry": [e for p in (bad, good, weird) for e in p["entry"]],
    }
    first, second, third = channel.parse_items(units_of(payload))
    assert isinstance(first, Reject) and first.external_id == "wamid.bad"
    assert "from '12' refused" in first.reason
    [unit] = entries(first.raw)  # the raw bytes are that one event, re-parsable
    assert unit.item["entry"][0]["changes"][0]["value"]["messages"][0]["id"] == "wamid.bad"
    assert isinstance(second, InboundMessage) and second.text == "fine"
    assert isinstance(third, Reject) and "unknown WhatsApp message type 'hologram'" in third.reason


async def test_reimport_parses_a_rejected_unit_again(make_channel: ChannelFactory) -> None:
    channel = make_channel("messenger")
    payload = messenger_text("hi", mid="m_1", timestamp=1718000000000)
    del payload["entry"][0]["messaging"][0]["sender"]
    [reject] = channel.parse_items(units_of(payload))
    assert isinstance(reject, Reject) and reject.external_id == "m_1"
    assert "without sender.id" in reject.reason
    fixed = json.loads(reject.raw)
    fixed["entry"][0]["messaging"][0]["sender"] = {"id": PSID}
    [item] = await channel.reimport(json.dumps(fixed).encode(), "m_1") or []
    assert isinstance(item, InboundMessage) and (item.external_id, item.text) == ("m_1", "hi")
    [still] = await channel.reimport(b"{not json", "m_1") or []
    assert isinstance(still, Reject)


def test_malformed_messenger_events_are_rejected(make_channel: ChannelFactory) -> None:
    channel = make_channel("messenger")
    no_mid = messenger_text("hi")
    del no_mid["entry"][0]["messaging"][0]["message"]["mid"]
    empty = messenger_text("hi", mid="m_empty")
    del empty["entry"][0]["messaging"][0]["message"]["text"]
    not_object = messenger_text("hi")
    not_object["entry"][0]["messaging"][0] = "garbage"
    reaction = messenger_text("hi")
    event = reaction["entry"][0]["messaging"][0]
    del event["message"]
    event["reaction"] = {"mid": "m_x", "action": "react", "reaction": "love", "emoji": "❤"}
    items = channel.parse_items(units_of(batched(no_mid, empty, not_object, reaction)))
    reasons = [item.reason for item in items if isinstance(item, Reject)]
    assert len(items) == len(reasons) == 3  # the reaction gives nothing
    assert "without mid" in reasons[0]
    assert "nothing in it" in reasons[1]
    assert "not an object" in reasons[2]


def test_standby_messages_only_when_configured(make_channel: ChannelFactory) -> None:
    payload = messenger_text("for the bot", mid="m_standby", timestamp=1)
    entry = payload["entry"][0]
    entry["standby"] = entry.pop("messaging")
    assert make_channel("messenger").parse_items(units_of(payload)) == []
    [item] = make_channel("messenger", standby=True).parse_items(units_of(payload))
    assert isinstance(item, InboundMessage) and item.external_id == "m_standby"


def test_messenger_reply_to_becomes_a_reference(make_channel: ChannelFactory) -> None:
    payload = messenger_text("this one", mid="m_r", reply_to="m_ours", timestamp=5)
    [item] = make_channel().parse_items(units_of(payload))
    assert isinstance(item, InboundMessage) and item.references == ["m_ours"]


# -- signatures and the handshake -----------------------------------------------------
SIGNED_BODY = meta_json_bytes(
    messenger_text("äöå </b> 50% @me https://x.io/a", mid="m_1", timestamp=1)
)
GOOD_HEADER = sign_meta(APP_SECRET, SIGNED_BODY)


def test_signature_accepts_the_raw_bytes_meta_signed() -> None:
    assert verify_signature(APP_SECRET, SIGNED_BODY, GOOD_HEADER)
    assert verify_signature(
        APP_SECRET, SIGNED_BODY, GOOD_HEADER.upper().replace("SHA256=", "sha256=")
    )
    # the same JSON re-serialized is other bytes: never verify a re-serialization
    assert not verify_signature(
        APP_SECRET, json.dumps(json.loads(SIGNED_BODY)).encode(), GOOD_HEADER
    )


def _changed_byte() -> tuple[str, bytes, str | None]:
    body = bytearray(SIGNED_BODY)
    body[len(body) // 2] ^= 0x01
    return APP_SECRET, bytes(body), GOOD_HEADER


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(lambda: ("wrong-secret", SIGNED_BODY, GOOD_HEADER), id="wrong secret"),
        pytest.param(_changed_byte, id="one changed body byte"),
        pytest.param(lambda: (APP_SECRET, SIGNED_BODY, None), id="missing header"),
        pytest.param(lambda: (APP_SECRET, SIGNED_BODY, ""), id="empty header"),
        pytest.param(
            lambda: (APP_SECRET, SIGNED_BODY, GOOD_HEADER.replace("sha256=", "sha1=")),
            id="other scheme",
        ),
        pytest.param(lambda: (APP_SECRET, SIGNED_BODY, GOOD_HEADER[7:]), id="no prefix"),
        pytest.param(lambda: (APP_SECRET, SIGNED_BODY, "sha256=" + "0" * 64), id="zeros"),
        pytest.param(
            lambda: (APP_SECRET, SIGNED_BODY, "sha256=é" + GOOD_HEADER[8:]), id="non-ascii"
        ),
        pytest.param(lambda: ("", SIGNED_BODY, sign_meta("", SIGNED_BODY)), id="empty secret"),
    ],
)
def test_signature_matrix_refuses(case: Callable[[], tuple[str, bytes, str | None]]) -> None:
    secret, body, header = case()
    assert verify_signature(secret, body, header) is False


def test_channel_verify_uses_the_app_secret_from_the_options(make_channel: ChannelFactory) -> None:
    request = webhook(messenger_text("hi"))
    assert make_channel().verify(request)
    assert make_channel(options={"app_secret": SecretStr(APP_SECRET)}).verify(request)
    assert make_channel(options={}).verify(request) is False  # no secret: deny
    assert make_channel(options={"app_secret": "other"}).verify(request) is False
    unsigned = WebhookRequest("POST", request.url, {}, request.body)
    assert make_channel().verify(unsigned) is False


HUB = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}


@pytest.mark.parametrize(
    ("query", "token", "expected"),
    [
        (HUB, VERIFY_TOKEN, "1158201444"),
        ({**HUB, "hub.verify_token": "guess"}, VERIFY_TOKEN, None),
        ({**HUB, "hub.mode": "unsubscribe"}, VERIFY_TOKEN, None),
        ({k: v for k, v in HUB.items() if k != "hub.mode"}, VERIFY_TOKEN, None),
        ({k: v for k, v in HUB.items() if k != "hub.verify_token"}, VERIFY_TOKEN, None),
        ({k: v for k, v in HUB.items() if k != "hub.challenge"}, VERIFY_TOKEN, None),
        ({**HUB, "hub.challenge": "<script>"}, VERIFY_TOKEN, None),
        ({**HUB, "hub.verify_token": ""}, "", None),  # no configured token: never
    ],
)
def test_handshake_matrix(query: dict[str, str], token: str, expected: str | None) -> None:
    assert handshake(query, token) == expected


def test_channel_challenge_uses_the_verify_token_option(make_channel: ChannelFactory) -> None:
    assert make_channel(options={"verify_token": VERIFY_TOKEN}).challenge(HUB) == "1158201444"
    assert make_channel(options={}).challenge(HUB) is None


# -- sending ------------------------------------------------------------------------
async def test_messenger_text(api_channel: ChannelFactory, fake: FakeGraph) -> None:
    receipt = await api_channel().send(outbound("Your order shipped"))
    [sent] = fake.sent
    assert sent["path"] == "/v21.0/me/messages"
    assert sent["json"] == {
        "recipient": {"id": PSID},
        "messaging_type": "RESPONSE",
        "message": {"text": "Your order shipped", "metadata": "omniroute:msg:42"},
    }
    assert sent["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert receipt.provider_id == sent["message_id"] and receipt.status == "sent"
    assert receipt.data == {"thread_id": sent["message_id"]}


async def test_messenger_human_agent_tag(api_channel: ChannelFactory, fake: FakeGraph) -> None:
    fake.window_closed.add(PSID)
    message = outbound("Following up", data={"window": "human_agent"})
    await api_channel(human_agent_tag=True).send(message)
    [sent] = fake.sent
    assert (sent["json"]["messaging_type"], sent["json"]["tag"]) == ("MESSAGE_TAG", "HUMAN_AGENT")
    # Not enabled for the inbox: refused before Meta is asked.
    fake.reset()
    with pytest.raises(PermanentSendError) as caught:
        await api_channel().send(message)
    assert caught.value.code == "window"
    assert fake.requests == []


async def test_messenger_outside_the_window_is_permanent(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    fake.window_closed.add(PSID)
    with pytest.raises(PermanentSendError) as caught:
        await api_channel().send(outbound())
    assert caught.value.code == "10"
    assert "error 10/2018278" in caught.value.reason
    assert "outside of allowed window" in caught.value.reason
    with pytest.raises(PermanentSendError) as closed:
        await api_channel().send(outbound(data={"window": "closed"}))
    assert closed.value.code == "window_closed"
    assert len(fake.requests) == 1  # the closed window was not even tried


@pytest.mark.parametrize(("setup", "code"), [("blocked", "551"), ("bad_recipients", "100")])
async def test_messenger_recipient_errors_are_permanent(
    api_channel: ChannelFactory, fake: FakeGraph, setup: str, code: str
) -> None:
    getattr(fake, setup).add(PSID)
    with pytest.raises(PermanentSendError) as caught:
        await api_channel().send(outbound())
    assert caught.value.code == code


async def test_whatsapp_text(api_channel: ChannelFactory, fake: FakeGraph) -> None:
    receipt = await api_channel("whatsapp").send(wa_outbound("Hello!"))
    [sent] = fake.sent
    assert sent["path"] == f"/v21.0/{PHONE_NUMBER_ID}/messages"
    assert sent["json"] == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "16505551234",
        "type": "text",
        "text": {"body": "Hello!", "preview_url": False},
    }
    assert receipt.provider_id == sent["message_id"]
    assert receipt.provider_id is not None and receipt.provider_id.startswith("wamid.")


async def test_whatsapp_template(api_channel: ChannelFactory, fake: FakeGraph) -> None:
    fake.templates["order_update"] = ["pt_BR"]
    channel = api_channel(
        "whatsapp",
        templates=[
            {"name": "hello_world", "language": "en_US"},
            {"name": "order_update", "language": "pt_BR", "params": 2},
        ],
    )
    await channel.send(
        wa_outbound("", data={"provider_template": {"name": "hello_world", "language": "en_US"}})
    )
    template = {"name": "order_update", "language": "pt_BR", "params": ["Ana", "#1234"]}
    receipt = await channel.send(
        wa_outbound(
            "ignored preview", data={"provider_template": template, "window": "template_only"}
        )
    )
    first, second = fake.sent
    assert first["json"]["template"] == {"name": "hello_world", "language": {"code": "en_US"}}
    assert second["json"]["type"] == "template"
    assert second["json"]["template"] == {
        "name": "order_update",
        "language": {"code": "pt_BR"},
        "components": [
            {
                "type": "body",
                "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "#1234"}],
            }
        ],
    }
    assert receipt.provider_id == second["message_id"]


@pytest.mark.parametrize(
    "template",
    [
        {"name": "unlisted", "language": "en_US"},
        {"name": "hello_world", "language": "de"},
        {"name": "hello_world", "language": "en_US", "params": ["one too many"]},
        "hello_world",
    ],
)
async def test_unlisted_templates_are_refused_before_meta(
    api_channel: ChannelFactory, fake: FakeGraph, template: Any
) -> None:
    channel = api_channel("whatsapp", templates=[{"name": "hello_world", "language": "en_US"}])
    with pytest.raises(PermanentSendError) as caught:
        await channel.send(wa_outbound(data={"provider_template": template}))
    assert caught.value.code == "template"
    assert fake.requests == []


async def test_whatsapp_windows(api_channel: ChannelFactory, fake: FakeGraph) -> None:
    channel = api_channel("whatsapp")
    with pytest.raises(PermanentSendError) as required:
        await channel.send(wa_outbound(data={"window": "template_only"}))
    assert required.value.code == "template_required"
    assert fake.requests == []
    fake.outside_window.add(WA_ID)  # Meta says so itself (the outbox did not know)
    with pytest.raises(PermanentSendError) as caught:
        await channel.send(wa_outbound())
    assert caught.value.code == "131047"
    assert "Re-engagement message" in caught.value.reason


async def test_rate_limit_then_success(api_channel: ChannelFactory, fake: FakeGraph) -> None:
    channel = api_channel()
    fake.fail_next(1, status=429, code=4)
    with pytest.raises(TemporarySendError) as caught:
        await channel.send(outbound())
    assert "error 4" in caught.value.reason
    receipt = await channel.send(outbound())
    assert [r["status"] for r in fake.requests] == [429, 200]
    assert receipt.provider_id == fake.sent[0]["message_id"]


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, 2), (503, 2), (400, 4), (400, 613), (400, 130429), (400, 131000)],
)
async def test_transient_errors_are_temporary(
    api_channel: ChannelFactory, fake: FakeGraph, status: int, code: int
) -> None:
    fake.fail_next(1, status=status, code=code)
    with pytest.raises(TemporarySendError):
        await api_channel("whatsapp").send(wa_outbound())
    assert fake.sent == []


async def test_meta_error_object_is_permanent_with_its_code(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    fake.fail_next_with(
        {
            "message": "(#131026) Message undeliverable",
            "type": "OAuthException",
            "code": 131026,
            "error_data": {"messaging_product": "whatsapp", "details": "Not on WhatsApp."},
            "fbtrace_id": "A1",
        }
    )
    with pytest.raises(PermanentSendError) as caught:
        await api_channel("whatsapp").send(wa_outbound())
    assert caught.value.code == "131026"
    assert caught.value.reason == (
        "Meta HTTP 400 error 131026: (#131026) Message undeliverable (Not on WhatsApp.)"
    )


async def test_bad_token_and_network_errors_are_temporary(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    with pytest.raises(TemporarySendError) as token:
        await api_channel("whatsapp", access_token="wrong").send(wa_outbound())
    assert "error 190" in token.value.reason
    with pytest.raises(TemporarySendError) as network:
        await api_channel(api_base_url="http://127.0.0.1:9").send(outbound())
    assert "no answer from Meta" in network.value.reason


async def test_a_hung_request_times_out_as_temporary(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    fake.hang_next(1, seconds=0.5)
    with pytest.raises(TemporarySendError):
        await api_channel(request_timeout=0.1).send(outbound())
    # ...and Meta sent it anyway: why an interrupted send is the agent's call (ASK).
    await fake.wait_for_sent(1, timeout=3.0)


async def test_appsecret_proof_is_sent_when_the_core_passes_the_secret(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    fake.app_secret = APP_SECRET  # "Require App Secret" on: calls without the proof fail
    await api_channel().send(outbound())
    expected = hmac.new(APP_SECRET.encode(), TOKEN.encode(), hashlib.sha256).hexdigest()
    assert fake.requests[-1]["query"]["appsecret_proof"] == expected
    with pytest.raises(PermanentSendError) as caught:
        await api_channel(options={}).send(outbound())
    assert "appsecret_proof" in caught.value.reason


async def test_long_text_is_split_and_a_failed_part_resumes(
    api_channel: ChannelFactory, fake: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = api_channel()
    words = " ".join(f"word{i:04d}" for i in range(500))  # 4499 characters
    real_post = channel._post
    calls = 0

    async def flaky(url: str, body: dict[str, Any]) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TemporarySendError("network blip")
        return await real_post(url, body)

    monkeypatch.setattr(channel, "_post", flaky)
    with pytest.raises(TemporarySendError):
        await channel.send(outbound(words))
    assert len(fake.sent) == 1
    receipt = await channel.send(outbound(words))  # the outbox's retry
    texts = [s["json"]["message"]["text"] for s in fake.sent]
    assert len(texts) == 3 and all(len(t) <= 2000 for t in texts)
    assert " ".join(texts) == words  # nothing lost, nothing sent twice
    assert receipt.provider_id == fake.sent[0]["message_id"]
    assert receipt.data["part_ids"] == [s["message_id"] for s in fake.sent[1:]]


async def test_attachments_go_by_public_url(api_channel: ChannelFactory, fake: FakeGraph) -> None:
    photo = Attachment("a.jpg", "image/jpeg", 10, url="https://files.example.com/a.jpg")
    invoice = Attachment("inv.pdf", "application/pdf", 10, url="https://files.example.com/inv.pdf")
    await api_channel().send(outbound("see attached", attachments=(photo, invoice)))
    text, image, document = (s["json"]["message"] for s in fake.sent)
    assert text["text"] == "see attached"
    assert image["attachment"] == {"type": "image", "payload": {"url": photo.url}}
    assert document["attachment"] == {"type": "file", "payload": {"url": invoice.url}}
    fake.reset()
    await api_channel("whatsapp").send(wa_outbound("", attachments=(photo, invoice)))
    image_body, document_body = (s["json"] for s in fake.sent)
    assert (image_body["type"], image_body["image"]) == ("image", {"link": photo.url})
    assert document_body["document"] == {"link": invoice.url, "filename": "inv.pdf"}


async def test_blob_only_attachments_and_empty_messages_are_refused(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    blob_only = Attachment("a.png", "image/png", 10, blob_key="sha256:00")
    with pytest.raises(PermanentSendError) as media:
        await api_channel().send(outbound(attachments=(blob_only,)))
    assert media.value.code == "media_url"
    with pytest.raises(PermanentSendError) as empty:
        await api_channel().send(outbound("   "))
    assert empty.value.code == "empty"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("channel", "recipient"),
    [
        ("messenger", Sender("email", "a@example.com", True)),
        ("messenger", Sender("messenger", "not-a-psid", True)),
        ("whatsapp", Sender("phone", "+16505551234", True)),
        ("whatsapp", Sender("whatsapp", "call me", True)),
    ],
)
async def test_wrong_recipients_fail_without_the_network(
    make_channel: ChannelFactory, channel: str, recipient: Sender
) -> None:
    with pytest.raises(PermanentSendError) as caught:
        await make_channel(channel, api_base_url="http://127.0.0.1:9").send(
            outbound(recipient=recipient)
        )
    assert caught.value.code == "bad_recipient"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "12"}, 12.0),
        ({"retry-after": "soon"}, None),
        (
            {
                "x-business-use-case-usage": json.dumps(
                    {
                        "1234": [
                            {
                                "type": "pages",
                                "call_count": 100,
                                "estimated_time_to_regain_access": 3,
                            }
                        ]
                    }
                )
            },
            180.0,
        ),
        ({"x-business-use-case-usage": "{broken"}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    response = httpx.Response(429, headers=headers, json={"error": {"message": "slow", "code": 4}})
    error = meta._send_error(response)
    assert isinstance(error, TemporarySendError)
    assert error.retry_after == expected


# -- media --------------------------------------------------------------------------
async def test_whatsapp_media_two_step_fetch(
    api_channel: ChannelFactory, fake: FakeGraph, graph_server: FakeGraphServer
) -> None:
    fake.add_media("1043287463409218", JPEG, "image/jpeg")
    fake.add_media("2000000000000001", b"%PDF-1.7 ...", "application/pdf")
    blobs = MemoryBlobs()
    channel = api_channel("whatsapp", blobs=blobs)
    photo = wa_image("1043287463409218", wamid="wamid.photo", timestamp=1718000000)
    doc = wa_media(
        "document",
        "2000000000000001",
        mime_type="application/pdf",
        filename="../../etc/passwd.pdf",
        wamid="wamid.doc",
        timestamp=1718000001,
    )
    units = units_of(photo) + units_of(doc)
    plain = channel.parse_items(units)  # sync: URL-only, pointing at the Graph media node
    assert [a.url for m in plain if isinstance(m, InboundMessage) for a in m.attachments] == [
        f"{graph_server.url}/v21.0/1043287463409218",
        f"{graph_server.url}/v21.0/2000000000000001",
    ]
    first, second = await channel.parse_items_async(units)
    assert isinstance(first, InboundMessage) and isinstance(second, InboundMessage)
    [photo_attachment] = first.attachments
    assert (photo_attachment.filename, photo_attachment.content_type) == (
        "1043287463409218.jpg",
        "image/jpeg",
    )
    assert (photo_attachment.size, photo_attachment.url) == (len(JPEG), None)
    assert blobs.items[str(photo_attachment.blob_key)] == (
        JPEG,
        "image/jpeg",
        "1043287463409218.jpg",
    )
    assert first.text == "my receipt" and "media_errors" not in first.data
    [document] = second.attachments
    assert document.filename == "passwd.pdf"  # never a path
    assert (await blobs.get(str(document.blob_key))) == b"%PDF-1.7 ..."
    node_requests = [r for r in fake.requests if r["path"].startswith("/v21.0/")]
    downloads = [r for r in fake.requests if r["path"].startswith("/media/")]
    assert len(node_requests) == 2 and len(downloads) == 2
    assert all(
        r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in node_requests + downloads
    )
    assert all(r["query"]["phone_number_id"] == PHONE_NUMBER_ID for r in node_requests)


async def test_whatsapp_media_of_a_message_already_stored_is_not_fetched_again(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    fake.add_media("1043287463409218", JPEG, "image/jpeg")
    stored: set[str] = set()

    async def is_stored(external_id: str) -> bool:
        return external_id in stored

    channel = api_channel("whatsapp")
    channel.context.stored = is_stored
    units = units_of(wa_image("1043287463409218", wamid="wamid.again", timestamp=1718000000))
    [first] = await channel.parse_items_async(units)
    assert isinstance(first, InboundMessage) and first.attachments[0].blob_key is not None
    stored.add(first.external_id)
    for _ in range(5):  # Meta's retries of the delivery: the core drops them as duplicates
        [again] = await channel.parse_items_async(units)
        assert isinstance(again, InboundMessage) and again.attachments[0].blob_key is None
    assert len([r for r in fake.requests if r["path"].startswith("/media/")]) == 1


async def test_whatsapp_media_failures_keep_the_message(
    api_channel: ChannelFactory, fake: FakeGraph
) -> None:
    channel = api_channel("whatsapp", media_types=["image/*"])
    fake.add_media("3000000000000001", b"<html>", "text/html")
    gone = wa_image("3000000000000002", wamid="wamid.gone", timestamp=1)
    html = wa_image("3000000000000001", wamid="wamid.html", timestamp=2)
    first, second = await channel.parse_items_async(units_of(gone) + units_of(html))
    assert isinstance(first, InboundMessage) and isinstance(second, InboundMessage)
    [error] = first.data["media_errors"]
    assert error["url"].endswith("/v21.0/3000000000000002")
    assert "Meta answered HTTP 400" in error["reason"]
    assert first.attachments[0].blob_key is None and first.attachments[0].url == error["url"]
    assert "text/html" in second.data["media_errors"][0]["reason"]
    no_blobs = api_channel("whatsapp")
    no_blobs.context.blobs = None
    [item] = await no_blobs.parse_items_async(units_of(html))
    assert isinstance(item, InboundMessage)
    assert item.data["media_errors"][0]["reason"] == "no blob store configured"


async def test_messenger_cdn_media_and_refused_hosts(
    api_channel: ChannelFactory, fake: FakeGraph, graph_server: FakeGraphServer
) -> None:
    path = fake.add_file("photo.png", PNG, "image/png")
    blobs = MemoryBlobs()
    channel = api_channel(blobs=blobs)
    ok = messenger_attachment("image", url=graph_server.url + path, mid="m_ok", timestamp=1)
    evil = messenger_attachment(
        "image", url="https://evil.example/x.jpg", mid="m_evil", timestamp=2
    )
    metadata = f"{graph_server.url}/redirect?to=http://169.254.169.254/latest/meta-data/"
    redirected = messenger_attachment("file", url=metadata, mid="m_redirect", timestamp=3)
    first, second, third = await channel.parse_async(webhook(batched(ok, evil, redirected)))
    assert isinstance(first, InboundMessage)
    assert first.attachments == [Attachment("photo.png", "image/png", len(PNG), blob_key="mem:0")]
    assert blobs.items["mem:0"] == (PNG, "image/png", "photo.png")
    assert isinstance(second, InboundMessage)
    assert "not an allowed media host" in second.data["media_errors"][0]["reason"]
    assert isinstance(third, InboundMessage)
    assert "169.254.169.254" in third.data["media_errors"][0]["reason"]
    cdn = [r for r in fake.requests if r["path"] in ("/cdn/photo.png", "/redirect")]
    assert len(cdn) == 2  # nothing else was fetched
    assert all("authorization" not in r["headers"] for r in cdn)  # CDN URLs need no token


def _https_media(
    handler: Callable[[httpx.Request], httpx.Response],
) -> tuple[httpx.MockTransport, StubResolver]:
    resolver = StubResolver(
        {
            "graph.facebook.com": ["157.240.1.1"],
            "lookaside.fbsbx.com": ["157.240.2.2"],
            "scontent-ams2-1.xx.fbcdn.net": ["157.240.3.3"],
            "scontent.xx.fbcdn.net": ["157.240.4.4"],
            "cdn.fbsbx.com": ["157.240.5.5"],
            "evilfbcdn.net": ["6.6.6.6"],
            "internal.fbcdn.net": ["10.0.0.5"],
        }
    )
    return httpx.MockTransport(handler), resolver


async def test_whatsapp_production_path_redirect_to_a_wildcard_host_keeps_the_token_home(
    make_channel: ChannelFactory,
) -> None:
    """https, DNS checked and pinned, the bearer token only to the host Graph named, a
    redirect to another ``*.fbcdn.net`` host followed (and re-checked)."""
    seen: list[httpx.Request] = []
    cdn = "https://scontent-ams2-1.xx.fbcdn.net/v/t62/abc.jpg?oh=1"

    def media(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers["host"] == "lookaside.fbsbx.com":
            return httpx.Response(302, headers={"location": cdn})
        return httpx.Response(200, content=JPEG, headers={"content-type": "image/jpeg"})

    def graph(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v21.0/1043287463409218"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        return httpx.Response(
            200,
            json={
                "url": "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1&ext=2&hash=3",
                "mime_type": "image/jpeg",
                "sha256": hashlib.sha256(JPEG).hexdigest(),
                "file_size": len(JPEG),
                "id": "1043287463409218",
                "messaging_product": "whatsapp",
            },
        )

    transport, resolver = _https_media(media)
    blobs = MemoryBlobs()
    channel = make_channel(
        "whatsapp",
        blobs=blobs,
        options={
            "media_transport": transport,
            "media_resolver": resolver,
            "api_transport": httpx.MockTransport(graph),
        },
    )
    [item] = await channel.parse_items_async(units_of(wa_image("1043287463409218")))
    assert isinstance(item, InboundMessage)
    assert item.attachments == [
        Attachment("1043287463409218.jpg", "image/jpeg", len(JPEG), blob_key="mem:0")
    ]
    first, second = seen
    assert (first.url.scheme, first.url.host) == ("https", "157.240.2.2")  # pinned
    assert first.extensions["sni_hostname"] == "lookaside.fbsbx.com"
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert (second.url.host, second.headers["host"]) == (
        "157.240.3.3",
        "scontent-ams2-1.xx.fbcdn.net",
    )
    assert "authorization" not in second.headers  # the redirect target never sees the token
    assert resolver.calls == ["lookaside.fbsbx.com", "scontent-ams2-1.xx.fbcdn.net"]


async def test_whatsapp_media_checksum_mismatch_is_refused(make_channel: ChannelFactory) -> None:
    def graph(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"url": "https://lookaside.fbsbx.com/x?hash=1", "sha256": "0" * 64}
        )

    transport, resolver = _https_media(
        lambda r: httpx.Response(200, content=JPEG, headers={"content-type": "image/jpeg"})
    )
    options = {
        "media_transport": transport,
        "media_resolver": resolver,
        "api_transport": httpx.MockTransport(graph),
    }
    [item] = await make_channel("whatsapp", options=options).parse_items_async(units_of(wa_image()))
    assert isinstance(item, InboundMessage)
    assert "SHA-256" in item.data["media_errors"][0]["reason"]


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("https://scontent.xx.fbcdn.net/v/t1/448_n.jpg?oh=1", True),  # *.fbcdn.net
        ("https://cdn.fbsbx.com/v/t59/invoice.jpg", True),  # *.fbsbx.com
        ("https://evilfbcdn.net/x.jpg", False),  # not under fbcdn.net
        ("https://fbcdn.net/x.jpg", False),  # the wildcard needs a subdomain
        ("http://scontent.xx.fbcdn.net/x.jpg", False),  # https only
        ("https://internal.fbcdn.net/x.jpg", False),  # allowed name, private address
    ],
)
async def test_messenger_wildcard_media_hosts(
    make_channel: ChannelFactory, url: str, stored: bool
) -> None:
    seen: list[httpx.Request] = []

    def media(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=JPEG, headers={"content-type": "image/jpeg"})

    transport, resolver = _https_media(media)
    channel = make_channel(options={"media_transport": transport, "media_resolver": resolver})
    payload = messenger_attachment("image", url=url, mid="m_w", timestamp=1)
    [item] = await channel.parse_items_async(units_of(payload))
    assert isinstance(item, InboundMessage)
    assert (item.attachments[0].blob_key is not None) is stored
    assert len(seen) == (1 if stored else 0)
    assert all("authorization" not in r.headers for r in seen)
    if not stored:
        assert item.data["media_errors"][0]["url"] == url


async def test_redirect_loops_end(make_channel: ChannelFactory) -> None:
    count = 0

    def media(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        host = "scontent.xx.fbcdn.net" if count % 2 else "scontent-ams2-1.xx.fbcdn.net"
        return httpx.Response(302, headers={"location": f"https://{host}/again"})

    transport, resolver = _https_media(media)
    channel = make_channel(options={"media_transport": transport, "media_resolver": resolver})
    payload = messenger_attachment(
        "image", url="https://cdn.fbsbx.com/start.jpg", mid="m_l", timestamp=1
    )
    [item] = await channel.parse_items_async(units_of(payload))
    assert isinstance(item, InboundMessage)
    assert "redirects" in item.data["media_errors"][0]["reason"]
    assert count <= 7


# -- WhatsApp numbers ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("wa_id", "expected"),
    [
        ("16505551234", "+16505551234"),  # a normal number
        ("447911123456", "+447911123456"),
        ("5215512345678", "+525512345678"),  # Mexico: the old mobile 1 dropped
        ("525512345678", "+525512345678"),
        ("551187654321", "+5511987654321"),  # Brazil: mobile without the ninth digit
        ("5511987654321", "+5511987654321"),
        ("551133334444", "+551133334444"),  # Brazil: a landline keeps 8 digits
        ("5491123456789", "+5491123456789"),  # Argentina: kept as sent (E.164 with the 9)
    ],
)
def test_wa_id_quirks(wa_id: str, expected: str) -> None:
    assert normalize_wa_id(wa_id) == expected


@pytest.mark.parametrize("wa_id", ["", "12", "abc", "1650555123x", "0000000000000000", "999123"])
def test_wa_ids_that_are_no_numbers(wa_id: str) -> None:
    with pytest.raises(ValueError):
        normalize_wa_id(wa_id)


def test_the_sender_is_e164_and_the_raw_wa_id_is_kept(make_channel: ChannelFactory) -> None:
    payload = wa_text("hola", wa_id="5215512345678", name="Ana", wamid="wamid.mx", timestamp=1)
    [item] = make_channel("whatsapp").parse_items(units_of(payload))
    assert isinstance(item, InboundMessage)
    assert item.sender == Sender("whatsapp", "+525512345678", True, name="Ana", verified_by="meta")
    assert item.data["wa_id"] == "5215512345678"


# -- windows ------------------------------------------------------------------------
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("channel", "ago", "tag", "expected"),
    [
        ("messenger", timedelta(minutes=5), False, "open"),
        ("messenger", timedelta(hours=24), False, "open"),
        ("messenger", timedelta(hours=24, seconds=1), False, "closed"),
        ("messenger", timedelta(hours=24, seconds=1), True, "human_agent"),
        ("messenger", timedelta(days=7), True, "human_agent"),
        ("messenger", timedelta(days=7, seconds=1), True, "closed"),
        ("messenger", None, True, "closed"),
        ("whatsapp", timedelta(hours=23), False, "open"),
        ("whatsapp", timedelta(hours=25), True, "template_only"),
        ("whatsapp", timedelta(days=30), False, "template_only"),
        ("whatsapp", None, False, "template_only"),
        ("messenger", -timedelta(minutes=1), False, "open"),  # a clock a little ahead
        ("sms", timedelta(days=30), False, "open"),  # no window
    ],
)
def test_window_state(channel: str, ago: timedelta | None, tag: bool, expected: str) -> None:
    last = NOW - ago if ago is not None else None
    assert window_state(channel, last, NOW, tag) == expected


def test_window_state_accepts_naive_utc(make_channel: ChannelFactory) -> None:
    naive = (NOW - timedelta(hours=2)).replace(tzinfo=None)
    assert window_state("whatsapp", naive, NOW, False) == "open"
    channel = make_channel("messenger", human_agent_tag=True)
    assert channel.window(NOW - timedelta(days=2), NOW) == "human_agent"


# -- configuration and declarations -----------------------------------------------------
def test_class_declarations(make_channel: ChannelFactory) -> None:
    assert MetaChannel.provider == "meta"
    assert MetaChannel.channel_ids == ("messenger", "whatsapp")
    assert MetaChannel.config_model is MetaConfig
    assert MetaChannel.webhook and MetaChannel.attachments
    assert MetaChannel.messaging_window == timedelta(hours=24)
    assert MetaChannel.uncertain_policy is UncertainPolicy.ASK
    messenger, whatsapp = make_channel("messenger"), make_channel("whatsapp")
    assert (messenger.channel_id, messenger.max_text_length, messenger.routing_key) == (
        "messenger",
        2000,
        PAGE_ID,
    )
    assert (whatsapp.channel_id, whatsapp.max_text_length, whatsapp.routing_key) == (
        "whatsapp",
        4096,
        PHONE_NUMBER_ID,
    )
    assert messenger.policy is UncertainPolicy.ASK


def test_config_defaults() -> None:
    cfg = config("whatsapp")
    assert cfg.provider == "meta" and cfg.api_base_url == "https://graph.facebook.com"
    assert cfg.api_version == "v21.0"
    assert cfg.media_hosts == [
        "graph.facebook.com",
        "lookaside.fbsbx.com",
        "*.fbcdn.net",
        "*.fbsbx.com",
    ]
    assert not cfg.allow_insecure_media_for_tests
    assert "access_token" in repr(cfg) and TOKEN not in repr(cfg)  # a SecretStr


@pytest.mark.parametrize(
    ("channel", "overrides", "message"),
    [
        ("messenger", {"page_id": None}, "needs page_id"),
        ("whatsapp", {"phone_number_id": None}, "needs phone_number_id"),
        ("messenger", {"phone_number_id": "1"}, "for whatsapp inboxes"),
        ("whatsapp", {"page_id": "1"}, "for messenger inboxes"),
        ("whatsapp", {"human_agent_tag": True}, "for messenger inboxes"),
        ("messenger", {"page_id": "me"}, "page_id"),
        ("sms", {}, "channel"),
        ("messenger", {"provider": "twilio"}, "provider"),
        ("messenger", {"api_version": "21"}, "api_version"),
        ("messenger", {"api_base_url": "ftp://x"}, "api_base_url"),
        ("messenger", {"media_hosts": ["*"]}, "media host"),
        ("messenger", {"media_hosts": ["*.evil.com/x"]}, "media host"),
        ("whatsapp", {"templates": [{"name": "Bad Name", "language": "en_US"}]}, "name"),
        (
            "whatsapp",
            {"templates": [{"name": "a", "language": "en"}, {"name": "a", "language": "en"}]},
            "twice",
        ),
        ("messenger", {"surprise": 1}, "surprise"),
    ],
)
def test_config_is_validated(channel: str, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(channel, **overrides)
