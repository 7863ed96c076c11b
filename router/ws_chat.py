"""``/ws/chat?inbox=<slug>``: the web-chat visitor protocol (docs/agent-protocol.md, "Visitors").

Origins not in the inbox's ``allowed_origins`` (or our own public origin) get 403 before
the upgrade. The first frame is a ``hello`` with the visitor's token if the widget has one;
a new visitor gets a fresh signed token in the ``welcome``, and a token this server never
minted is refused with a ``token_rejected`` error (the visitor starts anew, counted by the
new-visitor limit). Each message carries a client UUID; the server acks after the commit,
only with the stored message's id, and dedupes a resend on ``(inbox, visitor, client_id)``.
Frames are read by ``router.ws_frames`` (binary, too deep or unstorable text: an error).
Token buckets per IP and per visitor limit connections, new visitors and messages: beyond
them the socket is closed with 1008 and a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from sqlalchemy import Connection, select
from sqlalchemy.exc import DBAPIError
from starlette.websockets import WebSocketDisconnected

from channels.webchat import WebChatChannel, minted, new_visitor_token, visitor_address
from router import policy
from router.abandon import visitor_back, visitor_left, waiting_chats
from router.api.deps import declare
from router.csat import visitor_answer
from router.events import agent_stream, visitor_stream
from router.exceptions import Unavailable
from router.failpoints import failpoint
from router.hub import Session
from router.models import ContactIdentity, Conversation, Message
from router.ratelimit import RateLimiter
from router.runtime import Runtime
from router.sessions import origin_of, own_origins
from router.timeline import visitor_history
from router.types import OPEN_STATES
from router.visitor_identity import finish_proof, sign_in, start_proof
from router.ws_frames import BadFrame, receive

__all__ = ["router"]

router = APIRouter()
log = logging.getLogger(__name__)
HELLO_TIMEOUT = 10.0
_sockets: dict[str, int] = {}  # open visitor sockets in this process, by visitor


class _Limits:
    """Per-inbox token buckets, created lazily (per process)."""

    def __init__(self, channel: WebChatChannel) -> None:
        c = channel.web_config
        self.connections = RateLimiter(c.connections_per_minute_per_ip, 60)
        self.new_visitors = RateLimiter(c.new_visitors_per_minute_per_ip, 60)
        self.visitor_messages = RateLimiter(
            min(10, c.messages_per_minute_per_visitor),
            60 * min(10, c.messages_per_minute_per_visitor) / c.messages_per_minute_per_visitor,
        )
        self.ip_messages = RateLimiter(c.messages_per_minute_per_ip, 60)


def _limits(channel: WebChatChannel) -> _Limits:
    limits = getattr(channel, "_limits", None)
    if limits is None:
        limits = _Limits(channel)
        channel._limits = limits  # type: ignore[attr-defined]
    return limits


def _identity(conn: Connection, address: str) -> int | None:
    return conn.execute(
        select(ContactIdentity.id).where(
            ContactIdentity.kind == "webchat", ContactIdentity.address == address
        )
    ).scalar_one_or_none()


def _assigned_agent(conn: Connection, identity_id: int) -> int | None:
    return conn.execute(
        select(Conversation.assigned_agent_id)
        .join(Message, Message.conversation_id == Conversation.id)
        .where(
            Message.identity_id == identity_id,
            Conversation.state.in_([s.value for s in OPEN_STATES]),
            Conversation.assigned_agent_id.is_not(None),
        )
        .order_by(Message.id.desc())
        .limit(1)
    ).scalar_one_or_none()


async def _returning(runtime: Runtime, token: object) -> str | None:
    """The visitor address of a returning visitor's token: a token this server minted (its
    signature checks), or one issued before tokens were signed whose visitor the database
    knows. None for anything else: a made-up token is no way around the new-visitor limit."""
    if not isinstance(token, str):
        return None
    address = visitor_address(token)
    if address is None:
        return None
    if minted(runtime.channel_secret, token):
        return address
    return address if await runtime.db.read(_identity, address) is not None else None


@router.websocket("/ws/chat", dependencies=[declare(policy.VISITOR)])
async def chat_socket(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    with runtime.socket_open(ws, "visitor"):
        await _chat_socket(ws)


async def _chat_socket(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    slug = ws.query_params.get("inbox", "")
    channel = runtime.channels.get(slug)
    if not isinstance(channel, WebChatChannel) or not runtime.inboxes[slug].enabled:
        await ws.close(code=1008)  # before accept: an HTTP 403
        return
    origin = (ws.headers.get("origin") or "").lower()
    allowed = {origin_of(o) for o in channel.config.allowed_origins} | own_origins(
        runtime.settings.public_base_url
    )
    if origin not in allowed:
        log.info("web chat upgrade from a foreign origin %r refused", origin)
        await ws.close(code=1008)  # 403
        return
    ip = ws.client.host if ws.client else "?"
    limits = _limits(channel)
    await ws.accept()
    if not limits.connections.allow(ip):
        await ws.close(1008, "rate limit: too many connections")
        return
    send_lock = asyncio.Lock()

    async def send(frame: dict[str, Any]) -> None:
        async with send_lock:
            await ws.send_text(json.dumps(frame, default=str))

    try:
        hello = await asyncio.wait_for(receive(ws), HELLO_TIMEOUT)
        if hello.get("type") != "hello":
            raise BadFrame("invalid", 'the first frame must be {"type": "hello"}')
    except TimeoutError:
        with contextlib.suppress(Exception):
            await ws.close(1008, 'the first frame must be {"type": "hello"}')
        return
    except BadFrame as exc:
        with contextlib.suppress(Exception):
            await send(exc.frame())
            await ws.close(1008, 'the first frame must be {"type": "hello"}')
        return
    except WebSocketDisconnect:
        return
    token = hello.get("token")
    address = await _returning(runtime, token) if token is not None else None
    rejected = token is not None and address is None
    if address is None:
        if rejected:
            # a token this server never issued (made up, or from another deployment):
            # said plainly, then the visitor is a new one, counted like any other
            log.info("web chat %s: a visitor token this server never issued refused", slug)
            try:
                await send(
                    {
                        "type": "error",
                        "code": "token_rejected",
                        "message": "this chat token was not issued here: a new chat starts",
                    }
                )
            except (WebSocketDisconnect, WebSocketDisconnected):
                return
        if not limits.new_visitors.allow(ip):
            await ws.close(1008, "rate limit: too many new visitors")
            return
        token = new_visitor_token(runtime.channel_secret)
        address = visitor_address(token)
        assert address is not None
    name = hello.get("name") if isinstance(hello.get("name"), str) else None
    email = hello.get("email") if isinstance(hello.get("email"), str) else None
    language = hello.get("language") if isinstance(hello.get("language"), str) else None
    stream = visitor_stream(address)
    resume = None if rejected else hello.get("last_seq")
    session = Session(runtime.db, runtime.bus, send)
    try:
        opened = await session.open(
            {stream: resume if isinstance(resume, int) and not isinstance(resume, bool) else None},
            [f"ephemeral:{stream}"],
        )
        _sockets[address] = _sockets.get(address, 0) + 1
        waiting = await runtime.db.read(waiting_chats, address)
        if any("visitor_left_at" in (row.data or {}) for row in waiting):
            await runtime.db.write(visitor_back, address)  # back in time: not abandoned
        identity_problem = (
            await sign_in(runtime, channel, address, name, hello["identity"])
            if hello.get("identity") is not None
            else None
        )
        identity_id = await runtime.db.read(_identity, address)
        history = (
            await runtime.db.read(visitor_history, identity_id) if identity_id is not None else []
        )
        await send(
            {
                "type": "welcome",
                "token": token,
                "stream": stream,
                "last_seq": opened.positions[stream],
                "history": history,
                "title": channel.web_config.title,
                "greeting": channel.web_config.greeting,
                "max_chars": channel.web_config.max_message_chars,
            }
        )
        if identity_problem is not None:
            await send({"type": "error", "code": "identity_rejected", "message": identity_problem})
        for frame in opened.replay:
            await send(frame)
        session.start()
        while True:
            try:
                frame = await receive(ws)
            except BadFrame as exc:
                # refused before anything is stored: a message that cannot be stored is
                # never acknowledged (its client_id comes back with the error)
                await send(exc.frame("client_id"))
                continue
            try:
                kind = frame.get("type")
                if kind == "message":
                    problem = channel.check_message(frame.get("client_id"), frame.get("text"))
                    if problem is not None:
                        await send(
                            {
                                "type": "error",
                                "code": "invalid",
                                "client_id": frame.get("client_id"),
                                "message": problem,
                            }
                        )
                        continue
                    if not limits.visitor_messages.allow(address) or not limits.ip_messages.allow(
                        ip
                    ):
                        await ws.close(1008, "rate limit: too many messages")
                        return
                    # pre-chat answers may come with the first message instead of the hello
                    if name is None and isinstance(frame.get("name"), str):
                        name = frame["name"]
                    if email is None and isinstance(frame.get("email"), str):
                        email = frame["email"]
                    item = channel.inbound(
                        address,
                        frame["client_id"],
                        frame["text"],
                        name=name,
                        email=email,
                        language=language,
                    )
                    outcomes = await runtime.ingest(slug, [item])
                    failpoint("after_visitor_commit")
                    outcome = outcomes[0] if outcomes else None
                    if outcome is None or outcome.message_id is None:
                        # quarantined with its reason for an admin: the visitor must not
                        # believe it arrived, so no ack (and no resend: it would fail again)
                        await send(
                            {
                                "type": "error",
                                "code": "not_stored",
                                "client_id": frame["client_id"],
                                "message": "the message could not be stored and did not reach us",
                            }
                        )
                    else:
                        await send(
                            {
                                "type": "ack",
                                "client_id": frame["client_id"],
                                "message_id": outcome.message_id,
                                "duplicate": outcome.duplicate,
                            }
                        )
                    await runtime.after_ingest(outcomes)
                elif kind == "typing":
                    identity_id = identity_id or await runtime.db.read(_identity, address)
                    agent_id = (
                        await runtime.db.read(_assigned_agent, identity_id)
                        if identity_id is not None
                        else None
                    )
                    if agent_id is not None:
                        await runtime.bus.publish(
                            f"ephemeral:{agent_stream(agent_id)}",
                            {"type": "typing", "from": "visitor", "visitor": address},
                        )
                elif kind == "survey_answer":
                    identity_id = identity_id or await runtime.db.read(_identity, address)
                    recorded = identity_id is not None and await runtime.db.write(
                        visitor_answer, identity_id, frame.get("score")
                    )
                    await send(
                        {"type": "survey_thanks"}
                        if recorded
                        else {"type": "error", "code": "invalid", "message": "no survey is waiting"}
                    )
                elif kind == "verify_start":
                    if not limits.visitor_messages.allow(address):
                        await ws.close(1008, "rate limit: too many messages")
                        return
                    await send(await start_proof(runtime, channel, address, name, frame))
                elif kind == "verify_code":
                    await send(await finish_proof(runtime, address, name, frame))
                elif kind == "ping":
                    await send({"type": "pong"})
                else:
                    await send(
                        {
                            "type": "error",
                            "code": "invalid",
                            "message": f'unknown frame type "{kind}"',
                        }
                    )
            except (DBAPIError, Unavailable) as exc:
                # The database cannot take it now (down, full): nothing was stored. Say so;
                # the widget keeps the message and sends it again (same client_id: stored
                # once); the socket stays open.
                log.warning("web chat %s: storage unavailable (%s)", slug, type(exc).__name__)
                await send(
                    {
                        "type": "error",
                        "code": "unavailable",
                        "client_id": frame.get("client_id"),
                        "retry_after": 5,
                        "message": "we cannot take messages right now; it will be sent again",
                    }
                )
    except (WebSocketDisconnect, WebSocketDisconnected):
        pass  # the client left (or a send found it gone)
    finally:
        await session.close()
        # the visitor's last socket here closed: their waiting chats start counting
        # towards the inbox's abandon_after (another socket of theirs keeps them present)
        if address in _sockets:
            _sockets[address] -= 1
            if _sockets[address] <= 0:
                del _sockets[address]
                with contextlib.suppress(Exception):
                    if await runtime.db.read(waiting_chats, address):
                        await runtime.db.write(visitor_left, address)
