"""The Graph API side that Messenger and WhatsApp share: a Meta app's webhook (signatures,
the subscription handshake, splitting a delivery into events and handing each to the inbox
whose page id or phone number id it names), Graph API calls (tokens, ``appsecret_proof``,
Meta's errors), safe media downloads, and :class:`MetaChannel`, the base of
:class:`~channels.meta.messenger.MessengerChannel` and
:class:`~channels.meta.whatsapp.WhatsAppChannel`.

How the core drives it (:class:`MetaApp`, a :class:`~channels.base.WebhookApp`)
--------------------------------------------------------------------------------

Meta calls **one webhook URL per app** for every page and number of that app, so the
webhook belongs to ``meta_apps``, not to an inbox:

* ``GET /webhooks/meta/{app}`` (subscription handshake): ``handshake(request.query,
  verify_token)`` answered as ``200 text/plain``, or 403 when it is None.
* ``POST /webhooks/meta/{app}``: ``verify_signature(app_secret, raw_body,
  headers.get("x-hub-signature-256"))`` on the raw bytes before anything else (403 if
  False). Then ``units = entries(raw_body)`` (``ValueError`` when the body is not a JSON
  object: quarantined raw). Each :class:`Unit` is one event with its routing key
  (``Unit.key``: the page id for Messenger, ``value.metadata.phone_number_id`` for
  WhatsApp) and ``Unit.channel`` (``messenger``/``whatsapp``). ``route(units, channels)``,
  given the channels of the inboxes whose ``config.app`` is this app, groups the units by
  inbox (same ``channel_id`` and ``routing_key``) and returns the units nobody claims
  (counted; an unknown ``object`` such as ``instagram`` or a non-message change simply
  yields no unit, ``OBJECTS`` lists the objects read here). For every inbox:
  ``items = await channel.parse_items_async(units)``, then ingest. Answer 200 (Meta
  retries anything else, for hours, and disables webhooks that keep failing).

Per inbox the generic contract also works, for a deployment that prefers one route per
inbox: the core passes the app's secrets in ``ChannelContext.options`` as
``{"app_secret": ..., "verify_token": ...}`` (``str`` or ``SecretStr``);
``verify(request)`` checks ``X-Hub-Signature-256`` with ``app_secret`` (denied when it is
missing), ``challenge(request.query)`` answers the handshake, and
``parse(request)``/``parse_async(request)`` take a whole webhook body and keep only this
inbox's units (others are dropped: they belong to another inbox). When ``app_secret`` is
in the options, every Graph call also carries ``appsecret_proof``.

A unit that cannot be handled becomes a :class:`~channels.base.Reject` with the JSON of
that one unit as ``raw`` (a webhook body of one event: ``reimport`` parses it again); the
rest of the delivery goes on.

Media: ``parse_items``/``parse`` leave media as URL-only attachments;
``parse_items_async``/``parse_async`` then fetch them into ``context.blobs`` through
:func:`channels.safe_fetch.fetch_media` (allow-listed hosts with our ``*.domain``
wildcards, https only, every redirect re-checked, private addresses refused, size and type
limits). A medium that fails stays an attachment with ``url`` and no ``blob_key``, and
``data["media_errors"]`` says why. Test hooks in ``context.options``: ``media_resolver``
(a DNS stub), ``media_transport`` and ``api_transport`` (httpx transports).

Sending: the channel's request bodies are posted in order; the receipt has the first
message's id (also as ``thread_id``), the others are in ``data["part_ids"]``. A partly
sent message resumes after a temporary error without resending earlier parts. The outbox
tells the channel the window state in ``message.data["window"]`` (absent means open);
``"closed"`` is refused with ``PermanentSendError(code="window_closed")``. Attachments
are sent by their public ``url`` (one message each; a blob-only attachment is refused
with ``code="media_url"``, because neither API can fetch our blob store).

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
import email.utils
import hashlib
import hmac
import json
import logging
import mimetypes
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, NamedTuple
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr

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
    SendReceipt,
    TemporarySendError,
    UncertainPolicy,
    WebhookApp,
    WebhookRequest,
    WebhookUnit,
)
from channels.meta.config import MetaConfig
from channels.safe_fetch import MediaRefused, Resolver, fetch_media, system_resolver
from channels.text import split_text

__all__ = [
    "OBJECTS",
    "STANDARD_WINDOW",
    "MetaApp",
    "MetaAppConfig",
    "MetaChannel",
    "Unit",
    "WindowState",
    "entries",
    "handshake",
    "route",
    "verify_signature",
]

log = logging.getLogger(__name__)

WindowState = Literal["open", "human_agent", "template_only", "closed"]

#: Webhook ``object`` -> the channel id it carries.
OBJECTS: Mapping[str, str] = {"page": "messenger", "whatsapp_business_account": "whatsapp"}
#: Anything may be sent within this long of the customer's last message (both channels).
STANDARD_WINDOW = timedelta(hours=24)

# Meta error codes that mean "later" (rate limits, transient failures), whatever the status.
_TRANSIENT_CODES = frozenset(
    {1, 2, 4, 17, 32, 341, 613, 80006, 80007, 130429, 131000, 131016, 131048, 131056, 133004}
)
_TOKEN_CODES = frozenset({190})
_MAX_REDIRECTS = 5
_REMEMBERED_SENDS = 1024
_CHALLENGE = re.compile(r"^[A-Za-z0-9_.\-]{1,512}$")
_EXTENSIONS = {"audio/ogg": ".ogg", "image/jpeg": ".jpg", "audio/mpeg": ".mp3"}


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
    page_id = text_id(entry.get("id"))
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
            text_id(metadata.get("phone_number_id")) if isinstance(metadata, Mapping) else None
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


class MetaAppConfig(BaseModel):
    """An entry of ``meta_apps`` in channels.yaml: the app's secret and verify token."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    app_secret: SecretStr
    verify_token: SecretStr


class MetaApp(WebhookApp):
    """A Meta app's one webhook, shared by its Messenger pages and WhatsApp numbers."""

    title = "Meta"
    section = "meta_apps"
    config_model = MetaAppConfig
    inbox_key = "app"
    summary = "Messenger and WhatsApp webhooks of a Meta app, signed with X-Hub-Signature-256"
    handshake_summary = "Meta's subscription handshake (hub.mode, hub.verify_token)"

    @classmethod
    def handshake(cls, app: BaseModel, query: Mapping[str, str]) -> str | None:
        assert isinstance(app, MetaAppConfig)
        return handshake(query, app.verify_token.get_secret_value())

    @classmethod
    def verify(cls, app: BaseModel, request: WebhookRequest) -> bool:
        assert isinstance(app, MetaAppConfig)
        return verify_signature(
            app.app_secret.get_secret_value(),
            request.body,
            request.headers.get("x-hub-signature-256"),
        )

    @classmethod
    def split(cls, body: bytes) -> list[WebhookUnit]:
        return list(entries(body))

    @classmethod
    def route(
        cls, units: list[WebhookUnit], channels: list[Channel]
    ) -> tuple[dict[Channel, list[WebhookUnit]], list[WebhookUnit]]:
        ours = [u for u in units if isinstance(u, Unit)]
        groups, unclaimed = route(ours, [c for c in channels if isinstance(c, MetaChannel)])
        others = [u for u in units if not isinstance(u, Unit)]
        return {c: list(u) for c, u in groups.items()}, [*unclaimed, *others]

    @classmethod
    async def parse(cls, channel: Channel, units: list[WebhookUnit]) -> list[ParsedItem]:
        assert isinstance(channel, MetaChannel)
        return await channel.parse_items_async([u for u in units if isinstance(u, Unit)])


# -- helpers shared by the channel modules of this package -------------------------------
def text_id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text or None


def as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


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


def extension(content_type: str) -> str:
    """The usual file name extension of a media type (``.ogg``), or ``""``."""
    base = content_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(base) or mimetypes.guess_extension(base) or ""


def location_text(location: Mapping[str, Any]) -> str:
    label = ", ".join(
        str(location[k]) for k in ("name", "address") if isinstance(location.get(k), str)
    )
    lat, long = location.get("latitude"), location.get("longitude")
    where = f"{lat}, {long}" if lat is not None and long is not None else ""
    if label and where:
        return f"Location: {label} ({where})"
    return f"Location: {label or where or 'unknown'}"


def media_kind(content_type: str, other: str) -> str:
    major = content_type.split("/", 1)[0].strip().lower()
    return major if major in ("image", "video", "audio") else other


class Bad(Exception):
    """The item cannot be handled: becomes a Reject with this reason."""


class Ignore(Bad):
    """Nothing to store (a reaction): handled like an unknown event, not rejected."""


@dataclass
class _FetchState:
    """What the media client's hooks need for the fetch running in this task."""

    bearer: str | None  # the token, sent to bearer_host only
    bearer_host: str | None
    current: str  # the URL of the current hop (followed through redirects)
    insecure_ok: bool
    hops: int = 0  # redirects followed so far


_FETCH: ContextVar[_FetchState | None] = ContextVar("meta_media_fetch", default=None)


# -- the channel base -----------------------------------------------------------------------
class MetaChannel(Channel, ABC):
    """Messenger or WhatsApp through a Meta app: what both share. ``MetaChannel(slug,
    config, context)`` makes the class of ``config.channel`` (like ``pathlib.Path``);
    the registry names the two classes."""

    provider = "meta"
    channel_ids: ClassVar[tuple[str, ...]] = ("messenger", "whatsapp")
    config_model: ClassVar[type[InboxConfig]] = MetaConfig
    attachments = True
    messaging_window = STANDARD_WINDOW
    uncertain_policy = UncertainPolicy.ASK
    webhook = True
    _by_channel: ClassVar[dict[str, type[MetaChannel]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.channel_id:
            MetaChannel._by_channel[cls.channel_id] = cls

    def __new__(cls, slug: str, config: InboxConfig, context: ChannelContext) -> MetaChannel:
        if cls is MetaChannel:
            chosen = MetaChannel._by_channel.get(getattr(config, "channel", ""))
            if chosen is None:
                raise TypeError(f"no Meta channel for {getattr(config, 'channel', None)!r}")
            cls = chosen
        return super().__new__(cls)

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        if not isinstance(config, MetaConfig) or config.channel != self.channel_id:
            raise TypeError(f"{type(self).__name__} needs a {self.channel_id} MetaConfig")
        self.meta_config = config
        options = context.options
        self.media_resolver: Resolver = options.get("media_resolver", system_resolver)
        self._media_transport: httpx.AsyncBaseTransport | None = options.get("media_transport")
        self._api_transport: httpx.AsyncBaseTransport | None = options.get("api_transport")
        self._http: httpx.AsyncClient | None = None
        self._media_http: httpx.AsyncClient | None = None
        self._progress: OrderedDict[int, list[str]] = OrderedDict()

    # -- what each channel says ---------------------------------------------------------
    @property
    @abstractmethod
    def routing_key(self) -> str:
        """The id this inbox's units carry (:attr:`Unit.key`): page or phone number id."""

    @abstractmethod
    def parse_unit(self, unit: Unit) -> list[ParsedItem]:
        """The items of one unit of this channel; raises :class:`Bad` (a Reject) or
        :class:`Ignore` (nothing)."""

    @staticmethod
    @abstractmethod
    def unit_id(unit: Unit) -> str | None:
        """The external id of a unit's event, when it has one (for a Reject)."""

    @property
    @abstractmethod
    def send_url(self) -> str:
        """Where the Send API takes this inbox's messages."""

    @abstractmethod
    def recipient(self, address: str) -> str:
        """The recipient as the Send API wants it (PermanentSendError if it is none)."""

    @abstractmethod
    def window_bodies(
        self, message: OutboundMessage, to: str, window: str
    ) -> list[dict[str, Any]] | None:
        """What the window allows before the message's own content: the bodies to send
        instead (a template), None to go on, or a PermanentSendError."""

    @abstractmethod
    def message_bodies(
        self, message: OutboundMessage, to: str, parts: list[str], media: list[Attachment]
    ) -> list[dict[str, Any]]:
        """The request bodies of the text parts, then one per attachment."""

    async def after_parse(self, items: list[ParsedItem]) -> None:
        """What a channel adds to parsed items by asking the Graph API (in place)."""

    async def fetch_medium(self, url: str) -> tuple[bytes, str]:
        """One medium's bytes and content type (a channel may take other steps)."""
        return await self._safe_fetch(url, bearer=False)

    # -- identity -----------------------------------------------------------------------
    @property
    def graph_url(self) -> str:
        cfg = self.meta_config
        return f"{cfg.api_base_url}/{cfg.api_version}"

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
                items.extend(self.parse_unit(unit))
            except Ignore:
                continue
            except Bad as exc:
                items.append(Reject(str(exc), unit.raw(), _unit_id(self, unit)))
            except Exception as exc:
                log.exception("inbox %s: a Meta event could not be parsed", self.slug)
                reason = f"parse failed: {type(exc).__name__}: {exc}"
                items.append(Reject(reason, unit.raw(), _unit_id(self, unit)))
        return items

    async def parse_items_async(
        self, units: Iterable[Unit | tuple[str, Mapping[str, Any]]]
    ) -> list[ParsedItem]:
        """:meth:`parse_items`, then the media fetched into the blob store and what the
        channel looks up (:meth:`after_parse`)."""
        items = self.parse_items(units)
        await self.fetch_media(items)
        await self.after_parse(items)
        return items

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
            data, content_type = await self.fetch_medium(attachment.url)
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
        return self.recipient(message.recipient.address.strip())

    def _bodies(self, message: OutboundMessage, to: str) -> list[dict[str, Any]]:
        """The request bodies of this message, in order (text parts, then attachments)."""
        window = message.data.get("window") or "open"
        if window == "closed":
            raise PermanentSendError(
                f"the {self.channel_id} messaging window is closed", code="window_closed"
            )
        instead = self.window_bodies(message, to, window)
        if instead is not None:
            return instead
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
        assert self.max_text_length is not None
        parts = split_text(message.text, self.max_text_length) if message.text.strip() else []
        if not parts and not media:
            raise PermanentSendError("nothing to send: no text and no media", code="empty")
        return self.message_bodies(message, to, parts, media)

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send through the Graph API; the receipt has the (first) message id. See the
        module docstrings for ``data["window"]``, ``data["provider_template"]`` and the
        errors."""
        to = self._recipient(message)
        bodies = self._bodies(message, to)
        url = self.send_url
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


def _unit_id(channel: MetaChannel, unit: Unit) -> str | None:
    try:
        return channel.unit_id(unit)
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


def error_text(response: httpx.Response) -> str:
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
