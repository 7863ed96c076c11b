"""A local fake of the Twilio REST API (2010-04-01) that the official ``twilio`` package can talk to.

Three parts:

* ``HttpxTwilioClient`` / ``LocalTwilioHttpClient``: HTTP clients for ``twilio.rest.Client``.
  ``HttpxTwilioClient`` has no test dependencies and may be moved into production code as is.
* ``FakeTwilio``: an ASGI app (Starlette) with an in-memory model of Messages, Calls,
  Conferences, Conference Participants and Recording media, plus fault injection.
* ``FakeTwilioServer``: serves a ``FakeTwilio`` with uvicorn in a daemon thread on a free port.

Usage::

    with FakeTwilioServer() as server:
        fake = server.fake
        http = HttpxTwilioClient(rewrite_base=server.url, timeout=5)
        client = Client(fake.account_sid, fake.auth_token, http_client=http)
        msg = await client.messages.create_async(to="+15551230001", from_="+15550000000", body="hi")
        assert fake.messages[0]["form"]["Body"] == "hi"
        await http.close()

The fake never calls webhooks (no status callbacks, no TwiML fetches): tests post those
themselves, signing them with ``twilio.request_validator.RequestValidator`` if needed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import io
import re
import threading
import time
import wave
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Self, cast
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response as TwilioResponse

from tests.fakes.server import ThreadedASGIServer

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "FakeTwilio",
    "FakeTwilioServer",
    "HttpxTwilioClient",
    "LocalTwilioHttpClient",
    "RecordedRequest",
    "rewrite_base_url",
    "tiny_wav",
]

# =========================================================================================
# HTTP clients for twilio.rest.Client (HttpxTwilioClient is production-grade: no test imports)
# =========================================================================================

# HttpxTwilioClient and rewrite_base_url live in production code (channels/twilio_http.py);
# re-exported here for the tests that used them from this module.
from channels.twilio_http import HttpxTwilioClient, rewrite_base_url


class LocalTwilioHttpClient(TwilioHttpClient):
    """Synchronous twilio HTTP client (requests) that sends every request to ``base_url``.

    ``Client(sid, token, http_client=LocalTwilioHttpClient(server.url, timeout=5))``. It
    ignores proxy environment variables. ``last_response`` as in ``HttpxTwilioClient``.
    """

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url
        if self.session is not None:
            self.session.trust_env = False
        self.last_response: TwilioResponse | None = None

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        result = super().request(
            method,
            rewrite_base_url(url, self.base_url),
            params=params,
            data=data,
            headers=headers,
            auth=auth,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )
        self.last_response = result
        return result


# =========================================================================================
# The fake
# =========================================================================================

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_AUTH_TOKEN = "feedface" * 4
API_VERSION = "2010-04-01"
RESOURCES = frozenset({"Messages", "Calls", "Conferences", "Participants", "Recordings"})

_ACCOUNT_SID_RE = re.compile(r"^AC[0-9a-f]{32}$")
_E164_RE = re.compile(r"^\+[1-9]\d{1,14}$")
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_CALL_TERMINAL = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
_PARTICIPANT_ACTIVE = frozenset({"queued", "connecting", "ringing", "connected"})
_PARTICIPANT_STATUSES = _PARTICIPANT_ACTIVE | {"complete", "failed"}
_CALL_STATUSES = _CALL_TERMINAL | {"queued", "ringing", "in-progress"}
_PRIVATE_KEYS = frozenset({"form", "form_lists", "twiml", "url", "updates", "data", "content_type"})
_DEFAULT_FAULTS: dict[int, tuple[int, str]] = {
    400: (20001, "Bad Request"),
    404: (20404, "Not Found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    502: (20502, "Bad Gateway"),
    503: (20503, "Service Unavailable"),
    504: (20504, "Gateway Timeout"),
}

# GSM 03.38: basic set (1 septet) and extension set (2 septets, via escape).
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXT = frozenset("\f^{}\\[~]|€")


def num_segments(body: str) -> int:
    """SMS segments of ``body``: GSM-7 160/153 septets, else UCS-2 70/67 code units."""
    if not body:
        return 1
    if all(c in _GSM7_BASIC or c in _GSM7_EXT for c in body):
        units = sum(2 if c in _GSM7_EXT else 1 for c in body)
        single, multi = 160, 153
    else:
        units = len(body.encode("utf-16-le")) // 2
        single, multi = 70, 67
    return 1 if units <= single else -(-units // multi)


def tiny_wav(duration_ms: int = 100, rate: int = 8000) -> bytes:
    """A deterministic mono 16-bit PCM WAV of silence."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * (rate * duration_ms // 1000))
    return buf.getvalue()


def _wav_seconds(data: bytes) -> int | None:
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            return round(w.getnframes() / w.getframerate())
    except (wave.Error, EOFError, ZeroDivisionError):
        return None


def _rfc2822(moment: datetime) -> str:
    """Twilio's date format: ``Wed, 25 Nov 2026 10:00:00 +0000``."""
    return email.utils.format_datetime(moment.astimezone(UTC).replace(microsecond=0))


def _parse_rfc2822(value: str | None) -> datetime | None:
    return email.utils.parsedate_to_datetime(value) if value else None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _bool(value: str | None, default: bool) -> bool:
    """Twilio booleans: ``true`` is true; any other given value is false."""
    if value is None or value == "":
        return default
    return value.strip().lower() == "true"


def _bare_address(address: str) -> str:
    for prefix in ("whatsapp:", "client:", "sip:"):
        if address.startswith(prefix):
            return address[len(prefix) :]
    return address


def _valid_message_address(address: str) -> bool:
    if address.startswith("whatsapp:"):
        address = address[len("whatsapp:") :]
    return bool(_E164_RE.match(address))


def _valid_voice_address(address: str) -> bool:
    if address.startswith(("client:", "sip:")):
        return len(address.split(":", 1)[1]) > 0
    return bool(_E164_RE.match(address))


def _date_filter(value: str, op: str, actual: datetime | None) -> bool:
    """Twilio's ``DateX``/``DateX<``/``DateX>`` filters (inclusive; ``=`` compares the date)."""
    if actual is None:
        return False
    value = value.strip()
    if len(value) == 10:
        wanted_date = date.fromisoformat(value)
        got = actual.astimezone(UTC).date()
        return (
            got == wanted_date
            if op == "="
            else got <= wanted_date
            if op == "<"
            else got >= wanted_date
        )
    wanted = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if wanted.tzinfo is None:
        wanted = wanted.replace(tzinfo=UTC)
    if op == "=":
        return actual.astimezone(UTC).date() == wanted.astimezone(UTC).date()
    return actual <= wanted if op == "<" else actual >= wanted


def twilio_error(
    status: int,
    code: int | None,
    message: str,
    *,
    more_info: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Twilio's legacy JSON error object, as the twilio package parses it."""
    if more_info is None and code is not None:
        more_info = f"https://www.twilio.com/docs/errors/{code}"
    body = {"code": code, "message": message, "more_info": more_info, "status": status}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _public(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in _PRIVATE_KEYS}


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the fake received. ``headers`` keys are lower-case."""

    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    form_lists: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    username: str | None


@dataclass
class _Fault:
    resource: str | None
    status: int | None
    code: int | None
    message: str
    retry_after: int | None = None
    more_info: str | None = None
    hang_seconds: float = 0.0
    method: str | None = None  # only requests with this method (GET: lists and fetches)
    until: threading.Event | None = None  # a hang ends early when this is set


@dataclass
class _Ctx:
    method: str
    path: str
    params: dict[str, str]
    query: ImmutableMultiDict[str, str]
    form: ImmutableMultiDict[str, str]
    form_first: dict[str, str] = field(default_factory=dict)
    form_lists: dict[str, list[str]] = field(default_factory=dict)


_Handler = Callable[[_Ctx], Response]


class FakeTwilio:
    """In-memory Twilio REST API (ASGI app). State is guarded by a lock (``self.lock``).

    Recorded state (lists of dicts; each dict is the resource's JSON as served, plus the
    private keys ``form`` (first value per field) and ``form_lists`` (all values) of the
    creating request; they are live records, mutate them only through the helpers):

    * ``messages``: every message created through the API.
    * ``calls``: every Call resource: created through the Calls API, and also the outbound
      call behind each participant created through the Participants API and the simulated
      callers of ``add_participant``. Extra private keys ``url``, ``twiml`` (current
      instructions) and ``updates`` (forms of every update POST).
    * ``conferences``: every conference (``ensure_conference`` or implicit).
    * ``participants``: every participant ever, also ones that left (status ``complete``);
      extra private key ``updates``.
    * ``recordings``: recording sid -> metadata dict plus private ``data``/``content_type``.
    * ``requests``: every HTTP request received, as ``RecordedRequest``.
    * ``opted_out``: addresses that answer error 21610 to a message.
    * ``api_keys``: extra Basic-auth credentials ``{"SK...": secret}``.
    """

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not _ACCOUNT_SID_RE.match(account_sid):
            raise ValueError(f"account_sid must be 'AC' + 32 lower-case hex: {account_sid!r}")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.api_keys: dict[str, str] = {}
        self.opted_out: set[str] = set()
        self.media_requires_auth = True
        self.messages: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.conferences: list[dict[str, Any]] = []
        self.participants: list[dict[str, Any]] = []
        self.recordings: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordedRequest] = []
        self.lock = threading.RLock()
        self._clock = clock or _utcnow
        self._faults: list[_Fault] = []
        self._counters: dict[str, int] = {}
        self._abort_hangs = threading.Event()
        self.app = Starlette(routes=self._routes())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # ---- test controls -------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        retry_after: int | None = None,
        *,
        resource: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``n`` authenticated requests (to ``resource``, e.g. "Messages",
        or to any resource; with ``method``, e.g. "GET", only those) with ``status`` and
        Twilio's error object for it (429: code 20429 and, if ``retry_after`` is given, a
        ``Retry-After`` header). ``method="GET"`` on Messages: Twilio cannot list messages
        while creating them still works."""
        code, message = _DEFAULT_FAULTS.get(status, (status, "Error"))
        self._add_faults(n, resource, status, code, message, retry_after=retry_after, method=method)

    def fail_next_with(
        self,
        code: int,
        status: int,
        message: str,
        n: int = 1,
        *,
        resource: str | None = None,
        more_info: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``n`` requests with this Twilio error object."""
        self._add_faults(
            n, resource, status, code, message, retry_after=retry_after, more_info=more_info
        )

    def hang_next(
        self,
        n: int,
        seconds: float,
        *,
        resource: str | None = None,
        method: str | None = None,
        until: threading.Event | None = None,
    ) -> None:
        """Delay the next ``n`` requests (with ``method``, only those) by ``seconds``, or
        until ``until`` is set if that comes first, then answer them normally.

        Like a slow Twilio, the request still takes effect after the delay even if the
        client has given up (a create then exists: the outcome was ambiguous to the client).
        With ``until`` a test decides when a create that hangs lands. Stopping the
        ``FakeTwilioServer`` cuts pending delays short.
        """
        self._add_faults(
            n, resource, None, None, "", hang_seconds=seconds, method=method, until=until
        )

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self.lock:
            return len(self._faults)

    def add_api_key(self, key_sid: str, secret: str) -> None:
        """Accept ``key_sid:secret`` as Basic-auth credentials too (Twilio API keys)."""
        with self.lock:
            self.api_keys[key_sid] = secret

    def reset(self) -> None:
        """Forget all resources, requests, faults and opt-outs."""
        with self.lock:
            for collection in (self.messages, self.calls, self.conferences, self.participants):
                collection.clear()
            self.recordings.clear()
            self.requests.clear()
            self._faults.clear()
            self.opted_out.clear()

    def abort_hangs(self) -> None:
        """End all pending ``hang_next`` delays now (``FakeTwilioServer.stop`` calls it)."""
        self._abort_hangs.set()

    def ensure_conference(self, friendly_name: str) -> dict[str, Any]:
        """The in-progress conference named ``friendly_name``, created if there is none.

        Simulates the moment TwiML ``<Dial><Conference>friendly_name</Conference></Dial>``
        put a caller into the conference.
        """
        with self.lock:
            found = self._active_conference(friendly_name)
            if found is not None:
                if found["status"] == "init":
                    self._touch(found, status="in-progress")
                return found
            return self._new_conference(friendly_name, "in-progress")

    def get_conference(self, sid_or_name: str) -> dict[str, Any] | None:
        with self.lock:
            return self._resolve_conference(sid_or_name)

    def end_conference(self, sid_or_name: str) -> dict[str, Any]:
        with self.lock:
            conference = self._resolve_conference(sid_or_name)
            if conference is None:
                raise KeyError(sid_or_name)
            self._end_conference(conference, "conference-ended-via-api")
            return conference

    def add_participant(
        self,
        conference: str,
        *,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        label: str | None = None,
        status: str = "connected",
        muted: bool = False,
    ) -> dict[str, Any]:
        """Simulate a caller who joined ``conference`` (sid or name) through TwiML."""
        with self.lock:
            conf = self._resolve_conference(conference)
            if conf is None:
                conf = self._new_conference(conference, "in-progress")
            call = self._new_call(to, from_, {}, {}, direction="inbound", status="queued")
            part = self._new_participant(conf, call, {}, {}, label=label, muted=muted)
            self._set_participant_status(part, status)
            return part

    def set_participant_status(
        self, conference: str, participant: str, status: str
    ) -> dict[str, Any]:
        """Move a participant (by call sid or label) to ``status`` (queued, connecting,
        ringing, connected, complete, failed); its call and conference follow."""
        if status not in _PARTICIPANT_STATUSES:
            raise ValueError(status)
        with self.lock:
            conf = self._resolve_conference(conference)
            part = self._find_participant(conf, participant) if conf else None
            if part is None:
                raise KeyError(participant)
            self._set_participant_status(part, status)
            return part

    def set_call_status(self, sid: str, status: str) -> dict[str, Any]:
        if status not in _CALL_STATUSES:
            raise ValueError(status)
        with self.lock:
            call = self._find(self.calls, sid)
            if call is None:
                raise KeyError(sid)
            self._set_call_status(call, status)
            return call

    def set_message_status(
        self,
        sid: str,
        status: str,
        *,
        error_code: int | None = None,
        error_message: str | None = None,
    ) -> dict[str, Any]:
        """Change a message's status; ``sent``/``delivered``/``undelivered`` set ``date_sent``."""
        with self.lock:
            message = self._find(self.messages, sid)
            if message is None:
                raise KeyError(sid)
            changes: dict[str, Any] = {"status": status}
            if error_code is not None:
                changes["error_code"] = error_code
                changes["error_message"] = error_message
            if status in ("sent", "delivered", "undelivered", "read") and not message["date_sent"]:
                changes["date_sent"] = self._now()
            self._touch(message, **changes)
            return message

    def add_recording(
        self,
        sid: str,
        data: bytes | None = None,
        content_type: str = "audio/wav",
        *,
        call_sid: str | None = None,
        conference_sid: str | None = None,
    ) -> dict[str, Any]:
        """Serve ``data`` (default: ``tiny_wav()``) at ``/Recordings/{sid}`` (and .wav/.mp3);
        metadata at ``/Recordings/{sid}.json``."""
        payload = tiny_wav() if data is None else data
        seconds = _wav_seconds(payload)
        with self.lock:
            now = self._now()
            uri = f"{self._base()}/Recordings/{sid}.json"
            record: dict[str, Any] = {
                "account_sid": self.account_sid,
                "api_version": API_VERSION,
                "call_sid": call_sid,
                "conference_sid": conference_sid,
                "channels": 1,
                "date_created": now,
                "date_updated": now,
                "duration": str(seconds if seconds is not None else 0),
                "encryption_details": None,
                "error_code": None,
                "media_url": f"https://api.twilio.com{self._base()}/Recordings/{sid}",
                "price": None,
                "price_unit": "USD",
                "sid": sid,
                "source": "Conference" if conference_sid else "OutboundAPI",
                "start_time": now,
                "status": "completed",
                "subresource_uris": {
                    "transcriptions": f"{self._base()}/Recordings/{sid}/Transcriptions.json"
                },
                "uri": uri,
                "data": payload,
                "content_type": content_type,
            }
            self.recordings[sid] = record
            return record

    # ---- plumbing ------------------------------------------------------------------------

    def _add_faults(
        self,
        n: int,
        resource: str | None,
        status: int | None,
        code: int | None,
        message: str,
        *,
        retry_after: int | None = None,
        more_info: str | None = None,
        hang_seconds: float = 0.0,
        method: str | None = None,
        until: threading.Event | None = None,
    ) -> None:
        if resource is not None and resource not in RESOURCES:
            raise ValueError(f"resource must be one of {sorted(RESOURCES)}: {resource!r}")
        if n < 0:
            raise ValueError(n)
        fault = _Fault(
            resource,
            status,
            code,
            message,
            retry_after,
            more_info,
            hang_seconds,
            method.upper() if method else None,
            until,
        )
        with self.lock:
            self._faults.extend(_Fault(**vars(fault)) for _ in range(n))

    def _take_fault(self, resource: str, method: str) -> _Fault | None:
        with self.lock:
            for i, fault in enumerate(self._faults):
                if fault.resource not in (None, resource) or fault.method not in (None, method):
                    continue
                return self._faults.pop(i)
        return None

    async def _hang(self, seconds: float, until: threading.Event | None = None) -> None:
        deadline = time.monotonic() + seconds
        while not self._abort_hangs.is_set() and not (until is not None and until.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.05))

    def _now(self) -> str:
        return _rfc2822(self._clock())

    def _base(self) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}"

    def _sid(self, prefix: str) -> str:
        """Deterministic: the n-th SID of a prefix is the same in every run."""
        n = self._counters[prefix] = self._counters.get(prefix, 0) + 1
        digest = hashlib.sha256(f"{self.account_sid}/{prefix}/{n}".encode())
        return prefix + digest.hexdigest()[:32]

    def _touch(self, record: dict[str, Any], **changes: Any) -> None:
        record.update(changes)
        record["date_updated"] = self._now()

    @staticmethod
    def _find(records: Iterable[dict[str, Any]], sid: str) -> dict[str, Any] | None:
        for record in records:
            if record["sid"] == sid:
                return record
        return None

    def _authorized(self, header: str | None) -> tuple[bool, str | None]:
        if not header or not header.lower().startswith("basic "):
            return False, None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        user, sep, password = decoded.partition(":")
        if not sep:
            return False, user
        if user == self.account_sid and password == self.auth_token:
            return True, user
        return self.api_keys.get(user) == password and user in self.api_keys, user

    def _routes(self) -> list[Route]:
        p = "/2010-04-01/Accounts/{account_sid}"
        table: list[tuple[str, str | None, dict[str, _Handler]]] = [
            (
                p + "/Messages.json",
                "Messages",
                {"GET": self._list_messages, "POST": self._create_message},
            ),
            (p + "/Messages/{sid}.json", "Messages", {"GET": self._fetch_message}),
            (p + "/Calls.json", "Calls", {"GET": self._list_calls, "POST": self._create_call}),
            (
                p + "/Calls/{sid}.json",
                "Calls",
                {"GET": self._fetch_call, "POST": self._update_call},
            ),
            (p + "/Conferences.json", "Conferences", {"GET": self._list_conferences}),
            (
                p + "/Conferences/{sid}.json",
                "Conferences",
                {"GET": self._fetch_conference, "POST": self._update_conference},
            ),
            (
                p + "/Conferences/{conference}/Participants.json",
                "Participants",
                {"GET": self._list_participants, "POST": self._create_participant},
            ),
            (
                p + "/Conferences/{conference}/Participants/{participant}.json",
                "Participants",
                {
                    "GET": self._fetch_participant,
                    "POST": self._update_participant,
                    "DELETE": self._delete_participant,
                },
            ),
            (p + "/Recordings/{name}", "Recordings", {"GET": self._fetch_recording}),
            ("/{path:path}", None, {}),
        ]
        # Every method reaches the endpoint, which answers Twilio's 405 JSON itself
        # (Starlette would default a function endpoint to GET only).
        return [
            Route(path, self._endpoint(res, handlers), methods=_ALL_METHODS)
            for path, res, handlers in table
        ]

    def _endpoint(
        self, resource: str | None, handlers: dict[str, _Handler]
    ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            response = await self._handle(request, resource, handlers)
            with self.lock:
                response.headers["Twilio-Request-Id"] = self._sid("RQ")
            return response

        return endpoint

    async def _handle(
        self, request: Request, resource: str | None, handlers: dict[str, _Handler]
    ) -> Response:
        raw = await request.body()
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        pairs: list[tuple[str, str]] = []
        if content_type == "application/x-www-form-urlencoded":
            pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        form_first: dict[str, str] = {}
        form_lists: dict[str, list[str]] = {}
        for key, value in pairs:
            form_first.setdefault(key, value)
            form_lists.setdefault(key, []).append(value)
        ok, username = self._authorized(request.headers.get("authorization"))
        with self.lock:
            self.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.url.path,
                    query=dict(request.query_params),
                    form=form_first,
                    form_lists=form_lists,
                    headers=dict(request.headers),
                    body=raw,
                    username=username,
                )
            )
        public_media = resource == "Recordings" and not self.media_requires_auth
        account = request.path_params.get("account_sid")
        if not public_media and (not ok or (account is not None and account != self.account_sid)):
            return twilio_error(
                401, 20003, "Authenticate", headers={"WWW-Authenticate": 'Basic realm="Twilio API"'}
            )
        if resource is None:
            return self._not_found(request.url.path)
        fault = self._take_fault(resource, request.method)
        if fault is not None:
            if fault.hang_seconds > 0:
                await self._hang(fault.hang_seconds, fault.until)
            if fault.status is not None:
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                return twilio_error(
                    fault.status,
                    fault.code,
                    fault.message,
                    more_info=fault.more_info,
                    headers=headers,
                )
        handler = handlers.get(request.method)
        if handler is None:
            return twilio_error(405, 20004, "Method not allowed")
        ctx = _Ctx(
            method=request.method,
            path=request.url.path,
            params=dict(request.path_params),
            query=ImmutableMultiDict(request.query_params.multi_items()),
            form=ImmutableMultiDict(pairs),
            form_first=form_first,
            form_lists=form_lists,
        )
        with self.lock:
            return handler(ctx)

    @staticmethod
    def _not_found(path: str) -> JSONResponse:
        return twilio_error(404, 20404, f"The requested resource {path} was not found")

    @staticmethod
    def _bad(code: int, message: str) -> JSONResponse:
        return twilio_error(400, code, message)

    def _found(self, ctx: _Ctx, record: dict[str, Any] | None) -> JSONResponse:
        """``record`` as served (a fetch answer), or Twilio's 404 for the request's path."""
        return JSONResponse(_public(record)) if record else self._not_found(ctx.path)

    def _page(
        self,
        ctx: _Ctx,
        records: list[dict[str, Any]],
        key: str,
        list_path: str,
        *,
        sid_key: str = "sid",
    ) -> JSONResponse:
        """Twilio's paging envelope over ``records`` (already filtered and ordered)."""
        query = ctx.query
        try:
            page_size = max(1, min(1000, int(query.get("PageSize") or 50)))
            page = max(0, int(query.get("Page") or 0))
        except ValueError:
            return self._bad(20001, "Invalid paging parameter")
        start = page * page_size
        token = query.get("PageToken") or ""
        index = {r[sid_key]: i for i, r in enumerate(records)}
        if token.startswith("PA") and token[2:] in index:
            start = index[token[2:]] + 1
        elif token.startswith("PB") and token[2:] in index:
            start = max(0, index[token[2:]] - page_size)
        items = records[start : start + page_size]
        filters = [
            (k, v) for k, v in query.multi_items() if k not in ("PageSize", "Page", "PageToken")
        ]
        base = f"{self._base()}/{list_path}"

        def uri(page_no: int, page_token: str | None = None) -> str:
            params = [*filters, ("PageSize", str(page_size)), ("Page", str(page_no))]
            if page_token:
                params.append(("PageToken", page_token))
            return f"{base}?{urlencode(params)}"

        has_next = start + page_size < len(records)
        return JSONResponse(
            {
                key: [_public(r) for r in items],
                "end": start + max(len(items) - 1, 0),
                "first_page_uri": uri(0),
                "next_page_uri": uri(page + 1, "PA" + items[-1][sid_key])
                if has_next and items
                else None,
                "page": page,
                "page_size": page_size,
                "previous_page_uri": uri(page - 1, "PB" + items[0][sid_key])
                if page > 0 and items
                else None,
                "start": start,
                "uri": uri(page, token or None),
            }
        )

    @staticmethod
    def _newest_first(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        def created(record: dict[str, Any]) -> datetime:
            return cast(datetime, _parse_rfc2822(record["date_created"]))

        return sorted(reversed(records), key=created, reverse=True)

    @staticmethod
    def _date_filters(ctx: _Ctx, name: str, record: dict[str, Any], field_name: str) -> bool:
        actual = _parse_rfc2822(record.get(field_name))
        for op, key in (("=", name), ("<", name + "<"), (">", name + ">")):
            value = ctx.query.get(key)
            if value and not _date_filter(value, op, actual):
                return False
        return True

    def _check_date_params(self, ctx: _Ctx, *names: str) -> JSONResponse | None:
        for name in names:
            for key in (name, name + "<", name + ">"):
                value = ctx.query.get(key)
                if value:
                    try:
                        _date_filter(value, "=", _utcnow())
                    except ValueError:
                        return self._bad(20001, f"Invalid {key}: {value}")
        return None

    # ---- Messages ------------------------------------------------------------------------

    def _create_message(self, ctx: _Ctx) -> Response:
        form = ctx.form
        to = (form.get("To") or "").strip()
        from_ = (form.get("From") or "").strip() or None
        service = form.get("MessagingServiceSid") or None
        body = form.get("Body") or ""
        media = [u for u in form.getlist("MediaUrl") if u]
        if not to:
            return self._bad(21604, "A 'To' phone number is required.")
        if not from_ and not service:
            return self._bad(
                21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message."
            )
        if not body and not media and not form.get("ContentSid"):
            return self._bad(21602, "Message body is required.")
        if not _valid_message_address(to):
            return self._bad(21211, f"Invalid 'To' Phone Number: {to}")
        if len(body) > 1600:
            return self._bad(
                21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if to in self.opted_out or _bare_address(to) in self.opted_out:
            return self._bad(21610, "Attempt to send to unsubscribed recipient")
        sid = self._sid("SM")
        now = self._now()
        uri = f"{self._base()}/Messages/{sid}.json"
        record: dict[str, Any] = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_,
            "messaging_service_sid": service,
            "num_media": str(len(media)),
            "num_segments": str(num_segments(body)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {
                "media": f"{self._base()}/Messages/{sid}/Media.json",
                "feedback": f"{self._base()}/Messages/{sid}/Feedback.json",
            },
            "to": to,
            "uri": uri,
            "form": ctx.form_first,
            "form_lists": ctx.form_lists,
        }
        self.messages.append(record)
        return JSONResponse(_public(record), status_code=201)

    def _list_messages(self, ctx: _Ctx) -> Response:
        bad = self._check_date_params(ctx, "DateSent")
        if bad is not None:
            return bad
        to, from_ = ctx.query.get("To"), ctx.query.get("From")
        records = [
            m
            for m in self._newest_first(self.messages)
            if (not to or m["to"] == to)
            and (not from_ or m["from"] == from_)
            and self._date_filters(ctx, "DateSent", m, "date_sent")
        ]
        return self._page(ctx, records, "messages", "Messages.json")

    def _fetch_message(self, ctx: _Ctx) -> Response:
        return self._found(ctx, self._find(self.messages, ctx.params["sid"]))

    # ---- Calls ---------------------------------------------------------------------------

    def _new_call(
        self,
        to: str,
        from_: str,
        form_first: dict[str, str],
        form_lists: dict[str, list[str]],
        *,
        direction: str = "outbound-api",
        status: str = "queued",
    ) -> dict[str, Any]:
        sid = self._sid("CA")
        now = self._now()
        call: dict[str, Any] = {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": now,
            "date_updated": now,
            "direction": direction,
            "duration": None,
            "end_time": None,
            "forwarded_from": None,
            "from": from_,
            "from_formatted": from_,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": sid,
            "start_time": None,
            "status": status,
            "subresource_uris": {
                "recordings": f"{self._base()}/Calls/{sid}/Recordings.json",
                "notifications": f"{self._base()}/Calls/{sid}/Notifications.json",
                "events": f"{self._base()}/Calls/{sid}/Events.json",
            },
            "to": to,
            "to_formatted": to,
            "trunk_sid": None,
            "uri": f"{self._base()}/Calls/{sid}.json",
            "form": form_first,
            "form_lists": form_lists,
            "url": form_first.get("Url"),
            "twiml": form_first.get("Twiml"),
            "updates": [],
        }
        self.calls.append(call)
        return call

    def _set_call_status(self, call: dict[str, Any], status: str) -> None:
        changes: dict[str, Any] = {"status": status}
        if status == "in-progress" and not call["start_time"]:
            changes["start_time"] = self._now()
        if status in _CALL_TERMINAL and call["status"] not in _CALL_TERMINAL:
            end = self._clock()
            changes["end_time"] = _rfc2822(end)
            started = _parse_rfc2822(call["start_time"])
            changes["duration"] = str(int((end - started).total_seconds())) if started else "0"
        self._touch(call, **changes)

    def _dial_parties(
        self, ctx: _Ctx, *, needs_instructions: bool = False
    ) -> tuple[str, str] | JSONResponse:
        """``(To, From)`` of a request that places a call, or Twilio's error for them.

        ``needs_instructions``: the call also needs ``Url``, ``Twiml`` or ``ApplicationSid``
        (checked once both numbers are present, before ``To`` is validated).
        """
        form = ctx.form
        to = (form.get("To") or "").strip()
        from_ = (form.get("From") or "").strip()
        if not to:
            return self._bad(21201, "No 'To' number is specified")
        if not from_:
            return self._bad(21213, "No 'From' number is specified")
        if needs_instructions and not (
            form.get("Url") or form.get("Twiml") or form.get("ApplicationSid")
        ):
            return self._bad(21205, "Either 'Url', 'Twiml' or 'ApplicationSid' is required")
        if not _valid_voice_address(to):
            return self._bad(21211, f"Invalid 'To' Phone Number: {to}")
        return to, from_

    def _create_call(self, ctx: _Ctx) -> Response:
        parties = self._dial_parties(ctx, needs_instructions=True)
        if isinstance(parties, Response):
            return parties
        to, from_ = parties
        call = self._new_call(to, from_, ctx.form_first, ctx.form_lists)
        return JSONResponse(_public(call), status_code=201)

    def _list_calls(self, ctx: _Ctx) -> Response:
        q = ctx.query
        records = [
            c
            for c in self._newest_first(self.calls)
            if all(
                not q.get(param) or c[key] == q.get(param)
                for param, key in (
                    ("To", "to"),
                    ("From", "from"),
                    ("Status", "status"),
                    ("ParentCallSid", "parent_call_sid"),
                )
            )
        ]
        return self._page(ctx, records, "calls", "Calls.json")

    def _fetch_call(self, ctx: _Ctx) -> Response:
        return self._found(ctx, self._find(self.calls, ctx.params["sid"]))

    def _update_call(self, ctx: _Ctx) -> Response:
        call = self._find(self.calls, ctx.params["sid"])
        if call is None:
            return self._not_found(ctx.path)
        form = ctx.form
        status = form.get("Status")
        if status is not None and status not in ("canceled", "completed"):
            return self._bad(21218, f"Invalid value for Status: {status}")
        redirect = form.get("Url") or form.get("Twiml")
        if redirect and call["status"] in _CALL_TERMINAL:
            return self._bad(21220, "Call is not in-progress. Cannot redirect.")
        call["updates"].append(dict(ctx.form_first))
        participant = self._participant_of_call(call["sid"])
        if status == "completed" and call["status"] not in _CALL_TERMINAL:
            self._set_call_status(call, "completed")
        elif status == "canceled" and call["status"] in ("queued", "ringing"):
            self._set_call_status(call, "canceled")
        if redirect and call["status"] not in _CALL_TERMINAL:
            self._touch(call, url=form.get("Url"), twiml=form.get("Twiml"))
            if participant is not None:
                # New instructions take the call out of its conference; the call goes on.
                self._touch(participant, status="complete")
        elif participant is not None and call["status"] in _CALL_TERMINAL:
            self._set_participant_status(participant, "complete")
        self._touch(call)
        return JSONResponse(_public(call))

    # ---- Conferences ---------------------------------------------------------------------

    def _new_conference(self, friendly_name: str, status: str) -> dict[str, Any]:
        sid = self._sid("CF")
        now = self._now()
        conference: dict[str, Any] = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "call_sid_ending_conference": None,
            "date_created": now,
            "date_updated": now,
            "friendly_name": friendly_name,
            "reason_conference_ended": None,
            "region": "us1",
            "sid": sid,
            "status": status,
            "subresource_uris": {
                "participants": f"{self._base()}/Conferences/{sid}/Participants.json",
                "recordings": f"{self._base()}/Conferences/{sid}/Recordings.json",
            },
            "uri": f"{self._base()}/Conferences/{sid}.json",
        }
        self.conferences.append(conference)
        return conference

    def _active_conference(self, friendly_name: str) -> dict[str, Any] | None:
        matches = [
            c
            for c in self.conferences
            if c["friendly_name"] == friendly_name and c["status"] != "completed"
        ]
        return matches[-1] if matches else None

    def _resolve_conference(self, sid_or_name: str) -> dict[str, Any] | None:
        """By SID (any status), else the not-completed conference with that FriendlyName."""
        by_sid = self._find(self.conferences, sid_or_name)
        return by_sid if by_sid is not None else self._active_conference(sid_or_name)

    def _end_conference(self, conference: dict[str, Any], reason: str) -> None:
        if conference["status"] == "completed":
            return
        self._touch(conference, status="completed", reason_conference_ended=reason)
        for part in self.participants:
            if (
                part["conference_sid"] == conference["sid"]
                and part["status"] in _PARTICIPANT_ACTIVE
            ):
                self._set_participant_status(part, "complete")

    def _list_conferences(self, ctx: _Ctx) -> Response:
        bad = self._check_date_params(ctx, "DateCreated", "DateUpdated")
        if bad is not None:
            return bad
        name, status = ctx.query.get("FriendlyName"), ctx.query.get("Status")
        records = [
            c
            for c in self._newest_first(self.conferences)
            if (not name or c["friendly_name"] == name)
            and (not status or c["status"] == status)
            and self._date_filters(ctx, "DateCreated", c, "date_created")
            and self._date_filters(ctx, "DateUpdated", c, "date_updated")
        ]
        return self._page(ctx, records, "conferences", "Conferences.json")

    def _fetch_conference(self, ctx: _Ctx) -> Response:
        return self._found(ctx, self._find(self.conferences, ctx.params["sid"]))

    def _update_conference(self, ctx: _Ctx) -> Response:
        conference = self._find(self.conferences, ctx.params["sid"])
        if conference is None:
            return self._not_found(ctx.path)
        status = ctx.form.get("Status")
        if status is not None and status != "completed":
            return self._bad(20001, f"Invalid value for Status: {status}")
        if status == "completed":
            self._end_conference(conference, "conference-ended-via-api")
        else:
            self._touch(conference)
        return JSONResponse(_public(conference))

    # ---- Participants --------------------------------------------------------------------

    def _new_participant(
        self,
        conference: dict[str, Any],
        call: dict[str, Any],
        form_first: dict[str, str],
        form_lists: dict[str, list[str]],
        *,
        label: str | None,
        muted: bool,
    ) -> dict[str, Any]:
        now = self._now()
        coach = form_first.get("CallSidToCoach") or None
        part: dict[str, Any] = {
            "account_sid": self.account_sid,
            "call_sid": call["sid"],
            "call_sid_to_coach": coach,
            "coaching": _bool(form_first.get("Coaching"), coach is not None),
            "conference_sid": conference["sid"],
            "date_created": now,
            "date_updated": now,
            "end_conference_on_exit": _bool(form_first.get("EndConferenceOnExit"), False),
            "hold": False,
            "label": label,
            "muted": muted,
            "queue_time": "0",
            "start_conference_on_enter": _bool(form_first.get("StartConferenceOnEnter"), True),
            "status": "queued",
            "uri": f"{self._base()}/Conferences/{conference['sid']}/Participants/{call['sid']}.json",
            "form": form_first,
            "form_lists": form_lists,
            "updates": [],
        }
        self.participants.append(part)
        return part

    def _participant_of_call(self, call_sid: str) -> dict[str, Any] | None:
        for part in self.participants:
            if part["call_sid"] == call_sid and part["status"] in _PARTICIPANT_ACTIVE:
                return part
        return None

    def _find_participant(self, conference: dict[str, Any], key: str) -> dict[str, Any] | None:
        """An active participant of ``conference`` by call SID or label."""
        for part in self.participants:
            if (
                part["conference_sid"] == conference["sid"]
                and part["status"] in _PARTICIPANT_ACTIVE
                and key in (part["call_sid"], part["label"])
            ):
                return part
        return None

    def _set_participant_status(self, part: dict[str, Any], status: str) -> None:
        self._touch(part, status=status)
        call = self._find(self.calls, part["call_sid"])
        call_status = {
            "queued": "queued",
            "connecting": "queued",
            "ringing": "ringing",
            "connected": "in-progress",
            "complete": "completed",
            "failed": "failed",
        }[status]
        if call is not None and call["status"] not in _CALL_TERMINAL:
            self._set_call_status(call, call_status)
        if status == "connected":
            conference = self._find(self.conferences, part["conference_sid"])
            if conference is not None and conference["status"] == "init":
                self._touch(conference, status="in-progress")
        if status == "complete" and part["end_conference_on_exit"]:
            conference = self._find(self.conferences, part["conference_sid"])
            if conference is not None:
                self._touch(conference, call_sid_ending_conference=part["call_sid"])
                self._end_conference(conference, "participant-with-end-conference-on-exit-left")

    def _conference_for(self, ctx: _Ctx) -> dict[str, Any] | None:
        conference = self._resolve_conference(ctx.params["conference"])
        if conference is None or conference["status"] == "completed":
            return None
        return conference

    def _create_participant(self, ctx: _Ctx) -> Response:
        parties = self._dial_parties(ctx)
        if isinstance(parties, Response):
            return parties
        to, from_ = parties
        form = ctx.form
        key = ctx.params["conference"]
        conference = self._resolve_conference(key)
        if conference is None and re.match(r"^CF[0-9a-f]{32}$", key):
            return self._not_found(ctx.path)
        if conference is None:
            # Addressed by FriendlyName: Twilio creates the conference.
            conference = self._new_conference(key, "init")
        if conference["status"] == "completed":
            return self._not_found(ctx.path)
        label = form.get("Label") or None
        if label is not None and self._find_participant(conference, label) is not None:
            return self._bad(20001, f"Label '{label}' is already in use in this conference")
        call = self._new_call(to, from_, ctx.form_first, ctx.form_lists)
        part = self._new_participant(
            conference,
            call,
            ctx.form_first,
            ctx.form_lists,
            label=label,
            muted=_bool(form.get("Muted"), False),
        )
        response = JSONResponse(_public(part), status_code=201)
        self._set_participant_status(part, "ringing")
        return response

    def _list_participants(self, ctx: _Ctx) -> Response:
        conference = self._conference_for(ctx)
        if conference is None:
            return self._not_found(ctx.path)
        q = ctx.query
        records = [
            p
            for p in self.participants
            if p["conference_sid"] == conference["sid"]
            and p["status"] in _PARTICIPANT_ACTIVE
            and all(
                q.get(param) is None or p[key] == _bool(q.get(param), False)
                for param, key in (("Muted", "muted"), ("Hold", "hold"), ("Coaching", "coaching"))
            )
        ]
        list_path = f"Conferences/{conference['sid']}/Participants.json"
        return self._page(ctx, records, "participants", list_path, sid_key="call_sid")

    def _participant_for(self, ctx: _Ctx) -> dict[str, Any] | None:
        conference = self._conference_for(ctx)
        if conference is None:
            return None
        return self._find_participant(conference, ctx.params["participant"])

    def _fetch_participant(self, ctx: _Ctx) -> Response:
        return self._found(ctx, self._participant_for(ctx))

    def _update_participant(self, ctx: _Ctx) -> Response:
        part = self._participant_for(ctx)
        if part is None:
            return self._not_found(ctx.path)
        form = ctx.form
        part["updates"].append(dict(ctx.form_first))
        changes: dict[str, Any] = {}
        for param, key in (
            ("Muted", "muted"),
            ("Hold", "hold"),
            ("Coaching", "coaching"),
            ("EndConferenceOnExit", "end_conference_on_exit"),
        ):
            if form.get(param) is not None:
                changes[key] = _bool(form.get(param), False)
        if form.get("CallSidToCoach"):
            changes["call_sid_to_coach"] = form.get("CallSidToCoach")
        self._touch(part, **changes)
        return JSONResponse(_public(part))

    def _delete_participant(self, ctx: _Ctx) -> Response:
        part = self._participant_for(ctx)
        if part is None:
            return self._not_found(ctx.path)
        self._set_participant_status(part, "complete")
        return Response(status_code=204)

    # ---- Recordings ----------------------------------------------------------------------

    def _fetch_recording(self, ctx: _Ctx) -> Response:
        name = ctx.params["name"]
        sid, _, ext = name.partition(".")
        recording = self.recordings.get(sid)
        if recording is None or ext not in ("", "json", "wav", "mp3"):
            return self._not_found(ctx.path)
        if ext == "json":
            return JSONResponse(_public(recording))
        return Response(recording["data"], media_type=recording["content_type"])


# =========================================================================================
# Server
# =========================================================================================


class FakeTwilioServer(ThreadedASGIServer):
    """Serves a ``FakeTwilio`` on ``127.0.0.1`` (free port) with uvicorn in a daemon thread.

    ``with FakeTwilioServer() as server: server.url, server.fake``. See
    :class:`~tests.fakes.server.ThreadedASGIServer` for the port, start and stop details.

    Starting takes ~10 ms but stopping ~0.2 s (uvicorn's 0.1 s ticks), so a suite can keep
    one server per module and give each test a fresh fake: ``server.fake = FakeTwilio()``
    (requests are dispatched to whatever ``server.fake`` is at that moment). Stopping cuts
    short the ``hang_next`` delays of every fake served since the start.
    """

    def __init__(
        self,
        fake: FakeTwilio | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
    ) -> None:
        self._fake = fake if fake is not None else FakeTwilio()
        self._served: list[FakeTwilio] = [self._fake]
        super().__init__(
            self._app,
            name="FakeTwilioServer",
            host=host,
            startup_timeout=startup_timeout,
            on_stop=self._abort_served_hangs,
        )

    @property
    def fake(self) -> FakeTwilio:
        return self._fake

    @fake.setter
    def fake(self, fake: FakeTwilio) -> None:
        fake._abort_hangs.clear()
        self._served.append(fake)
        self._fake = fake

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._fake(scope, receive, send)

    def _abort_served_hangs(self) -> None:
        for fake in self._served:
            fake.abort_hangs()
        self._served = [self._fake]

    def start(self, timeout: float | None = None) -> Self:
        if not self.running:
            self._fake._abort_hangs.clear()
        return super().start(timeout)
