"""Facebook Messenger through a Meta app (``channel: messenger, provider: meta``): a page's
conversations in, the Send API out. What Messenger shares with WhatsApp (the app's webhook,
Graph calls, media, errors) is in :mod:`channels.meta.graph`.

Configuration (channels.yaml)::

    fb:
      channel: messenger
      provider: meta
      app: main                          # the entry of meta_apps whose webhook carries it
      page_id: "106000000000001"
      access_token: "${META_PAGE_TOKEN}"   # a Page access token
      human_agent_tag: false             # true: 24 h .. 7 d replies go with HUMAN_AGENT
      standby: false                     # true: also take messages under standby (handover)

Inbound: :class:`~channels.base.InboundMessage` with ``external_id`` = the ``mid`` (the
dedupe key), ``provider_ts`` from the event, the sender ``messenger``/PSID (named from the
User Profile API, asked once per person), ``references`` = the message replied to. Quick
replies and postbacks carry ``data["event"]`` and ``data["payload"]`` (the text is what the
person saw). Referrals (m.me links, ads) carry ``data["referral"]``; a referral without a
message is an empty-text message with ``data["event"] = "referral"`` and the external id
``referral:<psid>:<timestamp>`` (Meta's retries dedupe). Locations become text plus
``data["location"]``; media stay URL-only (the CDN URL) until fetched. Delivery receipts
listing ``mids`` are :class:`~channels.base.StatusUpdate` (``delivered``); read receipts
and receipts without ``mids`` are :class:`WatermarkStatus`: *every* message this inbox
sent to ``recipient`` (a PSID) at or before ``at`` is now ``status``. Ignored: echoes of
the page's own messages (ours, the Page Inbox's, other apps'), events under ``standby``
unless ``standby: true``, reactions, opt-ins, handover and other non-message events.

Outbound: ``{base}/{version}/me/messages`` with ``messaging_type`` ``RESPONSE``; in the
``human_agent`` window (24 h .. 7 d) ``MESSAGE_TAG`` + ``HUMAN_AGENT``, refused with
``PermanentSendError(code="window")`` unless ``human_agent_tag`` is enabled. Text longer
than 2000 characters is split.
"""

from __future__ import annotations

import dataclasses
import logging
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from channels.base import (
    Attachment,
    ChannelContext,
    InboundMessage,
    InboxConfig,
    OutboundMessage,
    ParsedItem,
    PermanentSendError,
    Sender,
    StatusUpdate,
)
from channels.meta.config import NUMERIC_ID
from channels.meta.graph import (
    STANDARD_WINDOW,
    Bad,
    MetaChannel,
    Unit,
    WindowState,
    as_utc,
    extension,
    location_text,
    media_kind,
    text_id,
)

__all__ = [
    "HUMAN_AGENT_WINDOW",
    "MESSENGER_TEXT_MAX",
    "MessengerChannel",
    "WatermarkStatus",
    "messenger_window",
]

log = logging.getLogger(__name__)

MESSENGER_TEXT_MAX = 2000
HUMAN_AGENT_WINDOW = timedelta(days=7)
_NAMES_CACHED = 10_000
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_MESSENGER_MEDIA = {"image": "image", "sticker": "image", "video": "video", "audio": "audio"}
_MESSENGER_DEFAULT_TYPES = {
    "image": "image/jpeg",
    "sticker": "image/png",
    "video": "video/mp4",
    "audio": "audio/mpeg",
    "file": "application/octet-stream",
}


@dataclass(frozen=True, slots=True)
class WatermarkStatus(StatusUpdate):
    """Messenger's watermark receipt: every message this inbox sent to ``recipient`` (a
    PSID) at or before ``at`` is ``status`` (``delivered`` or ``read``). ``provider_id`` is
    ``watermark:<psid>``, which matches no message (a core unaware of it ignores it)."""


def messenger_window(
    last_inbound_at: datetime | None, now: datetime, human_agent_tag: bool
) -> WindowState:
    """Within 24 hours of the customer's last message: ``open``; after that ``human_agent``
    up to 7 days when the inbox uses the HUMAN_AGENT tag, else ``closed``."""
    if last_inbound_at is not None:
        elapsed = as_utc(now) - as_utc(last_inbound_at)
        if elapsed <= STANDARD_WINDOW:
            return "open"
        if human_agent_tag and elapsed <= HUMAN_AGENT_WINDOW:
            return "human_agent"
    return "closed"


class MessengerChannel(MetaChannel):
    """A Facebook page's Messenger conversations (see the module docstring)."""

    channel_id = "messenger"
    channel_ids = ("messenger",)
    max_text_length = MESSENGER_TEXT_MAX

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        self._names: dict[str, str | None] = {}  # PSID -> profile name (or None)

    @property
    def routing_key(self) -> str:
        return self.meta_config.page_id or ""

    def window(self, last_inbound_at: datetime | None, now: datetime | None = None) -> WindowState:
        """:func:`messenger_window` for this inbox (``now`` defaults to the context's clock)."""
        return messenger_window(
            last_inbound_at,
            now if now is not None else self.context.now(),
            self.meta_config.human_agent_tag,
        )

    # -- inbound ------------------------------------------------------------------------
    def parse_unit(self, unit: Unit) -> list[ParsedItem]:
        entry = unit.item["entry"][0]
        if "standby" in entry and not self.meta_config.standby:
            return []
        events = entry.get("messaging") or entry.get("standby") or []
        event = events[0] if events else None
        if not isinstance(event, Mapping):
            raise Bad("a Messenger event that is not an object")
        page_id = unit.key
        sender = text_id((event.get("sender") or {}).get("id"))
        if isinstance(event.get("message"), Mapping) and event["message"].get("is_echo"):
            return []  # the page's own message (ours, the Page Inbox's, another app's)
        if sender == page_id:
            return []  # from the page itself
        if "delivery" in event or "read" in event:
            return self._messenger_receipt(event, sender)
        kinds = [k for k in ("message", "postback", "referral") if k in event]
        if not kinds:
            return []  # reactions, opt-ins, handover, policy notices: nothing to store
        if sender is None:
            raise Bad("a Messenger event without sender.id")
        when = _from_millis(event.get("timestamp"))
        who = Sender("messenger", sender, True, verified_by="meta")
        if kinds[0] == "message":
            return self._messenger_message(event["message"], who, when)
        if kinds[0] == "postback":
            return self._messenger_postback(event["postback"], who, when, event.get("timestamp"))
        referral = event["referral"]
        if not isinstance(referral, Mapping):
            raise Bad("a Messenger referral that is not an object")
        return [
            InboundMessage(
                external_id=f"referral:{sender}:{event.get('timestamp')}",
                sender=who,
                provider_ts=when,
                data={"event": "referral", "referral": dict(referral)},
            )
        ]

    def _messenger_receipt(self, event: Mapping[str, Any], sender: str | None) -> list[ParsedItem]:
        status = "delivered" if "delivery" in event else "read"
        receipt = event.get("delivery") if status == "delivered" else event.get("read")
        if not isinstance(receipt, Mapping):
            raise Bad(f"a Messenger {status} receipt that is not an object")
        at = _from_millis(receipt.get("watermark"))
        mids = receipt.get("mids")
        if isinstance(mids, list) and mids:
            return [StatusUpdate(str(mid), status, at=at) for mid in mids if text_id(mid)]
        if sender is None or at is None:
            raise Bad(f"a Messenger {status} receipt without sender or watermark")
        return [WatermarkStatus(f"watermark:{sender}", status, at=at, recipient=sender)]

    def _messenger_message(
        self, message: Any, who: Sender, when: datetime | None
    ) -> list[ParsedItem]:
        if not isinstance(message, Mapping):
            raise Bad("a Messenger message that is not an object")
        mid = text_id(message.get("mid"))
        if mid is None:
            raise Bad("a Messenger message without mid")
        if message.get("is_deleted"):
            return []  # unsent by the person
        text = message.get("text") if isinstance(message.get("text"), str) else ""
        data: dict[str, Any] = {}
        lines = [text] if text else []
        attachments = self._messenger_attachments(message.get("attachments"), data, lines)
        quick = message.get("quick_reply")
        if isinstance(quick, Mapping) and quick.get("payload") is not None:
            data["event"] = "quick_reply"
            data["payload"] = str(quick["payload"])
        if isinstance(message.get("referral"), Mapping):
            data["referral"] = dict(message["referral"])
        reply_to = message.get("reply_to")
        references = []
        if isinstance(reply_to, Mapping) and text_id(reply_to.get("mid")):
            references.append(str(reply_to["mid"]))
        if not lines and not attachments and not data:
            raise Bad("a Messenger message with nothing in it")
        return [
            InboundMessage(
                external_id=mid,
                sender=who,
                text="\n".join(lines),
                attachments=attachments,
                provider_ts=when,
                references=references,
                data=data,
            )
        ]

    def _messenger_attachments(
        self, listed: Any, data: dict[str, Any], lines: list[str]
    ) -> list[Attachment]:
        if listed is None:
            return []
        if not isinstance(listed, list):
            raise Bad("Messenger attachments that are not a list")
        attachments: list[Attachment] = []
        seen: set[str] = set()
        for index, attachment in enumerate(listed):
            if not isinstance(attachment, Mapping):
                raise Bad("a Messenger attachment that is not an object")
            kind = str(attachment.get("type") or "")
            payload = attachment.get("payload")
            payload = payload if isinstance(payload, Mapping) else {}
            if payload.get("sticker_id") is not None:
                data["sticker_id"] = payload["sticker_id"]
            if kind == "location":
                coordinates = payload.get("coordinates") or {}
                location = {
                    "latitude": coordinates.get("lat"),
                    "longitude": coordinates.get("long"),
                    "name": attachment.get("title"),
                    "url": attachment.get("url"),
                }
                data["location"] = location
                lines.append(location_text(location))
                continue
            url = payload.get("url")
            if kind in _MESSENGER_DEFAULT_TYPES and isinstance(url, str) and url:
                if url in seen:
                    continue  # a sticker comes twice (sticker + legacy image)
                seen.add(url)
                attachments.append(_messenger_attachment(kind, url, index))
                continue
            if kind == "template":
                data.setdefault("shared", []).append(dict(payload))
                continue
            link = url or attachment.get("url")
            if isinstance(link, str) and link:  # fallback (a shared link), reels, shares...
                entry = {"type": kind, "url": link}
                title = attachment.get("title") or payload.get("title")
                if isinstance(title, str) and title:
                    entry["title"] = title
                data.setdefault("links", []).append(entry)
        return attachments

    def _messenger_postback(
        self, postback: Any, who: Sender, when: datetime | None, timestamp: Any
    ) -> list[ParsedItem]:
        if not isinstance(postback, Mapping):
            raise Bad("a Messenger postback that is not an object")
        mid = text_id(postback.get("mid")) or f"postback:{who.address}:{timestamp}"
        data: dict[str, Any] = {"event": "postback"}
        if postback.get("payload") is not None:
            data["payload"] = str(postback["payload"])
        if isinstance(postback.get("referral"), Mapping):
            data["referral"] = dict(postback["referral"])
        title = postback.get("title")
        return [
            InboundMessage(
                external_id=mid,
                sender=who,
                text=title if isinstance(title, str) else "",
                provider_ts=when,
                data=data,
            )
        ]

    @staticmethod
    def unit_id(unit: Unit) -> str | None:
        entry = unit.item["entry"][0]
        event = (entry.get("messaging") or entry.get("standby"))[0]
        for key in ("message", "postback"):
            if isinstance(event.get(key), Mapping) and text_id(event[key].get("mid")):
                return str(event[key]["mid"])
        return None

    async def after_parse(self, items: list[ParsedItem]) -> None:
        """The senders' profile names (once per person)."""
        for index, item in enumerate(items):
            if isinstance(item, InboundMessage) and item.sender.name is None:
                name = await self._profile_name(item.sender.address)
                if name:
                    items[index] = dataclasses.replace(
                        item, sender=dataclasses.replace(item.sender, name=name)
                    )

    async def _profile_name(self, psid: str) -> str | None:
        """The person's name from the User Profile API, asked once per PSID (a token
        without the permission, or any failure, just leaves the name unknown)."""
        if psid in self._names:
            return self._names[psid]
        name: str | None = None
        try:
            response = await self._api().get(
                f"{self.graph_url}/{psid}",
                params={"fields": "first_name,last_name", **self._proof()},
                headers=self._auth_headers(),
            )
            if response.status_code == 200:
                body = response.json()
                full = f"{body.get('first_name', '')} {body.get('last_name', '')}".strip()
                name = full[:200] or None
        except (httpx.HTTPError, ValueError) as exc:
            log.info("no profile name for a Messenger user: %s", type(exc).__name__)
        if len(self._names) >= _NAMES_CACHED:
            self._names.pop(next(iter(self._names)))
        self._names[psid] = name
        return name

    # -- outbound -----------------------------------------------------------------------
    @property
    def send_url(self) -> str:
        return f"{self.graph_url}/me/messages"

    def recipient(self, address: str) -> str:
        if not NUMERIC_ID.match(address):
            raise PermanentSendError("recipient: not a page-scoped id", code="bad_recipient")
        return address

    def window_bodies(
        self, message: OutboundMessage, to: str, window: str
    ) -> list[dict[str, Any]] | None:
        if window == "human_agent" and not self.meta_config.human_agent_tag:
            raise PermanentSendError(
                "outside the 24-hour window and human_agent_tag is off for this inbox",
                code="window",
            )
        return None

    def message_bodies(
        self, message: OutboundMessage, to: str, parts: list[str], media: list[Attachment]
    ) -> list[dict[str, Any]]:
        tagged = message.data.get("window") == "human_agent"
        metadata = f"omniroute:msg:{message.message_id}"
        bodies = [_messenger_body(to, {"text": p, "metadata": metadata}, tagged) for p in parts]
        for attachment in media:
            kind = media_kind(attachment.content_type, "file")
            attached = {
                "attachment": {"type": kind, "payload": {"url": attachment.url}},
                "metadata": metadata,
            }
            bodies.append(_messenger_body(to, attached, tagged))
        return bodies


def _from_millis(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _messenger_attachment(kind: str, url: str, index: int) -> Attachment:
    try:
        stem = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    except ValueError:
        stem = ""
    major = _MESSENGER_MEDIA.get(kind)
    guessed = mimetypes.guess_type(stem)[0] if stem else None
    if guessed and (major is None or guessed.startswith(major + "/")):
        content_type = guessed
    elif guessed and major:
        content_type = f"{major}/{guessed.split('/', 1)[1]}"
    else:
        content_type = _MESSENGER_DEFAULT_TYPES[kind]
    fallback = f"{kind}-{index}{extension(content_type)}"
    name = stem if _SAFE_NAME.match(stem or "") else fallback
    return Attachment(name, content_type, 0, url=url)


def _messenger_body(psid: str, message: dict[str, Any], tagged: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"recipient": {"id": psid}}
    if tagged:
        body.update({"messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"})
    else:
        body["messaging_type"] = "RESPONSE"
    body["message"] = message
    return body
