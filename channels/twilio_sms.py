"""SMS and MMS through Twilio Programmable Messaging: signed webhooks in, the REST API out.

Webhooks (configure both on the Twilio number or Messaging Service):

* ``POST {public_base_url}/webhooks/twilio/{inbox}/sms``: an incoming message.
* ``POST {public_base_url}/webhooks/twilio/{inbox}/sms-status``: delivery reports of our
  messages (``send`` sets it as each message's ``StatusCallback``, so nothing to configure).

Both are ``application/x-www-form-urlencoded`` and signed with ``X-Twilio-Signature``
(HMAC-SHA1 of the URL plus the sorted parameters, keyed with the Auth Token). The URL that
is checked must be the one Twilio called, so the core passes the configured public URL,
never one rebuilt from the Host header.

How the core drives this channel (besides the generic contract in ``channels.base``):

* **parse_async**: ``parse`` is synchronous and leaves MMS media as URL-only attachments;
  ``parse_async`` does the same and then fetches the media (through
  :func:`channels.safe_fetch.fetch_media`) into ``context.blobs``. The core calls
  ``parse_async`` when a channel has it. A medium that is refused or fails stays an
  attachment with ``url`` set and no ``blob_key``, and ``data["media_errors"]`` says why.
  Media are fetched once: not for a message the inbox already stored
  (``context.stored``), and copies arriving together share one fetch per media URL.
* **Opt-out**: an inbound message that is an opt-out keyword (or carries Twilio's
  ``OptOutType``) has ``data["opt_out"]`` = ``"stop"`` | ``"start"`` | ``"help"``; the core
  records it on the identity and refuses to send to a stopped identity. Twilio also blocks
  such sends itself with error 21610, which ``send`` raises as
  ``PermanentSendError(code="21610")``.
* ``ack`` answers empty TwiML; with ``self_managed_opt_out`` a HELP gets ``help_text``.

Configuration (channels.yaml)::

    support-sms:
      channel: sms
      provider: twilio
      account_sid: AC0123456789abcdef0123456789abcdef
      auth_token: "${TWILIO_AUTH_TOKEN}"
      from_number: "+15550000000"          # and/or messaging_service_sid: MG...
      long_messages: split                 # split | refuse (over 1600 characters)
      self_managed_opt_out: false          # true: we answer HELP with help_text
      help_text: "Acme support. Reply STOP to opt out."
      media_max_mb: 5
      media_types: [image/*, video/*, audio/*, application/pdf, text/vcard]
      request_timeout: 10                  # seconds per Twilio API request

``api_base_url``, ``media_hosts`` and ``allow_insecure_media_for_tests`` exist for tests
against a local fake; production keeps their defaults.

Sending: ``send`` creates a Message (``From`` = ``from_number`` or the Messaging Service);
bodies over 1600 characters are split into several messages (or refused, per
``long_messages``). A send that may have reached Twilio (read timeout, 5xx) is remembered
with the outbox row (``TemporarySendError.progress``); its retry waits ``check_delay`` from
that create, then looks the message up instead of creating a duplicate. A create made when
the look-up found nothing, or failed ``check_attempts`` times in a row, is a possible
duplicate (``SendReceipt.uncertain_resends``). The status callback URL carries the message
id (``?message=<id>``), so a report on a second copy is recognised by the core.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import mimetypes
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

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
    WebhookResponse,
)
from channels.phone import normalize_e164
from channels.safe_fetch import MediaRefused, Resolver, fetch_media, system_resolver
from channels.text import split_text as _split_text
from channels.twilio_http import HttpxTwilioClient

__all__ = [
    "EMPTY_TWIML",
    "OptOut",
    "TwilioAccountConfig",
    "TwilioChannel",
    "TwilioSmsChannel",
    "TwilioSmsConfig",
    "normalize_e164",
    "opt_out_keyword",
    "split_text",
    "twilio_client",
    "verify_twilio",
]

log = logging.getLogger(__name__)

OptOut = Literal["stop", "start", "help"]

EMPTY_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_BODY = 1600  # Twilio refuses longer bodies with error 21617
MAX_MEDIA = 10  # Twilio's limit of media per message, both directions

# Twilio's default opt-out keywords (REVOKE and OPTOUT are the newest of its defaults).
STOP_KEYWORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
START_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_KEYWORDS = frozenset({"HELP", "INFO"})
_OPT_OUT_TYPES: dict[str, OptOut] = {"STOP": "stop", "START": "start", "HELP": "help"}

_ACCOUNT_SID = r"^AC[0-9a-f]{32}$"
_SERVICE_SID = r"^MG[0-9a-f]{32}$"
_MEDIA_KEY = re.compile(r"^MediaUrl(\d{1,2})$")
_XML_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# httpx errors raised before the request could reach Twilio: retrying cannot duplicate.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)
_REMEMBERED_SENDS = 1024
_REMEMBERED_MEDIA = 256  # media fetches kept per inbox, by URL (a late copy reuses them)
_NO_SID = "an incoming message without MessageSid: it cannot be deduplicated, so it was not stored"


# -- helpers ------------------------------------------------------------------------
def opt_out_keyword(body: str, opt_out_type: str | None = None) -> OptOut | None:
    """The opt-out meaning of an inbound message, if any.

    Twilio's ``OptOutType`` (sent when Advanced Opt-Out is on, also for custom keywords)
    wins; otherwise the body must be exactly one default keyword, ignoring case, surrounding
    whitespace and trailing ``.``/``!`` ("Stop." is an opt-out; "stop sending me ads" is not,
    as for Twilio).
    """
    if opt_out_type:
        kind = _OPT_OUT_TYPES.get(opt_out_type.strip().upper())
        if kind is not None:
            return kind
    word = re.sub(r"[.!\s]+$", "", body.strip()).upper()
    if word in STOP_KEYWORDS:
        return "stop"
    if word in START_KEYWORDS:
        return "start"
    if word in HELP_KEYWORDS:
        return "help"
    return None


def split_text(text: str, limit: int = MAX_BODY) -> list[str]:
    """:func:`channels.text.split_text`, at Twilio's body limit unless told otherwise."""
    return _split_text(text, limit)


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or invalid."""
    value = (headers or {}).get("retry-after") or (headers or {}).get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _created_since(created: datetime | None, since: datetime) -> bool:
    # Twilio's date_created has whole seconds: a message created 0.4 s after ``since`` can
    # carry an earlier timestamp, so compare at the second.
    if created is None:
        return False
    return _as_utc(created) >= _as_utc(since).replace(microsecond=0)


def _media_filename(url: str, content_type: str, index: int) -> str:
    # Twilio media URLs end in the Media SID (ME...) without an extension.
    stem = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", stem):
        stem = f"media-{index}"
    extension = mimetypes.guess_extension(content_type.split(";", 1)[0].strip().lower()) or ""
    return stem + extension


# -- configuration ------------------------------------------------------------------
class TwilioAccountConfig(InboxConfig):
    """What every Twilio inbox (SMS, voice) has: the account, its token, the API client
    settings and where recordings and media may be fetched from."""

    account_sid: str = Field(pattern=_ACCOUNT_SID)
    auth_token: SecretStr  # "${TWILIO_AUTH_TOKEN}": signs webhooks and authenticates calls
    request_timeout: float = Field(10.0, gt=0, le=120)  # seconds per Twilio API request
    # -- test-only overrides: never set these in production ---------------------------
    api_base_url: str | None = None  # send every REST call here (a local fake of Twilio)
    media_hosts: list[str] = ["api.twilio.com", "mms.twiliocdn.com", "s3-external-1.amazonaws.com"]
    # !!! TESTS ONLY !!! Admits http:// and loopback media URLs so a local fake can serve
    # media. In production it would let a webhook point our fetcher at localhost.
    allow_insecure_media_for_tests: bool = False

    @field_validator("api_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("api_base_url must be an http(s) URL")
        return value.rstrip("/") if value else value


def verify_twilio(auth_token: SecretStr, request: WebhookRequest) -> bool:
    """Twilio's ``X-Twilio-Signature`` over ``request.url`` and ``request.form``.

    The validator compares in constant time and accepts the URL with or without the
    default port (Twilio is inconsistent about it).
    """
    signature = request.headers.get("x-twilio-signature")
    if not signature:
        return False
    validator = RequestValidator(auth_token.get_secret_value())
    return bool(validator.validate(request.url, dict(request.form), signature))


def twilio_client(
    cfg: TwilioAccountConfig, http: httpx.AsyncClient
) -> tuple[Client, HttpxTwilioClient]:
    """A REST client for one call: its HttpxTwilioClient's ``last_response`` (for
    Retry-After) is then ours, not a concurrent call's; ``http``'s pool is shared."""
    adapter = HttpxTwilioClient(
        client=http, timeout=cfg.request_timeout, rewrite_base=cfg.api_base_url
    )
    return Client(cfg.account_sid, cfg.auth_token.get_secret_value(), http_client=adapter), adapter


class TwilioSmsConfig(TwilioAccountConfig):
    """The keys of a ``channel: sms, provider: twilio`` inbox in channels.yaml."""

    channel: Literal["sms"] = "sms"
    provider: Literal["twilio"] = "twilio"
    from_number: str | None = None  # E.164; wins over messaging_service_sid when both are set
    messaging_service_sid: str | None = Field(None, pattern=_SERVICE_SID)
    long_messages: Literal["split", "refuse"] = "split"
    # False: Twilio handles STOP/START/HELP (and answers them); True: we answer HELP with
    # help_text in the TwiML response (and the core must honour STOP itself).
    self_managed_opt_out: bool = False
    help_text: str | None = Field(None, min_length=1, max_length=MAX_BODY)
    media_max_mb: int = Field(5, ge=1, le=100)
    # After a create that may have reached Twilio (a timeout, a 5xx): seconds to wait
    # before asking Twilio whether it exists (it may still be processing it), and how many
    # failed look-ups in a row before the message is sent again anyway (counted as a
    # possible duplicate) rather than never.
    check_delay: float = Field(60.0, ge=0, le=3600)
    check_attempts: int = Field(3, ge=1, le=20)
    # A wildcard never admits image/svg+xml (scriptable); list it explicitly to accept it.
    media_types: list[str] = [
        "image/*",
        "video/*",
        "audio/*",
        "application/pdf",
        "text/vcard",
        "text/x-vcard",
        "text/calendar",
    ]

    @field_validator("from_number")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        if value is None:
            return None
        normalized = normalize_e164(value)
        if normalized != value:
            raise ValueError(f"from_number must be E.164 like {normalized}")
        return value

    @field_validator("help_text")
    @classmethod
    def _xml_safe(cls, value: str | None) -> str | None:
        if value is not None and _XML_INVALID.search(value):
            raise ValueError("help_text contains control characters")
        return value

    @model_validator(mode="after")
    def _sender(self) -> TwilioSmsConfig:
        if not self.from_number and not self.messaging_service_sid:
            raise ValueError("set from_number or messaging_service_sid (or both)")
        return self


# -- the channel --------------------------------------------------------------------
class _Ambiguous(Exception):
    """The create request may have reached Twilio (read timeout, 5xx...)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class _Progress:
    """What we know of a send: parts created, whether the last try of the next part may
    have reached Twilio (then its retry looks before it creates), how often that look-up
    failed, and how many creates were possible duplicates. Travels with the outbox row
    (``TemporarySendError.progress``), so any process resumes it."""

    sids: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    uncertain_since: datetime | None = None
    lookups_failed: int = 0
    uncertain_resends: int = 0

    def started(self) -> bool:
        return bool(self.sids or self.uncertain_since or self.uncertain_resends)

    def to_json(self) -> dict[str, Any]:
        since = self.uncertain_since
        return {
            "sids": list(self.sids),
            "statuses": list(self.statuses),
            "uncertain_since": since.isoformat() if since is not None else None,
            "lookups_failed": self.lookups_failed,
            "uncertain_resends": self.uncertain_resends,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Progress:
        since = data.get("uncertain_since")
        return cls(
            sids=[str(s) for s in data.get("sids") or []],
            statuses=[str(s) for s in data.get("statuses") or []],
            uncertain_since=datetime.fromisoformat(since) if since else None,
            lookups_failed=int(data.get("lookups_failed") or 0),
            uncertain_resends=int(data.get("uncertain_resends") or 0),
        )


class TwilioChannel(Channel):
    """What the Twilio channels share: the media fetcher's test hooks and one HTTP pool for
    the REST API."""

    webhook_summary = "Twilio webhooks, signed with X-Twilio-Signature"

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        if not isinstance(config, self.config_model):
            raise TypeError(f"{type(self).__name__} needs a {self.config_model.__name__}")
        # Test hooks (context.options): a DNS stub and an httpx client for media fetches.
        self.media_resolver: Resolver = context.options.get("media_resolver", system_resolver)
        self.media_client: httpx.AsyncClient | None = context.options.get("media_client")
        self._http: httpx.AsyncClient | None = None

    def _pool(self, timeout: float) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=timeout)
        return self._http

    async def stop(self) -> None:
        """Close the HTTP client used for the Twilio API."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class TwilioSmsChannel(TwilioChannel):
    """SMS/MMS over Twilio; see the module docstring for what the core must wire."""

    channel_id = "sms"
    provider = "twilio"
    channel_ids = ("sms",)
    config_model: ClassVar[type[InboxConfig]] = TwilioSmsConfig
    max_text_length = MAX_BODY
    attachments = True
    webhook = True
    webhook_kinds = frozenset({"sms", "sms-status"})
    uncertain_policy = UncertainPolicy.CHECK

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        assert isinstance(config, TwilioSmsConfig)
        self.sms_config = config
        self._progress: OrderedDict[int, _Progress] = OrderedDict()
        self._media_fetches: OrderedDict[str, asyncio.Future[tuple[Attachment, str | None]]] = (
            OrderedDict()
        )

    @property
    def status_callback_url(self) -> str:
        """Where Twilio posts delivery reports of our messages."""
        base = self.context.public_base_url.rstrip("/")
        return f"{base}/webhooks/twilio/{self.slug}/sms-status"

    # -- inbound ----------------------------------------------------------------------
    def verify(self, request: WebhookRequest) -> bool:
        return verify_twilio(self.sms_config.auth_token, request)

    def _kind(self, request: WebhookRequest) -> Literal["message", "status"] | None:
        path = urlsplit(request.url).path.rstrip("/")
        if path.endswith("/sms-status"):
            return "status"
        if path.endswith("/sms"):
            return "message"
        # No path (a re-import of a quarantined body): tell them apart by their fields.
        form = request.form
        has_content = "Body" in form or "NumMedia" in form
        if form.get("MessageStatus") and not has_content:
            return "status"
        if has_content:
            return "message"
        return None

    def parse(self, request: WebhookRequest) -> list[ParsedItem]:
        """An inbound message (media as URL-only attachments) or a status update; ``[]``
        for anything else. Use :meth:`parse_async` to also fetch the media."""
        kind = self._kind(request)
        if kind == "status":
            return self._status(request)
        if kind == "message":
            return self._message(request)
        return []

    async def parse_async(self, request: WebhookRequest) -> list[ParsedItem]:
        """:meth:`parse`, then every MMS medium fetched (safely) into the blob store, once:
        not for a message the inbox already stored (a retry the core drops), and one fetch
        per media URL for copies arriving together."""
        items = self.parse(request)
        with_media = [i for i in items if isinstance(i, InboundMessage) and i.attachments]
        fresh = await self.context.not_stored(with_media)
        await asyncio.gather(*(self._fetch_media(item) for item in fresh))
        return items

    async def reimport(self, raw: bytes, external_id: str) -> list[ParsedItem] | None:
        """Parse a quarantined webhook body again (its signature was checked on arrival)."""
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        request = WebhookRequest(method="POST", url="", headers={}, body=raw, form=form)
        return await self.parse_async(request)

    def _status(self, request: WebhookRequest) -> list[ParsedItem]:
        form = request.form
        sid = form.get("MessageSid") or form.get("SmsSid")
        status = form.get("MessageStatus") or form.get("SmsStatus")
        if not sid or not status:
            return []
        error = None
        code = (form.get("ErrorCode") or "").strip()
        if code and code != "0":
            detail = form.get("ErrorMessage") or f"https://www.twilio.com/docs/errors/{code}"
            error = f"{code}: {detail}"
        ours = request.query.get("message", "")
        message_id = int(ours) if ours.isdigit() and len(ours) < 19 else None
        return [StatusUpdate(sid, status, error, message_id=message_id)]

    def _message(self, request: WebhookRequest) -> list[ParsedItem]:
        form = request.form
        if not ("Body" in form or "NumMedia" in form):
            return []
        sid = form.get("MessageSid") or form.get("SmsMessageSid") or form.get("SmsSid")
        if not sid:
            # Signed by Twilio, so not noise, but without its id it cannot be deduplicated
            # (Twilio retries): keep it raw for an admin instead of dropping it unseen.
            log.warning(
                "Twilio SMS webhook of inbox %s without MessageSid: quarantined (fields: %s)",
                self.slug,
                ", ".join(sorted(form)[:40]),
            )
            return [Reject(_NO_SID, request.body)]
        raw_from = form.get("From", "")
        try:
            address = normalize_e164(raw_from)
        except ValueError as exc:
            return [Reject(f"From {raw_from[:40]!r} refused: {exc}", request.body, sid)]
        body = form.get("Body", "")
        data: dict[str, Any] = {}
        for key, name in (
            ("To", "to"),
            ("MessagingServiceSid", "messaging_service_sid"),
            ("NumSegments", "num_segments"),
        ):
            if form.get(key):
                data[name] = form[key]
        keyword = opt_out_keyword(body, form.get("OptOutType"))
        if keyword is not None:
            data["opt_out"] = keyword
        return [
            InboundMessage(
                external_id=sid,
                sender=Sender("phone", address, True, verified_by="twilio"),
                text=body,
                attachments=self._media(form),
                # Nothing automatic answers an opt-out or a HELP (Twilio or help_text does).
                no_auto_reply=keyword in ("stop", "help"),
                data=data,
            )
        ]

    @staticmethod
    def _media(form: Mapping[str, str]) -> list[Attachment]:
        indexes = sorted(int(m.group(1)) for key in form if (m := _MEDIA_KEY.match(key)))
        attachments = []
        for index in indexes[:MAX_MEDIA]:
            url = form[f"MediaUrl{index}"]
            if not url:
                continue
            content_type = form.get(f"MediaContentType{index}") or "application/octet-stream"
            attachments.append(
                Attachment(_media_filename(url, content_type, index), content_type, 0, url=url)
            )
        return attachments

    async def _fetch_media(self, message: InboundMessage) -> None:
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
        """One medium, fetched once per URL in this process: copies of a message that
        arrive together (or before the first copy is committed) share the fetch. A
        Twilio media URL names its message and medium, so it never means other bytes."""
        url = attachment.url
        if url is None or attachment.blob_key is not None:
            return attachment, None
        fetch = self._media_fetches.get(url)
        if fetch is None:
            fetch = asyncio.ensure_future(self._fetch_store(attachment))
            self._media_fetches[url] = fetch
            fetch.add_done_callback(lambda done: self._media_fetched(url, done))
        # shield: a caller that goes away does not cancel the fetch others wait for
        stored, reason = await asyncio.shield(fetch)
        if reason is not None:
            return attachment, reason
        return stored, None

    def _media_fetched(self, url: str, done: asyncio.Future[tuple[Attachment, str | None]]) -> None:
        if done.cancelled() or done.exception() is not None or done.result()[1] is not None:
            self._media_fetches.pop(url, None)  # a failure is tried again by the next copy
            return
        while len(self._media_fetches) > _REMEMBERED_MEDIA:
            self._media_fetches.popitem(last=False)

    async def _fetch_store(self, attachment: Attachment) -> tuple[Attachment, str | None]:
        cfg = self.sms_config
        assert attachment.url is not None
        blobs = self.context.blobs
        if blobs is None:
            return attachment, "no blob store configured"
        # Media sits behind Basic auth when the account enforces it: send our credentials to
        # Twilio's API host only (it redirects to a CDN that must not see them).
        auth_host = urlsplit(cfg.api_base_url).hostname if cfg.api_base_url else None
        try:
            data, content_type = await fetch_media(
                attachment.url,
                allowed_hosts=cfg.media_hosts,
                max_bytes=cfg.media_max_mb * 1024 * 1024,
                allowed_types=cfg.media_types,
                auth=(cfg.account_sid, cfg.auth_token.get_secret_value()),
                auth_host=auth_host or "api.twilio.com",
                client=self.media_client,
                allow_insecure=cfg.allow_insecure_media_for_tests,
                resolver=self.media_resolver,
                timeout=max(cfg.request_timeout, 20.0),
            )
        except MediaRefused as exc:
            log.warning("MMS media of inbox %s not stored: %s", self.slug, exc.reason)
            return attachment, exc.reason
        try:
            key = await blobs.put(data, content_type, attachment.filename)
        except Exception as exc:
            # Twilio does not retry an inbound webhook: keep the message and the media URL
            # (fetchable later) rather than lose the message to a storage hiccup.
            log.exception("MMS media of inbox %s not stored in the blob store", self.slug)
            return attachment, f"blob store: {type(exc).__name__}: {exc}"
        return (
            Attachment(
                _media_filename(attachment.url, content_type, 0)
                if content_type != attachment.content_type
                else attachment.filename,
                content_type,
                len(data),
                blob_key=key,
            ),
            None,
        )

    def ack(self, request: WebhookRequest) -> WebhookResponse:
        """Empty TwiML; with ``self_managed_opt_out``, a HELP is answered with ``help_text``."""
        cfg = self.sms_config
        if (
            cfg.self_managed_opt_out
            and cfg.help_text
            and self._kind(request) == "message"
            and opt_out_keyword(request.form.get("Body", ""), request.form.get("OptOutType"))
            == "help"
        ):
            body = (
                '<?xml version="1.0" encoding="UTF-8"?><Response><Message>'
                f"{escape(cfg.help_text)}</Message></Response>"
            )
            return WebhookResponse(200, body.encode("utf-8"), "text/xml")
        return WebhookResponse(200, EMPTY_TWIML, "text/xml")

    # -- outbound ---------------------------------------------------------------------
    def _parts(self, text: str) -> list[str]:
        if len(text) <= MAX_BODY:
            return [text]
        if self.sms_config.long_messages == "refuse":
            raise PermanentSendError(
                f"the message has {len(text)} characters; SMS allows {MAX_BODY}"
                " (long_messages: refuse)",
                code="too_long",
            )
        return split_text(text, MAX_BODY)

    @staticmethod
    def _recipient(message: OutboundMessage) -> str:
        if message.recipient.kind != "phone":
            raise PermanentSendError(
                f"an SMS cannot go to a {message.recipient.kind} identity", code="bad_recipient"
            )
        try:
            return normalize_e164(message.recipient.address)
        except ValueError as exc:
            raise PermanentSendError(f"recipient: {exc}", code="bad_recipient") from exc

    @staticmethod
    def _media_urls(message: OutboundMessage) -> list[str]:
        urls = []
        for attachment in message.attachments:
            # Twilio fetches outbound media itself, so it needs a public URL; a stored blob
            # alone cannot be sent (dropping it silently would lose what the agent sent).
            if not attachment.url or urlsplit(attachment.url).scheme not in ("https", "http"):
                raise PermanentSendError(
                    f"attachment {attachment.filename!r} has no public URL for Twilio to fetch",
                    code="media_url",
                )
            urls.append(attachment.url)
        if len(urls) > MAX_MEDIA:
            raise PermanentSendError(
                f"{len(urls)} attachments; an MMS carries at most {MAX_MEDIA}", code="media_count"
            )
        return urls

    def _client(self) -> tuple[Client, HttpxTwilioClient]:
        return twilio_client(self.sms_config, self._pool(self.sms_config.request_timeout))

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Create the Twilio Message(s); the receipt has the first part's SID and status.

        Other parts' SIDs are in ``data["part_ids"]``. Errors: 429, 5xx, timeouts and network
        errors are temporary (``retry_after`` from Retry-After); other 4xx are permanent with
        Twilio's code (``"21610"``: the recipient has opted out).
        """
        to = self._recipient(message)
        parts = self._parts(message.text)
        media = self._media_urls(message)
        if not parts[0] and not media:
            raise PermanentSendError("nothing to send: no text and no media", code="empty")
        remembered = self._progress.pop(message.message_id, None)
        if message.progress:  # the outbox row's copy: it is current whichever process wrote it
            progress = _Progress.from_json(message.progress)
        else:
            progress = remembered or _Progress()
        try:
            for index, body in enumerate(parts):
                if index < len(progress.sids):
                    continue  # created by an earlier attempt of this message
                if progress.uncertain_since is not None:
                    found = await self._look_before_resend(message, progress, to, body)
                    if found is not None:
                        progress.sids.append(str(found.sid))
                        progress.statuses.append(str(found.status))
                        continue
                started = self.context.now()
                try:
                    sid, status = await self._create(
                        to, body, media if index == 0 else [], message.message_id
                    )
                except _Ambiguous as exc:
                    progress.uncertain_since = started
                    raise TemporarySendError(exc.reason, exc.retry_after) from exc
                progress.sids.append(sid)
                progress.statuses.append(status)
        except (TemporarySendError, PermanentSendError) as exc:
            if isinstance(exc, TemporarySendError) and progress.started():
                self._remember(message.message_id, progress)
                exc.progress = progress.to_json()
            if progress.sids and isinstance(exc, PermanentSendError):
                exc.reason = f"{exc.reason} ({len(progress.sids)} of {len(parts)} parts sent)"
                exc.args = (exc.reason,)
            raise
        data: dict[str, Any] = {}
        if len(parts) > 1:
            data["part_ids"] = progress.sids[1:]
        return SendReceipt(
            progress.sids[0],
            progress.statuses[0],
            data,
            uncertain_resends=progress.uncertain_resends,
        )

    async def _look_before_resend(
        self, message: OutboundMessage, progress: _Progress, to: str, body: str
    ) -> Any | None:
        """After a create that may have reached Twilio: Twilio's record of it, or None when
        the part must be created (again). Never looks before ``check_delay`` has passed
        since that create started: a create that timed out on our side may still be in
        Twilio's hands, and listing too early finds nothing, so the resend would duplicate
        it. When the look-up keeps failing (``check_attempts`` in a row), the part is sent
        again anyway rather than never: the message converges to sent or failed. Every
        create that follows an unresolved ambiguity counts as an uncertain resend."""
        cfg = self.sms_config
        since = progress.uncertain_since
        assert since is not None
        wait = (since - self.context.now()).total_seconds() + cfg.check_delay
        if wait > 0:
            raise TemporarySendError(
                f"an earlier create may have reached Twilio: looking it up {cfg.check_delay:g} s"
                f" after it started, so in {wait:.0f} s",
                retry_after=wait,
                deferred=True,  # waiting is no attempt: it must not use up the row's attempts
            )
        try:
            found = await self._lookup(to, body, since)
        except TemporarySendError as exc:
            progress.lookups_failed += 1
            if progress.lookups_failed < cfg.check_attempts:
                exc.reason = (
                    f"{exc.reason} (look-up {progress.lookups_failed} of {cfg.check_attempts};"
                    " then it is sent again anyway, as a possible duplicate)"
                )
                exc.args = (exc.reason,)
                raise
            log.warning(
                "inbox %s, message %s: Twilio could not be asked %d times whether an earlier"
                " create went through; sending again (a possible duplicate)",
                self.slug,
                message.message_id,
                progress.lookups_failed,
            )
            found = None
        progress.uncertain_since = None
        progress.lookups_failed = 0
        if found is None:
            progress.uncertain_resends += 1
        return found

    def _remember(self, message_id: int, progress: _Progress) -> None:
        self._progress[message_id] = progress
        while len(self._progress) > _REMEMBERED_SENDS:
            self._progress.popitem(last=False)

    async def _create(
        self, to: str, body: str, media: Sequence[str], message_id: int | None = None
    ) -> tuple[str, str]:
        cfg = self.sms_config
        client, http = self._client()
        callback = self.status_callback_url
        if message_id is not None:
            # Twilio signs the whole URL: its reports name our message, so a second Twilio
            # message for it (a create we gave up on that landed after all) is recognised.
            callback += f"?message={message_id}"
        kwargs: dict[str, Any] = {"to": to, "status_callback": callback}
        if cfg.from_number:
            kwargs["from_"] = cfg.from_number
        else:
            kwargs["messaging_service_sid"] = cfg.messaging_service_sid
        if body:
            kwargs["body"] = body
        if media:
            kwargs["media_url"] = list(media)
        try:
            # httpx bounds each phase; this bounds the whole call (a server that trickles).
            async with asyncio.timeout(cfg.request_timeout * 2):
                created = await client.messages.create_async(**kwargs)
        except (TwilioRestException, TwilioServiceException) as exc:
            headers = http.last_response.headers if http.last_response is not None else None
            raise self._api_error(exc, headers, creating=True) from exc
        except _NOT_SENT as exc:
            raise TemporarySendError(f"cannot reach Twilio: {type(exc).__name__}") from exc
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _Ambiguous(f"no answer from Twilio: {type(exc).__name__}") from exc
        return str(created.sid), str(created.status)

    @staticmethod
    def _api_error(
        exc: TwilioRestException | TwilioServiceException,
        headers: Mapping[str, str] | None,
        *,
        creating: bool,
    ) -> Exception:
        status = int(exc.status or 0)
        code = str(exc.code) if exc.code is not None else None
        text = exc.msg if isinstance(exc, TwilioRestException) else exc.detail or exc.title
        text = str(text or "").removeprefix("Unable to create record: ")
        reason = f"Twilio HTTP {status}" + (f" error {code}" if code else "") + f": {text}"
        if status == 429:
            return TemporarySendError(reason, _retry_after(headers))
        if status >= 500:
            # The create may have happened before the error (a gateway timing out).
            if creating:
                return _Ambiguous(reason, _retry_after(headers))
            return TemporarySendError(reason, _retry_after(headers))
        if status in (401, 408):
            # 401: credentials being rotated or mistyped; fixing the config must not need
            # every queued message re-sent by hand. 408: Twilio's request timeout.
            return TemporarySendError(reason, _retry_after(headers))
        # 21610: the recipient has opted out (replied STOP).
        return PermanentSendError(reason, code=code or str(status), opted_out=code == "21610")

    async def _lookup(self, to: str, body: str, since: datetime) -> Any | None:
        """Twilio's newest Message to ``to`` (from our number) with ``body``, created at or
        after ``since``; TemporarySendError when Twilio cannot be asked."""
        cfg = self.sms_config
        client, http = self._client()
        filters: dict[str, Any] = {"to": to}
        if cfg.from_number:
            # With a Messaging Service Twilio picks the sender later: filter by recipient only.
            filters["from_"] = cfg.from_number
        try:
            async with asyncio.timeout(cfg.request_timeout * 2):
                records = await client.messages.list_async(limit=20, page_size=20, **filters)
        except (TwilioRestException, TwilioServiceException) as exc:
            headers = http.last_response.headers if http.last_response is not None else None
            error = self._api_error(exc, headers, creating=False)
            raise TemporarySendError(f"cannot check Twilio for the message: {error}") from exc
        except TwilioException as exc:
            # twilio quirk: a failed list page is a bare TwilioException(msg, response).
            response = exc.args[1] if len(exc.args) > 1 else None
            status = getattr(response, "status_code", "?")
            raise TemporarySendError(
                f"cannot check Twilio for the message: HTTP {status}",
                _retry_after(getattr(response, "headers", None)),
            ) from exc
        except (httpx.HTTPError, TimeoutError) as exc:
            raise TemporarySendError(
                f"cannot check Twilio for the message: {type(exc).__name__}"
            ) from exc
        for record in records:  # newest first
            if (record.body or "") == body and _created_since(record.date_created, since):
                return record
        return None

    async def find_sent(self, message: OutboundMessage, since: datetime) -> SendReceipt | None:
        """For an interrupted send: Twilio's Message with this (first part's) body to this
        recipient, created at or after ``since``, among the newest 20; else None."""
        to = self._recipient(message)
        text = message.text
        first = split_text(text, MAX_BODY)[0] if len(text) > MAX_BODY else text
        record = await self._lookup(to, first, since)
        if record is None:
            return None
        return SendReceipt(str(record.sid), str(record.status), {"found_by": "find_sent"})
