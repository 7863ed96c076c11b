"""Pure, defensive parser for inbound email: raw RFC 5322 bytes in, :class:`ParsedEmail` out.

``parse_email(raw)`` never raises anything but :class:`Unparseable` (quarantine the raw
bytes with its ``reason``). It does no network or database I/O and imports nothing of the
core. The fixture corpus in ``tests/channels/fixtures/email/`` (see its README) documents
every trap handled here; the main design decisions:

* **compat32, never policy.default.** ``policy.default`` raises on header *access* for a
  dozen real-world inputs (encoded CR/LF in a display name, ``Message-ID: <>``, an unclosed
  angle-addr, a year that overflows a C int, nested comments) and even while parsing a
  hostile Content-Type. compat32 keeps raw header text, which is decoded here by small,
  tolerant functions (RFC 2047 words one at a time, raw 8-bit as UTF-8 else windows-1252).
* **Charsets as browsers decode them** (WHATWG Encoding Standard): ISO-8859-1/us-ascii
  labels are windows-1252, gb2312 is GBK, Shift_JIS is cp932; unknown labels fall back to
  UTF-8, then windows-1252. Dangerous Python pseudo-codecs (``unicode_escape``...) are
  refused.
* **An isolated thread with a known stack.** MIME nesting is parsed recursively by the
  stdlib. The work runs in a fresh thread whose stack size is fixed here, so how deep the
  *caller's* stack happens to be (pytest, asyncio) cannot change the outcome, and a
  RecursionError is reported as :class:`Unparseable` instead of crashing the process.
  Everything after the stdlib parse walks the tree iteratively.
* **Degrade, don't fail.** A bad header yields ``None`` for that field; only a message
  without any structure or without any sender address is quarantined.
"""

from __future__ import annotations

import binascii
import codecs
import email
import email.parser
import email.utils
import hashlib
import html as html_lib
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.policy import compat32
from functools import partial
from html.parser import HTMLParser
from typing import Any, TypeVar

import nh3

__all__ = [
    "THREAD_TOKEN",
    "MessageKey",
    "ParsedAttachment",
    "ParsedEmail",
    "Unparseable",
    "decode_header_text",
    "message_key",
    "normalize_message_id",
    "parse_email",
]

THREAD_TOKEN: re.Pattern[str] = re.compile(r"\[#(\d+)-([0-9a-f]{8})\]")
"""Our conversation token as it appears in a (decoded) subject: ``[#42-deadbeef]``."""

_T = TypeVar("_T")


# -- public types -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ParsedAttachment:
    """One real attachment (or inline image) of an inbound message."""

    filename: str
    """Safe name: control characters removed, any directory part dropped; synthesised
    (``attachment-1.pdf``) when the message gives none."""
    content_type: str
    """Lower-case ``type/subtype``."""
    data: bytes
    """Transfer-decoded bytes (for ``message/rfc822``: the encapsulated message)."""
    inline: bool
    """``Content-Disposition: inline``, or no disposition but a Content-ID (cid: image)."""
    content_id: str | None
    """The Content-ID header as sent, angle brackets kept (``<image001.png@01DA...>``)."""


@dataclass(frozen=True, slots=True)
class ParsedEmail:
    """What the email channel needs to know about one inbound message."""

    classification: str
    """``message`` | ``bounce`` (an RFC 3464 DSN, or a non-standard bounce: an automated
    sender and the text of delivery software) | ``auto_reply`` | ``bulk``."""
    no_auto_reply: bool
    """Never send an automatic reply (RFC 3834 signals, noreply senders, null Return-Path,
    DSNs, mailing lists)."""
    sender: str | None
    """Lower-case sender address (From, else Sender, Reply-To, Return-Path)."""
    sender_name: str | None
    """Decoded display name, control characters (CR/LF) removed."""
    subject: str | None
    """Decoded Subject, ``None`` without a Subject header."""
    text: str
    """Display text: decoded, HTML converted when there is no text/plain, reply history
    (quotes, attributions, Outlook header blocks) stripped; inline forwards are kept."""
    full_text: str
    """``text`` before quote stripping."""
    html: str | None
    """The HTML body sanitized with nh3 (remote images not loaded), ``None`` if none."""
    attachments: tuple[ParsedAttachment, ...]
    """Real attachments in document order (no signature parts, no calendar alternative)."""
    message_id: str | None
    """Message-ID with angle brackets, ``None`` if missing or empty."""
    in_reply_to: str | None
    """First Message-ID of In-Reply-To."""
    references: tuple[str, ...]
    """References in header order (oldest first)."""
    thread_token: str | None
    """``[#42-deadbeef]`` as found in the decoded subject."""
    to: tuple[str, ...]
    """Lower-case To addresses."""
    cc: tuple[str, ...]
    """Lower-case Cc addresses."""
    date: datetime | None
    """Date header as an aware datetime; ``None`` if missing, invalid or overflowing."""
    bounce_of: str | None
    """Message-ID of the outbound message a bounce reports on: the returned original's,
    else one quoted in the bounce's text, else its In-Reply-To."""
    bounce_refs: tuple[str, ...]
    """Every Message-ID a bounce names, the likeliest first (one of them may be ours when
    ``bounce_of`` is not)."""
    bounce_reason: str | None
    """Why delivery failed, as the reporting server put it (Diagnostic-Code, or the line of
    a text bounce with the SMTP reply)."""
    dsn: dict[str, str] | None
    """``action``, ``status``, ``recipient`` of the first per-recipient DSN block; for a
    bounce without RFC 3464 structure, the same read from its text (``status`` may be
    empty)."""
    auth: dict[str, Any] | None
    """The Authentication-Results that counts: ``authserv_id``, ``dmarc``, ``dkim``,
    ``dkim_domain`` (when given), ``trusted`` (authserv-id is one of ours; topmost wins)."""
    size: int
    """``len(raw)``."""
    sha256: str
    """Hex SHA-256 of the raw bytes (kept with the message; the dedupe key is
    :func:`message_key`, which copies of one mail share even when their bytes differ)."""


class Unparseable(Exception):
    """The message cannot become a message: quarantine it with ``reason``."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_email(raw: bytes, *, trusted_authserv_ids: Iterable[str] = ()) -> ParsedEmail:
    """Parse one raw inbound message.

    ``trusted_authserv_ids`` are the authserv-ids of our own MX: only their
    Authentication-Results are ``trusted``.

    Never raises anything but :class:`Unparseable` (any other exception inside, including
    RecursionError and MemoryError, is converted); a single bad header degrades that field
    instead of failing the whole message.
    """
    try:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise Unparseable(f"raw message must be bytes, not {type(raw).__name__}")
        data = bytes(raw)
        trusted = frozenset(str(i).strip().lower() for i in trusted_authserv_ids)
        return _run_isolated(lambda: _parse(data, trusted))
    except Unparseable:
        raise
    except RecursionError:
        # The traceback would be ~1000 frames of feedparser; the reason says it all.
        raise Unparseable("MIME or header structure nested too deeply to parse") from None
    except Exception as exc:
        raise Unparseable(f"parser failure: {type(exc).__name__}: {exc}"[:300]) from exc


# -- the dedupe key -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MessageKey:
    """What makes one mail the same mail wherever and however often it is delivered."""

    external_id: str
    """``mid:<normalized Message-ID>``; without a Message-ID ``sha256:<hex>`` of the
    Date, From, To and Subject headers and the body. The same in every copy of a mail:
    delivered to two aliases, fetched again after a UIDVALIDITY change."""
    fingerprint: str
    """16 hex digits over sender address, Date and Subject: a mail with the same
    Message-ID but another fingerprint is another mail (clients that reuse ids)."""


_MAX_KEY = 400  # external_id is 512 characters; a suffix (#fingerprint) may follow
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def normalize_message_id(message_id: str) -> str:
    """``<Local@Example.COM>`` -> ``Local@example.com``: angle brackets and white space
    removed, the domain (right of the last ``@``) in lower case, the left part as sent
    (RFC 5322 gives it no case rule)."""
    value = "".join(message_id.split()).strip("<>")
    left, at, right = value.rpartition("@")
    return f"{left}{at}{right.lower()}" if at else value


def message_key(raw: bytes) -> MessageKey:
    """The dedupe key of a raw message, or of its header block alone (a message too
    large to download). Reads the headers only and never raises: unusable headers count
    as missing."""
    data = bytes(raw)
    end = _HEADER_END.search(data)
    head, body = (data[: end.start()], data[end.end() :]) if end else (data, b"")
    headers = _degrade(
        lambda: _Headers(email.parser.BytesHeaderParser(policy=compat32).parsebytes(head)), None
    )

    def value(name: str) -> str:
        found = headers.first(name) if headers is not None else None
        return " ".join((found or "").split())

    sender = _degrade(lambda: _sender(headers)[0] if headers is not None else None, None)
    subject = " ".join(_degrade(lambda: _decode_words(value("subject")), "").split())
    date = _degrade(lambda: _date(value("date")), None)
    when = date.astimezone(UTC).isoformat() if date is not None else value("date")
    fingerprint = hashlib.sha256(f"{sender or ''}\n{when}\n{subject}".encode()).hexdigest()
    message_id = _first_msgid(value("message-id"))
    if message_id is not None:
        key = normalize_message_id(message_id)
        if len(key) > _MAX_KEY:
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return MessageKey(f"mid:{key}", fingerprint[:16])
    content = hashlib.sha256()
    for name in ("date", "from", "to", "subject"):
        content.update(value(name).encode("utf-8", "surrogateescape") + b"\n")
    # line endings and trailing white space differ between stores of the same mail
    content.update(b"\n" + re.sub(rb"[ \t]*\r?\n", b"\n", body).rstrip())
    return MessageKey(f"sha256:{content.hexdigest()}", fingerprint[:16])


# -- isolation ----------------------------------------------------------------------------
# 1 MiB is enough for the stdlib parser to reach the recursion limit (~1000 MIME levels);
# the margin covers a raised sys.setrecursionlimit. Only address space is reserved.
_PARSER_STACK_BYTES = 16 * 1024 * 1024
_stack_size_lock = threading.Lock()


def _run_isolated(func: Callable[[], _T]) -> _T:
    """Run ``func`` in a fresh thread with a fixed stack and return (or raise) its outcome."""
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(func())
        except BaseException as exc:  # handed over to the calling thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name="email-parse", daemon=True)
    # threading.stack_size() is process-wide: set it only around start() of our thread.
    with _stack_size_lock:
        try:
            previous: int | None = threading.stack_size(_PARSER_STACK_BYTES)
        except (ValueError, RuntimeError):  # platform without a settable stack size
            previous = None
        try:
            thread.start()
            started = True
        except RuntimeError:  # cannot start a thread (resource limits): parse in place
            started = False
        finally:
            if previous is not None:
                threading.stack_size(previous)
    if not started:
        return func()
    thread.join()
    if failure:
        raise failure[0]
    if not outcome:
        raise Unparseable("parser thread ended without a result")
    return outcome[0]


# -- the parse ----------------------------------------------------------------------------
def _parse(raw: bytes, trusted: frozenset[str]) -> ParsedEmail:
    if not raw.strip():
        raise Unparseable("empty message")
    try:
        msg = email.message_from_bytes(raw, policy=compat32)
    except RecursionError:
        raise Unparseable("MIME structure nested too deeply to parse") from None
    headers = _Headers(msg)
    sender, sender_name = _sender(headers)
    if sender is None:
        raise Unparseable("no sender address (From, Sender, Reply-To and Return-Path unusable)")
    subject = headers.decoded("subject")

    mime = _walk_mime(msg)
    full_text, html = _bodies(mime.bodies)
    text = _strip_quotes(full_text, subject)
    attachments = tuple(
        _attachment(part, index) for index, part in enumerate(mime.attachments, start=1)
    )

    details: tuple[dict[str, str] | None, str | None] = (None, None)
    bounce_reason: str | None = None
    is_dsn = mime.report is not None and _is_delivery_report(mime.report)
    if mime.report is not None and is_dsn:
        # A malformed report still is a bounce; it just names no outbound (the channel
        # then rejects it with the raw bytes kept).
        details = _degrade(partial(_bounce_details, mime.report, headers), details)
        bounce_reason = _degrade(partial(_dsn_diagnostic, mime.report), None)
    is_bounce = is_dsn or (
        mime.report is None
        and _degrade(partial(_is_text_bounce, headers, sender, subject, full_text, mime), False)
    )
    if is_bounce and not is_dsn:
        found = _degrade(
            partial(_text_bounce_details, headers, sender, subject, full_text, mime), None
        )
        if found is not None:
            details, bounce_reason = found[:2], found[2]
    dsn, bounce_of = details
    no_refs: tuple[str, ...] = ()
    refs = (
        _degrade(partial(_bounce_refs, bounce_of, full_text, headers), no_refs)
        if is_bounce
        else no_refs
    )
    classification = _classify(headers, sender, subject, mime.report, is_bounce)

    token = THREAD_TOKEN.search(subject or "")
    return ParsedEmail(
        classification=classification,
        no_auto_reply=classification != "message",
        sender=sender,
        sender_name=sender_name,
        subject=subject,
        text=text,
        full_text=full_text,
        html=html,
        attachments=attachments,
        message_id=_first_msgid(headers.first("message-id")),
        in_reply_to=_first_msgid(headers.first("in-reply-to")),
        references=tuple(_MSGID.findall(" ".join(headers.all("references")))),
        thread_token=token.group(0) if token else None,
        to=_addresses(headers.all("to")),
        cc=_addresses(headers.all("cc")),
        date=_date(headers.first("date")),
        bounce_of=bounce_of,
        bounce_refs=refs,
        bounce_reason=bounce_reason,
        dsn=dsn,
        auth=_degrade(
            partial(_authentication, headers.all("authentication-results"), trusted), None
        ),
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _degrade(func: Callable[[], _T], default: _T) -> _T:
    """An optional field that fails to parse becomes its default, not a quarantine."""
    try:
        return func()
    except Exception:  # includes RecursionError: only this field is lost
        return default


# -- raw header access --------------------------------------------------------------------
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SURROGATE = re.compile("[\udc80-\udcff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_HEADER_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _Headers:
    """A part's headers as raw text: unfolded, raw 8-bit bytes decoded, never raising.

    compat32 keeps header values as the parser saw them (8-bit bytes as surrogate escapes);
    ``Message.get`` would wrap such values in ``email.header.Header`` and lose the bytes.
    """

    __slots__ = ("_values",)

    def __init__(self, msg: Message) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in msg.raw_items():
            key = str(name).strip().lower()
            self._values.setdefault(key, []).append(_unfold(value))

    def all(self, name: str) -> list[str]:
        return self._values.get(name, [])

    def first(self, name: str) -> str | None:
        values = self._values.get(name)
        return values[0] if values else None

    def decoded(self, name: str) -> str | None:
        """RFC 2047-decoded value with control characters (injected CR/LF) removed."""
        value = self.first(name)
        return None if value is None else _HEADER_CONTROLS.sub("", decode_header_text(value))


def _unfold(value: object) -> str:
    # RFC 5322 unfolding removes the line break and keeps the following whitespace.
    return _recover_8bit(_LINE_BREAK.sub("", value if isinstance(value, str) else str(value)))


def _recover_8bit(text: str) -> str:
    """Turn surrogate-escaped raw bytes (RFC 6532 headers, raw Latin-1) back into text."""
    if not _SURROGATE.search(text):
        return text
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Raw 8-bit headers that are not UTF-8 are, in practice, windows-1252.
        return data.decode("cp1252", "replace")


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments (which may nest) in one linear, non-recursive pass.

    Quoted strings and backslash escapes are respected; an unclosed comment runs to the end.
    Both stdlib address parsers recurse per nesting level (RecursionError at ~500 levels).
    """
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if not depth:
                out.append(ch)
        elif ch == "\\":
            escaped = True
            if not depth:
                out.append(ch)
        elif quoted:
            out.append(ch)
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")  # a comment is folding white space
        elif not depth:
            quoted = ch == '"'
            out.append(ch)
    return "".join(out)


# -- RFC 2047 encoded words -----------------------------------------------------------------
#: Deeper nesting than this is not mail a person wrote: what is left is kept as text.
MAX_DECODE_ROUNDS = 8
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def decode_header_text(value: str) -> str:
    """The text a header value says once fully decoded: RFC 2047 words are decoded again
    while decoding changes anything (at most :data:`MAX_DECODE_ROUNDS` times).

    An encoded word may decode to another encoded word; decoding only once would leave
    that inner word to whoever reads the value next, and the email package decodes it
    (CR and LF included) when the value is set on an outgoing message. Control characters
    are the caller's to remove, after this.
    """
    for _ in range(MAX_DECODE_ROUNDS):
        decoded = _decode_words(value)
        if decoded == value:
            break
        value = decoded
    return value


def _decode_words(value: str) -> str:
    """Decode RFC 2047 words tolerantly, one word at a time.

    Whitespace between adjacent words is dropped and the bytes of adjacent words in the
    same charset are joined before decoding (mail clients split multi-byte characters
    across words). Malformed words (unknown encoding letter, unterminated) stay literal,
    an invalid Q escape is kept, missing base64 padding is repaired and unknown charsets
    fall back like bodies do; ``email.header.decode_header`` raises on several of these.
    """
    if "=?" not in value:
        return value
    pieces: list[tuple[str, bytearray | str]] = []  # (charset, bytes) per word, ("", text)
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        after_word = bool(pieces) and isinstance(pieces[-1][1], bytearray)
        if between and not (after_word and between.strip(" \t") == ""):
            pieces.append(("", between))
        charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 language: utf-8*de
        encoded = match.group(3).encode("utf-8", "surrogateescape")
        if match.group(2) in "bB":
            data = _lenient_b64(encoded)
        else:
            data = _Q_ESCAPE.sub(
                lambda m: bytes([int(m.group(1), 16)]), encoded.replace(b"_", b" ")
            )
        last = pieces[-1] if pieces else None
        if last is not None and last[0] == charset and isinstance(last[1], bytearray):
            last[1].extend(data)
        else:
            pieces.append((charset, bytearray(data)))
        pos = match.end()
    pieces.append(("", value[pos:]))
    return "".join(
        chunk if isinstance(chunk, str) else _decode_bytes(bytes(chunk), charset)
        for charset, chunk in pieces
    )


# -- charsets -------------------------------------------------------------------------------
# Labels Python does not know, mapped as the WHATWG Encoding Standard does.
_WHATWG_LABELS = {
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "ms_kanji": "cp932",
    "csshiftjis": "cp932",
    "x-gbk": "gbk",
    "gb_2312-80": "gbk",
    "csgb2312": "gbk",
    "x-mac-roman": "mac-roman",
    "unicode-1-1-utf-8": "utf-8",
}
# Python codecs whose bytes are, in real mail, the superset encoding (WHATWG): Outlook
# labels windows-1252 text ISO-8859-1, Japanese mail uses cp932 characters under Shift_JIS.
_WHATWG_CODECS = {
    "ascii": "cp1252",
    "iso8859-1": "cp1252",
    "iso8859-9": "cp1254",
    "iso8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gbk",
    "shift_jis": "cp932",
    "euc_kr": "cp949",
}
# Text codecs a charset label must never select: they interpret escapes or are not
# character sets at all.
_REFUSED_CODECS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined", "charmap"}
)


def _codec(label: str | None) -> str | None:
    """Python codec for a MIME charset label, ``None`` if unknown or refused."""
    if not label:
        return None
    cleaned = _strip_comments(label).strip().strip("\"'").strip().lower()
    tokens = cleaned.split("*", 1)[0].split()  # RFC 2231 language suffix: utf-8*de
    cleaned = tokens[0] if tokens else ""
    if not cleaned or len(cleaned) > 64:
        return None
    cleaned = _WHATWG_LABELS.get(cleaned, cleaned)
    try:
        info = codecs.lookup(cleaned)
    except (LookupError, ValueError):
        return None
    if info.name in _REFUSED_CODECS or not getattr(info, "_is_text_encoding", True):
        return None
    return _WHATWG_CODECS.get(info.name, info.name)


def _decode_bytes(data: bytes, label: str | None) -> str:
    """Decode with the label's codec (errors replaced); unknown labels (``unknown-8bit``,
    ``x-user-defined``, none) try UTF-8, then windows-1252."""
    codec = _codec(label)
    text: str | None = None
    if codec is not None:
        try:
            text = data.decode(codec, "replace")
        except Exception:  # a few stateful CJK codecs can still fail: fall through
            text = None
    if text is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("cp1252", "replace")
    # UTF-7 (and UTF-16 with some inputs) can produce lone surrogates, which neither nh3
    # nor PostgreSQL accept.
    return _LONE_SURROGATE.sub("\ufffd", text)


def _normalise_text(text: str) -> str:
    # get_payload keeps the file's line endings; PostgreSQL text rejects NUL.
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text.removeprefix("\ufeff")


# -- transfer encodings ---------------------------------------------------------------------
_B64_NOT_ALPHABET = bytes(
    b for b in range(256) if not (chr(b).isascii() and (chr(b).isalnum() or chr(b) in "+/="))
)


def _lenient_b64(data: bytes) -> bytes:
    """Base64 the way RFC 2045 asks: ignore characters outside the alphabet, repair missing
    padding, drop a dangling 4n+1th character. (The stdlib returns the *undecoded* text for
    the dangling case.) Runs separated by ``=`` are decoded separately, as concatenated
    base64 chunks are."""
    out: list[bytes] = []
    for chunk in data.translate(None, _B64_NOT_ALPHABET).split(b"="):
        usable = len(chunk) - 1 if len(chunk) % 4 == 1 else len(chunk)
        if usable:
            out.append(binascii.a2b_base64(chunk[:usable] + b"=" * (-usable % 4)))
    return b"".join(out)


def _payload_bytes(part: Message) -> bytes:
    """A leaf part's transfer-decoded bytes (never the stdlib's undecoded fallback)."""
    data = _raw_payload(part)
    if data is None:
        return b""
    encoding = _header_token(_Headers(part).first("content-transfer-encoding"))
    if encoding == "base64":
        return _lenient_b64(data)
    if encoding == "quoted-printable":
        # binascii keeps invalid escapes (=ZZ) literally and accepts lowercase hex.
        return binascii.a2b_qp(data)
    if encoding in ("x-uuencode", "uuencode", "x-uue", "uue"):
        decoded = part.get_payload(decode=True)
        return decoded if isinstance(decoded, bytes) else data
    return data


def _raw_payload(part: Message) -> bytes | None:
    """The payload bytes exactly as they were in the message (``None`` for containers).

    compat32's ``get_payload()`` *decodes* a payload holding raw 8-bit bytes with the
    declared charset (and ``decode=True`` applies its own, non-lenient base64), so the
    stored value is read instead: ASCII with the raw bytes as surrogate escapes.
    """
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str):
        payload = part.get_payload()
        if not isinstance(payload, str):
            return None
    try:
        return payload.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # a str payload set by code, not by the parser
        return payload.encode("utf-8", "replace")


def _header_token(value: str | None) -> str:
    """First token of a header value, comments and quotes removed, lower-case."""
    if not value:
        return ""
    tokens = _strip_comments(value).split(";", 1)[0].replace('"', " ").split()
    return tokens[0].lower() if tokens else ""


# -- addresses ------------------------------------------------------------------------------
_MAX_COMMENT_PARENS = 16
_MAX_ADDRESS = 320  # RFC 5321: 64 (local part) + 1 + 255 (domain)
_ANGLE_ADDR = re.compile(r"<\s*([^<>\s@]+@[^<>\s@]+)\s*>")
# Starts only at a token boundary: searching from every position would be quadratic.
_ADDR_CHARS = r"[^\s<>()\[\]\",;:@]"
_BARE_ADDR = re.compile(rf"(?<!{_ADDR_CHARS}){_ADDR_CHARS}+@{_ADDR_CHARS}+")
_MSGID = re.compile(r"<[^<>\s]+>")
_QUOTING = re.compile(r'\\(.)|"', re.DOTALL)


def _sender(headers: _Headers) -> tuple[str | None, str | None]:
    """(address, display name) from From, falling back to Sender, Reply-To, Return-Path."""
    for name in ("from", "sender", "reply-to", "return-path"):
        value = headers.first(name)
        if value is None:
            continue
        display, address = _mailbox(value)
        if address is not None:
            return address, display
    return None, None


def _mailbox(value: str) -> tuple[str | None, str | None]:
    """(decoded display name, lower-case address) of the first mailbox in a header.

    The address in angle brackets is the sender, whatever the display name looks like:
    ``support@example.com <x@y.example>`` is x@y.example (the stdlib's parseaddr takes the
    display name for the address there, and an automatic reply went to it).
    """
    if value.count("(") > _MAX_COMMENT_PARENS:
        value = _strip_comments(value)  # nested-comment bomb: see _strip_comments
    chunk = _first_mailbox_text(_strip_comments(value))
    angle = _angle_mailbox(chunk)
    if angle is not None:
        return angle
    bare = _BARE_ADDR.findall(chunk)
    if len(bare) > 1 and all(_plausible_address(a.lower()) for a in bare):
        # No angle brackets but several addresses ("support@example.com x@y.example"):
        # a display name comes first, so the address is the last one.
        return None, bare[-1].lower()
    try:
        name, address = email.utils.parseaddr(value)
    except RecursionError:
        value = _strip_comments(value)
        name, address = email.utils.parseaddr(value)
    address = address.strip().lower()
    if not _plausible_address(address):
        found = _ANGLE_ADDR.search(value) or _BARE_ADDR.search(value)
        address = found.group(found.lastindex or 0).lower() if found else ""
    if not _plausible_address(address):
        return None, None
    display = _HEADER_CONTROLS.sub("", decode_header_text(name)).replace("\t", " ").strip()
    return display or None, address


def _first_mailbox_text(value: str) -> str:
    """The text of the first mailbox of an address list (comments already removed): a
    group's name (``Team: a@x, b@y;``) is skipped, the list ends at the first comma or
    semicolon outside quotes and angle brackets, and a piece without any ``@`` (the
    unquoted ``Doe, John <j@d.example>``) is joined to the next one."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    angle = 0
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angle += 1
        elif ch == ">" and angle:
            angle -= 1
        elif not angle and ch == ":" and not pieces and "@" not in "".join(current):
            current = []  # a group's display name
            continue
        elif not angle and ch in ",;":
            pieces.append("".join(current))
            current = []
            if "@" in pieces[-1]:
                break
            continue
        current.append(ch)
    else:
        pieces.append("".join(current))
    first_with_address = next((i for i, p in enumerate(pieces) if "@" in p), None)
    if first_with_address is None:
        return pieces[0] if pieces else ""
    return ",".join(pieces[: first_with_address + 1])


def _angle_mailbox(chunk: str) -> tuple[str | None, str | None] | None:
    """``display-name <addr-spec>``: (decoded display name, address), or None when the
    text has no angle-addr outside quotes or its content is no plausible address. The
    angle-addr ends a mailbox, so of several (``A <a@x> <b@y>``) the last one counts."""
    quoted = escaped = False
    found: tuple[int, int] | None = None
    index = 0
    while index < len(chunk):
        ch = chunk[index]
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "<":
            end = chunk.find(">", index)
            if end < 0:
                break
            found, index = (index, end), end
        index += 1
    if found is None:
        return None
    start, end = found
    # An obsolete source route (<@relay:user@host>) is not part of the address.
    address = chunk[start + 1 : end].rpartition(":")[2].strip().lower()
    if not _plausible_address(address):
        return None
    return _display_name(chunk[:start]), address


def _display_name(text: str) -> str | None:
    # quoted-string quotes and their backslash escapes go; what they quote stays
    text = _QUOTING.sub(lambda m: m.group(1) or "", text).strip()
    display = _HEADER_CONTROLS.sub("", _decode_words(text)).replace("\t", " ").strip()
    return display or None


def _plausible_address(address: str) -> bool:
    local, _, domain = address.rpartition("@")
    return (
        bool(local)
        and bool(domain)
        and len(address) <= _MAX_ADDRESS
        and not any(ch.isspace() for ch in address)
    )


def _addresses(values: list[str]) -> tuple[str, ...]:
    # Comments carry no addresses; stripping them first keeps getaddresses non-recursive.
    try:
        pairs = email.utils.getaddresses([_strip_comments(v) for v in values])
    except Exception:
        return ()
    out: dict[str, None] = {}  # ordered set
    for _name, address in pairs:
        address = address.strip().lower()
        if _plausible_address(address):
            out[address] = None
    return tuple(out)


def _first_msgid(value: str | None) -> str | None:
    found = _MSGID.search(value or "")
    return found.group(0) if found else None


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except Exception:  # ValueError (garbage), OverflowError (year 99999999999), ...
        return None
    # "-0000" means "UTC, local zone unknown" (RFC 5322): naive from the stdlib.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# -- MIME structure -------------------------------------------------------------------------
_MAX_REPAIRS = 16
_BODY_TYPES = {"text/plain": "plain", "text/html": "html", "text/calendar": "calendar"}


@dataclass(slots=True)
class _Mime:
    bodies: list[tuple[str, Message]] = field(default_factory=list)
    attachments: list[Message] = field(default_factory=list)
    report: Message | None = None


def _walk_mime(msg: Message) -> _Mime:
    """Leaves in document order, iteratively (no recursion, whatever the nesting depth).

    ``message/*`` parts are leaves (an attached mail is an attachment, not our body); the
    signature of ``multipart/signed`` is skipped (it is not a user attachment and we never
    claim verification); a ``multipart/*`` whose boundary never matched is re-parsed with
    the boundary actually used, else kept as raw body text.
    """
    mime = _Mime()
    stack: list[Message] = [msg]
    repairs = 0
    while stack:
        part = stack.pop()
        ctype = _content_type(part)
        maintype = ctype.partition("/")[0]
        if maintype == "multipart":
            payload = part.get_payload()
            if isinstance(payload, list):
                children = [child for child in payload if isinstance(child, Message)]
                if ctype == "multipart/signed" and len(children) >= 2:
                    children = children[:1]  # RFC 1847: the second part is the signature
                if ctype == "multipart/report" and mime.report is None:
                    mime.report = part
                stack.extend(reversed(children))
                continue
            repaired = _repair_multipart(part, ctype) if repairs < _MAX_REPAIRS else None
            repairs += 1
            if repaired is not None:
                stack.append(repaired)
            else:
                mime.bodies.append(("broken", part))
            continue
        kind = _BODY_TYPES.get(ctype)
        if maintype != "message" and kind is not None and _is_body(part):
            mime.bodies.append((kind, part))
        else:
            mime.attachments.append(part)
    return mime


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type().lower()
    except Exception:
        return "application/octet-stream"


def _is_body(part: Message) -> bool:
    return _disposition(part) != "attachment" and _filename(part) is None


def _disposition(part: Message) -> str:
    return _header_token(_Headers(part).first("content-disposition"))


# RFC 2046 bchars: the candidate can be quoted safely in the rebuilt Content-Type.
_DELIMITER_LINE = re.compile(
    r"--([0-9A-Za-z'()+_,./:=?-][0-9A-Za-z'()+_,./:=? -]{0,69}?)(--)?[ \t]*"
)


def _repair_multipart(part: Message, ctype: str) -> Message | None:
    """Re-parse a multipart whose declared boundary never occurs, using the boundary the
    body really uses (mail gateways that rewrite one but not the other)."""
    data = _raw_payload(part)
    if data is None:
        return None
    seen: dict[str, int] = {}
    for line in data.decode("ascii", "surrogateescape").splitlines():
        found = _DELIMITER_LINE.fullmatch(line)
        if found:
            seen[found.group(1)] = seen.get(found.group(1), 0) + 1
    boundary = next((b for b, count in seen.items() if count >= 2), None)
    if boundary is None:
        return None
    head = f'Content-Type: {ctype}; boundary="{boundary}"\r\n\r\n'.encode("ascii", "replace")
    try:
        repaired = email.message_from_bytes(head + data, policy=compat32)
    except Exception:  # RecursionError from a nested bomb, encode errors...
        return None
    return repaired if isinstance(repaired.get_payload(), list) else None


# -- attachments ----------------------------------------------------------------------------
_EXTENSIONS = {
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/json": ".json",
    "application/msword": ".doc",
    "application/vnd.ms-excel": ".xls",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "application/ics": ".ics",
    "text/calendar": ".ics",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/csv": ".csv",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "audio/mpeg": ".mp3",
    "video/mp4": ".mp4",
    "message/rfc822": ".eml",
}
_MAX_FILENAME = 255
_PATH_SEPARATOR = re.compile(r"[/\\]")


def _attachment(part: Message, index: int) -> ParsedAttachment:
    ctype = _content_type(part)
    data = _message_bytes(part) if ctype.startswith("message/") else _payload_bytes(part)
    content_id = (_Headers(part).first("content-id") or "").strip() or None
    disposition = _disposition(part)
    return ParsedAttachment(
        filename=_filename(part) or f"attachment-{index}{_extension(ctype)}",
        content_type=ctype,
        data=data,
        inline=disposition == "inline" or (not disposition and content_id is not None),
        content_id=content_id,
    )


def _extension(ctype: str) -> str:
    if ctype in _EXTENSIONS:
        return _EXTENSIONS[ctype]
    # DSN parts (message/delivery-status, text/rfc822-headers) and other text are text.
    return ".txt" if ctype.startswith("text/") or ctype == "message/delivery-status" else ".bin"


def _filename(part: Message) -> str | None:
    """Safe filename from Content-Disposition filename, else Content-Type name.

    compat32 semantics on purpose: policy.default drops backslashes as quoted-pairs
    (``C:\\Users\\me\\evil.bat`` -> ``C:Usersmeevil.bat``) and cuts unquoted names at the
    first space. RFC 2231 (percent-encoding, continuations) is decoded by the stdlib, RFC
    2047 words (Outlook, Thunderbird) here; then control characters go and only the last
    path component stays.
    """
    # Re-read the parameters from the 8-bit-decoded headers: raw UTF-8 names survive.
    headers = _Headers(part)
    probe = Message(policy=compat32)
    for name in ("content-disposition", "content-type"):
        value = headers.first(name)
        if value is not None:
            probe[name] = value
    try:
        raw_name = probe.get_filename()
    except Exception:
        return None
    if raw_name is None:
        return None
    name = "".join(ch for ch in decode_header_text(str(raw_name)) if ch >= " " and ch != "\x7f")
    name = _PATH_SEPARATOR.split(name)[-1].strip()
    if name in ("", ".", ".."):
        return None
    if len(name) > _MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        ext = dot + ext if stem and len(ext) < 16 else ""
        name = name[: _MAX_FILENAME - len(ext)] + ext
    return name


def _message_bytes(part: Message) -> bytes:
    """Bytes of an encapsulated message (``message/rfc822`` is parsed into a sub-message
    by the stdlib; get_payload(decode=True) is None for it)."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        try:
            return payload[0].as_bytes(policy=compat32.clone(linesep="\r\n"))
        except Exception:  # RecursionError on deep nesting: fall back to nothing
            return b""
    return _payload_bytes(part)


# -- bodies ---------------------------------------------------------------------------------
def _bodies(bodies: list[tuple[str, Message]]) -> tuple[str, str | None]:
    """(full display text, sanitized HTML): text/plain wins; HTML is converted only when
    there is no non-empty plain text. The calendar alternative is neither."""
    plain: list[str] = []
    rendered: list[_Rendered] = []
    for kind, part in bodies:
        if kind == "plain":
            plain.append(_plain_text(part))
        elif kind == "broken":
            plain.append(_part_text(part))  # raw body of an unrepairable multipart
        elif kind == "html":
            rendered.append(_render_html(_part_text(part)))
    text = "\n\n".join(t.strip("\n") for t in plain if t.strip())
    if not text:
        text = "\n\n".join(r.text for r in rendered if r.text.strip())
    html = "\n".join(r.html for r in rendered) if rendered else None
    return text.strip(), html


def _part_text(part: Message) -> str:
    return _normalise_text(_decode_bytes(_payload_bytes(part), _param(part, "charset")))


def _plain_text(part: Message) -> str:
    text = _part_text(part)
    if (_param(part, "format") or "").lower() == "flowed":
        text = _unflow(text, (_param(part, "delsp") or "").lower() == "yes")
    return text


def _param(part: Message, name: str) -> str | None:
    try:
        value = part.get_param(name)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, tuple):  # RFC 2231 encoded parameter
        try:
            return email.utils.collapse_rfc2231_value(value)
        except Exception:
            return None
    return str(value)


def _unflow(text: str, delsp: bool) -> str:
    """Undo RFC 3676 format=flowed soft line breaks (Apple Mail, Thunderbird)."""
    paragraphs: list[tuple[int, list[str]]] = []
    continues = False
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:].removeprefix(" ")  # space-stuffing
        flowed = content.endswith(" ") and content != "-- "  # "-- " is the signature mark
        if flowed and delsp:
            content = content[:-1]
        if continues and paragraphs and paragraphs[-1][0] == depth:
            paragraphs[-1][1].append(content)
        else:
            paragraphs.append((depth, [content]))
        continues = flowed
    lines: list[str] = []
    for depth, pieces in paragraphs:
        content = "".join(pieces)
        prefix = ">" * depth + (" " if depth and content else "")
        lines.append(prefix + content)
    return "\n".join(lines)


# -- HTML -----------------------------------------------------------------------------------
# Measured worst cases, all quadratic: nh3 (html5ever + ammonia) in the nesting depth of
# block elements (100k nested divs: 17 s) and in the number of '&' or NBSP characters in one
# text node or attribute (400k: 6.6 s); CPython 3.11's html.parser on unterminated tags
# ('<a ' * 20k: 30 s). So hostile HTML is measured first (linear scans) and degrades to
# plain text, and html.parser only ever sees nh3's well-formed output.
_MAX_HTML_CHARS = 1024 * 1024
_MAX_HTML_DEPTH = 1000
_MAX_ESCAPES_PER_RUN = 10_000
_HTML_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)")
_MARKUP_START = re.compile(r"<[A-Za-z/!?]")
# Void elements and elements whose end tag is optional: they do not deepen the tree.
_NON_NESTING_TAGS = (
    "area base br col embed hr img input link meta param source track wbr "
    "p li dt dd tr td th tbody thead tfoot option colgroup rb rt rp"
)
_NON_NESTING = frozenset(_NON_NESTING_TAGS.split())
_DROP_WITH_CONTENT = frozenset(
    {"script", "style", "title", "noscript", "template", "iframe", "object", "svg", "math"}
)
_URL_SCHEMES = frozenset({"http", "https", "mailto", "tel", "cid"})


@dataclass(frozen=True, slots=True)
class _Rendered:
    html: str
    text: str


def _render_html(source: str) -> _Rendered:
    source = source[:_MAX_HTML_CHARS]  # truncating is safe: the parser closes open tags
    if _html_depth(source) > _MAX_HTML_DEPTH or _escapes_per_run(source) > _MAX_ESCAPES_PER_RUN:
        text = _crude_html_text(source)
        return _Rendered(f"<pre>{html_lib.escape(text)}</pre>", text)
    try:
        clean = _sanitize(source).strip()
    except Exception:  # nh3 should not fail on str input; never lose the message over it
        text = _crude_html_text(source)
        return _Rendered(f"<pre>{html_lib.escape(text)}</pre>", text)
    return _Rendered(clean, _html_to_text(clean))


def _html_depth(source: str) -> int:
    """Upper bound of the element nesting depth, in one linear regex pass."""
    depth = deepest = 0
    for tag in _HTML_TAG.finditer(source):
        if tag.group(2).lower() in _NON_NESTING:
            continue
        if tag.group(1):
            depth = max(0, depth - 1)
        else:
            depth += 1
            deepest = max(deepest, depth)
            if deepest > _MAX_HTML_DEPTH:
                break
    return deepest


def _escapes_per_run(source: str) -> int:
    """Most '&'/NBSP characters between two pieces of markup (what nh3 re-escapes)."""
    return max(
        (run.count("&") + run.count("\xa0") for run in _MARKUP_START.split(source)), default=0
    )


def _crude_html_text(source: str) -> str:
    # [^<>] keeps this linear on '<<<<' floods.
    text = html_lib.unescape(re.sub(r"<[^<>]*>", " ", source))
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


def _keep_attribute(tag: str, attribute: str, value: str) -> str | None:
    """nh3 attribute filter (must never raise: errors go to sys.unraisablehook)."""
    if "<" in value or ">" in value:
        return None  # markup inside attribute values is the raw material of mXSS
    if tag == "img" and attribute == "src" and not value.strip().lower().startswith("cid:"):
        return None  # remote images are tracking pixels: never load them automatically
    return value


_CLEANER = nh3.Cleaner(
    clean_content_tags=_DROP_WITH_CONTENT,
    attribute_filter=_keep_attribute,
    url_schemes=_URL_SCHEMES,
    link_rel="noopener noreferrer nofollow",
)


def _sanitize(source: str) -> str:
    """nh3 (ammonia) allow-list sanitizing: no script/style/iframe/form/svg/on*/
    javascript:/data:, comments (Outlook conditional comments) dropped."""
    return _CLEANER.clean(source)


_BLOCK_TAGS = (
    "p div br tr li table ul ol dl dt dd h1 h2 h3 h4 h5 h6 hr pre section article "
    "header footer address figure figcaption caption details summary center"
)


class _TextExtractor(HTMLParser):
    """Sanitized HTML to plain text; blockquote content is prefixed ``> `` so that quote
    stripping treats HTML replies (Gmail, Apple Mail) like plain-text ones."""

    _BLOCK = frozenset(_BLOCK_TAGS.split())
    _SKIP = frozenset({"script", "style", "head", "title", "noscript", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0
        self._quote = 0
        self._pre = 0

    def _newline(self) -> None:
        self.chunks.append("\n" + "> " * self._quote)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
            return
        if tag == "blockquote":
            self._quote += 1
            self._newline()
        elif tag == "pre":
            self._pre += 1
            self._newline()
        elif tag in self._BLOCK:
            self._newline()
            if tag == "li":
                self.chunks.append("- ")
        elif tag in ("td", "th"):
            self.chunks.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "hr"):
            self._newline()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "blockquote":
            self._quote = max(0, self._quote - 1)
            self._newline()
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
            self._newline()
        elif tag in self._BLOCK and tag != "br":
            self._newline()

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._pre:
            self.chunks.append(data.replace("\n", "\n" + "> " * self._quote))
        else:
            # HTML white space collapses; NBSP (&nbsp;) is not white space here.
            self.chunks.append(re.sub(r"[ \t\r\n\f]+", " ", data))


def _html_to_text(clean_html: str) -> str:
    extractor = _TextExtractor()
    try:
        extractor.feed(clean_html)
        extractor.close()
    except Exception:  # html.parser on nh3's output should not fail; degrade anyway
        return _crude_html_text(clean_html)
    lines = [line.strip() for line in "".join(extractor.chunks).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# -- quote stripping ------------------------------------------------------------------------
_QUOTED = re.compile(r"^\s*>")
_FORWARD_SUBJECT = re.compile(r"^\s*(?:fwd?|wg|tr|rv|enc|doorst|vl)\s*:", re.IGNORECASE)
_FORWARD_MARKER = re.compile(
    r"^\s*(?:-{3,}\s*(?:Forwarded message|Weitergeleitete Nachricht|Message transféré"
    r"|Mensaje reenviado|Messaggio inoltrato|Doorgestuurd bericht|Mensagem encaminhada)"
    r"\s*-{3,}|Begin forwarded message\s*:|Anfang der weitergeleiteten Nachricht\s*:"
    r"|Début du message réexpédié\s*:)",
    re.IGNORECASE,
)
_ORIGINAL_MESSAGE = re.compile(
    r"^\s*-{3,}\s*(?:Original Message|Ursprüngliche Nachricht|Message d'origine"
    r"|Mensaje original|Messaggio originale|Oorspronkelijk bericht|Originalmeddelande"
    r"|Oprindelig meddelelse|Opprinnelig melding|Mensagem original)\s*-{3,}\s*$",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"^\s*_{8,}\s*$")  # Outlook's line above a localized header block
_HEADER_FROM = re.compile(
    r"^\s*\*?(?:From|Von|De|Da|Van|Från|Fra|Od|От)\s*:\*?\s*\S", re.IGNORECASE
)
_HEADER_SENT = re.compile(
    r"^\s*\*?(?:Sent|Date|Gesendet|Datum|Envoyé|Enviado|Fecha|Inviato|Data|Verzonden"
    r"|Skickat|Sendt|Wysłano|Отправлено)\s*:",
    re.IGNORECASE,
)
_MAX_ATTRIBUTION = 500
_ATTRIBUTION_START = re.compile(r"^\s*(?:On|Am|Le|El|Op|Il|Em|Den|På)\s", re.IGNORECASE)
_ATTRIBUTION_END = re.compile(
    r"\b(?:wrote|schrieb|a écrit|escribió|schreef|ha scritto|escreveu|skrev|napisał)\b.*:\s*$",
    re.IGNORECASE,
)


def _strip_quotes(text: str, subject: str | None) -> str:
    """Display text without reply history.

    Cuts at the first attribution (Gmail ``On ... wrote:``, possibly wrapped over lines),
    Outlook ``-----Original Message-----`` or a (localized) From:/Sent: header block, and
    drops ``>`` lines. An inline forward is content, not history: nothing from a forward
    marker on is touched, and a ``Fwd:``/``WG:`` subject turns stripping off entirely.
    """
    if not text or _FORWARD_SUBJECT.match(subject or ""):
        return text
    lines = text.split("\n")
    forward_at = next((i for i, line in enumerate(lines) if _FORWARD_MARKER.match(line)), None)
    limit = len(lines) if forward_at is None else forward_at
    cut = _history_start(lines, limit)
    if cut is not None:
        kept = [line for line in lines[:cut] if not _QUOTED.match(line)]
    else:
        kept = [line for line in lines[:limit] if not _QUOTED.match(line)] + lines[limit:]
    stripped = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    return stripped or text  # all history (a bare "see below"): show it rather than nothing


def _history_start(lines: list[str], limit: int) -> int | None:
    for i in range(limit):
        line = lines[i]
        if _ORIGINAL_MESSAGE.match(line):
            return i
        if _SEPARATOR.match(line) and _next_nonblank_matches(lines, i + 1, _HEADER_FROM):
            return i
        if _HEADER_FROM.match(line) and any(_HEADER_SENT.match(x) for x in lines[i + 1 : i + 4]):
            return i
        if _ATTRIBUTION_START.match(line):
            end = next(
                (
                    j
                    for j in range(i, min(i + 3, limit))
                    # attributions are short; the bound also keeps the regex linear
                    if len(lines[j]) <= _MAX_ATTRIBUTION and _ATTRIBUTION_END.search(lines[j])
                ),
                None,
            )
            if end is not None and _next_nonblank_matches(lines, end + 1, _QUOTED, at_end=True):
                return i
    return None


def _next_nonblank_matches(
    lines: list[str], start: int, pattern: re.Pattern[str], *, at_end: bool = False
) -> bool:
    for index in range(start, len(lines)):  # no slice: this runs once per candidate line
        if lines[index].strip():
            return bool(pattern.match(lines[index]))
    return at_end


# -- delivery status notifications ----------------------------------------------------------
def _children(part: Message) -> list[Message]:
    payload = part.get_payload()
    return [c for c in payload if isinstance(c, Message)] if isinstance(payload, list) else []


def _is_delivery_report(report: Message) -> bool:
    return (_param(report, "report-type") or "").strip().lower() == "delivery-status" or any(
        _content_type(c) == "message/delivery-status" for c in _children(report)
    )


def _status_groups(part: Message) -> list[_Headers]:
    """The field groups of a message/delivery-status part (the feedparser already splits
    them into Message objects; a transfer-encoded one is split here)."""
    children = _children(part)
    if children:
        return [_Headers(child) for child in children]
    text = _part_text(part)
    parser = email.parser.HeaderParser(policy=compat32)
    return [_Headers(parser.parsestr(block)) for block in re.split(r"\n\s*\n", text)]


def _delivery_status(report: Message) -> tuple[dict[str, str] | None, str | None]:
    """(first per-recipient block as action/status/recipient, X-Original-Message-ID)."""
    original_id: str | None = None
    for child in _children(report):
        if _content_type(child) != "message/delivery-status":
            continue
        for group in _status_groups(child):
            original_id = original_id or _first_msgid(group.first("x-original-message-id"))
            action = _header_token(group.first("action"))
            if not action:
                continue
            status = _header_token(group.first("status"))
            recipient = group.first("final-recipient") or group.first("original-recipient") or ""
            address = _strip_comments(recipient).split(";", 1)[-1].strip().strip("<>").lower()
            return {"action": action, "status": status, "recipient": address}, original_id
    return None, original_id


def _bounce_details(report: Message, headers: _Headers) -> tuple[dict[str, str] | None, str | None]:
    """(DSN fields, Message-ID of our outbound) of a delivery report."""
    dsn, original_id = _delivery_status(report)
    return dsn, _returned_id(_children(report)) or original_id or _first_msgid(
        headers.first("in-reply-to")
    )


def _dsn_diagnostic(report: Message) -> str | None:
    """The first per-recipient Diagnostic-Code (``smtp; 550 5.1.1 ...``) as text."""
    for child in _children(report):
        if _content_type(child) != "message/delivery-status":
            continue
        for group in _status_groups(child):
            code = group.first("diagnostic-code")
            if code:
                return _one_line(code.split(";", 1)[-1]) or None
    return None


def _returned_id(parts: Iterable[Message]) -> str | None:
    """Message-ID of a returned original among ``parts`` (message/rfc822 or the original's
    headers as text/rfc822-headers): Message-ID of our outbound (the report's subject)."""
    for child in parts:
        ctype = _content_type(child)
        original: _Headers | None = None
        if ctype in ("message/rfc822", "message/rfc822-headers", "message/global"):
            inner = _children(child)
            if inner:
                original = _Headers(inner[0])
        if original is None and ctype in (
            "text/rfc822-headers",
            "message/rfc822-headers",
            "message/global-headers",
        ):
            text = _part_text(child)
            original = _Headers(email.parser.HeaderParser(policy=compat32).parsestr(text))
        if original is not None:
            found = _first_msgid(original.first("message-id"))
            if found:
                return found
    return None


# -- bounces without RFC 3464 structure -----------------------------------------------------
# qmail, Exchange's and Outlook.com's plain NDRs, Sendmail and old Postfix, Exim, Gmail's text
# form. Recognised only when an automated sender (mailer-daemon, postmaster, an Exchange
# system mailbox, or the null return path) sends a body written by delivery software: a
# customer writing "Undeliverable: my parcel" is never a bounce.
_BOUNCE_LOCALPART = re.compile(
    r"(?:mailer-daemon|mailer_daemon|mailerdaemon|mail-daemon|postmaster"
    r"|microsoftexchange[0-9a-f]{32})(?:[-+_.].*)?",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver(?:able|ed)|delivery status notification|delivery (?:failure|failed|has failed)"
    r"|mail delivery (?:failed|failure|problem)|returned mail|failure notice|non[- ]?delivery"
    r"|message not delivered|delayed mail|unzustellbar|nicht zustellbar|non remis"
    r"|no se puede entregar|onbestelbaar|kan niet worden bezorgd",
    re.IGNORECASE,
)
_BOUNCE_TEXT = re.compile(
    r"this is the qmail-send program|i'm afraid i wasn't able to deliver your message"
    r"|delivery has failed to these recipients or groups"
    r"|your message (?:to \S+ )?(?:couldn't|could not|wasn't|was not) (?:be )?delivered"
    r"|delivery to the following recipients? failed|address not found\b"
    r"|this is the mail system at host|your message could not be delivered"
    r"|message could not\s+be delivered to one or more recipients"
    r"|could not be delivered to one or more of its\s+recipients"
    r"|the following addresses had permanent fatal errors|transcript of session follows"
    r"|this message was created automatically by mail delivery software"
    r"|diagnostic information for administrators|remote server returned"
    r"|the original message was received at|delivery is delayed to these recipients or groups"
    r"|message (?:has not yet been|hasn't been) delivered",
    re.IGNORECASE,
)
_DELAY_TEXT = re.compile(
    r"\(delay\)|is delayed|has not yet been delivered|hasn't been delivered yet"
    r"|will (?:continue|keep) (?:trying|retrying|to try)|still (?:being )?retr"
    r"|this is a warning only|warning: message .{0,200}delayed|delayed mail",
    re.IGNORECASE,
)
# Where a returned copy of the original begins: what follows is not the bounce's own text.
_RETURNED_COPY = re.compile(
    r"^[ \t>]*(?:-{2,}[ \t]*)?(?:below this line is a copy of the message"
    r"|(?:this is a )?copy of the message|original message(?: follows| headers)?\b"
    r"|unsent message (?:below|follows)|returned message|message headers follow"
    r"|the original message headers)",
    re.IGNORECASE | re.MULTILINE,
)
_QUOTED_MESSAGE_ID = re.compile(r"^[ \t>]*message-id[ \t]*:[ \t]*(<[^<>\s]+>)", re.I | re.M)
_ENHANCED_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.]*\d)")
_SMTP_REPLY = re.compile(r"(?<![\d.])[45]\d\d(?:[ -]|$)")
_FAILED_LINE = re.compile(r"^[ \t]*<([^<>\s@]+@[^<>\s@]+)>[ \t]*:", re.MULTILINE)


def _is_text_bounce(
    headers: _Headers, sender: str, subject: str | None, text: str, mime: _Mime
) -> bool:
    return_path = (headers.first("return-path") or "").strip()
    automated = (
        _BOUNCE_LOCALPART.fullmatch(sender.rpartition("@")[0]) is not None
        or re.fullmatch(r"<\s*>", return_path) is not None
    )
    if not automated:
        return False
    explanation = _explanation(text)
    if _BOUNCE_TEXT.search(explanation):
        return True
    returned = _returned_id(mime.attachments) or _QUOTED_MESSAGE_ID.search(text)
    return bool(_BOUNCE_SUBJECT.search(subject or "")) and bool(returned)


def _explanation(text: str) -> str:
    """The bounce's own words: its text up to a returned copy of the original."""
    found = _RETURNED_COPY.search(text)
    return text[: found.start()] if found else text


def _text_bounce_details(
    headers: _Headers, sender: str, subject: str | None, text: str, mime: _Mime
) -> tuple[dict[str, str], str | None, str | None]:
    """(action/status/recipient like a DSN's, Message-ID of our outbound, diagnostic)."""
    explanation = _explanation(text)
    status_match = _ENHANCED_STATUS.search(explanation)
    status = status_match.group(1) if status_match else ""
    delayed = bool(_DELAY_TEXT.search(f"{subject or ''}\n{explanation}")) and not status.startswith(
        "5."
    )
    diagnostic = _diagnostic_line(explanation)
    recipient = _failed_recipient(headers, sender, explanation)
    returned = _returned_id(mime.attachments)
    quoted = _QUOTED_MESSAGE_ID.search(text)
    bounce_of = (
        returned
        or (quoted.group(1) if quoted else None)
        or _first_msgid(headers.first("in-reply-to"))
    )
    dsn = {"action": "delayed" if delayed else "failed", "status": status, "recipient": recipient}
    return dsn, bounce_of, diagnostic


def _diagnostic_line(explanation: str) -> str | None:
    """The first line naming an SMTP reply or enhanced status code, with the indented
    lines that continue it (Postfix folds the remote server's answer)."""
    lines = explanation.split("\n")
    for index, line in enumerate(lines):
        if _ENHANCED_STATUS.search(line) or _SMTP_REPLY.search(line.strip()):
            parts = [line]
            for following in lines[index + 1 : index + 6]:
                if not following[:1].isspace() or not following.strip():
                    break
                parts.append(following)
            return _one_line(" ".join(parts)) or None
    return None


def _failed_recipient(headers: _Headers, sender: str, explanation: str) -> str:
    """X-Failed-Recipients (Exim, Gmail), else a ``<address>:`` line (qmail, Postfix),
    else the first address in the bounce's own words that is neither the bounce's sender,
    a recipient of the bounce, nor a postmaster."""
    failed = _addresses(headers.all("x-failed-recipients"))
    if failed:
        return failed[0]
    line = _FAILED_LINE.search(explanation)
    if line and _plausible_address(line.group(1).lower()):
        return line.group(1).lower()
    ours = {sender, *_addresses(headers.all("to")), *_addresses(headers.all("cc"))}
    for candidate in _BARE_ADDR.findall(explanation.replace("<", " ").replace(">", " ")):
        address = candidate.strip(".,;:'\"()[]").lower()
        if (
            _plausible_address(address)
            and address not in ours
            and not _BOUNCE_LOCALPART.fullmatch(address.rpartition("@")[0])
        ):
            return address
    return ""


def _bounce_refs(bounce_of: str | None, text: str, headers: _Headers) -> tuple[str, ...]:
    """Every Message-ID a bounce names, the likeliest first: the returned original's, the
    Message-ID lines quoted in its text, In-Reply-To, References."""
    found: dict[str, None] = {}
    for candidate in (
        bounce_of,
        *(m.group(1) for m in _QUOTED_MESSAGE_ID.finditer(text)),
        _first_msgid(headers.first("in-reply-to")),
        *reversed(_MSGID.findall(" ".join(headers.all("references")))),
    ):
        if candidate:
            found[candidate] = None
    return tuple(found)


def _one_line(value: str) -> str:
    return " ".join(value.split()).strip(" '\"")[:300]


# -- authentication results -----------------------------------------------------------------
_AUTH_CLAUSE = re.compile(r"\s*(dkim|spf|dmarc)\s*=\s*([A-Za-z]+)(.*)", re.IGNORECASE | re.DOTALL)
_HEADER_D = re.compile(r"header\.d\s*=\s*([^\s;]+)", re.IGNORECASE)


def _authentication(values: list[str], trusted: frozenset[str]) -> dict[str, Any] | None:
    """RFC 8601: only results from our own authserv-id count, and the topmost one (added by
    our MX, above anything the sender could have inserted) wins."""
    results = [r for r in (_auth_result(v) for v in values) if r is not None]
    if not results:
        return None
    chosen = next((r for r in results if r["authserv_id"] in trusted), None)
    return {**(chosen or results[0]), "trusted": chosen is not None}


def _auth_result(value: str) -> dict[str, Any] | None:
    # Comments first: "(2048-bit key; unprotected)" contains the clause separator.
    authserv, _, rest = _strip_comments(value).partition(";")
    tokens = authserv.split()
    if not tokens:
        return None
    result: dict[str, Any] = {"authserv_id": tokens[0].lower()}
    for clause in rest.split(";"):
        found = _AUTH_CLAUSE.match(clause)
        if not found:
            continue
        method = found.group(1).lower()
        if method == "spf" or method in result:  # first verdict per method
            continue
        result[method] = found.group(2).lower()
        domain = _HEADER_D.search(found.group(3)) if method == "dkim" else None
        if domain and domain.group(1).lower() != "none":
            result["dkim_domain"] = domain.group(1).lower()
    return result


# -- classification -------------------------------------------------------------------------
_AUTOMATED_LOCALPART = re.compile(
    r"(?:mailer-daemon|postmaster|no[-_.]?reply|do[-_.]?not[-_.]?reply)(?:[-+_.].*)?",
    re.IGNORECASE,
)
_AUTOMATIC_REPLY_SUBJECT = re.compile(
    r"^\s*(?:Automatic reply|Automatische Antwort|Réponse automatique|Respuesta automática"
    r"|Risposta automatica|Automatisch antwoord|Autosvar|Automatyczna odpowiedź)\s*:",
    re.IGNORECASE,
)


def _classify(
    headers: _Headers,
    sender: str,
    subject: str | None,
    report: Message | None,
    is_bounce: bool,
) -> str:
    """bounce > auto_reply > bulk > message; anything but message means no_auto_reply."""
    if is_bounce:
        return "bounce"
    auto_submitted = _header_token(headers.first("auto-submitted"))
    precedence = _header_token(headers.first("precedence"))
    x_autoreply = _header_token(headers.first("x-autoreply") or headers.first("x-autorespond"))
    # Outlook sets X-Auto-Response-Suppress on some human mail too: only together with its
    # OOF subject prefix or the inbox-rules loop marker is it an automatic reply.
    exchange_oof = headers.first("x-auto-response-suppress") is not None and (
        bool(_AUTOMATIC_REPLY_SUBJECT.match(subject or ""))
        or headers.first("x-ms-exchange-inbox-rules-loop") is not None
    )
    if (
        auto_submitted == "auto-replied"
        or precedence == "auto_reply"
        or x_autoreply not in ("", "no", "false", "0")
        or exchange_oof
    ):
        return "auto_reply"
    if report is not None and (_param(report, "report-type") or "").lower() == (
        "disposition-notification"
    ):
        return "auto_reply"  # RFC 8098 read receipt
    return_path = headers.first("return-path")
    bulk = (
        auto_submitted not in ("", "no")  # RFC 3834: "no" is explicitly human
        or precedence in ("bulk", "junk", "list")
        or headers.first("list-id") is not None
        or headers.first("list-unsubscribe") is not None
        or (return_path is not None and re.fullmatch(r"<\s*>", return_path.strip()) is not None)
        or _AUTOMATED_LOCALPART.fullmatch(sender.rpartition("@")[0]) is not None
        or report is not None
    )
    return "bulk" if bulk else "message"
