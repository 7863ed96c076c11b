"""The channel contract: what every vendor module implements, in both directions.

Inbound: ``verify(request)`` (signature check on the raw bytes, before parsing) and
``parse(request)`` into :class:`InboundMessage`, :class:`StatusUpdate` or :class:`Reject`
items (a bad item of a batch is rejected with its raw bytes; the rest goes on). Pollers
(email) call ``context.deliver(items)`` instead.

Outbound: ``send(OutboundMessage) -> SendReceipt``, raising :class:`TemporarySendError`
(retried with backoff) or :class:`PermanentSendError` (the message fails with the
provider's reason). ``find_sent`` answers "did an interrupted send go out?" for channels
whose uncertain-send policy is ``check``.

The core never switches on the channel type: what differs is declared as class attributes
(``max_text_length``, ``attachments``, ``rich_text``, ``messaging_window``,
``uncertain_policy``). Channels import nothing of the core; the core hands them a
:class:`ChannelContext`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CHANNEL_IDS",
    "SENDS_TO",
    "Attachment",
    "Channel",
    "ChannelContext",
    "InboundMessage",
    "InboxConfig",
    "OutboundMessage",
    "ParsedItem",
    "PermanentSendError",
    "Reject",
    "SendReceipt",
    "Sender",
    "StateStore",
    "StatusUpdate",
    "TemporarySendError",
    "UncertainPolicy",
    "WebhookApp",
    "WebhookRequest",
    "WebhookResponse",
    "WebhookUnit",
]

log = logging.getLogger(__name__)

#: The channel ids, declared here once (DESIGN.md "Names used everywhere"): channels.yaml's
#: ``channel:``, the routing fact ``channel`` (handed to the rules language), agents'
#: capacity keys and the fake channel's repertoire all come from this tuple.
CHANNEL_IDS: tuple[str, ...] = ("email", "sms", "voice", "webchat", "messenger", "whatsapp")
_DURATION = re.compile(r"^\d+[smhd]$")


class UncertainPolicy(StrEnum):
    """What to do with a send found interrupted by a crash (DESIGN.md, delivery semantics)."""

    RESEND = "resend"  # safe to resend (email: the same Message-ID dedupes downstream)
    CHECK = "check"  # ask the provider whether it exists before resending
    ASK = "ask"  # mark it uncertain; the agent decides ("may not have been sent, resend?")


# -- configuration ------------------------------------------------------------------
class InboxConfig(BaseModel):
    """Keys every inbox in channels.yaml has; channel modules subclass it with theirs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str
    provider: str
    default_queue: str | None = None
    continuity: Literal["join_open", "per_channel"] = "join_open"
    reopen_window: str = "7d"
    allowed_origins: list[str] = []
    uncertain_policy: UncertainPolicy | None = None
    # after an agent resolves, ask the customer one question on this channel (docs/kpis.md)
    survey: Literal["off", "csat", "nps"] = "off"
    survey_question: str | None = Field(None, max_length=300)

    @field_validator("reopen_window")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not _DURATION.match(value):
            raise ValueError(f'invalid duration "{value}" (like 30m, 8h or 7d)')
        return value

    @property
    def reopen_window_seconds(self) -> int:
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        return int(self.reopen_window[:-1]) * units[self.reopen_window[-1]]


# -- inbound ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sender:
    """Who wrote: an identity (``kind`` + normalized ``address``) and whether it is verified."""

    kind: str  # email | phone | messenger | whatsapp | webchat
    address: str
    verified: bool
    name: str | None = None
    verified_by: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    blob_key: str | None = None  # stored through the blob adapter
    url: str | None = None  # provider URL, not fetched yet
    inline: bool = False


@dataclass(slots=True)
class InboundMessage:
    external_id: str  # unique per inbox: the dedupe key
    sender: Sender
    text: str = ""
    subject: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    language: str | None = None
    provider_ts: datetime | None = None
    auto: bool = False  # an automatic message (out-of-office): attached, never reopens
    hints: dict[str, str] = field(default_factory=dict)  # unverified claims: name, email
    references: list[str] = field(default_factory=list)  # provider ids this replies to
    thread_token: str | None = None  # a channel-level threading token, checked by the core
    thread_id: str | None = None  # the id later replies refer to (an email's Message-ID)
    no_auto_reply: bool = False  # never answer automatically (lists, bulk, noreply senders)
    data: dict[str, Any] = field(default_factory=dict)
    # Set where external ids can be reused by senders (an email's Message-ID): a stored
    # message with this external_id but another fingerprint is another message, and this
    # one is stored under ``<external_id>#<fingerprint>``.
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A delivery report for one of our outbound messages, by the provider's id."""

    provider_id: str
    status: str  # queued | sent | delivered | read | failed | undelivered
    error: str | None = None
    at: datetime | None = None
    # A watermark (Messenger's read receipts): every message of this inbox to this
    # recipient's address sent at or before ``at`` has reached ``status``.
    recipient: str | None = None
    # A bounce that names no message of ours, or one we do not know: the latest message
    # of this inbox sent to this address (in the week before ``at``) is the one it reports.
    failed_recipient: str | None = None
    # Quarantined when the report matches none of our messages: a bounce never vanishes.
    unmatched: Reject | None = None
    # Our message id, when the provider echoes it (Twilio: the status callback URL): a
    # report under a provider id the message does not have reveals a second copy of it.
    message_id: int | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """An item that cannot be handled: quarantined with its raw bytes and the reason.

    With an ``external_id`` it is quarantined once per inbox: the same item rejected again
    (a provider's retry, a mailbox read again) is not kept twice, unless both carry
    fingerprints and they differ (see :class:`InboundMessage`)."""

    reason: str
    raw: bytes
    external_id: str | None = None  # its dedupe key, to re-import it under the same id
    fingerprint: str | None = None
    # ``raw`` is only part of the item (the headers of a mail too large to download):
    # re-importing it would lose the rest, so a re-import is refused.
    partial: bool = False


ParsedItem = InboundMessage | StatusUpdate | Reject


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """What a webhook channel needs of an HTTP request (the core builds it)."""

    method: str
    url: str  # the public URL the provider called (configured, never guessed)
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] = field(default_factory=dict)
    remote: str = ""


@dataclass(frozen=True, slots=True)
class WebhookResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"


# -- outbound -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutboundMessage:
    message_id: int
    conversation_id: int
    recipient: Sender
    text: str
    subject: str | None = None
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    is_auto: bool = False
    sender_name: str | None = None
    attempt: int = 1
    data: Mapping[str, Any] = field(default_factory=dict)  # channel-specific (thread ids...)
    # What the channel's last attempt left to resume from (TemporarySendError.progress),
    # kept with the outbox row: any process may make the next attempt.
    progress: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SendReceipt:
    provider_id: str | None
    status: str = "sent"
    data: Mapping[str, Any] = field(default_factory=dict)
    # Creates made although an earlier attempt may have created the message already (it
    # could not be found, or the provider could not be asked): each a possible duplicate,
    # counted on the outbox row and shown on the message (``possible_duplicate``).
    uncertain_resends: int = 0


class TemporarySendError(Exception):
    """Retry later (rate limit, 5xx, timeout). ``retry_after`` in seconds when the provider says.

    ``progress``: JSON-able state the next attempt resumes from (parts already created, a
    create that may have gone through and must be looked up first); the outbox keeps it
    with the row and hands it back as ``OutboundMessage.progress``.

    ``deferred``: nothing was tried, the channel only asks to be called again after
    ``retry_after`` (waiting before a look-up): it is no attempt, uses none of the row's
    attempts, and its wait is not shortened to the outbox's backoff ceiling."""

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        progress: Mapping[str, Any] | None = None,
        *,
        deferred: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.progress = progress
        self.deferred = deferred


class PermanentSendError(Exception):
    """Will never succeed (blocked, invalid recipient, window closed): the message fails."""

    def __init__(self, reason: str, code: str | None = None, *, opted_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        # The provider says the recipient opted out of messages (e.g. replied STOP): the
        # core marks every identity with that address so nothing more is sent to it.
        self.opted_out = opted_out


# -- the contract -------------------------------------------------------------------
class StateStore(Protocol):
    """A channel's durable state in its inbox (e.g. an IMAP cursor), by key."""

    async def load(self, key: str) -> dict[str, Any] | None: ...
    async def save(self, key: str, value: dict[str, Any]) -> None: ...


class BlobStore(Protocol):
    async def put(self, data: bytes, content_type: str, filename: str | None = None) -> str: ...

    async def get(self, key: str) -> bytes: ...


@dataclass
class ChannelContext:
    """What the core hands a channel: its inbox slug, where we are reachable, the clock,
    and a callback for pollers to deliver what they fetched."""

    slug: str
    public_base_url: str
    now: Callable[[], datetime]
    deliver: Callable[[list[ParsedItem]], Awaitable[Any]] | None = None
    blobs: BlobStore | None = None
    push: Callable[[OutboundMessage], Awaitable[SendReceipt]] | None = (
        None  # live delivery (web chat): at most once per message
    )
    # whether ``push`` delivered this message already (its receipt), for an uncertain send
    pushed: Callable[[OutboundMessage], Awaitable[SendReceipt | None]] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # test-only overrides and the like
    state: StateStore | None = None
    secret: bytes = b""  # per-deployment key for channel-level tokens (thread tokens)
    # A named lease held by one process at a time (a mailbox poller): ``await lease(name,
    # True)`` takes or renews it (False: another process holds it), ``lease(name, False)``
    # gives it up. None: one process, nothing to share.
    lease: Callable[[str, bool], Awaitable[bool]] | None = None
    lease_ttl: float = 30.0
    # ``await stored(external_id)``: whether this inbox already stored a message with that
    # dedupe key (a provider's retry, which the core will drop). None: cannot tell.
    stored: Callable[[str], Awaitable[bool]] | None = None

    async def not_stored(self, messages: list[InboundMessage]) -> list[InboundMessage]:
        """``messages`` less those already stored: work for a duplicate (fetching its media
        again) is wasted. When the core cannot be asked, all of them (the core still
        deduplicates)."""
        if self.stored is None or not messages:
            return messages
        fresh = []
        for message in messages:
            try:
                seen = await self.stored(message.external_id)
            except Exception:
                log.warning("inbox %s: cannot check for a stored duplicate", self.slug)
                seen = False
            if not seen:
                fresh.append(message)
        return fresh


# The identity kind each channel sends messages to (a phone inbox sends none: it calls).
SENDS_TO: Mapping[str, str] = {
    "email": "email",
    "sms": "phone",
    "whatsapp": "whatsapp",
    "messenger": "messenger",
    "webchat": "webchat",
}


class Channel:
    """Base class of every channel. Subclasses set the class attributes they differ in."""

    channel_id: ClassVar[str] = ""
    provider: ClassVar[str] = ""
    channel_ids: ClassVar[tuple[str, ...]] = ()  # the channel ids this class can serve
    config_model: ClassVar[type[InboxConfig]] = InboxConfig
    max_text_length: ClassVar[int | None] = None
    attachments: ClassVar[bool] = False
    rich_text: ClassVar[bool] = False
    messaging_window: ClassVar[timedelta | None] = None
    uncertain_policy: ClassVar[UncertainPolicy] = UncertainPolicy.ASK
    webhook: ClassVar[bool] = False  # receives provider webhooks (verify + parse)
    # The kinds of webhook it receives, the last segment of
    # ``/webhooks/{provider}/{inbox}/{kind}``; none: its webhook is ``/webhooks/{provider}/{inbox}``.
    webhook_kinds: ClassVar[frozenset[str]] = frozenset()
    webhook_summary: ClassVar[str] = ""  # what its webhook route says of itself (OpenAPI)

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        self.slug = slug
        self.config = config
        self.context = context

    @property
    def policy(self) -> UncertainPolicy:
        return self.config.uncertain_policy or self.uncertain_policy

    @property
    def largest_attachment(self) -> int:
        """The largest attachment (bytes) this inbox accepts: the blob store is sized to
        take it, so no attachment the channel accepted is dropped for its size."""
        return 0

    async def start(self) -> None:
        """Start pollers or clients. Webhook-only channels need nothing."""

    async def stop(self) -> None:
        """Stop pollers, close clients; in-flight work is finished or left recoverable."""

    def sends_to(self, kind: str) -> bool:
        """Whether this channel can send a message to an identity of ``kind``."""
        return SENDS_TO.get(self.channel_id) == kind

    def verify(self, request: WebhookRequest) -> bool:
        """Check the request's signature over the raw bytes. Deny by default."""
        return False

    def parse(self, request: WebhookRequest) -> list[ParsedItem]:
        """Turn a verified request into items. Unknown payloads give ``[]`` (ignored)."""
        return []

    async def parse_async(self, request: WebhookRequest) -> list[ParsedItem]:
        """What the core calls: ``parse``, plus any I/O a channel needs (fetching media)."""
        return self.parse(request)

    def ack(self, request: WebhookRequest) -> WebhookResponse:
        """The answer the provider expects once everything is persisted."""
        return WebhookResponse(200, b"", "text/plain")

    async def send(self, message: OutboundMessage) -> SendReceipt:
        raise PermanentSendError(f"the {self.provider} {self.channel_id} channel cannot send")

    async def reimport(self, raw: bytes, external_id: str) -> list[ParsedItem] | None:
        """Parse a quarantined item again (after a fix); None if this channel cannot."""
        return None

    def window(self, last_inbound_at: datetime | None, now: datetime | None = None) -> str:
        """What may be sent now to a customer who last wrote at ``last_inbound_at``:
        ``open`` (anything), ``human_agent`` (only what an agent typed), ``template_only``
        (only one of the inbox's ``templates``) or ``closed`` (nothing). No window: open."""
        return "open"

    def templates(self) -> list[str]:
        """The names of the pre-approved templates an agent may send outside the window."""
        return []

    async def find_sent(self, message: OutboundMessage, since: datetime) -> SendReceipt | None:
        """For ``check``: the provider's record of this message if it was sent, else None."""
        return None


class WebhookUnit(Protocol):
    """One event of a shared webhook's delivery, as a :class:`WebhookApp` splits it."""

    def raw(self) -> bytes:
        """The event on its own, as the provider's JSON (what a quarantine keeps)."""
        ...


class WebhookApp:
    """A provider webhook that serves several inboxes: one callback URL per app of the
    provider (a Meta app calls one URL for all its pages and numbers).

    channels.yaml lists the apps under ``section`` (``meta_apps: {main: {...}}``), each
    validated by ``config_model``; an inbox names its app with its ``inbox_key`` (``app:
    main``) and finds the app's settings in ``ChannelContext.options``. The core serves
    ``GET`` and ``POST /webhooks/{provider}/{app}``: ``handshake`` answers the GET; a POST
    is ``verify``-ed on the raw bytes, ``split`` into units, ``route``-d to the inboxes of
    the app, and each inbox's units ``parse``-d."""

    title: ClassVar[str] = ""  # in messages: 'unknown Meta app "x"'
    section: ClassVar[str] = ""
    config_model: ClassVar[type[BaseModel]] = BaseModel
    inbox_key: ClassVar[str] = "app"
    summary: ClassVar[str] = ""  # of the POST route (OpenAPI)
    handshake_summary: ClassVar[str] = ""  # of the GET route

    @classmethod
    def options(cls, app: BaseModel) -> dict[str, Any]:
        """What an inbox of ``app`` gets in ``ChannelContext.options``: its settings."""
        return {name: getattr(app, name) for name in type(app).model_fields}

    @classmethod
    def handshake(cls, app: BaseModel, query: Mapping[str, str]) -> str | None:
        """The body to answer a subscription check with (``200 text/plain``); None: 403."""
        return None

    @classmethod
    def verify(cls, app: BaseModel, request: WebhookRequest) -> bool:
        """Check the delivery's signature over the raw bytes. Deny by default."""
        return False

    @classmethod
    def split(cls, body: bytes) -> list[WebhookUnit]:
        """The delivery's events, in order; ``ValueError`` when the body cannot be read."""
        raise ValueError(f"the {cls.title} webhook cannot be read")

    @classmethod
    def route(
        cls, units: list[WebhookUnit], channels: list[Channel]
    ) -> tuple[dict[Channel, list[WebhookUnit]], list[WebhookUnit]]:
        """The units by the inbox (of this app) they belong to, and those none claims."""
        return {}, list(units)

    @classmethod
    async def parse(cls, channel: Channel, units: list[WebhookUnit]) -> list[ParsedItem]:
        """One inbox's units as items (media fetched), like ``Channel.parse_async``."""
        return []
