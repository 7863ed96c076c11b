"""Reading a websocket frame as a JSON object, whatever the client sends (docs/security.md,
"Websocket frames").

Every socket (``/ws/agent``, ``/ws/chat``, ``/ws/supervisor``) reads its frames here. A frame
the server will not act on raises :class:`BadFrame`, which the socket answers with an
``error`` frame and then goes on reading (or, for the first frame, closes with 1008):

- a binary frame (``binary_frame``);
- a frame over :data:`MAX_FRAME` characters (``too_large``);
- JSON nested deeper than :data:`MAX_DEPTH` (``too_deep``): Python's parser recurses, so a
  frame of 30,000 ``[`` would otherwise end in a ``RecursionError``;
- text that is not a JSON object (``invalid``);
- a string holding a lone surrogate or a NUL written as a JSON escape (``"\\ud800"``,
  ``"\\u0000"``) (``invalid_text``): such text cannot be encoded as UTF-8, so it could never
  be stored (PostgreSQL refuses NUL too) and must be refused before anything is stored or
  acknowledged.

Text frames that are not valid UTF-8 never reach the application: the websocket layer fails
the connection with 1007, as RFC 6455 requires (see :func:`quiet_invalid_utf8`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from router.exceptions import OmnirouteError

__all__ = ["MAX_DEPTH", "MAX_FRAME", "BadFrame", "parse_frame", "quiet_invalid_utf8", "receive"]

MAX_FRAME = 64 * 1024
MAX_DEPTH = 32


class BadFrame(OmnirouteError):
    """A frame the server refuses; ``code`` says why (see the module docstring)."""

    status = 400

    def __init__(self, code: str, message: str, request: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request = request  # the parsed frame, when it was a JSON object

    def frame(self, *echo: str) -> dict[str, Any]:
        """The ``error`` frame, repeating the ``echo`` fields of the refused request (its
        ``id`` or ``client_id``) when they are plain, storable values."""
        out: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        for key in echo:
            value = (self.request or {}).get(key)
            if (isinstance(value, str) and _storable(value)) or isinstance(value, int):
                out[key] = value
        return out


def _storable(text: str) -> bool:
    if text.isascii():
        return "\x00" not in text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _check(value: Any) -> None:
    """Walk the parsed frame without recursion: its depth, and every string (keys too)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                raise BadFrame(
                    "invalid_text",
                    "text must be valid Unicode: a lone surrogate (\\ud800-\\udfff) or a NUL "
                    "character cannot be stored",
                )
            continue
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise _too_deep()
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def _too_deep() -> BadFrame:
    return BadFrame("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels is refused")


def parse_frame(raw: str) -> dict[str, Any]:
    """The JSON object in ``raw``, or :class:`BadFrame`."""
    if len(raw) > MAX_FRAME:
        raise BadFrame("too_large", f"frames are limited to {MAX_FRAME} bytes")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise BadFrame("invalid", "frames must be JSON objects") from None
    if not isinstance(value, dict):
        raise BadFrame("invalid", "frames must be JSON objects")
    # Cheap cases first: no escape means no surrogate or NUL (the text itself was decoded
    # from UTF-8 and JSON allows no raw control characters in strings), and few brackets
    # mean little depth; most frames skip the walk.
    if "\\u" in raw or raw.count("[") + raw.count("{") > MAX_DEPTH:
        try:
            _check(value)
        except BadFrame as exc:
            exc.request = value
            raise
    return value


async def receive(ws: WebSocket) -> dict[str, Any]:
    """The next frame as a JSON object. Raises :class:`BadFrame` for a frame the server
    refuses (the socket stays usable) and ``WebSocketDisconnect`` when the client left."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if text is None:
        raise BadFrame("binary_frame", "frames must be text (JSON objects), not binary")
    return parse_frame(text)


class _InvalidUtf8(logging.Filter):
    """uvicorn logs a client's invalid UTF-8 text frame with a traceback at ERROR level; it
    is the client's fault, already answered with close 1007: one warning line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Invalid UTF-8 sequence received from client"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = (
                "a client sent a text frame that is not UTF-8: closed 1007",
                (),
            )
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = _InvalidUtf8()


def quiet_invalid_utf8() -> None:
    """Install the filter on uvicorn's error logger (once per process)."""
    logger = logging.getLogger("uvicorn.error")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
