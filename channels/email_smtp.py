"""Outbound email: build a reply as proper MIME and hand it to an SMTP server (aiosmtplib).

Three pieces, used by the email channel:

* :func:`build_message` makes an :class:`~email.message.EmailMessage` (text, optional
  HTML alternative, attachments and inline images) through the ``email`` API, so names
  and subjects can never smuggle in headers.
* :func:`make_message_id` gives every outbound message a deterministic Message-ID: a send
  retried after a crash carries the same one, and receiving systems drop the copy.
* :func:`send` talks SMTP (implicit TLS, STARTTLS or, when configured, plain; AUTH
  PLAIN/LOGIN or XOAUTH2 with tokens from :class:`OAuth2Tokens`) and turns every failure
  into :class:`~channels.base.TemporarySendError` (retry) or
  :class:`~channels.base.PermanentSendError` (the message fails with the server's answer).

Secrets (passwords, access and refresh tokens, client secrets) never appear in an error
reason, a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.errors
import email.headerregistry
import email.message
import email.policy
import email.utils
import hashlib
import hmac
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape as html_escape
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal, Protocol

import aiosmtplib
import httpx
import nh3

from channels.base import PermanentSendError, TemporarySendError
from channels.email_parse import MAX_DECODE_ROUNDS, decode_header_text

__all__ = [
    "OAuth2Tokens",
    "OAuthError",
    "OutgoingAttachment",
    "SmtpSettings",
    "TokenProvider",
    "build_message",
    "header_text",
    "make_message_id",
    "send",
    "xoauth2_string",
]

logger = logging.getLogger(__name__)

SECURITY_MODES = ("tls", "starttls", "plain")
AUTH_MODES = ("password", "xoauth2", "none")
MAX_REFERENCES = 20  # the thread root plus the most recent ancestors
_TOKEN_TIMEOUT = 30.0  # seconds, for the token endpoint when we own the HTTP client
_TOKEN_EARLY = 60.0  # refresh an access token this long before it expires
_DEFAULT_EXPIRES_IN = 3600.0  # when the token endpoint does not say
_MAX_REASON = 500

# Anything that could end a header line, or that has no business in one. str.splitlines()
# (which parts of the email package use) also breaks on \v, \f, \x1c-\x1e, \x85 and
# U+2028/U+2029, so all of those go too, not only CR and LF.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
# Lone surrogates (JSON allows "\ud800") cannot be encoded at all: they become U+FFFD.
_SURROGATE = re.compile("[\ud800-\udfff]")
# A msg-id as we write it (RFC 5322 3.6.4): "<left@right>", printable ASCII without
# spaces, angle brackets or a second "@". Non-ASCII ids could not be sent without
# SMTPUTF8, and ours are folded as-is. Content-IDs need no "@" (Gmail's "ii_..." have none).
_MSG_ID = re.compile(r"<[!-;=?A-~]{1,200}@[!-;=?A-~]{1,200}>")
_CONTENT_ID = re.compile(r"<[!-;=?-~]{1,250}>")
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
_MIME_TOKEN = re.compile(r"[a-z0-9!#$&^_.+-]{1,127}")


# -- settings ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """How to reach and log in to the SMTP submission server of one inbox.

    ``security``: ``"tls"`` (implicit TLS, usually port 465), ``"starttls"`` (usually
    587; the upgrade is required, never skipped) or ``"plain"`` (no TLS: only when the
    configuration explicitly allows it). ``auth``: ``"password"`` (AUTH PLAIN/LOGIN with
    ``username`` and ``password``), ``"xoauth2"`` (``username`` plus tokens from a
    :class:`TokenProvider` given to :func:`send`) or ``"none"``. ``tls_context`` replaces
    the default (system trust store, hostname checked). Raises ``ValueError`` for an
    unknown mode or missing credentials.
    """

    host: str
    port: int
    security: str
    username: str | None
    auth: str
    password: str | None = field(default=None, repr=False)  # never in a repr or a log
    timeout: float = 30.0
    tls_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if self.security not in SECURITY_MODES:
            raise ValueError(f"security must be one of {SECURITY_MODES}, not {self.security!r}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, not {self.auth!r}")
        if not self.host or _CONTROL.search(self.host):
            raise ValueError(f"invalid SMTP host {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid SMTP port {self.port}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.auth != "none" and not self.username:
            raise ValueError(f"auth {self.auth!r} needs a username")
        if self.auth == "password" and not self.password:
            raise ValueError("auth 'password' needs a password")


@dataclass(frozen=True, slots=True)
class OutgoingAttachment:
    """A file to send. ``inline`` parts with a ``content_id`` are what ``cid:`` URLs in
    the HTML refer to; with HTML they are placed next to it (multipart/related)."""

    filename: str
    content_type: str
    data: bytes
    inline: bool = False
    content_id: str | None = None


# -- Message-ID ----------------------------------------------------------------------
def make_message_id(secret: bytes, message_id: int, domain: str) -> str:
    """Deterministic ``<or-{message_id}.{hmac8}@{domain}>`` for one outbound message.

    An uncertain send retried after a crash carries the same Message-ID, so receiving
    systems drop the duplicate. ``hmac8`` is the first 8 hex digits of
    HMAC-SHA256(secret, ``"{message_id}@{domain}"``): ids can't be guessed from our
    message numbers, and a reply's In-Reply-To can be checked as really ours.
    Raises ``ValueError`` for an empty secret, a negative id or an unusable domain.
    """
    if not secret:
        raise ValueError("the Message-ID secret must not be empty")
    if isinstance(message_id, bool) or message_id < 0:
        raise ValueError(f"invalid message id {message_id!r}")
    domain = domain.strip().lower()
    if not _DOMAIN.fullmatch(domain):
        raise ValueError(f"invalid Message-ID domain {domain!r}")
    digest = hmac.new(secret, f"{message_id}@{domain}".encode(), hashlib.sha256).hexdigest()
    return f"<or-{message_id}.{digest[:8]}@{domain}>"


# -- building ------------------------------------------------------------------------
class _MessageIdListHeader(
    email.headerregistry.UnstructuredHeader, email.headerregistry.BaseHeader
):
    """References / In-Reply-To: folded between msg-ids only, never encoded.

    As plain unstructured headers the email package would RFC 2047-encode a msg-id
    longer than a line (``=?utf-8?q?=3C...``), which breaks threading everywhere.
    """

    max_count: ClassVar[Literal[1] | None] = 1

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        # Taken literally: the unstructured parser would decode an encoded word inside a
        # msg-id ("<a=?utf-8?q?=0D=0A...?=@b>"), CR and LF included.
        super().parse(value, kwds)
        kwds["decoded"] = _one_line(value)

    def fold(self, *, policy: email.policy.Policy) -> str:
        return _fold_tokens(self.name, str(self).split(), policy)


# What may stand in a display name without quoting or encoding (RFC 5322 atext, spaces).
_PLAIN_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*")
_WORD_BYTES = 45  # base64 of 45 bytes is 60 characters: an encoded word of 72


def _phrase_words(text: str) -> list[str]:
    """A display name as atoms, or else as RFC 2047 base64 words (UTF-8, whole characters).

    Whitespace between encoded words is not part of the text (RFC 2047 6.2), so the
    words can be folded anywhere and still decode to exactly ``text``."""
    if _PLAIN_PHRASE.fullmatch(text) and "=?" not in text:
        return text.split()
    words: list[str] = []
    chunk = b""
    for ch in text:
        data = ch.encode()
        if chunk and len(chunk) + len(data) > _WORD_BYTES:
            words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
            chunk = b""
        chunk += data
    if chunk:
        words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
    return words


def _fold_tokens(name: str, tokens: Iterable[str], policy: email.policy.Policy) -> str:
    """``Name: token token ...``, folded between tokens only."""
    limit = policy.max_line_length or 998
    lines: list[str] = []
    line = f"{name}:"
    for token in tokens:
        if line != f"{name}:" and len(line) + 1 + len(token) > limit:
            lines.append(line)
            line = ""
        line += " " + token
    lines.append(line)
    return policy.linesep.join(lines) + policy.linesep


class _MailboxHeader(  # type: ignore[misc]  # the stubs' classes disagree; the registry mixes them
    email.headerregistry.UniqueAddressHeader, email.headerregistry.BaseHeader
):
    """From / To / Reply-To, folded by us.

    The email package folds a long display name with specials (``:``, ``@``) without its
    quotes (Python 3.11: ``From: Order Reply-To: evil@example.org [#1]\r\n [#1] <us@...>``
    parses as a group holding evil@example.org): a display name that is not plain atoms is
    written as encoded words, which hold no specials however they are folded."""

    def fold(self, *, policy: email.policy.Policy) -> str:
        addresses = list(self.addresses)
        if not all(a.addr_spec.isascii() for a in addresses):
            return super().fold(policy=policy)
        tokens: list[str] = []
        for i, address in enumerate(addresses):
            words = _phrase_words(address.display_name)
            spec = f"<{address.addr_spec}>" if words else address.addr_spec
            tokens.extend([*words, spec + ("," if i < len(addresses) - 1 else "")])
        return _fold_tokens(self.name, tokens, policy)


def _make_policy() -> email.policy.EmailPolicy[email.message.EmailMessage]:
    registry = email.headerregistry.HeaderRegistry()
    for name in ("from", "to", "reply-to"):
        registry.map_to_type(name, _MailboxHeader)
    registry.map_to_type("references", _MessageIdListHeader)
    registry.map_to_type("in-reply-to", _MessageIdListHeader)
    policy: email.policy.EmailPolicy[email.message.EmailMessage] = email.policy.SMTP.clone(
        header_factory=registry
    )
    return policy


_POLICY = _make_policy()


def _one_line(value: str) -> str:
    """A header-safe single line: control characters become spaces, runs collapse."""
    return " ".join(_CONTROL.sub(" ", _SURROGATE.sub("\ufffd", value)).split())


def _stdlib_decoded(value: str) -> str:
    # What the email package makes of a value set on a message: it decodes encoded words.
    return str(_POLICY.header_factory("subject", value))


def header_text(value: str) -> str:
    """The text of a header value we write: fully decoded, on one line, never an encoded
    word.

    Encoded words are decoded (ours and the email package's way) until nothing changes,
    control characters become spaces after every round, and any ``=?`` still left is
    broken up (``= ?``): nothing in the result can be decoded again, here or by whoever
    reads our message, so what was checked is what gets written. The email package then
    folds and, for non-ASCII text, encodes it itself.
    """
    text = _one_line(value)
    for _ in range(MAX_DECODE_ROUNDS + 1):
        decoded = _one_line(_stdlib_decoded(_one_line(decode_header_text(text))))
        if decoded == text:
            break
        text = decoded
    return _one_line(text.replace("=?", "= ?"))


def _address(addr_spec: str, display_name: str | None = None) -> email.headerregistry.Address:
    """An Address; an address itself is never repaired (that could change who gets the
    mail): anything that isn't one clean ``local@domain`` raises ``ValueError``."""
    candidate = addr_spec.strip()
    if (
        not candidate
        or _CONTROL.search(candidate)
        or any(c in candidate for c in " <>,;")
        or "=?" in candidate  # the email package would decode it as an encoded word
    ):
        raise ValueError(f"invalid email address {addr_spec!r}")
    try:
        address = email.headerregistry.Address(
            display_name=header_text(display_name or ""), addr_spec=candidate
        )
    except (ValueError, email.errors.HeaderParseError) as exc:
        raise ValueError(f"invalid email address {addr_spec!r}") from exc
    if not address.username or not address.domain or address.addr_spec != candidate:
        raise ValueError(f"invalid email address {addr_spec!r}")
    return address


def _msg_ids(values: Iterable[str]) -> list[str]:
    """Normalized, deduplicated msg-ids; unusable ones (from odd inbound mail) are dropped."""
    ids: list[str] = []
    for value in values:
        for token in _one_line(value).split():
            ident = token if token.startswith("<") else f"<{token}>"
            if _MSG_ID.fullmatch(ident) and "=?" not in ident and ident not in ids:
                ids.append(ident)
    return ids


def _content_type(value: str) -> tuple[str, str]:
    maintype, _, subtype = value.split(";", 1)[0].strip().lower().partition("/")
    if not (_MIME_TOKEN.fullmatch(maintype) and _MIME_TOKEN.fullmatch(subtype)):
        return "application", "octet-stream"
    # multipart/* and message/* can't be carried as opaque base64 bytes (RFC 2046).
    if maintype in ("multipart", "message"):
        return "application", "octet-stream"
    return maintype, subtype


def _filename(value: str) -> str:
    # Receivers should ignore directories, but not all do: keep the last component only.
    name = PurePosixPath(header_text(value).replace("\\", "/")).name.strip()
    return name or "attachment"


def _content_id(value: str) -> str:
    ident = value.strip()
    ident = ident if ident.startswith("<") else f"<{ident}>"
    if not _CONTENT_ID.fullmatch(ident) or "=?" in ident:
        raise ValueError(f"invalid Content-ID {value!r}")
    return ident


# What makes an agent's plain text "formatted" for a mail client: a link or a line break.
_URL = re.compile(r"(?:https?://|mailto:)[^\s<>\"']+[^\s<>\"'.,;:!?)\]}]", re.IGNORECASE)


def text_to_html(text: str) -> str | None:
    """The HTML part for an agent's plain text, when it has formatting a mail client should
    show (links, line breaks); None for a single line without a link (text/plain is enough).

    Blank lines make paragraphs, single line breaks ``<br>``, http(s) and mailto URLs links;
    everything else is text (escaped), and the result is sanitized with nh3 (only ``p``,
    ``br`` and ``a href``, links with ``rel="noopener noreferrer"``)."""
    if "\n" not in text.strip() and not _URL.search(text):
        return None
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip().replace("\r\n", "\n")):
        lines = []
        for line in block.split("\n"):
            out, last = [], 0
            for found in _URL.finditer(line):
                out.append(html_escape(line[last : found.start()]))
                url = html_escape(found.group(0))
                out.append(f'<a href="{url}">{url}</a>')
                last = found.end()
            out.append(html_escape(line[last:]))
            lines.append("".join(out))
        paragraphs.append("<p>" + "<br>\n".join(lines) + "</p>")
    return nh3.clean(
        "\n".join(paragraphs),
        tags={"p", "br", "a"},
        attributes={"a": {"href"}},
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer",
    )


def build_message(
    *,
    from_address: str,
    from_name: str | None,
    to: str,
    subject: str,
    text: str,
    html: str | None,
    attachments: Sequence[OutgoingAttachment],
    message_id: str,
    in_reply_to: str | None,
    references: Sequence[str],
    auto: bool,
    date: datetime,
    reply_to: str | None = None,
) -> email.message.EmailMessage:
    """Build the MIME message of one outbound email.

    Structure: ``text/plain``; with ``html`` a ``multipart/alternative``, whose HTML part
    becomes ``multipart/related`` with the inline attachments; other attachments make
    it ``multipart/mixed`` (inline ones without HTML go there too, as inline).

    Names, the subject and filenames are fully decoded and made single-line
    (:func:`header_text`: CR, LF and other control characters become spaces, no encoded
    word survives), then set through the ``email`` API (policy SMTP), which folds and
    encodes them, so no value can start a header. Addresses, ``message_id`` and Content-IDs are not
    repaired: an unusable one raises ``ValueError``. ``References`` keeps the thread
    root and the newest ancestors (:data:`MAX_REFERENCES` in all) and ends with
    ``in_reply_to``; unusable ids are dropped. ``Auto-Submitted: auto-replied`` marks
    ``auto`` messages. ``date`` must be timezone-aware.
    """
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    if not _MSG_ID.fullmatch(message_id.strip()) or "=?" in message_id:
        raise ValueError(f"invalid Message-ID {message_id!r}")

    msg = email.message.EmailMessage(policy=_POLICY)
    msg["From"] = _address(from_address, from_name)
    msg["To"] = _address(to)
    if reply_to:
        msg["Reply-To"] = _address(reply_to)
    msg["Subject"] = header_text(subject)
    msg["Date"] = email.utils.format_datetime(date)
    msg["Message-ID"] = message_id.strip()

    parent = _msg_ids([in_reply_to]) if in_reply_to else []
    if parent:
        msg["In-Reply-To"] = parent[0]
    thread = [ident for ident in _msg_ids(references) if ident not in parent] + parent
    if len(thread) > MAX_REFERENCES:
        # RFC 5322 3.6.4 allows trimming; the root keeps threading intact for clients
        # that look at the first id, the newest ones for those that look at the last.
        thread = thread[:1] + thread[-(MAX_REFERENCES - 1) :]
    if thread:
        msg["References"] = " ".join(thread)

    if auto:
        msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: other robots must not answer
        msg["X-Auto-Response-Suppress"] = "All"  # the same, for Exchange / Outlook

    msg.set_content(text)
    related: email.message.MIMEPart | None = None
    if html is not None:
        msg.add_alternative(html, subtype="html")
        related = list(msg.iter_parts())[-1]

    for attachment in attachments:
        maintype, subtype = _content_type(attachment.content_type)
        options: dict[str, Any] = {"filename": _filename(attachment.filename)}
        if attachment.content_id:
            options["cid"] = _content_id(attachment.content_id)
        if attachment.inline and related is not None:
            related.add_related(attachment.data, maintype, subtype, disposition="inline", **options)
        else:
            disposition = "inline" if attachment.inline else "attachment"
            msg.add_attachment(
                attachment.data, maintype, subtype, disposition=disposition, **options
            )

    # The email API gives every part it creates a MIME-Version; only the top needs one.
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    return msg


# -- OAuth2 --------------------------------------------------------------------------
class TokenProvider(Protocol):
    """Where :func:`send` gets an XOAUTH2 access token."""

    async def token(self) -> str:
        """A currently valid access token."""
        ...


class OAuthError(PermanentSendError):
    """The token endpoint refused us (``invalid_grant``: the refresh token was revoked or
    expired; ``invalid_client``...): permanent until someone reconfigures the inbox.
    ``code`` is the OAuth ``error`` value, or ``http-<status>``."""


class OAuth2Tokens:
    """XOAUTH2 access tokens from a refresh token (Microsoft 365, Google token endpoints).

    POSTs ``grant_type=refresh_token`` with ``client_id``, ``refresh_token`` and, when
    given, ``client_secret`` and ``scope`` to ``token_url``; caches the access token
    until shortly before ``expires_in`` runs out. A new refresh token in the answer
    (Microsoft rotates them) replaces the old one, in memory only. Concurrent callers
    share one refresh (a rotated refresh token must not be spent twice).

    Errors: a refusal (HTTP 400/401 ``invalid_grant`` and other 4xx) raises
    :class:`OAuthError` (permanent); network failures, timeouts, 408/429/5xx and
    malformed answers raise :class:`~channels.base.TemporarySendError`.
    ``client`` (an ``httpx.AsyncClient``, not closed here) is for tests and shared
    pools; without it a short-lived client is made per refresh. ``now`` is a monotonic
    clock in seconds.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        refresh_token: str,
        client_secret: str | None = None,
        scope: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token_url = token_url
        self._client_id = client_id
        self._refresh_token = refresh_token
        self._client_secret = client_secret
        self._scope = scope
        self._client = client
        self._now = now
        self._access: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"OAuth2Tokens(token_url={self._token_url!r}, client_id={self._client_id!r})"

    async def token(self) -> str:
        """The cached access token, or a fresh one when it is (nearly) expired."""
        async with self._lock:
            if self._access is not None and self._now() < self._refresh_at:
                return self._access
            return await self._refresh()

    def invalidate(self) -> None:
        """Forget the cached access token (the server refused it): the next
        :meth:`token` asks the token endpoint again."""
        self._access = None

    async def _refresh(self) -> str:
        form = {
            "grant_type": "refresh_token",
            "client_id": self._client_id,
            "refresh_token": self._refresh_token,
        }
        if self._client_secret:
            form["client_secret"] = self._client_secret
        if self._scope:
            form["scope"] = self._scope
        secrets = [self._refresh_token, self._client_secret]
        started = self._now()  # expiry counts from before the request: errs on the early side
        try:
            if self._client is not None:
                response = await self._post(self._client, form)
            else:
                async with httpx.AsyncClient(timeout=_TOKEN_TIMEOUT) as client:
                    response = await self._post(client, form)
        except httpx.TransportError as exc:  # connect, read, timeouts, TLS
            # ``from None``: the chained exception carries the request, body included.
            raise TemporarySendError(
                _redact(f"OAuth token endpoint unreachable: {type(exc).__name__}: {exc}", secrets)
            ) from None

        status = response.status_code
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            payload = {}

        if status == 200:
            access = payload.get("access_token")
            if not isinstance(access, str) or not access:
                raise TemporarySendError("OAuth token endpoint answered without an access_token")
            expires_in = _seconds(payload.get("expires_in")) or _DEFAULT_EXPIRES_IN
            rotated = payload.get("refresh_token")
            if isinstance(rotated, str) and rotated and rotated != self._refresh_token:
                self._refresh_token = rotated
                logger.info("OAuth refresh token rotated for client %s", self._client_id)
            self._access = access
            self._refresh_at = started + expires_in - min(_TOKEN_EARLY, expires_in / 2)
            logger.debug("OAuth access token refreshed, valid for %.0f s", expires_in)
            return access

        error = payload.get("error")
        code = error if isinstance(error, str) and error else f"http-{status}"
        description = payload.get("error_description")
        detail = f": {description}" if isinstance(description, str) and description else ""
        reason = _redact(f"OAuth token refresh failed: HTTP {status} {code}{detail}", secrets)
        if status in (408, 425, 429) or status >= 500:
            raise TemporarySendError(reason, _seconds(response.headers.get("retry-after")))
        raise OAuthError(reason, code=code)

    async def _post(self, client: httpx.AsyncClient, form: dict[str, str]) -> httpx.Response:
        return await client.post(self._token_url, data=form, headers={"Accept": "application/json"})


def xoauth2_string(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial response: base64 of ``user=U\\x01auth=Bearer T\\x01\\x01``."""
    if _CONTROL.search(user) or _CONTROL.search(token):
        raise ValueError("user and token must not contain control characters")
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode("ascii")


# -- sending -------------------------------------------------------------------------
async def send(
    settings: SmtpSettings,
    message: email.message.EmailMessage,
    *,
    tokens: TokenProvider | None = None,
) -> None:
    """Submit ``message`` (envelope from its From/To/Cc/Bcc headers; Bcc is not sent).

    Connects (implicit TLS, or STARTTLS, which is then required), authenticates (AUTH
    PLAIN/LOGIN via ``login()``, or XOAUTH2 with a token from ``tokens``), sends, quits.

    Raises :class:`~channels.base.TemporarySendError` for SMTP 4xx answers, refused or
    reset connections, timeouts, TLS failures, a server without STARTTLS when it is
    required, and token endpoint outages; :class:`~channels.base.PermanentSendError`
    for 5xx answers (a rejected recipient or sender, failed authentication...) with
    ``code`` the SMTP code and the server's text in ``reason``, for a server lacking
    AUTH (or XOAUTH2, or SMTPUTF8 for an internationalized address), and for a message
    without usable addresses. :class:`OAuthError` (permanent) comes from the token
    endpoint. Reasons never contain the password or a token. When the server accepts
    some recipients and refuses others the message counts as sent (a retry would
    duplicate it for the others); the refusals are logged.
    """
    secrets: list[str | None] = [settings.password]
    token: str | None = None
    if settings.auth == "xoauth2":
        if tokens is None:
            raise PermanentSendError("SMTP auth is xoauth2 but no token provider is configured")
        # Before connecting: a token endpoint outage must not hold an SMTP session open.
        token = await tokens.token()
        secrets.append(token)
    if settings.username:
        secrets.extend(_auth_encodings(settings.username, settings.password, token))

    where = f"{settings.host}:{settings.port}"
    smtp = aiosmtplib.SMTP(
        hostname=settings.host,
        port=settings.port,
        use_tls=settings.security == "tls",
        start_tls=False,  # done explicitly below, so a missing STARTTLS is never skipped
        tls_context=settings.tls_context,
        timeout=settings.timeout,
    )
    try:
        try:
            await smtp.connect()
            if settings.security == "starttls":
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    # Refuse to downgrade: an on-path attacker may have stripped it.
                    raise TemporarySendError(f"SMTP server {where} does not offer STARTTLS")
                await smtp.starttls()
            await _authenticate(smtp, settings, token, tokens, secrets)
            refused, _ = await smtp.send_message(message)
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            # OSError covers refused/reset connections, TLS errors and TimeoutError.
            raise _classify(exc, where, secrets) from _cause(exc)
        if refused:
            logger.warning(
                "SMTP server %s accepted %s but refused some recipients: %s",
                where,
                message.get("Message-ID"),
                {rcpt: f"{r.code} {r.message}" for rcpt, r in refused.items()},
            )
        logger.debug("SMTP server %s accepted %s", where, message.get("Message-ID"))
        # The message is accepted: a failing QUIT must not turn into a resend.
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()
    finally:
        smtp.close()


async def _authenticate(
    smtp: aiosmtplib.SMTP,
    settings: SmtpSettings,
    token: str | None,
    tokens: TokenProvider | None,
    secrets: Sequence[str | None],
) -> None:
    if settings.auth == "none":
        return
    assert settings.username is not None  # SmtpSettings checked it
    if settings.auth == "password":
        assert settings.password is not None
        if smtp.is_ehlo_or_helo_needed:
            await smtp.ehlo()
        if not smtp.supports_extension("auth"):
            raise PermanentSendError(f"SMTP server {settings.host} does not offer AUTH")
        try:
            await smtp.login(settings.username, settings.password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _response_error(
                "SMTP authentication failed", exc.code, exc.message, secrets
            ) from None
        return

    assert token is not None
    if smtp.is_ehlo_or_helo_needed:
        await smtp.ehlo()
    if "xoauth2" not in smtp.server_auth_methods:
        raise PermanentSendError(f"SMTP server {settings.host} does not offer AUTH XOAUTH2")
    # The raw command rather than a helper (older aiosmtplib has none): on failure the
    # server sends a base64 JSON challenge, we answer an empty line, then it says 535.
    response = await smtp.execute_command(
        b"AUTH", b"XOAUTH2", xoauth2_string(settings.username, token).encode("ascii")
    )
    detail = ""
    if response.code == 334:
        detail = _xoauth2_challenge(response.message)
        response = await smtp.execute_command(b"")
    if response.code != 235:
        invalidate = getattr(tokens, "invalidate", None)
        if callable(invalidate):
            invalidate()  # the token may have been revoked early: fetch a new one next time
        raise _response_error(
            "SMTP XOAUTH2 authentication failed", response.code, response.message + detail, secrets
        )


def _xoauth2_challenge(message: str) -> str:
    """The interesting part of an XOAUTH2 error challenge (``{"status": "401", ...}``)."""
    try:
        data = json.loads(base64.b64decode(message.strip(), validate=True))
    except (binascii.Error, ValueError):
        return ""
    status = data.get("status") if isinstance(data, dict) else None
    return f" (token rejected, status {status})" if isinstance(status, str) else ""


def _classify(
    exc: Exception, where: str, secrets: Sequence[str | None]
) -> TemporarySendError | PermanentSendError:
    """Map an aiosmtplib (or socket/TLS) failure to the channel contract."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # Every recipient was refused: permanent if any refusal was, else retry later.
        if not exc.recipients:
            return TemporarySendError(f"SMTP server {where} refused all recipients")
        permanent = [r for r in exc.recipients if 500 <= r.code < 600]
        first = (permanent or exc.recipients)[0]
        what = f"SMTP recipient {first.recipient} refused"
        others = "".join(
            f"; {r.recipient}: {r.code} {r.message}" for r in exc.recipients if r is not first
        )
        return _response_error(what, first.code, first.message + others, secrets)
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return _response_error(
            f"SMTP recipient {exc.recipient} refused", exc.code, exc.message, secrets
        )
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return _response_error(f"SMTP sender {exc.sender} refused", exc.code, exc.message, secrets)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return _response_error("SMTP authentication failed", exc.code, exc.message, secrets)
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return _response_error("SMTP message refused", exc.code, exc.message, secrets)
    if isinstance(exc, aiosmtplib.SMTPResponseException):  # greeting, EHLO, STARTTLS...
        return _response_error(f"SMTP server {where} answered", exc.code, exc.message, secrets)
    if isinstance(exc, TimeoutError):  # aiosmtplib's timeouts are TimeoutErrors too
        return TemporarySendError(_redact(f"SMTP server {where} timed out: {exc}", secrets))
    if isinstance(exc, ssl.SSLError):  # an OSError: kept apart for a clearer reason
        return TemporarySendError(_redact(f"TLS with SMTP server {where} failed: {exc}", secrets))
    if isinstance(exc, OSError):  # refused, reset, unreachable; SMTPConnectError too
        return TemporarySendError(_redact(f"SMTP server {where} unreachable: {exc}", secrets))
    if isinstance(exc, aiosmtplib.SMTPException):  # capabilities: AUTH, SMTPUTF8...
        return PermanentSendError(_redact(f"SMTP server {where}: {exc}", secrets))
    # ValueError: no usable From/To in the message (aiosmtplib checks the envelope).
    return PermanentSendError(_redact(f"cannot send this message: {exc}", secrets))


def _cause(exc: Exception) -> Exception | None:
    # Authentication answers may echo what we sent: don't chain them into tracebacks.
    return None if isinstance(exc, aiosmtplib.SMTPAuthenticationError) else exc


def _response_error(
    what: str, code: int, text: str, secrets: Sequence[str | None]
) -> TemporarySendError | PermanentSendError:
    reason = _redact(f"{what}: {code} {_one_line(text)}".strip(), secrets)
    if 500 <= code < 600:
        return PermanentSendError(reason, code=str(code))
    return TemporarySendError(reason)  # 4xx, and anything unexpected: try again later


def _auth_encodings(user: str, password: str | None, token: str | None) -> list[str]:
    """What our AUTH commands put on the wire, should a server echo it in an error."""
    encoded: list[str] = []
    if password:
        encoded.append(base64.b64encode(f"\0{user}\0{password}".encode()).decode())
        encoded.append(base64.b64encode(password.encode()).decode())
    if token:  # not xoauth2_string(): this must not raise before the send is attempted
        encoded.append(
            base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        )
    return encoded


def _redact(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 1] + "…"
    return text


def _seconds(value: object) -> float | None:
    """A positive number of seconds from JSON or a header (``"3599"``, ``3599``), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds < float("inf") else None
