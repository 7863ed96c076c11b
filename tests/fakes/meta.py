"""A local fake of Meta's Graph API (Messenger Send API, WhatsApp Cloud API) and webhook builders.

Two halves:

* :class:`FakeGraph` (an ASGI app) and :class:`FakeGraphServer` (it on uvicorn in a thread)
  answer what our Messenger/WhatsApp channel calls: ``POST /{v}/me/messages`` (also
  ``/{v}/{page_id}/messages``), ``POST /{v}/{phone_number_id}/messages``, ``GET /{v}/{media_id}``
  plus the media download, ``GET /{v}/{psid}?fields=...`` (user profile). Errors carry Meta's
  error object (``{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}``;
  WhatsApp errors have ``error_data: {messaging_product, details}`` and no subcode, as in
  v16.0+). Failures and hangs can be injected; every request is recorded.
* Builders (``messenger_*``, ``wa_*``, ``unknown_object`` ...) return webhook bodies shaped as
  Meta delivers them, :func:`sign_meta` / :func:`meta_json_bytes` / :func:`signed_request`
  produce the raw bytes and ``X-Hub-Signature-256`` header the way Meta does.

Shapes follow Meta's reference pages (developers.facebook.com/docs/messenger-platform/
reference/send-api, .../webhooks/webhook-events/*, .../whatsapp/cloud-api/webhooks/*,
.../whatsapp/support/error-codes). Where Meta's pages and real traffic disagree the fake
follows real traffic and says so in a comment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.fakes.server import ThreadedASGIServer

__all__ = [
    "APP_ID",
    "DISPLAY_PHONE_NUMBER",
    "PAGE_ID",
    "PHONE_NUMBER_ID",
    "PSID",
    "WABA_ID",
    "WA_ID",
    "FakeGraph",
    "FakeGraphServer",
    "as_standby",
    "batched",
    "graph_error",
    "messenger_attachment",
    "messenger_delivery",
    "messenger_echo",
    "messenger_feed_change",
    "messenger_postback",
    "messenger_quick_reply",
    "messenger_read",
    "messenger_referral",
    "messenger_text",
    "meta_json_bytes",
    "sign_meta",
    "sign_meta_sha1",
    "signed_request",
    "unknown_object",
    "wa_account_update",
    "wa_contacts",
    "wa_image",
    "wa_interactive_button_reply",
    "wa_interactive_list_reply",
    "wa_location",
    "wa_media",
    "wa_status",
    "wa_template_button_reply",
    "wa_text",
    "wa_unsupported",
    "wamid_for",
]

Json = dict[str, Any]

# -- default identities (the same in fixtures, fakes and tests) ---------------------------
PAGE_ID = "106000000000001"
PSID = "24000000000000001"
APP_ID = 1517776481860111
WABA_ID = "102290129340398"
PHONE_NUMBER_ID = "106540352242922"
DISPLAY_PHONE_NUMBER = "15550783881"
WA_ID = "16505551234"
WA_PROFILE_NAME = "Kerry Fisher"

MESSAGING_TYPES = ("RESPONSE", "UPDATE", "MESSAGE_TAG")
MESSAGE_TAGS = ("CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE", "ACCOUNT_UPDATE", "HUMAN_AGENT")
MESSENGER_ATTACHMENT_TYPES = ("image", "audio", "video", "file", "template")
WA_SEND_TYPES = (
    "text",
    "template",
    "image",
    "document",
    "audio",
    "video",
    "sticker",
    "interactive",
    "location",
    "contacts",
    "reaction",
)
WA_MEDIA_TYPES = ("image", "document", "audio", "video", "sticker")
MESSENGER_TEXT_MAX = 2000
WA_TEXT_MAX = 4096
ERROR_CODES_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
WINDOW_POLICY_URL = "https://developers.facebook.com/docs/messenger-platform/policy-overview"

_DIGITS = re.compile(r"\D")


# -- error objects ---------------------------------------------------------------------------
def _fbtrace_id() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode().rstrip("=")


def graph_error(
    message: str,
    *,
    code: int,
    type_: str = "OAuthException",
    subcode: int | None = None,
    details: str | None = None,
    is_transient: bool | None = None,
    error_user_title: str | None = None,
    error_user_msg: str | None = None,
) -> Json:
    """Meta's error object. ``details`` makes it a WhatsApp Cloud API error (``error_data``)."""
    error: Json = {"message": message, "type": type_, "code": code}
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    if subcode is not None:
        error["error_subcode"] = subcode
    if is_transient is not None:
        error["is_transient"] = is_transient
    if error_user_title is not None:
        error["error_user_title"] = error_user_title
    if error_user_msg is not None:
        error["error_user_msg"] = error_user_msg
    error["fbtrace_id"] = _fbtrace_id()
    return {"error": error}


#: Messages of the transient errors ``fail_next`` injects, by code.
TRANSIENT_MESSAGES: dict[int, str] = {
    1: "An unknown error occurred",
    2: "(#2) Service temporarily unavailable",
    4: "(#4) Application request limit reached",
    17: "(#17) User request limit reached",
    32: "(#32) Page request limit reached",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    130429: "(#130429) Rate limit hit",
    131000: "(#131000) Something went wrong",
    131016: "(#131016) Service unavailable",
}

_WA_TRANSIENT_DETAILS: dict[int, str] = {
    130429: "Cloud API message throughput has been reached.",
    131000: "Message failed to send due to an unknown error.",
    131016: "A service is temporarily unavailable.",
}


class _GraphError(Exception):
    def __init__(self, status: int, body: Json, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(body["error"]["message"])
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


@dataclass
class _Injection:
    kind: Literal["fail", "hang"]
    status: int = 500
    body: Json | None = None
    seconds: float = 0.0


@dataclass
class _Media:
    data: bytes
    mime_type: str
    url_hash: str
    ext: int


@dataclass
class _File:
    data: bytes
    content_type: str


# -- ids ---------------------------------------------------------------------------------------
def _messenger_mid() -> str:
    return "m_" + secrets.token_urlsafe(60)


def wamid_for(wa_id: str, suffix: str | None = None) -> str:
    """A WhatsApp message id the way Meta mints them: base64 of a length-prefixed record.

    ``wamid.HBgL...`` for 11-digit numbers (``0x1c 0x18 <len>`` + the number + a random tail).
    """
    tail = (suffix or secrets.token_hex(9).upper()).encode()
    raw = b"\x1c\x18" + bytes([len(wa_id)]) + wa_id.encode() + b"\x15\x02\x00\x11\x18"
    raw += bytes([len(tail)]) + tail + b"\x00"
    return "wamid." + base64.b64encode(raw).decode()


def _numeric_id(digits: int = 16) -> str:
    return str(secrets.randbelow(9 * 10 ** (digits - 1)) + 10 ** (digits - 1))


# -- the fake ----------------------------------------------------------------------------------
class FakeGraph:
    """Meta's Graph API, the parts the Messenger and WhatsApp channels use. An ASGI app.

    State (tests set it directly; handlers read it under :attr:`lock`):

    * ``page_ids`` — pages whose ``/{page_id}/messages`` is the Messenger Send API
      (``/me/messages`` always is).
    * ``window_closed`` — PSIDs whose 24-hour window is over: RESPONSE/UPDATE sends fail with
      code 10 / subcode 2018278; MESSAGE_TAG sends (e.g. HUMAN_AGENT) still go.
    * ``human_agent_expired`` — PSIDs past even the 7-day HUMAN_AGENT window: every send fails.
    * ``blocked`` — PSIDs that blocked the page: code 551 / subcode 1545041.
    * ``bad_recipients`` — PSIDs Meta does not know: code 100 / subcode 2018001 (any
      non-numeric id too).
    * ``bad_urls`` — attachment URLs Meta cannot fetch: code 100 / subcode 2018008.
    * ``profiles`` — PSID -> ``{first_name, last_name, profile_pic}``; others: code 10.
    * ``phone_number_ids`` — WhatsApp business numbers; others: code 100 / subcode 33.
    * ``templates`` — approved template name -> language codes; others: code 132001.
    * ``outside_window`` — wa_ids whose customer-service window is over: non-template sends
      fail with 131047. ``window_error_mode = "webhook"`` answers 200 instead and queues the
      ``failed`` status webhook in ``status_webhooks`` (what Cloud API does in practice).
    * ``not_on_whatsapp`` — numbers without WhatsApp: 200, then a 131026 ``failed`` webhook.
    * ``wa_id_map`` — ``to`` -> wa_id when they differ (Brazil/Mexico numbers).
    * ``app_secret`` — when set, requests must carry ``appsecret_proof``.

    Records: ``requests`` (every request: method, path, query, headers, json, status),
    ``sent`` (every accepted send: kind, path, json, headers, message_id, recipient).
    """

    def __init__(
        self,
        access_token: str = "EAAG-fake-page-token",
        version: str = "v21.0",
        *,
        app_secret: str | None = None,
        page_ids: Iterable[str] = (PAGE_ID,),
        phone_number_ids: Iterable[str] = (PHONE_NUMBER_ID,),
        templates: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.access_token = access_token
        self.version = version
        self.app_secret = app_secret
        self.lock = threading.Lock()
        self.page_ids: set[str] = set(page_ids)
        self.window_closed: set[str] = set()
        self.human_agent_expired: set[str] = set()
        self.blocked: set[str] = set()
        self.bad_recipients: set[str] = set()
        self.bad_urls: set[str] = set()
        self.profiles: dict[str, Json] = {}
        self.phone_number_ids: set[str] = set(phone_number_ids)
        default_templates = {"hello_world": ["en_US"]}
        self.templates: dict[str, list[str]] = {
            name: list(langs) for name, langs in (templates or default_templates).items()
        }
        self.outside_window: set[str] = set()
        self.not_on_whatsapp: set[str] = set()
        self.wa_id_map: dict[str, str] = {}
        self.window_error_mode: Literal["sync", "webhook"] = "sync"
        self.status_webhooks: list[Json] = []
        self.sent: list[Json] = []
        self.requests: list[Json] = []
        self._media: dict[str, _Media] = {}
        self._files: dict[str, _File] = {}
        self._injections: list[_Injection] = []
        self._closing = threading.Event()
        self.app = Starlette(
            routes=[
                Route("/media/{media_id}", self._media_download, methods=["GET"]),
                Route("/cdn/{name:path}", self._cdn, methods=["GET"]),
                Route("/redirect", self._redirect, methods=["GET"]),
                Route("/{version}/me/messages", self._me_messages, methods=["POST"]),
                Route("/{version}/{node}/messages", self._node_messages, methods=["POST"]),
                Route("/{version}/{node}", self._get_node, methods=["GET"]),
                Route(
                    "/{path:path}",
                    self._unknown_path,
                    methods=["GET", "POST", "DELETE", "PUT", "PATCH"],
                ),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # a sender killed mid-request (bench/crash.py) needs no answer and no traceback
        with contextlib.suppress(ClientDisconnect):
            await self.app(scope, receive, send)

    # -- test-facing API -------------------------------------------------------------------
    def add_media(self, media_id: str, data: bytes, mime_type: str = "image/jpeg") -> Json:
        """Register WhatsApp media; returns the webhook's media object (base64 sha256)."""
        with self.lock:
            self._media[media_id] = _Media(
                data, mime_type, secrets.token_urlsafe(24), int(time.time()) + 300
            )
        return {
            "mime_type": mime_type,
            "sha256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
            "id": media_id,
        }

    def expire_media_url(self, media_id: str) -> None:
        """Invalidate the download URLs handed out so far (Meta's expire after 5 minutes)."""
        with self.lock:
            media = self._media[media_id]
            media.url_hash = secrets.token_urlsafe(24)
            media.ext = int(time.time()) + 300

    def remove_media(self, media_id: str) -> None:
        """Media Meta no longer has (deleted, or past the 30-day retention)."""
        with self.lock:
            self._media.pop(media_id, None)

    def add_file(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        """Serve ``data`` at ``/cdn/{name}``; returns the path (join it to the server URL)."""
        with self.lock:
            self._files[name] = _File(data, content_type)
        return f"/cdn/{name}"

    def fail_next(self, n: int = 1, status: int = 500, code: int = 2) -> None:
        """The next ``n`` API requests fail with a transient Meta error (code 4: rate limit,
        2: service unavailable, 130429: WhatsApp throughput, ...)."""
        message = TRANSIENT_MESSAGES.get(code, f"(#{code}) Injected failure")
        for _ in range(n):
            body = graph_error(
                message,
                code=code,
                details=_WA_TRANSIENT_DETAILS.get(code),
                is_transient=True if code in (1, 2, 4, 17, 32, 613) else None,
            )
            self._push(_Injection("fail", status=status, body=body))

    def fail_next_with(self, error: Json, status: int = 400, n: int = 1) -> None:
        """The next ``n`` API requests answer ``error`` (a full ``{"error": {...}}`` object or
        just its inner dict) with ``status``."""
        body = error if "error" in error else {"error": dict(error)}
        for _ in range(n):
            self._push(_Injection("fail", status=status, body=json.loads(json.dumps(body))))

    def hang_next(self, n: int = 1, seconds: float = 30.0) -> None:
        """The next ``n`` API requests stall ``seconds`` before being processed normally, so a
        client that times out may still have sent the message (check ``sent``)."""
        for _ in range(n):
            self._push(_Injection("hang", seconds=seconds))

    def reset(self) -> None:
        """Forget records and pending injections (configuration stays)."""
        with self.lock:
            self.sent.clear()
            self.requests.clear()
            self.status_webhooks.clear()
            self._injections.clear()

    def sent_to(self, recipient: str) -> list[Json]:
        with self.lock:
            return [s for s in self.sent if s["recipient"] == recipient]

    async def wait_for_sent(self, count: int, timeout: float = 5.0) -> list[Json]:
        """Poll until at least ``count`` sends were accepted; returns a copy of ``sent``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.sent) >= count:
                    return list(self.sent)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.sent)} of {count} sends after {timeout}s")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        """Release hanging requests (the server calls this when it stops)."""
        self._closing.set()

    # -- plumbing ----------------------------------------------------------------------------
    def _push(self, injection: _Injection) -> None:
        with self.lock:
            self._injections.append(injection)

    def _pop_injection(self) -> _Injection | None:
        with self.lock:
            return self._injections.pop(0) if self._injections else None

    async def _hang(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the fake closes first; False when it did."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._closing.is_set():
                return False
            await asyncio.sleep(min(0.05, remaining))
        return True

    def _record(self, request: Request, body: Any, status: int) -> None:
        with self.lock:
            self.requests.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": dict(request.query_params),
                    "headers": dict(request.headers),
                    "json": body,
                    "status": status,
                }
            )

    @staticmethod
    def _respond(status: int, body: Json, headers: Mapping[str, str] | None = None) -> Response:
        merged = {"x-fb-trace-id": _fbtrace_id(), "x-fb-request-id": _fbtrace_id()}
        merged.update(headers or {})
        return JSONResponse(body, status_code=status, headers=merged)

    async def _api(
        self,
        request: Request,
        handler: Callable[[Request, Any], tuple[int, Json]],
        *,
        read_body: bool = True,
    ) -> Response:
        """Common path of every Graph call: body, injections, version, auth, handler."""
        body: Any = await _read_body(request) if read_body else None
        injection = self._pop_injection()
        if injection is not None and injection.kind == "hang":
            if not await self._hang(injection.seconds):
                self._record(request, body, 503)
                return self._respond(
                    503, graph_error(TRANSIENT_MESSAGES[2], code=2, is_transient=True)
                )
            injection = None
        try:
            if injection is not None:
                assert injection.body is not None
                headers = {}
                if injection.body["error"].get("code") in (4, 17, 32, 613):
                    headers["x-app-usage"] = json.dumps(
                        {"call_count": 100, "total_cputime": 12, "total_time": 15}
                    )
                raise _GraphError(injection.status, injection.body, headers)
            version = request.path_params.get("version")
            if version is not None and version != self.version:
                raise _GraphError(
                    400,
                    graph_error(f"Unknown path components: /{version}", code=2500),
                )
            status, payload = handler(request, body)
        except _GraphError as exc:
            self._record(request, body, exc.status)
            return self._respond(exc.status, exc.body, exc.headers)
        self._record(request, body, status)
        return self._respond(status, payload)

    def _check_token(self, request: Request, *, me: bool, whatsapp: bool, body: Any = None) -> None:
        token = _bearer(request) or request.query_params.get("access_token")
        if not token and isinstance(body, dict) and isinstance(body.get("access_token"), str):
            token = body["access_token"]  # a form (or JSON) body field, as in Meta's curls
        status = 401 if whatsapp else 400
        if not token:
            if me:
                message, code = (
                    "An active access token must be used to query information about the "
                    "current user.",
                    2500,
                )
            else:
                message, code = "An access token is required to request this resource.", 104
            raise _GraphError(
                status,
                graph_error(message, code=code),
                {"www-authenticate": f'OAuth "Facebook Platform" "invalid_request" "{message}"'},
            )
        if not hmac.compare_digest(token, self.access_token):
            message = "Invalid OAuth access token - Cannot parse access token"
            raise _GraphError(
                status,
                graph_error(message, code=190),
                {"www-authenticate": f'OAuth "Facebook Platform" "invalid_token" "{message}"'},
            )
        if self.app_secret is not None:
            proof = request.query_params.get("appsecret_proof")
            if not proof:
                raise _GraphError(
                    400,
                    graph_error(
                        "API calls from the server require an appsecret_proof argument",
                        code=100,
                        type_="GraphMethodException",
                    ),
                )
            expected = hmac.new(
                self.app_secret.encode(), token.encode(), hashlib.sha256
            ).hexdigest()
            if not hmac.compare_digest(proof, expected):
                raise _GraphError(
                    400,
                    graph_error(
                        "Invalid appsecret_proof provided in the API argument",
                        code=100,
                        type_="GraphMethodException",
                    ),
                )

    # -- routes ------------------------------------------------------------------------------
    async def _me_messages(self, request: Request) -> Response:
        def handle(req: Request, body: Any) -> tuple[int, Json]:
            self._check_token(req, me=True, whatsapp=False, body=body)
            return self._messenger_send(req, body)

        return await self._api(request, handle)

    async def _node_messages(self, request: Request) -> Response:
        node = request.path_params["node"]

        def handle(req: Request, body: Any) -> tuple[int, Json]:
            with self.lock:
                is_wa = node in self.phone_number_ids
                is_page = node in self.page_ids
            whatsapp = is_wa or (
                not is_page
                and isinstance(body, dict)
                and body.get("messaging_product") == "whatsapp"
            )
            self._check_token(req, me=False, whatsapp=whatsapp, body=body)
            if is_page:
                return self._messenger_send(req, body)
            if not is_wa:
                raise _GraphError(400, _unsupported(node, "post"))
            return self._wa_send(req, node, body)

        return await self._api(request, handle)

    async def _get_node(self, request: Request) -> Response:
        node = request.path_params["node"]

        def handle(req: Request, _body: Any) -> tuple[int, Json]:
            with self.lock:
                media = self._media.get(node)
                profile = self.profiles.get(node)
            fields = [f for f in req.query_params.get("fields", "").split(",") if f]
            self._check_token(req, me=False, whatsapp=media is not None)
            if media is not None:
                base = str(req.base_url).rstrip("/")
                return 200, {
                    "url": f"{base}/media/{node}?ext={media.ext}&hash={media.url_hash}",
                    "mime_type": media.mime_type,
                    # The Graph media node gives hex; the webhook's media object gives base64.
                    "sha256": hashlib.sha256(media.data).hexdigest(),
                    "file_size": len(media.data),
                    "id": node,
                    "messaging_product": "whatsapp",
                }
            if profile is not None:
                wanted = fields or ["name"]
                answer: Json = {}
                for field in wanted:
                    if field == "name" and "name" not in profile:
                        first, last = profile.get("first_name", ""), profile.get("last_name", "")
                        answer["name"] = f"{first} {last}".strip()
                    elif field in profile:
                        answer[field] = profile[field]
                answer["id"] = node
                return 200, answer
            if fields:
                raise _GraphError(
                    400,
                    graph_error(
                        "(#10) Application does not have permission for this action", code=10
                    ),
                )
            raise _GraphError(400, _unsupported(node, "get"))

        return await self._api(request, handle, read_body=False)

    async def _media_download(self, request: Request) -> Response:
        media_id = request.path_params["media_id"]
        injection = self._pop_injection()
        if injection is not None and injection.kind == "hang":
            if not await self._hang(injection.seconds):
                self._record(request, None, 503)
                return Response(status_code=503)
            injection = None
        if injection is not None:
            assert injection.body is not None
            self._record(request, None, injection.status)
            return self._respond(injection.status, injection.body)
        token = _bearer(request)
        if not token or not hmac.compare_digest(token, self.access_token):
            self._record(request, None, 401)
            return self._respond(
                401,
                graph_error("Invalid OAuth access token - Cannot parse access token", code=190),
            )
        with self.lock:
            media = self._media.get(media_id)
        url_hash = request.query_params.get("hash", "")
        if media is None or not hmac.compare_digest(url_hash, media.url_hash):
            self._record(request, None, 404)
            return Response(b"", status_code=404)
        self._record(request, None, 200)
        return Response(media.data, media_type=media.mime_type)

    async def _cdn(self, request: Request) -> Response:
        name = request.path_params["name"]
        with self.lock:
            file = self._files.get(name)
        status = 200 if file is not None else 404
        self._record(request, None, status)
        if file is None:
            return Response(b"Not Found", status_code=404, media_type="text/plain")
        return Response(file.data, media_type=file.content_type)

    async def _redirect(self, request: Request) -> Response:
        target = request.query_params.get("to")
        status = int(request.query_params.get("status", "302"))
        self._record(request, None, status if target else 400)
        if not target:
            return Response(b"missing ?to=", status_code=400, media_type="text/plain")
        return RedirectResponse(target, status_code=status)

    async def _unknown_path(self, request: Request) -> Response:
        self._record(request, None, 400)
        return self._respond(
            400, graph_error(f"Unknown path components: {request.url.path}", code=2500)
        )

    # -- Messenger Send API --------------------------------------------------------------------
    def _messenger_send(self, request: Request, body: Any) -> tuple[int, Json]:
        if not isinstance(body, dict):
            raise _GraphError(400, _param_error("The parameter recipient is required"))
        recipient = body.get("recipient")
        if not isinstance(recipient, dict) or not recipient:
            raise _GraphError(400, _param_error("The parameter recipient is required"))
        psid = str(recipient.get("id", ""))
        sender_action = body.get("sender_action")
        message = body.get("message")
        if message is None and sender_action is None:
            raise _GraphError(400, _param_error("Must send either message or sender action"))
        messaging_type = body.get("messaging_type")
        tag = body.get("tag")
        if message is not None:
            if messaging_type not in MESSAGING_TYPES:
                raise _GraphError(
                    400,
                    _param_error(
                        "param messaging_type must be one of {RESPONSE, UPDATE, MESSAGE_TAG}"
                        f' - got "{messaging_type}"'
                    ),
                )
            if messaging_type == "MESSAGE_TAG":
                if tag is None:
                    raise _GraphError(
                        400, _param_error("Tag is required for MESSAGE_TAG messaging type")
                    )
                if tag not in MESSAGE_TAGS:
                    raise _GraphError(
                        400,
                        _param_error("param tag must be one of {" + ", ".join(MESSAGE_TAGS) + "}"),
                    )
        if not psid.isdigit() or psid in self.bad_recipients:
            raise _GraphError(
                400, graph_error("(#100) No matching user found", code=100, subcode=2018001)
            )
        with self.lock:
            blocked = psid in self.blocked
            window_closed = psid in self.window_closed
            agent_expired = psid in self.human_agent_expired
        if blocked:
            raise _GraphError(
                400,
                graph_error(
                    "(#551) This person isn't available right now.", code=551, subcode=1545041
                ),
            )
        tagged = messaging_type == "MESSAGE_TAG"
        if message is not None and (agent_expired or (window_closed and not tagged)):
            raise _GraphError(
                400,
                graph_error(
                    "(#10) This message is sent outside of allowed window. Learn more about the "
                    f"new policy here: {WINDOW_POLICY_URL}",
                    code=10,
                    subcode=2018278,
                ),
            )
        if message is None:  # a sender action: no message id
            return 200, {"recipient_id": psid}
        answer: Json = {"recipient_id": psid}
        self._validate_messenger_message(message, answer)
        answer["message_id"] = _messenger_mid()
        self._record_sent(request, "messenger", body, answer["message_id"], psid)
        return 200, answer

    def _validate_messenger_message(self, message: Any, answer: Json) -> None:
        if not isinstance(message, dict):
            raise _GraphError(400, _param_error("param message must be an object"))
        text = message.get("text")
        attachment = message.get("attachment")
        if (text is None) == (attachment is None):
            raise _GraphError(
                400,
                _param_error("param message must have exactly one of text or attachment"),
            )
        if text is not None:
            if not isinstance(text, str) or not text:
                raise _GraphError(
                    400, _param_error("param message[text] must be non-empty UTF-8 encoded string")
                )
            if len(text) > MESSENGER_TEXT_MAX:
                raise _GraphError(
                    400,
                    _param_error(
                        f"Length of param message[text] must be less than or equal to "
                        f"{MESSENGER_TEXT_MAX}"
                    ),
                )
            return
        if not isinstance(attachment, dict) or attachment.get("type") not in (
            MESSENGER_ATTACHMENT_TYPES
        ):
            raise _GraphError(
                400,
                _param_error(
                    "param message[attachment][type] must be one of "
                    "{image, audio, video, file, template}"
                ),
            )
        payload = attachment.get("payload")
        if not isinstance(payload, dict):
            raise _GraphError(400, _param_error("param message[attachment][payload] is required"))
        if attachment["type"] == "template":
            return
        url = payload.get("url")
        if url is None and payload.get("attachment_id") is None:
            raise _GraphError(
                400, _param_error("Either url or attachment_id is required in the payload")
            )
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise _GraphError(
                    400, _param_error("param message[attachment][payload][url] must be a valid URL")
                )
            with self.lock:
                bad = url in self.bad_urls
            if bad:
                raise _GraphError(
                    400,
                    graph_error(
                        "(#100) Failed to fetch the file from the url",
                        code=100,
                        subcode=2018008,
                    ),
                )
            if payload.get("is_reusable"):
                answer["attachment_id"] = _numeric_id()

    # -- WhatsApp Cloud API ----------------------------------------------------------------------
    def _wa_send(self, request: Request, phone_number_id: str, body: Any) -> tuple[int, Json]:
        if not isinstance(body, dict):
            raise _GraphError(400, _wa_param_error("The request body must be a JSON object."))
        if body.get("messaging_product") != "whatsapp":
            raise _GraphError(
                400,
                graph_error(
                    "(#100) The parameter messaging_product is required.",
                    code=100,
                    details="The parameter messaging_product is required.",
                ),
            )
        recipient_type = body.get("recipient_type", "individual")
        if recipient_type not in ("individual", "group"):
            raise _GraphError(
                400, _wa_param_error("Param recipient_type must be one of {individual, group}.")
            )
        to = body.get("to")
        if not isinstance(to, str) or not _DIGITS.sub("", to):
            raise _GraphError(
                400, _wa_param_error("Param to is required and must be a phone number.")
            )
        kind = body.get("type", "text")
        if kind not in WA_SEND_TYPES:
            raise _GraphError(
                400,
                _wa_param_error("Param type must be one of {" + ", ".join(WA_SEND_TYPES) + "}."),
            )
        with self.lock:
            wa_id = self.wa_id_map.get(to) or self.wa_id_map.get(_DIGITS.sub("", to))
            wa_id = wa_id or _DIGITS.sub("", to)
            outside = wa_id in self.outside_window
            absent = wa_id in self.not_on_whatsapp
            templates = {k: list(v) for k, v in self.templates.items()}
            mode = self.window_error_mode
        self._validate_wa_content(kind, body, templates)
        message_id = wamid_for(wa_id)
        if outside and kind != "template":
            if mode == "sync":
                raise _GraphError(
                    400,
                    graph_error(
                        "(#131047) Re-engagement message",
                        code=131047,
                        details="Message failed to send because more than 24 hours have "
                        "passed since the customer last replied to this number.",
                    ),
                )
            self._queue_failed_status(phone_number_id, message_id, wa_id, 131047)
        elif absent:
            self._queue_failed_status(phone_number_id, message_id, wa_id, 131026)
        message_entry: Json = {"id": message_id}
        if kind == "template":
            message_entry["message_status"] = "accepted"
        answer: Json = {
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": wa_id}],
            "messages": [message_entry],
        }
        self._record_sent(request, "whatsapp", body, message_id, wa_id)
        return 200, answer

    def _validate_wa_content(
        self, kind: str, body: Json, templates: Mapping[str, list[str]]
    ) -> None:
        content = body.get(kind)
        if not isinstance(content, dict) and kind != "contacts":
            raise _GraphError(400, _wa_param_error(f"Param {kind} is required for type {kind}."))
        if kind == "text":
            text = content.get("body") if isinstance(content, dict) else None
            if not isinstance(text, str) or not text:
                raise _GraphError(400, _wa_param_error("Param text['body'] is required."))
            if len(text) > WA_TEXT_MAX:
                raise _GraphError(
                    400,
                    _wa_param_error(
                        f"Param text['body'] must be at most {WA_TEXT_MAX} characters long."
                    ),
                )
        elif kind == "template":
            assert isinstance(content, dict)
            name = content.get("name")
            language = content.get("language")
            code = language.get("code") if isinstance(language, dict) else None
            if not isinstance(name, str) or not isinstance(code, str):
                raise _GraphError(
                    400,
                    graph_error(
                        "(#131008) Required parameter is missing",
                        code=131008,
                        details="Params template['name'] and template['language']['code'] "
                        "are required.",
                    ),
                )
            if code not in templates.get(name, []):
                raise _GraphError(
                    404,
                    graph_error(
                        "(#132001) Template name does not exist in the translation",
                        code=132001,
                        details=f"template name ({name}) does not exist in {code}",
                    ),
                )
        elif kind in WA_MEDIA_TYPES:
            assert isinstance(content, dict)
            if not content.get("id") and not content.get("link"):
                raise _GraphError(
                    400, _wa_param_error(f"Param {kind} must have either 'id' or 'link'.")
                )
        elif kind == "interactive":
            assert isinstance(content, dict)
            itype = content.get("type")
            body_text = (content.get("body") or {}).get("text")
            action = content.get("action")
            if itype not in ("button", "list", "cta_url", "product", "product_list", "flow"):
                raise _GraphError(400, _wa_param_error("Param interactive['type'] is invalid."))
            if itype in ("button", "list") and not body_text:
                raise _GraphError(
                    400, _wa_param_error("Param interactive['body']['text'] is required.")
                )
            if not isinstance(action, dict):
                raise _GraphError(400, _wa_param_error("Param interactive['action'] is required."))
            if itype == "button":
                buttons = action.get("buttons") or []
                if not 1 <= len(buttons) <= 3:
                    raise _GraphError(
                        400,
                        graph_error(
                            "(#131009) Parameter value is not valid",
                            code=131009,
                            details="Buttons count should be between 1 and 3.",
                        ),
                    )
                for button in buttons:
                    title = (button.get("reply") or {}).get("title", "")
                    if not title or len(title) > 20:
                        raise _GraphError(
                            400,
                            graph_error(
                                "(#131009) Parameter value is not valid",
                                code=131009,
                                details="Button title length invalid. Min length: 1, "
                                "Max length: 20",
                            ),
                        )
            if itype == "list":
                sections = action.get("sections") or []
                if not action.get("button") or not 1 <= len(sections) <= 10:
                    raise _GraphError(
                        400,
                        graph_error(
                            "(#131009) Parameter value is not valid",
                            code=131009,
                            details="A list needs action['button'] and 1 to 10 sections.",
                        ),
                    )

    def _queue_failed_status(
        self, phone_number_id: str, message_id: str, wa_id: str, code: int
    ) -> None:
        payload = wa_status(
            message_id,
            "failed",
            recipient_id=wa_id,
            phone_number_id=phone_number_id,
            error_code=code,
        )
        with self.lock:
            self.status_webhooks.append(payload)

    def _record_sent(
        self, request: Request, kind: str, body: Json, message_id: str, recipient: str
    ) -> None:
        with self.lock:
            self.sent.append(
                {
                    "kind": kind,
                    "path": request.url.path,
                    "json": body,
                    "headers": dict(request.headers),
                    "message_id": message_id,
                    "recipient": recipient,
                }
            )


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def _read_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        # The Send API's curl examples post form fields holding JSON strings.
        form: Json = {}
        for key, values in parse_qs(raw.decode(), keep_blank_values=True).items():
            value = values[-1]
            form[key] = value
            if value.lstrip().startswith(("{", "[")):
                with contextlib.suppress(ValueError):
                    form[key] = json.loads(value)
        return form
    try:
        return json.loads(raw)
    except ValueError:
        return {"__unparsable__": raw.decode(errors="replace")}


def _param_error(text: str) -> Json:
    return graph_error(f"(#100) {text}", code=100)


def _wa_param_error(details: str) -> Json:
    return graph_error("(#100) Invalid parameter", code=100, details=details)


def _unsupported(node: str, verb: str) -> Json:
    return graph_error(
        f"Unsupported {verb} request. Object with ID '{node}' does not exist, cannot be loaded "
        "due to missing permissions, or does not support this operation. Please read the "
        "Graph API documentation at https://developers.facebook.com/docs/graph-api",
        code=100,
        subcode=33,
        type_="GraphMethodException",
    )


# -- the server --------------------------------------------------------------------------------
class FakeGraphServer(ThreadedASGIServer):
    """Serves a :class:`FakeGraph` on ``127.0.0.1:<free port>`` from a daemon thread.

    ``with FakeGraphServer() as server: httpx.get(server.url + ...)``; ``server.graph`` is the
    fake, ``server.graph_url`` the versioned base (``http://127.0.0.1:PORT/v21.0``).
    Stopping releases the requests ``hang_next`` holds (:meth:`FakeGraph.close`); starting
    again re-arms the hangs. ``start()`` on a running server does nothing.
    """

    def __init__(
        self, graph: FakeGraph | None = None, *, host: str = "127.0.0.1", **graph_kwargs: Any
    ) -> None:
        self.graph = graph if graph is not None else FakeGraph(**graph_kwargs)
        super().__init__(self.graph, name="FakeGraphServer", host=host, on_stop=self.graph.close)

    @property
    def graph_url(self) -> str:
        return f"{self.url}/{self.graph.version}"

    def start(self, timeout: float | None = 10.0) -> Self:
        if self.running:
            return self
        self.graph._closing.clear()
        return super().start(timeout)


# -- webhook signing -------------------------------------------------------------------------
def sign_meta(app_secret: str, body: bytes) -> str:
    """``X-Hub-Signature-256`` value: ``sha256=`` + HMAC-SHA256(app secret, raw body), hex."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def sign_meta_sha1(app_secret: str, body: bytes) -> str:
    """The legacy ``X-Hub-Signature`` value (``sha1=``), which Meta still sends alongside."""
    return "sha1=" + hmac.new(app_secret.encode(), body, hashlib.sha1).hexdigest()


def meta_json_bytes(payload: Any) -> bytes:
    """Serialize the way Meta does on the wire: compact, non-ASCII as ``\\uXXXX`` (lowercase
    hex), and ``/`` ``<`` ``%`` ``@`` escaped as ``\\/`` ``\\u003C`` ``\\u0025`` ``\\u0040``.

    Meta signs these bytes, so a receiver must verify the raw body, never a re-serialization.
    (Messenger webhook docs, "Validating payloads".) The escaped characters only occur inside
    JSON strings, so a textual replace is exact.
    """
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    for char, escaped in (("/", "\\/"), ("<", "\\u003C"), ("%", "\\u0025"), ("@", "\\u0040")):
        text = text.replace(char, escaped)
    return text.encode("ascii")


def signed_request(app_secret: str, payload: Any) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers of a webhook delivery of ``payload``."""
    body = meta_json_bytes(payload)
    return body, {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": sign_meta(app_secret, body),
        "X-Hub-Signature": sign_meta_sha1(app_secret, body),
        "User-Agent": "facebookexternalua",
    }


# -- Messenger webhook builders ----------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


def _page_payload(event: Json, page_id: str, entry_time: int | None) -> Json:
    stamp = entry_time if entry_time is not None else event.get("timestamp", _now_ms())
    return {"object": "page", "entry": [{"id": page_id, "time": stamp, "messaging": [event]}]}


def _inbound(psid: str, page_id: str, timestamp: int | None, **fields: Any) -> Json:
    event: Json = {
        "sender": {"id": psid},
        "recipient": {"id": page_id},
        "timestamp": timestamp if timestamp is not None else _now_ms(),
    }
    event.update(fields)
    return event


def messenger_text(
    text: str = "hello, world!",
    *,
    psid: str = PSID,
    page_id: str = PAGE_ID,
    mid: str | None = None,
    timestamp: int | None = None,
    entry_time: int | None = None,
    reply_to: str | None = None,
) -> Json:
    """A text message from a person to the page."""
    message: Json = {"mid": mid or _messenger_mid(), "text": text}
    if reply_to is not None:
        message["reply_to"] = {"mid": reply_to}
    return _page_payload(_inbound(psid, page_id, timestamp, message=message), page_id, entry_time)


def messenger_attachment(
    type_: Literal["image", "file", "audio", "video", "location", "fallback", "sticker"] = "image",
    *,
    url: str = "https://scontent.xx.fbcdn.net/v/t1.15752-9/photo.jpg?_nc_cat=1&oh=00_AfA&oe=6700",
    lat: float = 52.3676,
    long: float = 4.9041,
    title: str | None = None,
    sticker_id: int = 369239263222822,
    text: str | None = None,
    psid: str = PSID,
    page_id: str = PAGE_ID,
    mid: str | None = None,
    timestamp: int | None = None,
    entry_time: int | None = None,
) -> Json:
    """A message with one attachment. ``payload.url`` is a CDN URL (no auth, expires).

    ``location`` is the legacy shape (``payload.coordinates {lat, long}`` plus title/url);
    ``sticker`` sends both the new ``sticker`` and the old ``image`` attachment, as Meta does
    during its 2026 transition.
    """
    attachments: list[Json]
    if type_ == "location":
        attachments = [
            {
                "title": title or "Pinned Location",
                "url": f"https://l.facebook.com/l.php?u=https%3A%2F%2Fwww.bing.com%2Fmaps%2Fdefault.aspx%3Fv%3D2%26pc%3DFACEBK%26mid%3D8100%26where1%3D{lat}%252C%2B{long}",
                "type": "location",
                "payload": {"coordinates": {"lat": lat, "long": long}},
            }
        ]
    elif type_ == "fallback":
        attachments = [
            {
                "title": title or "Example Domain",
                "url": url,
                "type": "fallback",
                "payload": {"url": url, "title": title or "Example Domain"},
            }
        ]
    elif type_ == "sticker":
        attachments = [
            {"type": "sticker", "payload": {"url": url, "sticker_id": sticker_id}},
            {"type": "image", "payload": {"url": url, "sticker_id": sticker_id}},
        ]
    else:
        attachments = [{"type": type_, "payload": {"url": url}}]
    message: Json = {"mid": mid or _messenger_mid(), "attachments": attachments}
    if text is not None:
        message["text"] = text
    return _page_payload(_inbound(psid, page_id, timestamp, message=message), page_id, entry_time)


def messenger_quick_reply(
    text: str = "Red",
    payload: str = "DEVELOPER_DEFINED_PAYLOAD_FOR_PICKING_RED",
    *,
    psid: str = PSID,
    page_id: str = PAGE_ID,
    mid: str | None = None,
    timestamp: int | None = None,
    entry_time: int | None = None,
) -> Json:
    """A tap on a quick reply: a text message carrying ``quick_reply.payload``."""
    message = {"mid": mid or _messenger_mid(), "text": text, "quick_reply": {"payload": payload}}
    return _page_payload(_inbound(psid, page_id, timestamp, message=message), page_id, entry_time)


def messenger_postback(
    title: str = "Talk to an agent",
    payload: str = "AGENT",
    *,
    referral: Json | None = None,
    psid: str = PSID,
    page_id: str = PAGE_ID,
    mid: str | None = None,
    timestamp: int | None = None,
    entry_time: int | None = None,
) -> Json:
    """A tap on a postback button (or Get Started, with ``referral`` from an m.me link)."""
    postback: Json = {"title": title, "payload": payload, "mid": mid or _messenger_mid()}
    if referral is not None:
        postback["referral"] = referral
    return _page_payload(_inbound(psid, page_id, timestamp, postback=postback), page_id, entry_time)


def messenger_referral(
    ref: str = "campaign-spring",
    *,
    source: str = "SHORTLINK",
    type_: str = "OPEN_THREAD",
    psid: str = PSID,
    page_id: str = PAGE_ID,
    timestamp: int | None = None,
    entry_time: int | None = None,
) -> Json:
    """A person with an existing thread followed an m.me link / ad (no message, no mid)."""
    referral = {"ref": ref, "source": source, "type": type_}
    return _page_payload(_inbound(psid, page_id, timestamp, referral=referral), page_id, entry_time)


def messenger_echo(
    text: str = "Thanks, an agent will be with you shortly.",
    *,
    app_id: int | None = APP_ID,
    metadata: str | None = None,
    psid: str = PSID,
    page_id: str = PAGE_ID,
    mid: str | None = None,
    timestamp: int | None = None,
    entry_time: int | None = None,
) -> Json:
    """A message the page sent (by our app, another app, or a human in the Page inbox —
    ``app_id`` differs / is the Page Inbox app then). The sender is the page."""
    message: Json = {"mid": mid or _messenger_mid(), "is_echo": True}
    if app_id is not None:
        message["app_id"] = app_id
    if metadata is not None:
        message["metadata"] = metadata
    message["text"] = text
    event = {
        "sender": {"id": page_id},
        "recipient": {"id": psid},
        "timestamp": timestamp if timestamp is not None else _now_ms(),
        "message": message,
    }
    return _page_payload(event, page_id, entry_time)


def messenger_delivery(
    mids: list[str] | None,
    watermark: int,
    *,
    psid: str = PSID,
    page_id: str = PAGE_ID,
    entry_time: int | None = None,
) -> Json:
    """Delivery receipt. No ``timestamp`` in the event; ``mids`` may be absent (pass None)."""
    delivery: Json = {"watermark": watermark}
    if mids is not None:
        delivery = {"mids": list(mids), "watermark": watermark}
    event = {"sender": {"id": psid}, "recipient": {"id": page_id}, "delivery": delivery}
    stamp = entry_time if entry_time is not None else watermark
    return {"object": "page", "entry": [{"id": page_id, "time": stamp, "messaging": [event]}]}


def messenger_read(
    watermark: int,
    *,
    psid: str = PSID,
    page_id: str = PAGE_ID,
    timestamp: int | None = None,
    entry_time: int | None = None,
) -> Json:
    """Read receipt: everything the page sent up to ``watermark`` (ms) was read."""
    event = _inbound(psid, page_id, timestamp, read={"watermark": watermark})
    return _page_payload(event, page_id, entry_time)


def as_standby(payload: Json) -> Json:
    """The same events delivered under ``standby`` (another app owns the thread — handover
    protocol); receivers that only read ``messaging`` miss them, which may be intended."""
    out: Json = json.loads(json.dumps(payload))
    for entry in out["entry"]:
        entry["standby"] = entry.pop("messaging")
    return out


def messenger_feed_change(*, page_id: str = PAGE_ID, entry_time: int = 1700000000000) -> Json:
    """A ``page`` object with ``changes`` (feed) and no ``messaging``: not a message."""
    return {
        "object": "page",
        "entry": [
            {
                "id": page_id,
                "time": entry_time,
                "changes": [
                    {
                        "field": "feed",
                        "value": {
                            "item": "comment",
                            "verb": "add",
                            "post_id": f"{page_id}_123456789",
                            "comment_id": "123456789_987654321",
                            "message": "Nice post!",
                            "from": {"id": "6000000000000001", "name": "Someone"},
                            "created_time": entry_time // 1000,
                        },
                    }
                ],
            }
        ],
    }


def batched(*payloads: Json, same_entry: bool = False) -> Json:
    """One delivery carrying several. Meta batches by concatenating ``entry`` items (each
    Messenger entry's ``messaging`` holds one event, per the docs); ``same_entry=True``
    additionally merges entries of the same id into one multi-item ``messaging``/``changes``
    list, which receivers must also accept."""
    if not payloads:
        raise ValueError("batched() needs at least one payload")
    objects = {p["object"] for p in payloads}
    if len(objects) != 1:
        raise ValueError(f"cannot batch different objects: {sorted(objects)}")
    entries = [json.loads(json.dumps(e)) for p in payloads for e in p["entry"]]
    if same_entry:
        merged: list[Json] = []
        by_id: dict[str, Json] = {}
        for entry in entries:
            into = by_id.get(entry["id"])
            if into is None:
                by_id[entry["id"]] = entry
                merged.append(entry)
                continue
            for key in ("messaging", "standby", "changes"):
                if key in entry:
                    into.setdefault(key, []).extend(entry[key])
        entries = merged
    return {"object": objects.pop(), "entry": entries}


# -- WhatsApp webhook builders -----------------------------------------------------------------
def _now_s() -> str:
    return str(int(time.time()))


def _wa_payload(
    value: Json,
    *,
    waba_id: str,
    phone_number_id: str,
    display_phone_number: str,
    field: str = "messages",
) -> Json:
    full: Json = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number,
            "phone_number_id": phone_number_id,
        },
    }
    full.update(value)
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": waba_id, "changes": [{"value": full, "field": field}]}],
    }


def _wa_message(
    type_: str,
    content: Any,
    *,
    wa_id: str,
    name: str,
    wamid: str | None,
    timestamp: str | int | None,
    context: Json | None,
    waba_id: str,
    phone_number_id: str,
    display_phone_number: str,
    extra: Json | None = None,
) -> Json:
    message: Json = {}
    if context is not None:
        message["context"] = context
    message.update(
        {
            "from": wa_id,
            "id": wamid or wamid_for(wa_id),
            "timestamp": str(timestamp) if timestamp is not None else _now_s(),
            "type": type_,
        }
    )
    if content is not None:
        message[type_] = content
    message.update(extra or {})
    value = {
        "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
        "messages": [message],
    }
    return _wa_payload(
        value,
        waba_id=waba_id,
        phone_number_id=phone_number_id,
        display_phone_number=display_phone_number,
    )


@dataclass(frozen=True)
class _WaIds:
    wa_id: str = WA_ID
    name: str = WA_PROFILE_NAME
    waba_id: str = WABA_ID
    phone_number_id: str = PHONE_NUMBER_ID
    display_phone_number: str = DISPLAY_PHONE_NUMBER


def _ids(kwargs: Mapping[str, Any]) -> _WaIds:
    return _WaIds(**{k: v for k, v in kwargs.items() if v is not None})


def _wa(
    type_: str,
    content: Any,
    ids: _WaIds,
    wamid: str | None,
    timestamp: Any,
    context: Json | None = None,
    extra: Json | None = None,
) -> Json:
    return _wa_message(
        type_,
        content,
        wa_id=ids.wa_id,
        name=ids.name,
        wamid=wamid,
        timestamp=timestamp,
        context=context,
        waba_id=ids.waba_id,
        phone_number_id=ids.phone_number_id,
        display_phone_number=ids.display_phone_number,
        extra=extra,
    )


def wa_text(
    body: str = "Hi, I need help with my order",
    *,
    wamid: str | None = None,
    timestamp: str | int | None = None,
    context: Json | None = None,
    **ids: str | None,
) -> Json:
    """A text message. ``ids``: wa_id, name, waba_id, phone_number_id, display_phone_number."""
    return _wa("text", {"body": body}, _ids(ids), wamid, timestamp, context)


def _media_content(
    media_id: str,
    mime_type: str,
    sha256: str,
    caption: str | None,
    filename: str | None,
    voice: bool | None,
) -> Json:
    content: Json = {}
    if caption is not None:
        content["caption"] = caption
    if filename is not None:
        content["filename"] = filename
    content.update({"mime_type": mime_type, "sha256": sha256, "id": media_id})
    if voice is not None:
        content["voice"] = voice
    return content


def wa_media(
    kind: Literal["image", "document", "audio", "video", "sticker"],
    media_id: str = "1043287463409218",
    *,
    mime_type: str = "image/jpeg",
    sha256: str = "B3mGm9OU2B8mX6hq7hrp7F2MjT4Z5pSAAOLqpHyDkjA=",
    caption: str | None = None,
    filename: str | None = None,
    voice: bool | None = None,
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    """A media message: only an id (fetch ``GET /{v}/{id}`` then the URL, with the token).
    ``sha256`` here is base64 (the Graph media node answers hex)."""
    content = _media_content(media_id, mime_type, sha256, caption, filename, voice)
    return _wa(kind, content, _ids(ids), wamid, timestamp)


def wa_image(
    media_id: str = "1043287463409218",
    *,
    mime_type: str = "image/jpeg",
    sha256: str = "B3mGm9OU2B8mX6hq7hrp7F2MjT4Z5pSAAOLqpHyDkjA=",
    caption: str | None = "my receipt",
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    content = _media_content(media_id, mime_type, sha256, caption, None, None)
    return _wa("image", content, _ids(ids), wamid, timestamp)


def _reply_context(context_id: str | None, ids: _WaIds) -> Json:
    return {
        "from": ids.display_phone_number,
        "id": context_id or wamid_for(ids.wa_id),
    }


def wa_interactive_button_reply(
    button_id: str = "agent",
    title: str = "Talk to an agent",
    *,
    context_id: str | None = None,
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    """A tap on a reply button of an interactive message we sent (``context`` names it)."""
    the_ids = _ids(ids)
    content = {"type": "button_reply", "button_reply": {"id": button_id, "title": title}}
    context = _reply_context(context_id, the_ids)
    return _wa("interactive", content, the_ids, wamid, timestamp, context)


def wa_interactive_list_reply(
    row_id: str = "billing",
    title: str = "Billing",
    description: str | None = "Invoices and payments",
    *,
    context_id: str | None = None,
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    the_ids = _ids(ids)
    reply: Json = {"id": row_id, "title": title}
    if description is not None:
        reply["description"] = description
    content = {"type": "list_reply", "list_reply": reply}
    context = _reply_context(context_id, the_ids)
    return _wa("interactive", content, the_ids, wamid, timestamp, context)


def wa_template_button_reply(
    payload: str = "STOP",
    text: str = "Stop promotions",
    *,
    context_id: str | None = None,
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    """A tap on a template's quick-reply button: ``type: "button"`` (not ``interactive``)."""
    the_ids = _ids(ids)
    content = {"payload": payload, "text": text}
    context = _reply_context(context_id, the_ids)
    return _wa("button", content, the_ids, wamid, timestamp, context)


def wa_location(
    latitude: float = 37.483307,
    longitude: float = -122.148981,
    *,
    name: str | None = "Pablo Morales",
    address: str | None = "1 Hacker Way, Menlo Park, CA 94025",
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    content: Json = {"latitude": latitude, "longitude": longitude}
    if name is not None:
        content["name"] = name
    if address is not None:
        content["address"] = address
    return _wa("location", content, _ids(ids), wamid, timestamp)


def wa_contacts(
    cards: list[Json] | None = None,
    *,
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    """Shared contact cards. Note ``messages[].contacts`` (cards) vs ``value.contacts``
    (the sender's profile): the same key at two levels."""
    default = [
        {
            "name": {
                "formatted_name": "Barbara Johnson",
                "first_name": "Barbara",
                "last_name": "Johnson",
            },
            "phones": [{"phone": "+1 (415) 555-0123", "wa_id": "14155550123", "type": "MOBILE"}],
            "emails": [{"email": "bjohnson@example.com", "type": "WORK"}],
        }
    ]
    return _wa("contacts", cards if cards is not None else default, _ids(ids), wamid, timestamp)


WA_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer "
        "last replied to this number.",
    ),
    131026: (
        "Message undeliverable",
        "Unable to deliver message. Reasons can include: The recipient phone number is not a "
        "WhatsApp phone number.",
    ),
    131049: (
        "This message was not delivered to maintain healthy ecosystem engagement.",
        "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
    ),
    131000: ("Something went wrong", "Message failed to send due to an unknown error."),
    130472: (
        "User's number is part of an experiment",
        "Failed to send message because this user's phone number is part of an experiment",
    ),
}


def wa_status(
    message_id: str,
    status: Literal["sent", "delivered", "read", "failed"] = "delivered",
    *,
    recipient_id: str = WA_ID,
    timestamp: str | int | None = None,
    error_code: int = 131047,
    error_title: str | None = None,
    error_details: str | None = None,
    category: str = "service",
    waba_id: str = WABA_ID,
    phone_number_id: str = PHONE_NUMBER_ID,
    display_phone_number: str = DISPLAY_PHONE_NUMBER,
) -> Json:
    """A status of a message we sent. ``value.statuses`` and no ``contacts``/``messages``;
    ``sent`` (and the first of delivered/read) carries conversation + pricing, ``failed``
    carries ``errors``."""
    entry: Json = {
        "id": message_id,
        "status": status,
        "timestamp": str(timestamp) if timestamp is not None else _now_s(),
        "recipient_id": recipient_id,
    }
    if status in ("sent", "delivered"):
        stamp = int(entry["timestamp"])
        conversation: Json = {"id": hashlib.md5(message_id.encode()).hexdigest()}
        if status == "sent":
            conversation["expiration_timestamp"] = str(stamp + 86400)
        conversation["origin"] = {"type": category}
        entry["conversation"] = conversation
        entry["pricing"] = {
            "billable": category != "service",
            "pricing_model": "PMP",
            "category": category,
            "type": "free_customer_service" if category == "service" else "regular",
        }
    if status == "failed":
        title, details = WA_STATUS_ERRORS.get(error_code, ("Generic error", "Generic error"))
        title = error_title or title
        entry["errors"] = [
            {
                "code": error_code,
                "title": title,
                "message": title,
                "error_data": {"details": error_details or details},
                "href": ERROR_CODES_HREF,
            }
        ]
    return _wa_payload(
        {"statuses": [entry]},
        waba_id=waba_id,
        phone_number_id=phone_number_id,
        display_phone_number=display_phone_number,
    )


def wa_unsupported(
    unsupported_type: str = "poll_creation",
    *,
    error_code: int = 131051,
    wamid: str | None = None,
    timestamp: str | int | None = None,
    **ids: str | None,
) -> Json:
    """A message type Cloud API cannot render (polls, edits, view-once...)."""
    the_ids = _ids(ids)
    title = (
        "Message type unknown" if error_code == 131051 else "This message is currently unavailable."
    )
    errors = [
        {
            "code": error_code,
            "title": title,
            "message": title,
            "error_data": {"details": "Message type is currently not supported."},
        }
    ]
    content = {"type": unsupported_type}
    return _wa("unsupported", content, the_ids, wamid, timestamp, extra={"errors": errors})


def wa_account_update(*, waba_id: str = WABA_ID, phone_number: str = DISPLAY_PHONE_NUMBER) -> Json:
    """A ``whatsapp_business_account`` change that is not ``messages``: ignore it."""
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": waba_id,
                "time": 1700000000,
                "changes": [
                    {
                        "field": "account_update",
                        "value": {"phone_number": phone_number, "event": "VERIFIED_ACCOUNT"},
                    }
                ],
            }
        ],
    }


def unknown_object() -> Json:
    """An object our channel does not handle (Instagram messaging): ignore it, answer 200."""
    return {
        "object": "instagram",
        "entry": [
            {
                "id": "17841400000000001",
                "time": 1700000000000,
                "messaging": [
                    {
                        "sender": {"id": "9000000000000001"},
                        "recipient": {"id": "17841400000000001"},
                        "timestamp": 1700000000000,
                        "message": {"mid": "aWdfZAG1faXRlbTox", "text": "hi from instagram"},
                    }
                ],
            }
        ],
    }
