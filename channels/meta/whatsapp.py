"""The WhatsApp Cloud API through a Meta app (``channel: whatsapp, provider: meta``): a
business number's messages in, the Graph ``messages`` endpoint out. What WhatsApp shares
with Messenger (the app's webhook, Graph calls, media, errors) is in
:mod:`channels.meta.graph`.

Configuration (channels.yaml)::

    wa:
      channel: whatsapp
      provider: meta
      app: main
      phone_number_id: "106540352242922"
      access_token: "${META_WA_TOKEN}"     # a system-user token with whatsapp_business_messaging
      templates:                         # pre-approved templates agents may send
        - {name: order_update, language: en_US, params: 2}
      media_max_mb: 25
      request_timeout: 10                # seconds per Graph API request

Inbound: :class:`~channels.base.InboundMessage` with ``external_id`` = the WhatsApp message
id, the sender ``whatsapp``/E.164 (:func:`normalize_wa_id`; the raw wa_id is in
``data["wa_id"]``) named from the delivery's contacts, ``references`` = the message
replied to. Buttons and interactive replies carry ``data["event"]`` and
``data["payload"]``; locations and shared contacts become text plus ``data["location"]`` /
``data["contacts"]``; a message Meta cannot render (``unsupported``) is kept, empty, with
``data["unsupported"]``; a ``system`` message (the customer changed number) is ``auto``
with ``data["system"]``. Media are the Graph media node
``{api_base_url}/{api_version}/{media-id}`` until fetched in two steps: ``GET`` the node
with the bearer token for a short-lived URL and a SHA-256, then that URL with the bearer
token (sent to that URL's host only, never to a redirect target), the checksum verified.
Statuses ``sent``/``delivered``/``read``/``failed`` are
:class:`~channels.base.StatusUpdate` (failed with ``error`` = ``"<code> <title>:
<details>"``); reactions and other changes are ignored.

Outbound: ``{base}/{version}/{phone_number_id}/messages``. Outside the 24-hour window only
a template may go (``template_only``; anything else is refused with
``code="template_required"``): ``message.data["provider_template"] = {"name", "language",
"params": [...]}`` sends that template (it must be listed in ``templates`` with that many
params, else ``code="template"``); the message's text and attachments are then not sent
(the text may be the agent's preview of the template). Text longer than 4096 characters is
split.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import phonenumbers

from channels.base import (
    Attachment,
    InboundMessage,
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
    Ignore,
    MetaChannel,
    Unit,
    WindowState,
    as_utc,
    error_text,
    extension,
    location_text,
    media_kind,
    text_id,
)
from channels.safe_fetch import MediaRefused

__all__ = ["WHATSAPP_TEXT_MAX", "WhatsAppChannel", "normalize_wa_id", "whatsapp_window"]

WHATSAPP_TEXT_MAX = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f/\\]")
_WA_MEDIA = ("image", "audio", "video", "document", "sticker")
_WA_STATUSES = frozenset({"sent", "delivered", "read", "failed"})


def whatsapp_window(last_inbound_at: datetime | None, now: datetime) -> WindowState:
    """Within 24 hours of the customer's last message: ``open``; after that (or never
    written) only a template may go: ``template_only``."""
    if last_inbound_at is not None and as_utc(now) - as_utc(last_inbound_at) <= STANDARD_WINDOW:
        return "open"
    return "template_only"


def normalize_wa_id(wa_id: str) -> str:
    """A WhatsApp id (country code + number, digits) as E.164; ValueError when it is none.

    Known quirks: Mexico's mobile ``521`` + 10 digits (the ``1`` was abolished in 2019,
    WhatsApp still sends it) becomes ``+52`` + 10 digits; Brazil's mobiles sent without
    the ninth digit (``55`` + area code + 8 digits starting with 6-9) get it back, so one
    person has one address whatever WhatsApp sends. Argentina's ``549`` + 10 digits is
    kept as sent: ``+549...`` is the E.164 form of an Argentine mobile (the ``9`` is part
    of it), the same that SMS and voice produce."""
    digits = wa_id.strip().removeprefix("+")
    if not digits.isdigit() or not 7 <= len(digits) <= 15:
        raise ValueError("not a WhatsApp id (7 to 15 digits)")
    if digits.startswith("521") and len(digits) == 13:
        digits = "52" + digits[3:]
    elif digits.startswith("55") and len(digits) == 12 and digits[4] in "6789":
        digits = digits[:4] + "9" + digits[4:]
    try:
        number = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from exc
    if not phonenumbers.is_possible_number(number):
        raise ValueError("not a possible phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


class WhatsAppChannel(MetaChannel):
    """A WhatsApp business number's conversations (see the module docstring)."""

    channel_id = "whatsapp"
    channel_ids = ("whatsapp",)
    max_text_length = WHATSAPP_TEXT_MAX

    @property
    def routing_key(self) -> str:
        return self.meta_config.phone_number_id or ""

    def window(self, last_inbound_at: datetime | None, now: datetime | None = None) -> WindowState:
        """:func:`whatsapp_window` for this inbox (``now`` defaults to the context's clock)."""
        return whatsapp_window(last_inbound_at, now if now is not None else self.context.now())

    def templates(self) -> list[str]:
        return [t.name for t in self.meta_config.templates]

    # -- inbound ------------------------------------------------------------------------
    def parse_unit(self, unit: Unit) -> list[ParsedItem]:
        value = unit.item["entry"][0]["changes"][0]["value"]
        if "statuses" in value:
            return self._whatsapp_status(value["statuses"][0])
        message = value["messages"][0]
        if not isinstance(message, Mapping):
            raise Bad("a WhatsApp message that is not an object")
        contacts = value.get("contacts") or []
        return self._whatsapp_message(message, contacts)

    def _whatsapp_status(self, status: Any) -> list[ParsedItem]:
        if not isinstance(status, Mapping):
            raise Bad("a WhatsApp status that is not an object")
        message_id = text_id(status.get("id"))
        state = status.get("status")
        if message_id is None or not isinstance(state, str):
            raise Bad("a WhatsApp status without id or status")
        if state not in _WA_STATUSES:
            return []  # deleted, warning, ...: nothing to apply
        error = None
        if state == "failed":
            error = _wa_error_text(status.get("errors")) or "failed (no reason given)"
        return [StatusUpdate(message_id, state, error, _from_seconds(status.get("timestamp")))]

    def _whatsapp_message(self, message: Mapping[str, Any], contacts: Any) -> list[ParsedItem]:
        message_id = text_id(message.get("id"))
        if message_id is None:
            raise Bad("a WhatsApp message without id")
        raw_from = text_id(message.get("from"))
        if raw_from is None:
            raise Bad("a WhatsApp message without from")
        try:
            address = normalize_wa_id(raw_from)
        except ValueError as exc:
            raise Bad(f"from {raw_from[:40]!r} refused: {exc}") from exc
        name = None
        for contact in contacts if isinstance(contacts, list) else []:
            if isinstance(contact, Mapping) and contact.get("wa_id") == raw_from:
                profile = contact.get("profile")
                if isinstance(profile, Mapping) and isinstance(profile.get("name"), str):
                    name = profile["name"].strip()[:200] or None
        kind = str(message.get("type") or "")
        data: dict[str, Any] = {"wa_id": raw_from}
        references: list[str] = []
        context = message.get("context")
        if isinstance(context, Mapping):
            if text_id(context.get("id")):
                references.append(str(context["id"]))
            if context.get("forwarded") or context.get("frequently_forwarded"):
                data["forwarded"] = True
        if isinstance(message.get("referral"), Mapping):
            data["referral"] = dict(message["referral"])
        text, attachments, auto = self._whatsapp_content(kind, message, data)
        return [
            InboundMessage(
                external_id=message_id,
                sender=Sender("whatsapp", address, True, name=name, verified_by="meta"),
                text=text,
                attachments=attachments,
                provider_ts=_from_seconds(message.get("timestamp")),
                auto=auto,
                references=references,
                data=data,
            )
        ]

    def _whatsapp_content(
        self, kind: str, message: Mapping[str, Any], data: dict[str, Any]
    ) -> tuple[str, list[Attachment], bool]:
        """``(text, attachments, auto)`` of a WhatsApp message by its type."""
        content = message.get(kind)
        if kind == "reaction":
            raise Ignore
        if kind == "unsupported" or (message.get("errors") and kind not in _WA_MEDIA):
            data["unsupported"] = {
                "type": (content or {}).get("type") if isinstance(content, Mapping) else kind,
                "error": _wa_error_text(message.get("errors")),
            }
            return "", [], False
        if kind == "text":
            body = content.get("body") if isinstance(content, Mapping) else None
            if not isinstance(body, str):
                raise Bad("a WhatsApp text without body")
            return body, [], False
        if kind in _WA_MEDIA:
            if not isinstance(content, Mapping) or not NUMERIC_ID.match(str(content.get("id"))):
                raise Bad(f"a WhatsApp {kind} without a numeric media id")
            media_id = str(content["id"])
            mime = str(content.get("mime_type") or "application/octet-stream")
            content_type = mime.split(";", 1)[0].strip().lower()
            filename = _filename(
                content.get("filename") if isinstance(content.get("filename"), str) else None,
                f"{media_id}{extension(mime)}",
            )
            if content.get("voice"):
                data["voice"] = True
            if content.get("animated"):
                data["animated"] = True
            attachment = Attachment(filename, content_type, 0, url=f"{self.graph_url}/{media_id}")
            caption = content.get("caption")
            return (caption if isinstance(caption, str) else ""), [attachment], False
        if kind == "interactive":
            if not isinstance(content, Mapping):
                raise Bad("a WhatsApp interactive message without content")
            itype = str(content.get("type") or "")
            reply = content.get(itype)
            if itype in ("button_reply", "list_reply") and isinstance(reply, Mapping):
                data["event"] = itype
                data["payload"] = str(reply.get("id") or "")
                if isinstance(reply.get("description"), str):
                    data["description"] = reply["description"]
                return str(reply.get("title") or ""), [], False
            if itype == "nfm_reply" and isinstance(reply, Mapping):  # a WhatsApp Flow
                data["event"] = "flow_reply"
                data["payload"] = str(reply.get("response_json") or "")
                return str(reply.get("body") or ""), [], False
            raise Bad(f"a WhatsApp interactive reply of unknown type {itype!r}")
        if kind == "button":
            if not isinstance(content, Mapping):
                raise Bad("a WhatsApp button reply without content")
            data["event"] = "button"
            data["payload"] = str(content.get("payload") or "")
            return str(content.get("text") or ""), [], False
        if kind == "location":
            if not isinstance(content, Mapping):
                raise Bad("a WhatsApp location without content")
            location = {
                k: content.get(k) for k in ("latitude", "longitude", "name", "address", "url")
            }
            data["location"] = {k: v for k, v in location.items() if v is not None}
            return location_text(location), [], False
        if kind == "contacts":
            if not isinstance(content, list):
                raise Bad("WhatsApp contacts that are not a list")
            data["contacts"] = content
            return "\n".join(_contact_text(c) for c in content if isinstance(c, Mapping)), [], False
        if kind == "system":
            data["system"] = dict(content) if isinstance(content, Mapping) else content
            body = content.get("body") if isinstance(content, Mapping) else None
            return (body if isinstance(body, str) else ""), [], True
        raise Bad(f"unknown WhatsApp message type {kind!r}")

    @staticmethod
    def unit_id(unit: Unit) -> str | None:
        value = unit.item["entry"][0]["changes"][0]["value"]
        listed = value.get("messages") or value.get("statuses")
        return text_id(listed[0].get("id"))

    # -- media: two steps ---------------------------------------------------------------
    async def fetch_medium(self, url: str) -> tuple[bytes, str]:
        node = f"{self.graph_url}/"
        if url.startswith(node):
            return await self._whatsapp_media(url[len(node) :])
        return await self._safe_fetch(url, bearer=False)

    async def _whatsapp_media(self, media_id: str) -> tuple[bytes, str]:
        """Step 1: the media node (URL, checksum, size); step 2: the bytes, with the token."""
        cfg = self.meta_config
        if not NUMERIC_ID.match(media_id):
            raise MediaRefused("not a WhatsApp media id")
        params = {"phone_number_id": cfg.phone_number_id or "", **self._proof()}
        try:
            async with asyncio.timeout(cfg.request_timeout * 2):
                response = await self._api().get(
                    f"{self.graph_url}/{media_id}", params=params, headers=self._auth_headers()
                )
        except (httpx.HTTPError, TimeoutError) as exc:
            raise MediaRefused(f"cannot ask Meta for the media: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise MediaRefused(f"Meta answered HTTP {response.status_code}: {error_text(response)}")
        try:
            info = response.json()
        except ValueError as exc:
            raise MediaRefused("Meta's media answer is not JSON") from exc
        url = info.get("url") if isinstance(info, dict) else None
        if not isinstance(url, str) or not url:
            raise MediaRefused("Meta's media answer has no url")
        limit = cfg.media_max_mb * 1024 * 1024
        size = info.get("file_size")
        if isinstance(size, int) and size > limit:
            raise MediaRefused(f"the media is {size} bytes, over {limit}")
        data, content_type = await self._safe_fetch(url, bearer=True)
        expected = str(info.get("sha256") or "").lower()
        if re.fullmatch(r"[0-9a-f]{64}", expected) and hashlib.sha256(data).hexdigest() != expected:
            raise MediaRefused("the media does not match Meta's SHA-256")
        return data, content_type

    # -- outbound -----------------------------------------------------------------------
    @property
    def send_url(self) -> str:
        return f"{self.graph_url}/{self.meta_config.phone_number_id}/messages"

    def recipient(self, address: str) -> str:
        digits = address.removeprefix("+")
        if not digits.isdigit() or not 7 <= len(digits) <= 15:
            raise PermanentSendError("recipient: not a phone number", code="bad_recipient")
        return digits

    def _template(self, wanted: Any) -> dict[str, Any]:
        if not isinstance(wanted, Mapping):
            raise PermanentSendError("template: expected {name, language, params}", code="template")
        name, language = wanted.get("name"), wanted.get("language")
        params = wanted.get("params") or []
        if not isinstance(params, list | tuple):
            raise PermanentSendError("template: params must be a list", code="template")
        for template in self.meta_config.templates:
            if template.name == name and template.language == language:
                if len(params) != template.params:
                    raise PermanentSendError(
                        f"template {name} ({language}) takes {template.params} parameters,"
                        f" got {len(params)}",
                        code="template",
                    )
                body: dict[str, Any] = {"name": name, "language": {"code": language}}
                if params:
                    body["components"] = [
                        {
                            "type": "body",
                            "parameters": [{"type": "text", "text": str(p)} for p in params],
                        }
                    ]
                return body
        raise PermanentSendError(
            f"template {name!r} ({language}) is not one of this inbox's templates", code="template"
        )

    def window_bodies(
        self, message: OutboundMessage, to: str, window: str
    ) -> list[dict[str, Any]] | None:
        if message.data.get("provider_template") is not None:
            template = self._template(message.data["provider_template"])
            return [_wa_body(to, "template", template)]
        if window == "template_only":
            raise PermanentSendError(
                "more than 24 hours since the customer wrote: only a template can be sent",
                code="template_required",
            )
        return None

    def message_bodies(
        self, message: OutboundMessage, to: str, parts: list[str], media: list[Attachment]
    ) -> list[dict[str, Any]]:
        bodies = [_wa_body(to, "text", {"body": p, "preview_url": False}) for p in parts]
        for attachment in media:
            kind = media_kind(attachment.content_type, "document")
            content: dict[str, Any] = {"link": attachment.url}
            if kind == "document":
                content["filename"] = attachment.filename
            bodies.append(_wa_body(to, kind, content))
        return bodies


def _from_seconds(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _filename(name: str | None, fallback: str) -> str:
    """A safe file name: the last path segment without control characters, else fallback."""
    if name:
        cleaned = _CONTROL.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()
        if cleaned and cleaned not in (".", "..") and len(cleaned) <= 200:
            return cleaned
    return fallback


def _contact_text(card: Mapping[str, Any]) -> str:
    name = card.get("name")
    parts = [str(name.get("formatted_name") or "").strip() if isinstance(name, Mapping) else ""]
    for key, field in (("phones", "phone"), ("emails", "email")):
        for item in card.get(key) or []:
            if isinstance(item, Mapping) and item.get(field):
                parts.append(str(item[field]))
    return "Contact: " + ", ".join(p for p in parts if p)


def _wa_error_text(errors: Any) -> str | None:
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], Mapping):
        return None
    error = errors[0]
    title = error.get("title") or error.get("message") or "error"
    details = (
        (error.get("error_data") or {}).get("details")
        if isinstance(error.get("error_data"), Mapping)
        else None
    )
    text = f"{error.get('code', '?')} {title}"
    return f"{text}: {details}" if details and details != title else text


def _wa_body(to: str, kind: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": kind,
        kind: content,
    }
