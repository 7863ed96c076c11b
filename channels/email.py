"""Email: IMAP in (IDLE, with a full poll as a safety net), SMTP out, threaded safely.

Inbound, a poller per inbox: ``SELECT`` the folder, fetch messages by UID after the stored
cursor (``UIDVALIDITY`` + last UID; the cursor advances only after the messages it covers
are committed), then ``IDLE`` (re-issued every ``idle_refresh``, under NAT timeouts), with a
full poll every ``full_poll`` anyway so a missed push is never missed mail. Servers without
IDLE are polled. Errors reconnect with exponential backoff and jitter; nothing kills the
poller. ``UID FETCH n+1:*`` returns the last message even when nothing is new, so UIDs at or
below the cursor are skipped.

``external_id`` is the mail's key (:func:`channels.email_parse.message_key`): its normalized
Message-ID, or a content hash without one, with a fingerprint (sender, Date, Subject) that
tells a reused Message-ID from a copy. A mail delivered to two aliases, or read again after
a UIDVALIDITY change, is one message; quarantined items carry the same key and are kept
once. A message over ``max_size`` is quarantined from its headers (``partial``: never
re-imported from them), without downloading it whole; whatever cannot be parsed is
quarantined raw. Bounces (RFC 3464 or the common non-standard forms) mark the outbound
message they name failed and open nothing; one naming nothing we sent is quarantined.

Outbound: replies through the outbox as proper MIME from the inbox address with the agent's
name, with our own deterministic Message-ID (an uncertain send retried after a crash carries
the same one, so downstream dedupes), ``In-Reply-To``/``References`` and a thread token in
the subject. Temporary SMTP errors are retried; permanent ones fail the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import re
import socket
import ssl
from typing import Any, ClassVar, Literal

from aioimaplib import IMAP4
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from channels.base import (
    Attachment,
    Channel,
    InboundMessage,
    InboxConfig,
    OutboundMessage,
    ParsedItem,
    PermanentSendError,
    Reject,
    Sender,
    SendReceipt,
    StatusUpdate,
    UncertainPolicy,
)
from channels.email_parse import MessageKey, ParsedEmail, Unparseable, message_key, parse_email
from channels.email_smtp import (
    OAuth2Tokens,
    OutgoingAttachment,
    SmtpSettings,
    build_message,
    make_message_id,
    send,
    text_to_html,
)
from channels.threading import thread_token

__all__ = ["EmailChannel", "EmailInboxConfig"]

log = logging.getLogger(__name__)
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FETCH_BATCH = 20
_EXISTS = re.compile(rb"^\* \d+ EXISTS\s*$")
_OUR_ID = re.compile(r"<or-(\d{1,18})\.[0-9a-f]{8}@([^<>@\s]+)>", re.IGNORECASE)
# Searches in a row before IDLE while mail keeps coming (IDLE itself brings the rest)
_QUIET_SEARCHES = 20


def _seconds(value: str) -> float:
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f'invalid duration "{value}" (like 30s, 9m or 1h)')
    return float(int(match.group(1)) * _UNITS[match.group(2)])


class OAuth(BaseModel):
    """XOAUTH2 with a refresh token (Microsoft 365, Google)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    token_url: str
    client_id: str
    client_secret: SecretStr | None = None
    refresh_token: SecretStr
    scope: str | None = None


class Server(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int | None = None
    security: Literal["tls", "starttls", "plain"] = "tls"
    user: str | None = None
    auth: Literal["password", "xoauth2", "none"] = "password"
    password: SecretStr | None = None
    oauth: OAuth | None = None
    ca_file: str | None = None  # a private CA to trust (the system's CAs otherwise)

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    @model_validator(mode="after")
    def _credentials(self) -> Server:
        if self.auth == "password" and (self.user is None or self.password is None):
            raise ValueError('auth "password" needs user and password (use "${ENV_VAR}")')
        if self.auth == "xoauth2" and (self.user is None or self.oauth is None):
            raise ValueError('auth "xoauth2" needs user and oauth')
        return self


class Imap(Server):
    folder: str = "INBOX"
    after_import: Literal["nothing", "flag", "move"] = "nothing"
    move_to: str | None = None
    flag: str = "\\Seen"

    @model_validator(mode="after")
    def _move(self) -> Imap:
        if self.after_import == "move" and not self.move_to:
            raise ValueError('after_import "move" needs move_to')
        return self


class EmailInboxConfig(InboxConfig):
    address: str = Field(description="the inbox's address: From of replies")
    imap: Imap
    smtp: Server
    allow_plaintext: bool = False  # security "plain" is refused unless this is set
    idle_refresh: str = "9m"
    full_poll: str = "5m"
    reconnect_max: str = "5m"  # the longest wait between reconnection attempts
    max_size_mb: int = Field(25, ge=1, le=1024)
    trusted_authserv_ids: list[str] = []  # Authentication-Results of these hosts count

    @field_validator("idle_refresh", "full_poll", "reconnect_max")
    @classmethod
    def _duration(cls, value: str) -> str:
        _seconds(value)
        return value

    @model_validator(mode="after")
    def _plaintext(self) -> EmailInboxConfig:
        for name, server in (("imap", self.imap), ("smtp", self.smtp)):
            if server.security == "plain" and not self.allow_plaintext:
                raise ValueError(
                    f'{name}: security "plain" sends credentials and mail in the clear; '
                    "set allow_plaintext: true to allow it"
                )
        return self


def _tokens(oauth: OAuth | None) -> OAuth2Tokens | None:
    if oauth is None:
        return None
    return OAuth2Tokens(
        oauth.token_url,
        oauth.client_id,
        oauth.refresh_token.get_secret_value(),
        oauth.client_secret.get_secret_value() if oauth.client_secret else None,
        oauth.scope,
    )


class _Retry(Exception):
    """The session ended in a way worth reconnecting for."""


class EmailChannel(Channel):
    channel_id = "email"
    provider = "imap"
    channel_ids = ("email",)
    config_model = EmailInboxConfig
    attachments = True
    rich_text = True
    uncertain_policy = UncertainPolicy.RESEND  # same Message-ID: downstream drops the copy
    cursor_key: ClassVar[str] = "imap-cursor"

    def __init__(self, slug: str, config: InboxConfig, context: Any) -> None:
        super().__init__(slug, config, context)
        assert isinstance(config, EmailInboxConfig)
        self.cfg: EmailInboxConfig = config
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._imap_tokens = _tokens(config.imap.oauth)
        self._smtp_tokens = _tokens(config.smtp.oauth)
        self.domain = config.address.rpartition("@")[2] or "localhost"
        self.polls = 0  # full polls started (for tests and metrics)
        self.standby = False  # another process holds this mailbox's lease
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._announced = False  # the server said EXISTS since the last search began

    @property
    def largest_attachment(self) -> int:
        return self.cfg.max_size_mb * 1024 * 1024  # a mail's limit bounds its attachments

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.context.deliver is None:
            return
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"imap:{self.slug}")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    @property
    def _lease_name(self) -> str:
        return f"imap:{self.slug}"

    async def _hold_lease(self) -> bool:
        """One process polls a mailbox (the others stand by and take over when its lease
        expires); a brief overlap is harmless, the UID cursor and message ids dedupe."""
        lease = self.context.lease
        return lease is None or await lease(self._lease_name, True)

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.context.lease_ttl / 3)
            if not await self._hold_lease():
                raise _Retry("another process took the mailbox's lease")

    async def _run(self) -> None:
        try:
            await self._poll_while_leased()
        finally:
            if self.context.lease is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.context.lease(self._lease_name, False))

    async def _poll_while_leased(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            try:
                if not await self._hold_lease():
                    self.standby = True
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.context.lease_ttl / 3):
                            await self._stopping.wait()
                    continue
                self.standby = False
                await self._session()
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nothing may kill the poller
                log.warning(
                    "imap %s: %s: %s; reconnecting in %.1fs",
                    self.slug,
                    type(exc).__name__,
                    str(exc)[:200],
                    delay,
                )
                self.connected.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, _seconds(self.cfg.reconnect_max))

    # -- one IMAP session -------------------------------------------------------------------
    async def _connect(self) -> IMAP4:
        imap = self._client()
        try:
            await self._open(imap)
        except BaseException:
            await _close(imap)
            raise
        return imap

    def _client(self) -> IMAP4:
        server = self.cfg.imap
        port = server.port or (993 if server.security == "tls" else 143)
        timeout = 60
        self._lost = lost = asyncio.Event()

        def on_lost(_: Exception | None) -> None:
            lost.set()

        # IMAP4 takes an ssl_context for implicit TLS (IMAP4_SSL has no conn_lost_cb)
        imap = IMAP4(
            host=server.host,
            port=port,
            timeout=timeout,
            conn_lost_cb=on_lost,
            ssl_context=server.tls_context() if server.security == "tls" else None,
        )
        return imap

    async def _open(self, imap: IMAP4) -> None:
        server = self.cfg.imap
        await imap.wait_hello_from_server()
        self._hear_announcements(imap)
        sock = imap.protocol.transport.get_extra_info("socket")
        if sock is not None:  # a dead peer behind NAT is noticed by the kernel, not only by us
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if server.security == "starttls":
            await self._starttls(imap, server.host, server.tls_context())
        if server.auth == "xoauth2":
            assert self._imap_tokens is not None and server.user is not None
            response = await imap.xoauth2(server.user, await self._imap_tokens.token())
        elif server.auth == "password":
            assert server.user is not None and server.password is not None
            response = await imap.login(server.user, server.password.get_secret_value())
        else:
            response = None
        if response is not None and response.result != "OK":
            raise _Retry(f"login refused: {_text(response.lines)[:200]}")

    def _hear_announcements(self, imap: IMAP4) -> None:
        """Note every ``* n EXISTS``: aioimaplib hands an untagged response only to a pending
        command that asked for that kind of answer and drops the rest, so new mail announced
        alongside our UID FETCH or STORE would otherwise go unnoticed until the full poll."""
        protocol = imap.protocol
        untagged = protocol._untagged_response

        def hear(line: bytes) -> Any:
            if _EXISTS.match(line):
                self._announced = True
            return untagged(line)

        protocol._untagged_response = hear

    @staticmethod
    async def _starttls(imap: IMAP4, host: str, context: ssl.SSLContext) -> None:
        """aioimaplib has no STARTTLS of its own: send the command, then upgrade the
        transport in place (asyncio's start_tls) before anything else is said."""
        from aioimaplib import Command

        protocol = imap.protocol
        response = await protocol.execute(Command("STARTTLS", protocol.new_tag()))
        if response.result != "OK":
            raise _Retry("STARTTLS refused")
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            protocol.transport, protocol, context, server_hostname=host
        )
        protocol.transport = transport
        await protocol.capability()

    async def _session(self) -> None:
        """One connection: its work is abandoned the moment the connection is lost (an
        aioimaplib command would otherwise wait for its own timeout). Abandoning is safe: the
        cursor only moves after a commit, and a message stored twice is recognised."""
        imap = await self._connect()
        work = asyncio.ensure_future(self._serve(imap))
        lost = asyncio.ensure_future(self._lost.wait())
        keep = asyncio.ensure_future(self._keep_lease())
        try:
            done, _ = await asyncio.wait({work, lost, keep}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()
            elif keep in done:
                keep.result()
            else:
                raise _Retry("connection lost")
        finally:
            for task in (work, lost, keep):
                task.cancel()
            # wait for the work to wind down without swallowing our own cancellation
            await asyncio.wait({work}, timeout=5)
            if work.done() and not work.cancelled():
                work.exception()  # retrieved (it was raised above if it mattered)
            self.connected.clear()
            await _close(imap)

    async def _serve(self, imap: IMAP4) -> None:
        folder = self.cfg.imap.folder
        selected = await imap.select(folder)
        if selected.result != "OK":
            raise _Retry(f"cannot select {folder}: {_text(selected.lines)[:200]}")
        validity = _uidvalidity(selected.lines)
        self.connected.set()
        idle = imap.has_capability("IDLE")
        full_poll = _seconds(self.cfg.full_poll)
        refresh = _seconds(self.cfg.idle_refresh)
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while not self._stopping.is_set():
            if loop.time() >= next_full:
                self.polls += 1
                next_full = loop.time() + full_poll
            # Mail announced (``* n EXISTS``) in the answer to one of our own commands is not
            # announced again in IDLE: search again until a search imports nothing and
            # nothing was announced since it started.
            for _ in range(_QUIET_SEARCHES):
                self._announced = False
                if not await self._fetch_new(imap, folder, validity) and not self._announced:
                    break
            wait = max(0.05, min(refresh, next_full - loop.time()))
            if idle:
                await self._idle(imap, wait)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
                await imap.noop()
            # A re-SELECT notices a changed UIDVALIDITY (the folder was rebuilt).
            if not idle or loop.time() >= next_full:
                selected = await imap.select(folder)
                if selected.result != "OK":
                    raise _Retry(f"cannot select {folder}")
                validity = _uidvalidity(selected.lines)

    async def _idle(self, imap: IMAP4, wait: float) -> None:
        """IDLE until the server pushes something or ``wait`` is over (a lost connection
        cancels this from :meth:`_session`)."""
        idle = await imap.idle_start(timeout=wait)
        try:
            with contextlib.suppress(TimeoutError):
                pushed = await imap.wait_server_push(timeout=wait + 5)
                if isinstance(pushed, list) and any(
                    b"BYE" in line if isinstance(line, bytes) else "BYE" in str(line)
                    for line in pushed
                ):
                    raise _Retry("the server said BYE")
            imap.idle_done()
            await asyncio.wait_for(idle, 30)
        finally:
            if not idle.done():  # cancelled or failed: no IDLE left dangling
                idle.cancel()

    # -- fetching ---------------------------------------------------------------------------
    async def _fetch_new(self, imap: IMAP4, folder: str, validity: int) -> bool:
        """Import what is new after the cursor; True when something was."""
        state = self.context.state
        assert state is not None and self.context.deliver is not None
        cursor = await state.load(self.cursor_key) or {}
        last = int(cursor.get("last_uid", 0)) if cursor.get("uidvalidity") == validity else 0
        if cursor and cursor.get("uidvalidity") != validity:
            log.warning(
                "imap %s: UIDVALIDITY of %s changed (%s -> %s): re-reading the folder; "
                "messages already stored are recognised by Message-ID and content",
                self.slug,
                folder,
                cursor.get("uidvalidity"),
                validity,
            )
        response = await imap.uid_search(f"UID {last + 1}:*")
        if response.result != "OK":
            raise _Retry(f"UID SEARCH failed: {_text(response.lines)[:200]}")
        uids = sorted(u for u in _numbers(response.lines) if u > last)  # n+1:* quirk
        for start in range(0, len(uids), _FETCH_BATCH):
            batch = uids[start : start + _FETCH_BATCH]
            items = [await self._fetch_one(imap, folder, validity, uid) for uid in batch]
            await self.context.deliver(items)  # returns after the commit
            await state.save(self.cursor_key, {"uidvalidity": validity, "last_uid": batch[-1]})
            await self._after_import(imap, batch)
        return bool(uids)

    async def _fetch_one(self, imap: IMAP4, folder: str, validity: int, uid: int) -> ParsedItem:
        where = f"{folder}/{validity}/{uid}"
        size_response = await imap.uid("fetch", str(uid), "(RFC822.SIZE)")
        size = _size(size_response.lines)
        limit = self.cfg.max_size_mb * 1024 * 1024
        if size is not None and size > limit:
            response = await imap.uid("fetch", str(uid), "(BODY.PEEK[HEADER])")
            headers = _literal(response.lines) or b""
            key = message_key(headers)
            return Reject(
                f"{where}: {size} bytes is over the {self.cfg.max_size_mb} MiB limit "
                "(headers kept; the message was not downloaded)",
                headers,
                key.external_id,
                key.fingerprint,
                partial=True,
            )
        response = await imap.uid("fetch", str(uid), "(BODY.PEEK[])")
        raw = _literal(response.lines)
        if response.result != "OK" or raw is None:
            raise _Retry(f"cannot fetch UID {uid}: {_text(response.lines)[:200]}")
        return await self.item(raw, where)

    async def _after_import(self, imap: IMAP4, uids: list[int]) -> None:
        action = self.cfg.imap.after_import
        if action == "nothing" or not uids:
            return
        span = ",".join(str(u) for u in uids)
        if action == "flag":
            await imap.uid("store", span, "+FLAGS", f"({self.cfg.imap.flag})")
        elif action == "move":
            assert self.cfg.imap.move_to is not None
            if imap.has_capability("MOVE"):
                await imap.uid("move", span, self.cfg.imap.move_to)
            else:
                await imap.uid("copy", span, self.cfg.imap.move_to)
                await imap.uid("store", span, "+FLAGS", "(\\Deleted)")
                await imap.expunge()

    async def reimport(self, raw: bytes, external_id: str) -> list[ParsedItem] | None:
        return [await self.item(raw, f"re-import of {external_id}")]

    async def item(self, raw: bytes, where: str) -> ParsedItem:
        """One raw message as an item for the core (also used to re-import quarantine);
        ``where`` (folder/UIDVALIDITY/UID) only goes into reasons. Its external_id is the
        mail's :func:`message_key`, the same wherever it was found."""
        key = message_key(raw)
        try:
            parsed = await asyncio.to_thread(
                parse_email, raw, trusted_authserv_ids=self.cfg.trusted_authserv_ids
            )
        except Unparseable as exc:
            return Reject(f"{where}: {exc.reason}", raw, key.external_id, key.fingerprint)
        if parsed.classification == "bounce":
            return self._bounce(parsed, raw, where, key)
        if parsed.sender is None:
            return Reject(f"{where}: no sender address", raw, key.external_id, key.fingerprint)
        return await self._inbound(parsed, raw, key, where)

    def _bounce(self, parsed: ParsedEmail, raw: bytes, where: str, key: MessageKey) -> ParsedItem:
        """A bounce updates the outbound message it reports on and opens no conversation.
        That message is the one of ours it names (our Message-IDs carry an HMAC, so ours
        are recognised among every id a bounce quotes), else the returned original's; a
        bounce that quotes no Message-ID at all names its failed recipient, whose latest
        message from this inbox it then reports on. A bounce matching nothing we sent is
        quarantined with its reason, never dropped."""
        dsn = parsed.dsn or {}
        recipient = dsn.get("recipient") or None
        target = next((r for r in parsed.bounce_refs if self._ours(r)), parsed.bounce_of)
        if target is None and recipient is None:
            return Reject(
                f"{where}: a bounce that names none of our messages", raw, key.external_id
            )
        named = target or f"the last message to {recipient}"
        unmatched = Reject(
            f"{where}: a bounce reporting on {named}, which this inbox did not send "
            f"({dsn.get('status') or 'no status'}: {parsed.bounce_reason or parsed.subject})"[
                :1000
            ],
            raw,
            key.external_id,
        )
        action = dsn.get("action", "failed")
        if action not in ("failed", ""):
            # "delayed", "relayed", "delivered": not a failure
            return StatusUpdate(target or "", "sent", None, self.context.now(), unmatched=unmatched)
        why = parsed.bounce_reason or parsed.subject or "no reason given"
        where_to = f"{recipient}: " if recipient else ""
        reason = " ".join(v for v in ("bounced:", dsn.get("status"), f"{where_to}{why}") if v)
        return StatusUpdate(
            target or "",
            "failed",
            reason[:500],
            self.context.now(),
            failed_recipient=recipient if not parsed.bounce_refs else None,
            unmatched=unmatched,
        )

    def _ours(self, message_id: str) -> bool:
        """Whether ``message_id`` is one this deployment generated (its HMAC checks)."""
        found = _OUR_ID.fullmatch(message_id)
        if found is None:
            return False
        try:
            expected = make_message_id(self.context.secret, int(found.group(1)), found.group(2))
        except ValueError:
            return False
        return hmac.compare_digest(expected, message_id.lower())

    async def _inbound(
        self, parsed: ParsedEmail, raw: bytes, key: MessageKey, where: str
    ) -> InboundMessage:
        attachments = []
        for a in parsed.attachments:
            blob_key = None
            if self.context.blobs is not None:
                try:
                    blob_key = await self.context.blobs.put(a.data, a.content_type, a.filename)
                except ValueError as exc:  # over the blob store's limit: kept as a note
                    log.warning(
                        "imap %s: %s: attachment %s not kept: %s",
                        self.slug,
                        where,
                        a.filename,
                        exc,
                    )
            attachments.append(
                Attachment(a.filename, a.content_type, len(a.data), blob_key, inline=a.inline)
            )
        proof = sender_proof(parsed.auth, parsed.sender or "")
        auth = parsed.auth or {}
        spoofed = bool(auth.get("trusted")) and auth.get("dmarc") == "fail"
        return InboundMessage(
            external_id=key.external_id,
            fingerprint=key.fingerprint,
            sender=Sender(
                "email",
                parsed.sender or "",
                verified=proof is not None,
                name=parsed.sender_name,
                verified_by=proof,
            ),
            text=parsed.text,
            subject=parsed.subject,
            html=parsed.html,
            attachments=attachments,
            provider_ts=parsed.date,
            auto=parsed.classification == "auto_reply",
            references=[*parsed.references, *([parsed.in_reply_to] if parsed.in_reply_to else [])],
            thread_token=parsed.thread_token,
            thread_id=parsed.message_id,
            # mail from our own address (a forged From, a loop through a forward) is never
            # answered automatically
            no_auto_reply=parsed.no_auto_reply or parsed.sender == self.cfg.address.lower(),
            data={
                "location": where,
                "sha256": parsed.sha256,
                "size": parsed.size,
                "classification": parsed.classification,
                **({"full_text": parsed.full_text} if parsed.full_text != parsed.text else {}),
                **({"to": list(parsed.to)} if parsed.to else {}),
                **({"cc": list(parsed.cc)} if parsed.cc else {}),
                **({"spoofed": True} if spoofed else {}),
            },
        )

    # -- sending ----------------------------------------------------------------------------
    def _smtp_settings(self) -> SmtpSettings:
        server = self.cfg.smtp
        port = server.port or {"tls": 465, "starttls": 587, "plain": 25}[server.security]
        return SmtpSettings(
            host=server.host,
            port=port,
            security=server.security,
            username=server.user,
            auth=server.auth,
            password=server.password.get_secret_value() if server.password else None,
            tls_context=server.tls_context() if server.security != "plain" else None,
        )

    async def send(self, message: OutboundMessage) -> SendReceipt:
        if message.recipient.kind != "email" or "@" not in message.recipient.address:
            raise PermanentSendError(f"not an email address: {message.recipient.address!r}")
        message_id = make_message_id(self.context.secret, message.message_id, self.domain)
        thread = list(message.data.get("thread", []))
        inbound = [t["id"] for t in thread if t.get("direction") == "in"]
        references = [t["id"] for t in thread if t.get("id") and t["id"] != message_id]
        token = thread_token(self.context.secret, message.conversation_id)
        base = message.subject or message.data.get("conversation_subject") or "Your request"
        base = re.sub(r"\s*\[#\d+-[0-9a-f]{8}\]", "", base).strip()
        if inbound and not re.match(r"(?i)^(re|aw|sv):", base):
            base = f"Re: {base}"
        attachments = []
        for a in message.attachments:
            if a.blob_key is None or self.context.blobs is None:
                raise PermanentSendError(f"attachment {a.filename} has no stored bytes")
            data = await self.context.blobs.get(a.blob_key)
            attachments.append(OutgoingAttachment(a.filename, a.content_type, data, a.inline))
        try:
            mime = self._mime(message, base, token, message_id, inbound, references, attachments)
        except ValueError as exc:  # an address or id the email API refuses: never sendable
            raise PermanentSendError(f"cannot build the email: {exc}") from None
        await send(self._smtp_settings(), mime, tokens=self._smtp_tokens)
        return SendReceipt(
            message_id,
            "sent",
            {"thread_id": message_id, "recipients": [message.recipient.address.lower()]},
        )

    def _mime(
        self,
        message: OutboundMessage,
        base: str,
        token: str,
        message_id: str,
        inbound: list[str],
        references: list[str],
        attachments: list[OutgoingAttachment],
    ) -> Any:
        return build_message(
            from_address=self.cfg.address,
            from_name=message.sender_name,
            to=message.recipient.address,
            subject=f"{base} {token}",
            text=message.text,
            # an agent's formatted text (links, line breaks) also as sanitized HTML:
            # multipart/alternative, as mail clients expect
            html=message.html if message.html is not None else text_to_html(message.text),
            attachments=attachments,
            message_id=message_id,
            in_reply_to=inbound[-1] if inbound else None,
            references=references,
            auto=message.is_auto,
            date=self.context.now(),
        )


def sender_proof(auth: dict[str, Any] | None, sender: str) -> str | None:
    """How the sender's address is proven, or None: only our own MX's Authentication-Results
    count (``trusted``), with DMARC pass, or a DKIM pass whose signing domain is aligned with
    the From domain (the same domain or a parent of it, DMARC's relaxed alignment)."""
    if not auth or not auth.get("trusted"):
        return None
    if auth.get("dmarc") == "pass":
        return "dmarc"
    domain = sender.rpartition("@")[2].lower()
    signer = str(auth.get("dkim_domain") or "").lower()
    if (
        auth.get("dkim") == "pass"
        and signer
        and (domain == signer or domain.endswith("." + signer))
    ):
        return "dkim"
    return None


# -- IMAP helpers ---------------------------------------------------------------------------
async def _close(imap: IMAP4) -> None:
    """Log out politely if the connection still works (bounded: aioimaplib may not end a
    command on a dead connection, and must not hold up a shutdown); close the socket."""
    transport = getattr(imap.protocol, "transport", None)
    # in an abandoned IDLE, the server would take LOGOUT for a broken DONE and never answer
    if (
        transport is not None
        and not transport.is_closing()
        and not imap.protocol.has_pending_idle_command()
    ):
        logout = asyncio.ensure_future(imap.logout())
        done, _ = await asyncio.wait({logout}, timeout=5)
        if done and not logout.cancelled():
            logout.exception()  # retrieved: a failed logout changes nothing
        else:
            logout.cancel()
    if transport is not None:
        transport.close()


def _text(lines: list[Any]) -> str:
    return " ".join(
        line.decode("utf-8", "replace") if isinstance(line, bytes | bytearray) else str(line)
        for line in lines
    )


def _uidvalidity(lines: list[Any]) -> int:
    match = re.search(r"UIDVALIDITY (\d+)", _text(lines))
    if not match:
        raise _Retry("the server sent no UIDVALIDITY")
    return int(match.group(1))


def _numbers(lines: list[Any]) -> list[int]:
    """The UIDs of a SEARCH answer (the untagged ``SEARCH 3 4 5`` line; the tagged status
    line that follows is not part of it)."""
    for line in lines:
        text = line.decode() if isinstance(line, bytes | bytearray) else str(line)
        words = text.split()
        if words and words[0] == "SEARCH":
            words = words[1:]
        if words and all(w.isdigit() for w in words):
            return [int(w) for w in words]
    return []


def _size(lines: list[Any]) -> int | None:
    match = re.search(r"RFC822\.SIZE (\d+)", _text(lines))
    return int(match.group(1)) if match else None


def _literal(lines: list[Any]) -> bytes | None:
    """The message bytes of a FETCH answer (aioimaplib gives them as a bytearray line)."""
    for line in lines:
        if isinstance(line, bytearray):
            return bytes(line)
    return None
