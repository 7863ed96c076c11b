"""Request body limits, enforced while the body is read, before any route sees it.

Plain ASGI around the whole application (as :class:`router.app.SecurityHeaders`): a body
announced larger than its route's limit (``Content-Length``) is answered 413 at once,
without reading it; a body without a length (chunked) is counted as it streams in and
answered 413 the moment it passes the limit. Either way nothing past the limit is held in
memory: the route, which would have buffered the body whole (FastAPI reads a JSON body
before authentication runs), only sees the client go away. uvicorn drops whatever the
client still sends of that request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "BodyLimits"]


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """Bytes allowed per kind of route (see ``Settings``: ``OMNIROUTE_MAX_*_BYTES``)."""

    default: int  # JSON APIs, rules, everything not named below
    upload: int  # POST /api/uploads (multipart)
    webhook: int  # /webhooks/...
    small: int  # sign-in and out (/console/...), survey answers (/survey/...)

    def for_path(self, path: str) -> int:
        if path.startswith("/webhooks/"):
            return self.webhook
        if path == "/api/uploads":
            return self.upload
        if path.startswith(("/console/", "/survey/")):
            return self.small
        return self.default


class BodyLimit:
    """Answers 413 to a request whose body is over its route's limit, while reading it."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope["path"])
        announced = _content_length(scope)
        if announced is not None and announced > limit:
            await _refuse(send, limit)
            return

        received = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _refuse(send, limit)
                    # The route sees the client go away: whatever it answers is dropped.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the route failed on the disconnect we made up: the 413 has been sent


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses these before we are called
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": "too_large",
            "message": f"the request body is larger than this route's limit of {limit} bytes",
            "limit": limit,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
