"""Facebook Messenger and the WhatsApp Cloud API through Meta: signed webhooks in, the Graph
Send API out. One class, :class:`MetaChannel`, serves both (``channel: messenger`` or
``channel: whatsapp``, ``provider: meta``).

Configuration (channels.yaml)::

    meta_apps:
      main: {app_secret: "${META_APP_SECRET}", verify_token: "${META_VERIFY_TOKEN}"}
    inboxes:
      fb:
        channel: messenger
        provider: meta
        app: main                          # the entry of meta_apps whose webhook carries it
        page_id: "106000000000001"
        access_token: "${META_PAGE_TOKEN}"   # a Page access token
        human_agent_tag: false             # true: 24 h .. 7 d replies go with HUMAN_AGENT
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

``api_base_url`` (default ``https://graph.facebook.com``), ``api_version`` (``v21.0``),
``media_hosts`` and ``allow_insecure_media_for_tests`` exist for tests against a local fake;
production keeps their defaults. ``media_hosts`` entries are exact host names or
``*.domain`` wildcards (any host under ``domain``, not ``domain`` itself).

How the core drives this module
-------------------------------

Meta calls **one webhook URL per app** for every page and number of that app, so the
webhook belongs to ``meta_apps``, not to an inbox. The pure functions do the app level:

* ``GET /webhooks/meta/{app}`` (subscription handshake): answer
  ``handshake(request.query, verify_token)`` as ``200 text/plain``, or 403 when it is None.
* ``POST /webhooks/meta/{app}``: ``verify_signature(app_secret, raw_body,
  headers.get("x-hub-signature-256"))`` on the raw bytes before anything else (403 if
  False). Then ``units = entries(raw_body)`` (``ValueError`` when the body is not a JSON
  object: quarantine it raw). Each :class:`Unit` is one event with its routing key
  (``Unit.key``: the page id for Messenger, ``value.metadata.phone_number_id`` for
  WhatsApp) and ``Unit.channel`` (``messenger``/``whatsapp``). ``route(units, channels)``,
  given the channels of the inboxes whose ``config.app`` is this app, groups the units by
  inbox (same ``channel_id`` and ``routing_key``) and returns the units nobody claims
  (count them; an unknown ``object`` such as ``instagram`` or a non-message change simply
  yields no unit, ``OBJECTS`` lists the objects this module reads).
  For every inbox: ``items = await channel.parse_items_async(units)``, then ingest. Answer
  200 (Meta retries anything else, for hours, and disables webhooks that keep failing).

Per inbox the generic contract also works, for a deployment that prefers one route per
inbox (``/webhooks/meta/{inbox}``): the core passes the app's secrets in
``ChannelContext.options`` as ``{"app_secret": ..., "verify_token": ...}`` (``str`` or
``SecretStr``); ``verify(request)`` checks ``X-Hub-Signature-256`` with ``app_secret``
(denied when it is missing), ``challenge(request.query)`` answers the handshake, and
``parse(request)``/``parse_async(request)`` take a whole webhook body and keep only this
inbox's units (others are dropped: they belong to another inbox). When ``app_secret`` is
in the options, every Graph call also carries ``appsecret_proof``.

What comes out of parsing:

* :class:`~channels.base.InboundMessage` with ``external_id`` = the Messenger ``mid`` or
  the WhatsApp message id (the dedupe key), ``provider_ts`` from the event, ``Sender``
  ``messenger``/PSID or ``whatsapp``/E.164 (see :func:`normalize_wa_id`; the raw wa_id is
  in ``data["wa_id"]``), ``references`` = the message replied to. Quick replies,
  postbacks, WhatsApp buttons and interactive replies carry ``data["event"]`` and
  ``data["payload"]`` (the developer-defined payload/id; the text is what the person
  saw). Referrals (m.me links, ads) carry ``data["referral"]``; a referral without a
  message is an empty-text message with ``data["event"] = "referral"`` and the external id
  ``referral:<psid>:<timestamp>`` (Meta's retries dedupe). Locations and
  shared contacts become text plus ``data["location"]`` / ``data["contacts"]``. A
  WhatsApp message Meta cannot render (``unsupported``) is kept, empty, with
  ``data["unsupported"]``; a WhatsApp ``system`` message (the customer changed number) is
  ``auto`` with ``data["system"]``.
* :class:`~channels.base.StatusUpdate` for our messages: Messenger delivery receipts
  listing ``mids`` (``delivered``), WhatsApp ``sent``/``delivered``/``read``/``failed``
  (failed with ``error`` = ``"<code> <title>: <details>"``).
* :class:`WatermarkStatus` (a ``StatusUpdate`` subclass) for Messenger read receipts and
  delivery receipts without ``mids``: *every* message this inbox sent to
  ``recipient`` (a PSID) at or before ``at`` is now ``status``. Its ``provider_id``
  (``watermark:<psid>``) matches no message, so a core that does not know it ignores it
  harmlessly; to apply it, move forward the outbound messages of this inbox to that
  identity sent at or before ``at``.
* Ignored (no item): echoes of the page's own messages (ours, the Page Inbox's, other
  apps'), events under ``standby`` unless ``standby: true``, reactions, opt-ins, handover
  and other non-message events, WhatsApp reactions and non-``messages`` changes.
* :class:`~channels.base.Reject` for an item that cannot be handled (no sender, a
  malformed event, a wa_id that is no phone number, an unknown WhatsApp message type),
  with the JSON of that one unit as ``raw`` (a webhook body of one event: ``reimport``
  parses it again); the rest of the delivery goes on.

Media: ``parse_items``/``parse`` leave media as URL-only attachments (Messenger: the CDN
URL; WhatsApp: the Graph media node ``{api_base_url}/{api_version}/{media-id}``).
``parse_items_async``/``parse_async`` then fetch them into ``context.blobs`` through
:func:`channels.safe_fetch.fetch_media` (allow-listed hosts with our ``*.domain``
wildcards, https only, every redirect re-checked, private addresses refused, size and type
limits). WhatsApp media take two steps: ``GET /{version}/{media-id}`` with the bearer
token gives a short-lived URL and a SHA-256, then that URL is fetched with the bearer
token (sent to that URL's host only, never to a redirect target) and the checksum is
verified. A medium that fails stays an attachment with ``url`` and no ``blob_key``, and
``data["media_errors"]`` says why. Test hooks in ``context.options``: ``media_resolver``
(a DNS stub), ``media_transport`` and ``api_transport`` (httpx transports).

Wiring checklist: register ``"meta": {c: MetaChannel for c in MetaChannel.channel_ids}``
in ``channels.CHANNELS``; check that ``config.app`` names an entry of ``meta_apps`` and pass
its secrets in ``options``; add the two routes above; have the outbox put
``channel.window(last_inbound_at)`` in ``OutboundMessage.data["window"]`` (and apply
:class:`WatermarkStatus`); give ``tests/channels/test_contract.py`` sample configs
(``meta``: ``app``, ``page_id``, ``access_token``; ``meta:whatsapp``: ``app``,
``phone_number_id``, ``access_token``).

Sending: ``send`` posts to ``{base}/{version}/me/messages`` (Messenger, ``messaging_type``
``RESPONSE``, or ``MESSAGE_TAG`` + ``HUMAN_AGENT``) or ``{base}/{version}/{phone_number_id}
/messages`` (WhatsApp). The outbox tells the channel the window state in
``message.data["window"]`` (see :func:`window_state`; absent means open):

* ``"human_agent"`` (Messenger): sent with the HUMAN_AGENT tag; refused with
  ``PermanentSendError(code="window")`` unless ``human_agent_tag`` is enabled.
* ``"template_only"`` (WhatsApp): only a template may go; anything else is refused with
  ``code="template_required"``.
* ``"closed"``: refused with ``code="window_closed"``.

``message.data["provider_template"] = {"name", "language", "params": [...]}`` (WhatsApp) sends that
template (it must be listed in ``templates`` with that many params, else
``code="template"``); the message text and attachments are then not sent (the text may be
the agent's preview of the template). Text longer than Meta's limit
(2000 characters on Messenger, 4096 on WhatsApp) is split; attachments are sent by their
public ``url`` (one message each; a blob-only attachment is refused with
``code="media_url"``, because neither API can fetch our blob store). The receipt has the
first message's id (also as ``thread_id``); the others are in ``data["part_ids"]``. A
partly sent message resumes after a temporary error without resending earlier parts.

Errors: 429, 5xx, network errors, Meta's rate-limit and transient codes (4, 17, 32, 613,
80007, 130429, 131000, 131016, 131056, ..., or ``is_transient``) and token errors (190,
401: fixing the token must not fail every queued message) are ``TemporarySendError``
(``retry_after`` from ``Retry-After`` or ``x-business-use-case-usage``); other Meta errors
are ``PermanentSendError(code=str(meta_code))`` with Meta's message, e.g. ``"10"``
(subcode 2018278: outside the 24 h window), ``"551"`` (person unavailable/blocked),
``"100"`` (no such user), ``"131047"`` (WhatsApp re-engagement window), ``"131026"``
(undeliverable), ``"132001"`` (template does not exist). WhatsApp often accepts a message
and reports such failures later as a ``failed`` status webhook. Meta has no idempotency
key, so an interrupted send is left to the agent (``uncertain_policy = ASK``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import hmac
import json
import logging
import mimetypes
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, NamedTuple
from urllib.parse import urljoin, urlsplit

import httpx
import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from channels.base import (
    Attachment,
    Channel,
    ChannelContext,
    InboundMessage,
    InboxConfig,
    OutboundMessage,
    ParsedItem,
    PermanentSendError,
    Reject,
    Sender,
    SendReceipt,
    StatusUpdate,
    TemporarySendError,
    UncertainPolicy,
    WebhookRequest,
)
from channels.safe_fetch import MediaRefused, Resolver, fetch_media, system_resolver
from channels.twilio_sms import split_text

__all__ = [
    "MESSENGER_TEXT_MAX",
    "OBJECTS",
    "WHATSAPP_TEXT_MAX",
    "MetaChannel",
    "MetaConfig",
    "MetaTemplate",
    "Unit",
    "WatermarkStatus",
    "WindowState",
    "entries",
    "handshake",
    "normalize_wa_id",
    "route",
    "verify_signature",
    "window_state",
]

log = logging.getLogger(__name__)
_NAMES_CACHED = 10_000

WindowState = Literal["open", "human_agent", "template_only", "closed"]

#: Webhook ``object`` -> the channel id it carries.
OBJECTS: Mapping[str, str] = {"page": "messenger", "whatsapp_business_account": "whatsapp"}
MESSENGER_TEXT_MAX = 2000
WHATSAPP_TEXT_MAX = 4096
STANDARD_WINDOW = timedelta(hours=24)
HUMAN_AGENT_WINDOW = timedelta(days=7)

# Meta error codes that mean "later" (rate limits, transient failures), whatever the status.
_TRANSIENT_CODES = frozenset(
    {1, 2, 4, 17, 32, 341, 613, 80006, 80007, 130429, 131000, 131016, 131048, 131056, 133004}
)
_TOKEN_CODES = frozenset({190})
_MAX_REDIRECTS = 5
_REMEMBERED_SENDS = 1024
_NUMERIC_ID = re.compile(r"^\d{1,32}$")
_HOST_PATTERN = re.compile(
    r"^(\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_CHALLENGE = re.compile(r"^[A-Za-z0-9_.\-]{1,512}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f/\\]")
_EXTENSIONS = {"audio/ogg": ".ogg", "image/jpeg": ".jpg", "audio/mpeg": ".mp3"}
_MESSENGER_MEDIA = {"image": "image", "sticker": "image", "video": "video", "audio": "audio"}
_MESSENGER_DEFAULT_TYPES = {
    "image": "image/jpeg",
    "sticker": "image/png",
    "video": "video/mp4",
    "audio": "audio/mpeg",
    "file": "application/octet-stream",
}
_WA_MEDIA = ("image", "audio", "video", "document", "sticker")
_WA_STATUSES = frozenset({"sent", "delivered", "read", "failed"})


# -- the app level: signatures, the handshake, splitting a delivery ----------------------
def verify_signature(app_secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` (``X-Hub-Signature-256``) is ``sha256=`` + the hex HMAC-SHA256 of
    the raw ``body`` keyed with the app secret. Constant-time; the body is never parsed or
    re-serialized (Meta escapes ``/``, ``<``, ``@``, non-ASCII... in what it signs)."""
    if not app_secret or not header:
        return False
    scheme, _, given = header.strip().partition("=")
    if scheme.lower() != "sha256" or not given:
        return False
    expected = hmac.new(app_secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    try:
        given_bytes = given.lower().encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given_bytes, expected.encode("ascii"))


def handshake(query: Mapping[str, str], verify_token: str) -> str | None:
    """The ``hub.challenge`` to echo when Meta verifies the webhook (``hub.mode`` is
    ``subscribe`` and ``hub.verify_token`` matches, compared in constant time); else None."""
    if not verify_token or query.get("hub.mode") != "subscribe":
        return None
    given = query.get("hub.verify_token") or ""
    challenge = query.get("hub.challenge") or ""
    if not _CHALLENGE.match(challenge):
        return None
    if not hmac.compare_digest(given.encode("utf-8"), verify_token.encode("utf-8")):
        return None
    return challenge


class Unit(NamedTuple):
    """One event of a webhook delivery and where it goes.

    ``key`` is the routing key (Messenger: the page id; WhatsApp: the phone number id) and
    ``item`` a webhook body holding that one event (so its JSON is re-parsable on its own:
    it is what a :class:`Reject` keeps)."""

    key: str
    item: dict[str, Any]

    @property
    def channel(self) -> str:
        return OBJECTS.get(str(self.item.get("object")), "")

    def raw(self) -> bytes:
        return _dump(self.item)


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def entries(body: bytes | Mapping[str, Any]) -> list[Unit]:
    """Split one webhook delivery into :class:`Unit` s, in order.

    Messenger: one unit per event of ``entry[].messaging`` and ``entry[].standby``
    (``changes``, the page feed, give none). WhatsApp: one unit per message and per status
    of each ``messages`` change (other fields, like ``account_update``, give none). An
    unknown ``object`` gives ``[]``. Raises ``ValueError`` when ``body`` is not a JSON
    object. Parts without a routing key are skipped (logged)."""
    if isinstance(body, Mapping):
        payload: Any = body
    else:
        payload = json.loads(body)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(payload, Mapping):
        raise ValueError("the webhook body is not a JSON object")
    kind = payload.get("object")
    found = payload.get("entry")
    if kind not in OBJECTS or not isinstance(found, list):
        return []
    units: list[Unit] = []
    for entry in found:
        if not isinstance(entry, Mapping):
            log.warning("Meta webhook: an entry that is not an object skipped")
            continue
        if kind == "page":
            units.extend(_page_units(entry))
        else:
            units.extend(_waba_units(entry))
    return units


def _page_units(entry: Mapping[str, Any]) -> list[Unit]:
    page_id = _text_id(entry.get("id"))
    units = []
    for key in ("messaging", "standby"):
        events = entry.get(key)
        if not isinstance(events, list):
            continue
        if page_id is None:
            log.warning("Meta webhook: a page entry without id skipped (%d events)", len(events))
            continue
        for event in events:
            item = {
                "object": "page",
                "entry": [{"id": page_id, "time": entry.get("time"), key: [event]}],
            }
            units.append(Unit(page_id, item))
    return units


def _waba_units(entry: Mapping[str, Any]) -> list[Unit]:
    units = []
    changes = entry.get("changes")
    for change in changes if isinstance(changes, list) else []:
        if not isinstance(change, Mapping) or change.get("field") != "messages":
            continue
        value = change.get("value")
        if not isinstance(value, Mapping):
            continue
        metadata = value.get("metadata")
        number_id = (
            _text_id(metadata.get("phone_number_id")) if isinstance(metadata, Mapping) else None
        )
        if number_id is None:
            log.warning("Meta webhook: a WhatsApp change without phone_number_id skipped")
            continue
        base = {k: value[k] for k in ("messaging_product", "metadata") if k in value}
        listed_contacts = value.get("contacts")
        contacts: list[Any] = listed_contacts if isinstance(listed_contacts, list) else []
        for key in ("messages", "statuses"):
            listed = value.get(key)
            for event in listed if isinstance(listed, list) else []:
                one: dict[str, Any] = dict(base)
                if key == "messages":
                    sender = event.get("from") if isinstance(event, Mapping) else None
                    mine = [
                        c for c in contacts if isinstance(c, Mapping) and c.get("wa_id") == sender
                    ]
                    one["contacts"] = mine or contacts
                one[key] = [event]
                item = {
                    "object": "whatsapp_business_account",
                    "entry": [
                        {"id": entry.get("id"), "changes": [{"field": "messages", "value": one}]}
                    ],
                }
                units.append(Unit(number_id, item))
    return units


def route(
    units: Iterable[Unit], channels: Iterable[MetaChannel]
) -> tuple[dict[MetaChannel, list[Unit]], list[Unit]]:
    """Group ``units`` by the inbox they belong to (same channel id and routing key, first
    match wins); returns ``(by_channel, unclaimed)``. Pass the channels of one app."""
    table: dict[tuple[str, str], MetaChannel] = {}
    for channel in channels:
        table.setdefault((channel.channel_id, channel.routing_key), channel)
    routed: dict[MetaChannel, list[Unit]] = {}
    unclaimed: list[Unit] = []
    for unit in units:
        owner = table.get((unit.channel, unit.key))
        if owner is None:
            unclaimed.append(unit)
        else:
            routed.setdefault(owner, []).append(unit)
    return routed, unclaimed


# -- pure helpers -----------------------------------------------------------------------
def window_state(
    channel: str, last_inbound_at: datetime | None, now: datetime, human_agent_tag: bool
) -> WindowState:
    """What may be sent to a customer whose last message arrived at ``last_inbound_at``.

    Within 24 hours: ``open``. Messenger after that: ``human_agent`` up to 7 days when the
    inbox uses the HUMAN_AGENT tag, else ``closed``. WhatsApp after 24 hours (or never
    written): ``template_only``. Other channels have no window (``open``)."""
    if channel not in OBJECTS.values():
        return "open"
    if last_inbound_at is not None:
        elapsed = _as_utc(now) - _as_utc(last_inbound_at)
        if elapsed <= STANDARD_WINDOW:
            return "open"
    if channel == "whatsapp":
        return "template_only"
    if (
        last_inbound_at is not None
        and human_agent_tag
        and _as_utc(now) - _as_utc(last_inbound_at) <= HUMAN_AGENT_WINDOW
    ):
        return "human_agent"
    return "closed"


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


def _text_id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text or None


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _from_millis(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _from_seconds(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.strip().lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def _hostname(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: ``Retry-After`` (seconds or an HTTP date), else the largest
    ``estimated_time_to_regain_access`` (minutes) in ``x-business-use-case-usage``."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, (when - datetime.now(UTC)).total_seconds())
            except (TypeError, ValueError):
                pass
    usage = headers.get("x-business-use-case-usage")
    if not usage:
        return None
    try:
        parsed = json.loads(usage)
    except ValueError:
        return None
    minutes = [
        float(record.get("estimated_time_to_regain_access") or 0)
        for records in (parsed.values() if isinstance(parsed, dict) else [])
        for record in (records if isinstance(records, list) else [])
        if isinstance(record, dict)
    ]
    longest = max(minutes, default=0.0)
    return longest * 60 if longest > 0 else None


def _filename(name: str | None, fallback: str) -> str:
    """A safe file name: the last path segment without control characters, else fallback."""
    if name:
        cleaned = _CONTROL.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()
        if cleaned and cleaned not in (".", "..") and len(cleaned) <= 200:
            return cleaned
    return fallback


def _extension(content_type: str) -> str:
    base = content_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(base) or mimetypes.guess_extension(base) or ""


# -- configuration ----------------------------------------------------------------------
class MetaTemplate(BaseModel):
    """A pre-approved WhatsApp template agents may send (``params``: its body variables)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_]{1,512}$")
    language: str = Field(pattern=r"^[a-z]{2,3}(_[A-Za-z0-9]{2,4})?$")  # en, en_US, pt_BR
    params: int = Field(0, ge=0, le=100)


class MetaConfig(InboxConfig):
    """The keys of a ``provider: meta`` inbox (``channel: messenger`` or ``whatsapp``)."""

    channel: Literal["messenger", "whatsapp"]
    provider: Literal["meta"] = "meta"
    app: str = Field(pattern=r"^\S{1,64}$")  # an entry of meta_apps (secret, verify token)
    page_id: str | None = Field(None, pattern=_NUMERIC_ID.pattern)  # messenger
    phone_number_id: str | None = Field(None, pattern=_NUMERIC_ID.pattern)  # whatsapp
    access_token: SecretStr  # "${META_TOKEN}": Page token or WhatsApp system-user token
    api_version: str = Field("v21.0", pattern=r"^v\d{1,3}\.\d{1,3}$")
    human_agent_tag: bool = False  # messenger: reply 24 h .. 7 d with the HUMAN_AGENT tag
    templates: list[MetaTemplate] = []  # whatsapp
    standby: bool = False  # messenger: also take messages delivered under standby (handover)
    request_timeout: float = Field(10.0, gt=0, le=120)  # seconds per Graph API request
    media_max_mb: int = Field(25, ge=1, le=100)
    # A wildcard never admits image/svg+xml (scriptable); list it explicitly to accept it.
    media_types: list[str] = [
        "image/*",
        "video/*",
        "audio/*",
        "application/pdf",
        "text/plain",
        "text/csv",
        "text/vcard",
        "text/x-vcard",
        "application/msword",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.ms-excel",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.ms-powerpoint",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ]
    # -- test-only overrides: never change these in production ------------------------
    api_base_url: str = "https://graph.facebook.com"
    media_hosts: list[str] = [
        "graph.facebook.com",
        "lookaside.fbsbx.com",
        "*.fbcdn.net",
        "*.fbsbx.com",
    ]
    # !!! TESTS ONLY !!! Admits http:// and loopback media URLs so a local fake can serve
    # media. In production it would let a webhook point our fetcher at localhost.
    allow_insecure_media_for_tests: bool = False

    @field_validator("api_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname:
            raise ValueError("api_base_url must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("media_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        hosts = [h.strip().lower() for h in value]
        for host in hosts:
            if not _HOST_PATTERN.match(host) and not re.fullmatch(
                r"[0-9.]+|\[?[0-9a-f:]+\]?", host
            ):
                raise ValueError(f"media host {host!r}: a host name or *.domain")
        return hosts

    @model_validator(mode="after")
    def _per_channel(self) -> MetaConfig:
        if self.channel == "messenger":
            if not self.page_id:
                raise ValueError("a messenger inbox needs page_id")
            if self.phone_number_id or self.templates:
                raise ValueError("phone_number_id and templates are for whatsapp inboxes")
        else:
            if not self.phone_number_id:
                raise ValueError("a whatsapp inbox needs phone_number_id")
            if self.page_id or self.human_agent_tag or self.standby:
                raise ValueError("page_id, human_agent_tag and standby are for messenger inboxes")
            seen = set()
            for template in self.templates:
                key = (template.name, template.language)
                if key in seen:
                    raise ValueError(f"template {template.name} ({template.language}) twice")
                seen.add(key)
        return self


# -- parsed items ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WatermarkStatus(StatusUpdate):
    """Messenger's watermark receipt: every message this inbox sent to ``recipient`` (a
    PSID) at or before ``at`` is ``status`` (``delivered`` or ``read``). ``provider_id`` is
    ``watermark:<psid>``, which matches no message (a core unaware of it ignores it)."""


class _Bad(Exception):
    """The item cannot be handled: becomes a Reject with this reason."""


@dataclass
class _FetchState:
    """What the media client's hooks need for the fetch running in this task."""

    bearer: str | None  # the token, sent to bearer_host only
    bearer_host: str | None
    current: str  # the URL of the current hop (followed through redirects)
    insecure_ok: bool
    hops: int = 0  # redirects followed so far


_FETCH: ContextVar[_FetchState | None] = ContextVar("meta_media_fetch", default=None)


# -- the channel -------------------------------------------------------------------------
class MetaChannel(Channel):
    """Messenger or WhatsApp through Meta; see the module docstring for the core's part."""

    channel_id = "messenger"  # per instance: the inbox's channel
    provider = "meta"
    channel_ids = ("messenger", "whatsapp")
    config_model: ClassVar[type[InboxConfig]] = MetaConfig
    max_text_length = MESSENGER_TEXT_MAX  # per instance: 4096 for WhatsApp
    attachments = True
    messaging_window = timedelta(hours=24)
    uncertain_policy = UncertainPolicy.ASK
    webhook = True

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        if not isinstance(config, MetaConfig):
            raise TypeError("MetaChannel needs a MetaConfig")
        self._names: dict[str, str | None] = {}  # PSID -> profile name (or None)
        self.meta_config = config
        self.channel_id = config.channel  # type: ignore[misc]  # one class, two channels
        self.max_text_length = (  # type: ignore[misc]
            MESSENGER_TEXT_MAX if config.channel == "messenger" else WHATSAPP_TEXT_MAX
        )
        options = context.options
        self.media_resolver: Resolver = options.get("media_resolver", system_resolver)
        self._media_transport: httpx.AsyncBaseTransport | None = options.get("media_transport")
        self._api_transport: httpx.AsyncBaseTransport | None = options.get("api_transport")
        self._http: httpx.AsyncClient | None = None
        self._media_http: httpx.AsyncClient | None = None
        self._progress: OrderedDict[int, list[str]] = OrderedDict()

    # -- identity -----------------------------------------------------------------------
    @property
    def routing_key(self) -> str:
        """The id this inbox's units carry (:attr:`Unit.key`): page or phone number id."""
        cfg = self.meta_config
        return (cfg.page_id if cfg.channel == "messenger" else cfg.phone_number_id) or ""

    @property
    def graph_url(self) -> str:
        cfg = self.meta_config
        return f"{cfg.api_base_url}/{cfg.api_version}"

    def window(self, last_inbound_at: datetime | None, now: datetime | None = None) -> WindowState:
        """:func:`window_state` for this inbox (``now`` defaults to the context's clock)."""
        return window_state(
            self.channel_id,
            last_inbound_at,
            now if now is not None else self.context.now(),
            self.meta_config.human_agent_tag,
        )

    def templates(self) -> list[str]:
        return [t.name for t in self.meta_config.templates]

    def _option_secret(self, name: str) -> str:
        value = self.context.options.get(name)
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        return value if isinstance(value, str) else ""

    # -- lifecycle ----------------------------------------------------------------------
    async def stop(self) -> None:
        """Close the HTTP clients (Graph API and media)."""
        for client in (self._http, self._media_http):
            if client is not None:
                await client.aclose()
        self._http = self._media_http = None

    def _api(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.meta_config.request_timeout, transport=self._api_transport
            )
        return self._http

    def _media_client(self) -> httpx.AsyncClient:
        if self._media_http is None:
            # Our own client: no proxy from the environment (it would resolve names past
            # the address checks), and hooks that add the bearer token to the one host that
            # needs it and follow the hops for the *.domain allow-list.
            self._media_http = httpx.AsyncClient(
                trust_env=False,
                transport=self._media_transport,
                event_hooks={"request": [_add_bearer], "response": [_follow_hop]},
            )
        return self._media_http

    # -- inbound: the contract --------------------------------------------------------
    def verify(self, request: WebhookRequest) -> bool:
        """``X-Hub-Signature-256`` with ``context.options["app_secret"]``; denied without it."""
        return verify_signature(
            self._option_secret("app_secret"),
            request.body,
            request.headers.get("x-hub-signature-256"),
        )

    def challenge(self, query: Mapping[str, str]) -> str | None:
        """:func:`handshake` with ``context.options["verify_token"]``."""
        return handshake(query, self._option_secret("verify_token"))

    def parse(self, request: WebhookRequest) -> list[ParsedItem]:
        """This inbox's items of a whole webhook body (media as URLs; see parse_async).
        Units of other pages or numbers are dropped (they belong to other inboxes)."""
        try:
            units = entries(request.body)
        except ValueError as exc:
            return [Reject(f"the webhook body is not a JSON object: {exc}", request.body)]
        return self.parse_items(
            u for u in units if u.channel == self.channel_id and u.key == self.routing_key
        )

    async def parse_async(self, request: WebhookRequest) -> list[ParsedItem]:
        """:meth:`parse`, then the media fetched (safely) into the blob store."""
        items = self.parse(request)
        await self.fetch_media(items)
        return items

    async def reimport(self, raw: bytes, external_id: str) -> list[ParsedItem] | None:
        """Parse a rejected unit (or any webhook body) again, media included."""
        try:
            units = entries(raw)
        except ValueError as exc:
            return [Reject(f"not a JSON object: {exc}", raw, external_id)]
        items = self.parse_items([u for u in units if u.channel == self.channel_id])
        await self.fetch_media(items)
        return items

    # -- inbound: units ---------------------------------------------------------------
    def parse_items(
        self, units: Iterable[Unit | tuple[str, Mapping[str, Any]]]
    ) -> list[ParsedItem]:
        """The items of units routed to this inbox (see :func:`entries`), in order. Units
        of the other channel are skipped; a unit that fails becomes a Reject."""
        items: list[ParsedItem] = []
        for key, item in units:
            unit = Unit(key, dict(item))
            if unit.channel != self.channel_id:
                log.warning("inbox %s: a %s unit skipped", self.slug, unit.channel or "foreign")
                continue
            try:
                if self.channel_id == "messenger":
                    items.extend(self._messenger_unit(unit))
                else:
                    items.extend(self._whatsapp_unit(unit))
            except _Ignore:
                continue
            except _Bad as exc:
                items.append(Reject(str(exc), unit.raw(), _unit_id(unit)))
            except Exception as exc:
                log.exception("inbox %s: a Meta event could not be parsed", self.slug)
                reason = f"parse failed: {type(exc).__name__}: {exc}"
                items.append(Reject(reason, unit.raw(), _unit_id(unit)))
        return items

    async def parse_items_async(
        self, units: Iterable[Unit | tuple[str, Mapping[str, Any]]]
    ) -> list[ParsedItem]:
        """:meth:`parse_items`, then the media fetched into the blob store and, on
        Messenger, the sender's profile name looked up (once per person)."""
        items = self.parse_items(units)
        await self.fetch_media(items)
        if self.channel_id == "messenger":
            for index, item in enumerate(items):
                if isinstance(item, InboundMessage) and item.sender.name is None:
                    name = await self._profile_name(item.sender.address)
                    if name:
                        items[index] = dataclasses.replace(
                            item, sender=dataclasses.replace(item.sender, name=name)
                        )
        return items

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

    # -- Messenger --------------------------------------------------------------------
    def _messenger_unit(self, unit: Unit) -> list[ParsedItem]:
        entry = unit.item["entry"][0]
        if "standby" in entry and not self.meta_config.standby:
            return []
        events = entry.get("messaging") or entry.get("standby") or []
        event = events[0] if events else None
        if not isinstance(event, Mapping):
            raise _Bad("a Messenger event that is not an object")
        page_id = unit.key
        sender = _text_id((event.get("sender") or {}).get("id"))
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
            raise _Bad("a Messenger event without sender.id")
        when = _from_millis(event.get("timestamp"))
        who = Sender("messenger", sender, True, verified_by="meta")
        if kinds[0] == "message":
            return self._messenger_message(event["message"], who, when)
        if kinds[0] == "postback":
            return self._messenger_postback(event["postback"], who, when, event.get("timestamp"))
        referral = event["referral"]
        if not isinstance(referral, Mapping):
            raise _Bad("a Messenger referral that is not an object")
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
            raise _Bad(f"a Messenger {status} receipt that is not an object")
        at = _from_millis(receipt.get("watermark"))
        mids = receipt.get("mids")
        if isinstance(mids, list) and mids:
            return [StatusUpdate(str(mid), status, at=at) for mid in mids if _text_id(mid)]
        if sender is None or at is None:
            raise _Bad(f"a Messenger {status} receipt without sender or watermark")
        return [WatermarkStatus(f"watermark:{sender}", status, at=at, recipient=sender)]

    def _messenger_message(
        self, message: Any, who: Sender, when: datetime | None
    ) -> list[ParsedItem]:
        if not isinstance(message, Mapping):
            raise _Bad("a Messenger message that is not an object")
        mid = _text_id(message.get("mid"))
        if mid is None:
            raise _Bad("a Messenger message without mid")
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
        if isinstance(reply_to, Mapping) and _text_id(reply_to.get("mid")):
            references.append(str(reply_to["mid"]))
        if not lines and not attachments and not data:
            raise _Bad("a Messenger message with nothing in it")
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
            raise _Bad("Messenger attachments that are not a list")
        attachments: list[Attachment] = []
        seen: set[str] = set()
        for index, attachment in enumerate(listed):
            if not isinstance(attachment, Mapping):
                raise _Bad("a Messenger attachment that is not an object")
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
                lines.append(_location_text(location))
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
            raise _Bad("a Messenger postback that is not an object")
        mid = _text_id(postback.get("mid")) or f"postback:{who.address}:{timestamp}"
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

    # -- WhatsApp ---------------------------------------------------------------------
    def _whatsapp_unit(self, unit: Unit) -> list[ParsedItem]:
        value = unit.item["entry"][0]["changes"][0]["value"]
        if "statuses" in value:
            return self._whatsapp_status(value["statuses"][0])
        message = value["messages"][0]
        if not isinstance(message, Mapping):
            raise _Bad("a WhatsApp message that is not an object")
        contacts = value.get("contacts") or []
        return self._whatsapp_message(message, contacts)

    def _whatsapp_status(self, status: Any) -> list[ParsedItem]:
        if not isinstance(status, Mapping):
            raise _Bad("a WhatsApp status that is not an object")
        message_id = _text_id(status.get("id"))
        state = status.get("status")
        if message_id is None or not isinstance(state, str):
            raise _Bad("a WhatsApp status without id or status")
        if state not in _WA_STATUSES:
            return []  # deleted, warning, ...: nothing to apply
        error = None
        if state == "failed":
            error = _wa_error_text(status.get("errors")) or "failed (no reason given)"
        return [StatusUpdate(message_id, state, error, _from_seconds(status.get("timestamp")))]

    def _whatsapp_message(self, message: Mapping[str, Any], contacts: Any) -> list[ParsedItem]:
        message_id = _text_id(message.get("id"))
        if message_id is None:
            raise _Bad("a WhatsApp message without id")
        raw_from = _text_id(message.get("from"))
        if raw_from is None:
            raise _Bad("a WhatsApp message without from")
        try:
            address = normalize_wa_id(raw_from)
        except ValueError as exc:
            raise _Bad(f"from {raw_from[:40]!r} refused: {exc}") from exc
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
            if _text_id(context.get("id")):
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
            raise _Ignore
        if kind == "unsupported" or (message.get("errors") and kind not in _WA_MEDIA):
            data["unsupported"] = {
                "type": (content or {}).get("type") if isinstance(content, Mapping) else kind,
                "error": _wa_error_text(message.get("errors")),
            }
            return "", [], False
        if kind == "text":
            body = content.get("body") if isinstance(content, Mapping) else None
            if not isinstance(body, str):
                raise _Bad("a WhatsApp text without body")
            return body, [], False
        if kind in _WA_MEDIA:
            if not isinstance(content, Mapping) or not _NUMERIC_ID.match(str(content.get("id"))):
                raise _Bad(f"a WhatsApp {kind} without a numeric media id")
            media_id = str(content["id"])
            mime = str(content.get("mime_type") or "application/octet-stream")
            content_type = mime.split(";", 1)[0].strip().lower()
            filename = _filename(
                content.get("filename") if isinstance(content.get("filename"), str) else None,
                f"{media_id}{_extension(mime)}",
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
                raise _Bad("a WhatsApp interactive message without content")
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
            raise _Bad(f"a WhatsApp interactive reply of unknown type {itype!r}")
        if kind == "button":
            if not isinstance(content, Mapping):
                raise _Bad("a WhatsApp button reply without content")
            data["event"] = "button"
            data["payload"] = str(content.get("payload") or "")
            return str(content.get("text") or ""), [], False
        if kind == "location":
            if not isinstance(content, Mapping):
                raise _Bad("a WhatsApp location without content")
            location = {
                k: content.get(k) for k in ("latitude", "longitude", "name", "address", "url")
            }
            data["location"] = {k: v for k, v in location.items() if v is not None}
            return _location_text(location), [], False
        if kind == "contacts":
            if not isinstance(content, list):
                raise _Bad("WhatsApp contacts that are not a list")
            data["contacts"] = content
            return "\n".join(_contact_text(c) for c in content if isinstance(c, Mapping)), [], False
        if kind == "system":
            data["system"] = dict(content) if isinstance(content, Mapping) else content
            body = content.get("body") if isinstance(content, Mapping) else None
            return (body if isinstance(body, str) else ""), [], True
        raise _Bad(f"unknown WhatsApp message type {kind!r}")

    # -- media ------------------------------------------------------------------------
    async def fetch_media(self, items: Sequence[ParsedItem]) -> None:
        """Fetch the media of ``items`` (in place) into the blob store; not for a message
        the inbox already stored (Meta's retry of a delivery: the core drops it)."""
        with_media = [i for i in items if isinstance(i, InboundMessage) and i.attachments]
        fresh = await self.context.not_stored(with_media)
        await asyncio.gather(*(self._fetch_message_media(item) for item in fresh))

    async def _fetch_message_media(self, message: InboundMessage) -> None:
        results = await asyncio.gather(*(self._fetch_one(a) for a in message.attachments))
        message.attachments = [attachment for attachment, _ in results]
        errors = [
            {"url": attachment.url, "reason": reason}
            for attachment, reason in results
            if reason is not None
        ]
        if errors:
            message.data["media_errors"] = errors

    async def _fetch_one(self, attachment: Attachment) -> tuple[Attachment, str | None]:
        if attachment.url is None or attachment.blob_key is not None:
            return attachment, None
        blobs = self.context.blobs
        if blobs is None:
            return attachment, "no blob store configured"
        try:
            node = f"{self.graph_url}/"
            if self.channel_id == "whatsapp" and attachment.url.startswith(node):
                data, content_type = await self._whatsapp_media(attachment.url[len(node) :])
            else:
                data, content_type = await self._safe_fetch(attachment.url, bearer=False)
        except MediaRefused as exc:
            log.warning("media of inbox %s not stored: %s", self.slug, exc.reason)
            return attachment, exc.reason
        try:
            key = await blobs.put(data, content_type, attachment.filename)
        except Exception as exc:
            # Keep the message (and the media reference) rather than lose it to storage.
            log.exception("media of inbox %s not stored in the blob store", self.slug)
            return attachment, f"blob store: {type(exc).__name__}: {exc}"
        return Attachment(attachment.filename, content_type, len(data), blob_key=key), None

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.meta_config.access_token.get_secret_value()}"}

    def _proof(self) -> dict[str, str]:
        secret = self._option_secret("app_secret")
        if not secret:
            return {}
        token = self.meta_config.access_token.get_secret_value()
        proof = hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()
        return {"appsecret_proof": proof}

    async def _whatsapp_media(self, media_id: str) -> tuple[bytes, str]:
        """Step 1: the media node (URL, checksum, size); step 2: the bytes, with the token."""
        cfg = self.meta_config
        if not _NUMERIC_ID.match(media_id):
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
            raise MediaRefused(
                f"Meta answered HTTP {response.status_code}: {_error_text(response)}"
            )
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

    async def _safe_fetch(self, url: str, *, bearer: bool) -> tuple[bytes, str]:
        """:func:`fetch_media` with our ``*.domain`` allow-list: each round allows the exact
        hosts plus the current URL's host when a wildcard admits it; a redirect to another
        wildcard host is resumed from there (every hop still checked by fetch_media)."""
        cfg = self.meta_config
        exact = [h for h in cfg.media_hosts if not h.startswith("*.")]
        state = _FetchState(
            bearer=cfg.access_token.get_secret_value() if bearer else None,
            bearer_host=_hostname(url) if bearer else None,
            current=url,
            insecure_ok=cfg.allow_insecure_media_for_tests,
        )
        token = _FETCH.set(state)
        timeout = max(cfg.request_timeout, 20.0)
        try:
            async with asyncio.timeout(timeout):
                current = url
                while True:
                    host = _hostname(current)
                    allowed = list(exact)
                    if any(_host_matches(host, p) for p in cfg.media_hosts):
                        allowed.append(host)
                    state.current = current
                    try:
                        return await fetch_media(
                            current,
                            allowed_hosts=allowed,
                            max_bytes=cfg.media_max_mb * 1024 * 1024,
                            allowed_types=cfg.media_types,
                            client=self._media_client(),
                            allow_insecure=cfg.allow_insecure_media_for_tests,
                            resolver=self.media_resolver,
                            max_redirects=_MAX_REDIRECTS - state.hops,
                            timeout=timeout,
                        )
                    except MediaRefused:
                        target = state.current
                        target_host = _hostname(target)
                        moved = target != current and target_host not in allowed
                        if not moved or not any(
                            _host_matches(target_host, p) for p in cfg.media_hosts
                        ):
                            raise
                        if state.hops > _MAX_REDIRECTS:
                            raise MediaRefused(f"more than {_MAX_REDIRECTS} redirects") from None
                        current = target
        except TimeoutError as exc:
            raise MediaRefused(f"fetching the media took longer than {timeout:g}s") from exc
        finally:
            _FETCH.reset(token)

    # -- outbound ---------------------------------------------------------------------
    def _recipient(self, message: OutboundMessage) -> str:
        kind = message.recipient.kind
        if kind != self.channel_id:
            raise PermanentSendError(
                f"a {self.channel_id} message cannot go to a {kind} identity",
                code="bad_recipient",
            )
        address = message.recipient.address.strip()
        if self.channel_id == "messenger":
            if not _NUMERIC_ID.match(address):
                raise PermanentSendError("recipient: not a page-scoped id", code="bad_recipient")
            return address
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

    def _bodies(self, message: OutboundMessage, to: str) -> list[dict[str, Any]]:
        """The request bodies of this message, in order (text parts, then attachments)."""
        data = message.data
        window = data.get("window") or "open"
        if window == "closed":
            raise PermanentSendError(
                f"the {self.channel_id} messaging window is closed", code="window_closed"
            )
        if self.channel_id == "whatsapp":
            if data.get("provider_template") is not None:
                template = self._template(data["provider_template"])
                return [_wa_body(to, "template", template)]
            if window == "template_only":
                raise PermanentSendError(
                    "more than 24 hours since the customer wrote: only a template can be sent",
                    code="template_required",
                )
        elif window == "human_agent" and not self.meta_config.human_agent_tag:
            raise PermanentSendError(
                "outside the 24-hour window and human_agent_tag is off for this inbox",
                code="window",
            )
        media = []
        for attachment in message.attachments:
            # Meta fetches media by URL; a blob alone cannot be sent, and dropping it would
            # silently lose what the agent sent.
            if not attachment.url or urlsplit(attachment.url).scheme != "https":
                raise PermanentSendError(
                    f"attachment {attachment.filename!r} has no public https URL for Meta",
                    code="media_url",
                )
            media.append(attachment)
        limit = self.max_text_length or MESSENGER_TEXT_MAX
        parts = split_text(message.text, limit) if message.text.strip() else []
        if not parts and not media:
            raise PermanentSendError("nothing to send: no text and no media", code="empty")
        if self.channel_id == "messenger":
            tagged = window == "human_agent"
            metadata = f"omniroute:msg:{message.message_id}"
            bodies = [_messenger_body(to, {"text": p, "metadata": metadata}, tagged) for p in parts]
            for attachment in media:
                kind = _media_kind(attachment.content_type, "file")
                attached = {
                    "attachment": {"type": kind, "payload": {"url": attachment.url}},
                    "metadata": metadata,
                }
                bodies.append(_messenger_body(to, attached, tagged))
            return bodies
        bodies = [_wa_body(to, "text", {"body": p, "preview_url": False}) for p in parts]
        for attachment in media:
            kind = _media_kind(attachment.content_type, "document")
            content: dict[str, Any] = {"link": attachment.url}
            if kind == "document":
                content["filename"] = attachment.filename
            bodies.append(_wa_body(to, kind, content))
        return bodies

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send through the Graph API; the receipt has the (first) message id. See the
        module docstring for ``data["window"]``, ``data["provider_template"]`` and the errors."""
        to = self._recipient(message)
        bodies = self._bodies(message, to)
        if self.channel_id == "messenger":
            url = f"{self.graph_url}/me/messages"
        else:
            url = f"{self.graph_url}/{self.meta_config.phone_number_id}/messages"
        sent = self._progress.pop(message.message_id, None) or []
        try:
            for index, body in enumerate(bodies):
                if index < len(sent):
                    continue  # sent by an earlier attempt of this message
                sent.append(await self._post(url, body))
        except TemporarySendError:
            if sent:
                self._progress[message.message_id] = sent
                while len(self._progress) > _REMEMBERED_SENDS:
                    self._progress.popitem(last=False)
            raise
        except PermanentSendError as exc:
            if sent:
                exc.reason = f"{exc.reason} ({len(sent)} of {len(bodies)} parts sent)"
                exc.args = (exc.reason,)
            raise
        data: dict[str, Any] = {"thread_id": sent[0]}
        if len(sent) > 1:
            data["part_ids"] = sent[1:]
        return SendReceipt(sent[0], "sent", data)

    async def _post(self, url: str, body: dict[str, Any]) -> str:
        cfg = self.meta_config
        try:
            async with asyncio.timeout(cfg.request_timeout * 2):
                response = await self._api().post(
                    url, json=body, params=self._proof(), headers=self._auth_headers()
                )
        except (httpx.HTTPError, TimeoutError) as exc:
            raise TemporarySendError(f"no answer from Meta: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise _send_error(response)
        try:
            answer = response.json()
        except ValueError as exc:
            raise TemporarySendError("Meta answered 200 with a body that is not JSON") from exc
        message_id = None
        if isinstance(answer, dict):
            message_id = answer.get("message_id")
            messages = answer.get("messages")
            if message_id is None and isinstance(messages, list) and messages:
                first = messages[0]
                message_id = first.get("id") if isinstance(first, dict) else None
        if not isinstance(message_id, str) or not message_id:
            # Accepted, but we cannot tell which message it is: do not send it again.
            raise PermanentSendError("Meta accepted the message without an id", code="no_id")
        return message_id


# -- module helpers used by the channel ----------------------------------------------------
class _Ignore(_Bad):
    """Nothing to store (a reaction): handled like an unknown event, not rejected."""


def _unit_id(unit: Unit) -> str | None:
    """The external id of a unit's event, when it has one (for a Reject)."""
    try:
        entry = unit.item["entry"][0]
        if unit.channel == "messenger":
            event = (entry.get("messaging") or entry.get("standby"))[0]
            for key in ("message", "postback"):
                if isinstance(event.get(key), Mapping) and _text_id(event[key].get("mid")):
                    return str(event[key]["mid"])
            return None
        value = entry["changes"][0]["value"]
        listed = value.get("messages") or value.get("statuses")
        return _text_id(listed[0].get("id"))
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def _add_bearer_for(request: httpx.Request, state: _FetchState) -> None:
    host = _hostname("//" + request.headers.get("host", ""))
    secure = request.url.scheme == "https" or state.insecure_ok
    if state.bearer and host and host == state.bearer_host and secure:
        request.headers["Authorization"] = f"Bearer {state.bearer}"


async def _add_bearer(request: httpx.Request) -> None:
    """Request hook of the media client: the token to the one host that needs it."""
    state = _FETCH.get()
    if state is not None:
        _add_bearer_for(request, state)


async def _follow_hop(response: httpx.Response) -> None:
    """Response hook of the media client: track the URL of each redirect hop."""
    state = _FETCH.get()
    location = response.headers.get("location")
    if state is not None and location and response.status_code in (301, 302, 303, 307, 308):
        state.current = urljoin(state.current, location)
        state.hops += 1


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
    fallback = f"{kind}-{index}{_extension(content_type)}"
    name = stem if _SAFE_NAME.match(stem or "") else fallback
    return Attachment(name, content_type, 0, url=url)


def _location_text(location: Mapping[str, Any]) -> str:
    label = ", ".join(
        str(location[k]) for k in ("name", "address") if isinstance(location.get(k), str)
    )
    lat, long = location.get("latitude"), location.get("longitude")
    where = f"{lat}, {long}" if lat is not None and long is not None else ""
    if label and where:
        return f"Location: {label} ({where})"
    return f"Location: {label or where or 'unknown'}"


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


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    return str(error.get("message") or response.reason_phrase or "no error object")


def _send_error(response: httpx.Response) -> Exception:
    """A Graph API error answer as a Temporary- or PermanentSendError."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    subcode = error.get("error_subcode")
    message = str(error.get("message") or response.reason_phrase or "no error object")
    details = (
        error.get("error_data", {}).get("details")
        if isinstance(error.get("error_data"), dict)
        else None
    )
    reason = f"Meta HTTP {status}"
    if code is not None:
        reason += f" error {code}" + (f"/{subcode}" if subcode is not None else "")
    reason += f": {message}"
    if isinstance(details, str) and details and details not in message:
        reason += f" ({details})"
    user_message = error.get("error_user_msg")
    if isinstance(user_message, str) and user_message and user_message not in reason:
        reason += f" - {user_message}"
    retry = _retry_after(response.headers)
    if (
        status == 429
        or status >= 500
        or code in _TRANSIENT_CODES
        or error.get("is_transient") is True
    ):
        return TemporarySendError(reason, retry)
    if status == 401 or code in _TOKEN_CODES:
        # A token being rotated or mistyped: fixing the config must not fail every message.
        return TemporarySendError(reason, retry)
    return PermanentSendError(reason, code=str(code) if code is not None else str(status))


def _messenger_body(psid: str, message: dict[str, Any], tagged: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"recipient": {"id": psid}}
    if tagged:
        body.update({"messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"})
    else:
        body["messaging_type"] = "RESPONSE"
    body["message"] = message
    return body


def _wa_body(to: str, kind: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": kind,
        kind: content,
    }


def _media_kind(content_type: str, other: str) -> str:
    major = content_type.split("/", 1)[0].strip().lower()
    return major if major in ("image", "video", "audio") else other
