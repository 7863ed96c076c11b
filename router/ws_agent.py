"""``/ws/agent``: the agent protocol (documented in docs/agent-protocol.md).

The token travels in the first frame, never in the URL (URLs end up in logs). The client
sends ``{"type": "hello", "token": ..., "resume": {"agent:3": 41}}``; the server answers
``welcome`` with a snapshot of the agent's offers and conversations, then replays what the
client missed on each stream (or ``resync_required`` if it was pruned), then goes live.
Every command carries an ``id`` and is answered by ``ack`` or ``error`` with that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from sqlalchemy import Connection, select
from starlette.websockets import WebSocketDisconnected

from router.agents import agent_by_name
from router.assignment.core import conversation_summary
from router.auth import Principal
from router.credentials import CLOSE_CODE, MESSAGES, PRESENCE_REASONS, REVOKED, Credential
from router.events import SUPERVISORS, agent_stream
from router.exceptions import Forbidden, InvalidInput, NotFound, OmnirouteError, Unauthorized
from router.hub import Session
from router.identity import merge_as
from router.messaging import agent_write
from router.models import ContactIdentity, Conversation, Message, Offer
from router.outbox import resend
from router.revocation import Watch
from router.runtime import Runtime
from router.sessions import hello_principal
from router.timeline import contact_timeline
from router.types import AgentPresence, OfferState, Role

__all__ = ["agent_state", "router"]

router = APIRouter()
log = logging.getLogger(__name__)
HELLO_TIMEOUT = 10.0
MAX_FRAME = 64 * 1024


def agent_state(conn: Connection, agent_id: int) -> dict[str, Any]:
    offers = conn.execute(
        select(Offer.id, Offer.conversation_id, Offer.expires_at)
        .where(Offer.agent_id == agent_id, Offer.state == OfferState.PENDING.value)
        .order_by(Offer.id)
    ).all()
    owned = (
        conn.execute(
            select(Conversation.id)
            .where(
                Conversation.assigned_agent_id == agent_id,
                Conversation.state.in_(["assigned", "waiting_customer", "offered"]),
            )
            .order_by(Conversation.id)
        )
        .scalars()
        .all()
    )
    return {
        "offers": [
            {
                "offer_id": o.id,
                "expires_at": o.expires_at.isoformat(),
                "conversation": conversation_summary(conn, o.conversation_id),
            }
            for o in offers
        ],
        "conversations": [conversation_summary(conn, int(c)) for c in owned],
    }


def _visitor_of(conn: Connection, conversation_id: int) -> str | None:
    return conn.execute(
        select(ContactIdentity.address)
        .join(Message, Message.identity_id == ContactIdentity.id)
        .where(
            Message.conversation_id == conversation_id,
            Message.direction == "in",
            ContactIdentity.kind == "webchat",
        )
        .order_by(Message.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def _outbox_of_message(conn: Connection, message_id: int, conversation_agent: int) -> int | None:
    from router.models import Outbox

    row = conn.execute(
        select(Outbox.id)
        .join(Conversation, Conversation.id == Outbox.conversation_id)
        .where(
            Outbox.message_id == message_id, Conversation.assigned_agent_id == conversation_agent
        )
    ).first()
    return int(row[0]) if row else None


def _int(cmd: dict[str, Any], key: str) -> int:
    value = cmd.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f'"{key}" must be an integer')
    return value


def _text(cmd: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = cmd.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f'"{key}" must be a string')
    return value


class SignedOut(Exception):
    """The socket's credential ended: nothing more is sent to it."""


class AgentConnection:
    def __init__(self, ws: WebSocket, runtime: Runtime, principal: Principal) -> None:
        self.ws = ws
        self.runtime = runtime
        self.principal = principal
        assert principal.agent_id is not None
        self.agent_id: int = principal.agent_id
        self._send_lock = asyncio.Lock()
        self.watch: Watch | None = None

    async def send(self, frame: dict[str, Any]) -> None:
        if self.watch is not None and not await self.watch.valid():
            raise SignedOut(self.watch.ended)
        async with self._send_lock:
            await self.ws.send_text(json.dumps(frame, default=str))

    async def signed_out(self, reason: str) -> None:
        """The credential ended (router.revocation): say why, close with 4401 and the reason."""
        message = MESSAGES[reason]
        async with self._send_lock:
            with contextlib.suppress(Exception):
                await self.ws.send_text(
                    json.dumps({"type": "signed_out", "reason": reason, "message": message})
                )
        await self.ws.close(CLOSE_CODE, message)

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        kind = cmd.get("type")
        a, rt = self.agent_id, self.runtime
        if kind == "ping":
            return {}
        if kind == "accept":
            result = await rt.assignment.accept(a, _int(cmd, "offer_id"))
            contact_id = await rt.db.read(
                lambda c: c.execute(
                    select(Conversation.contact_id).where(
                        Conversation.id == result["conversation_id"]
                    )
                ).scalar_one()
            )
            result["timeline"] = await rt.db.read(contact_timeline, int(contact_id))
            return result
        if kind == "reject":
            await rt.assignment.reject(
                a, _int(cmd, "offer_id"), _text(cmd, "reason", required=False)
            )
            return {}
        if kind in ("reply", "note"):
            client_id = _text(cmd, "client_id", required=False)
            identity = cmd.get("identity_id")
            result = await rt.db.write(
                agent_write,
                a,
                _int(cmd, "conversation_id"),
                _text(cmd, "text") or "",
                note=kind == "note",
                client_id=client_id,
                identity_id=identity if isinstance(identity, int) else None,
                inbox_id=rt.inbox_id_of(_text(cmd, "inbox", required=False)),
                template=_template(cmd.get("template")),
                attachments=cmd.get("attachments") or None,
            )
            rt.outbox.wake()
            return result
        if kind == "transfer":
            to_agent_name = _text(cmd, "to_agent", required=False)
            to_agent = None
            if to_agent_name is not None:
                to_agent = await rt.db.read(agent_by_name, to_agent_name)
                if to_agent is None:
                    raise NotFound(f'no agent "{to_agent_name}"')
            await rt.assignment.transfer(
                a,
                _int(cmd, "conversation_id"),
                to_queue=_text(cmd, "to_queue", required=False),
                to_agent=to_agent,
                note=_text(cmd, "note", required=False),
            )
            return {}
        if kind == "resolve":
            resolved = await rt.assignment.resolve(a, _int(cmd, "conversation_id"))
            return {"wrap_up_until": resolved["wrap_up_until"]} if resolved["wrap_up_until"] else {}
        if kind == "end_wrap_up":
            await rt.assignment.end_wrap_up(a, _int(cmd, "conversation_id"))
            return {}
        if kind == "escalate":
            queue = await rt.assignment.escalate(
                a, _int(cmd, "conversation_id"), _text(cmd, "reason") or ""
            )
            return {"queue": queue}
        if kind == "merge_contacts":
            return await rt.db.write(
                merge_as,
                _int(cmd, "contact_id"),
                _int(cmd, "from_contact_id"),
                actor=f"user:{self.principal.user_id}",
                any_pair=self.principal.allows(Role.SUPERVISOR),
                reason=_text(cmd, "reason", required=False),
            )
        if kind == "send_to_routing":
            await rt.assignment.send_to_routing(
                a, _int(cmd, "conversation_id"), _text(cmd, "note", required=False)
            )
            return {}
        if kind == "set_status":
            status = cmd.get("status")
            if status not in ("online", "away"):
                raise InvalidInput('"status" must be "online" or "away"')
            await rt.assignment.set_status(a, AgentPresence(status), "set by agent")
            return {"status": status}
        if kind == "typing":
            visitor = await rt.db.read(_visitor_of, _int(cmd, "conversation_id"))
            if visitor is not None:
                await rt.bus.publish(
                    f"ephemeral:visitor:{visitor}", {"type": "typing", "from": "agent"}
                )
            return {}
        if kind == "resend":
            outbox_id = await rt.db.read(_outbox_of_message, _int(cmd, "message_id"), a)
            if outbox_id is None or not await rt.db.write(
                resend, outbox_id, f"resend requested by {self.principal.name}"
            ):
                raise NotFound("no uncertain or failed message of yours with that id")
            rt.outbox.wake()
            return {}
        if kind == "timeline":
            before = cmd.get("before")
            contact_id = await rt.db.read(
                lambda c: c.execute(
                    select(Conversation.contact_id).where(
                        Conversation.id == _int(cmd, "conversation_id")
                    )
                ).scalar_one_or_none()
            )
            if contact_id is None:
                raise NotFound("no such conversation")
            return await rt.db.read(
                lambda c: contact_timeline(
                    c, int(contact_id), before=before if isinstance(before, int) else None
                )
            )
        if kind == "state":
            return await rt.db.read(agent_state, a)
        raise InvalidInput(
            f'unknown command "{kind}"' if isinstance(kind, str) else 'a command needs a "type"'
        )


async def _hello(ws: WebSocket, runtime: Runtime) -> tuple[Principal, Credential, dict[str, Any]]:
    try:
        raw = await asyncio.wait_for(ws.receive_text(), HELLO_TIMEOUT)
    except TimeoutError:
        raise Unauthorized("send hello with your token first") from None
    try:
        hello = json.loads(raw)
    except ValueError:
        raise Unauthorized("the first frame must be a JSON hello") from None
    if not isinstance(hello, dict) or hello.get("type") != "hello":
        raise Unauthorized('the first frame must be {"type": "hello", "token": ...}')
    principal, credential = await hello_principal(ws, runtime.db, hello)
    if principal.agent_id is None:
        raise Forbidden("this user is not an agent")
    return principal, credential, hello


@router.websocket("/ws/agent")
async def agent_socket(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    with runtime.socket_open(ws, "agent"):
        await _agent_socket(ws)


async def _agent_socket(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    await ws.accept()
    try:
        principal, credential, hello = await _hello(ws, runtime)
    except OmnirouteError as exc:
        with contextlib.suppress(Exception):
            await ws.send_text(
                json.dumps({"type": "error", "code": exc.code, "message": exc.message})
            )
            await ws.close(1008, exc.message[:120])
        return
    except WebSocketDisconnect:
        return
    conn = AgentConnection(ws, runtime, principal)
    with runtime.guard.watching(credential, conn.signed_out) as watch:
        conn.watch = watch
        try:
            await _serve_agent(ws, runtime, conn, hello)
        finally:
            await watch.closed()  # a socket signed out leaves with its code and reason


async def _serve_agent(
    ws: WebSocket, runtime: Runtime, conn: AgentConnection, hello: dict[str, Any]
) -> None:
    principal, watch = conn.principal, conn.watch
    assert watch is not None
    resume: dict[str, Any] = hello["resume"] if isinstance(hello.get("resume"), dict) else {}
    streams: dict[str, int | None] = {
        agent_stream(conn.agent_id): _seq(resume.get(agent_stream(conn.agent_id)))
    }
    if principal.allows(Role.SUPERVISOR):
        streams[SUPERVISORS] = _seq(resume.get(SUPERVISORS))
    session = Session(runtime.db, runtime.bus, conn.send)
    connection_id: int | None = None
    try:
        opened = await session.open(streams, [f"ephemeral:{agent_stream(conn.agent_id)}"])
        state = await runtime.db.read(agent_state, conn.agent_id)
        await conn.send(
            {
                "type": "welcome",
                "agent_id": conn.agent_id,
                "user": principal.name,
                "role": principal.role.value,
                "streams": opened.positions,
                "state": state,
            }
        )
        for stream in opened.resync:
            await conn.send({"type": "resync_required", "stream": stream})
        for frame in opened.replay:
            await conn.send(frame)
        session.start()
        # Only now the agent goes online (and may be offered work): new offers arrive as
        # live events after the welcome, never lost between the snapshot and the stream.
        # Refused if the credential ended since the hello (then no presence outlives it).
        try:
            connection_id = await runtime.assignment.connect(conn.agent_id, watch.credential)
        except Unauthorized as exc:
            watch.end(str(exc.detail.get("reason", REVOKED)))
            return
        await _command_loop(ws, conn)
    except (WebSocketDisconnect, WebSocketDisconnected, SignedOut):
        pass  # the client left (or a send found it gone, or signed out)
    finally:
        await session.close()
        logout = getattr(conn, "logged_out", False)
        if connection_id is not None:
            ended = PRESENCE_REASONS[watch.ended] if watch.ended is not None else None
            try:
                await runtime.assignment.disconnect(
                    conn.agent_id, connection_id, logout=logout, ended=ended
                )
            except Exception:
                log.exception("disconnect bookkeeping failed for agent %s", conn.agent_id)


def _seq(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def _command_loop(ws: WebSocket, conn: AgentConnection) -> None:
    while True:
        raw = await ws.receive_text()
        if len(raw) > MAX_FRAME:
            await conn.send(
                {
                    "type": "error",
                    "code": "too_large",
                    "message": f"frames are limited to {MAX_FRAME} bytes",
                }
            )
            continue
        try:
            cmd = json.loads(raw)
        except ValueError:
            await conn.send(
                {"type": "error", "code": "invalid", "message": "frames must be JSON objects"}
            )
            continue
        if not isinstance(cmd, dict):
            await conn.send(
                {"type": "error", "code": "invalid", "message": "frames must be JSON objects"}
            )
            continue
        request_id = cmd.get("id")
        # A credential that ended acts no more, even before its socket is closed.
        try:
            if conn.watch is not None and not await conn.watch.valid(strict=True):
                return
        except OmnirouteError as exc:
            await conn.send(
                {"type": "error", "id": request_id, "code": exc.code, "message": exc.message}
            )
            continue
        if cmd.get("type") == "logout":
            conn.logged_out = True  # type: ignore[attr-defined]
            await conn.send({"type": "ack", "id": request_id, "result": {}})
            await ws.close(1000, "logged out")
            return
        reply: dict[str, Any] | None
        try:
            result = await conn.handle(cmd)
            reply = (
                None
                if cmd.get("type") == "typing"
                else {"type": "ack", "id": request_id, "result": result}
            )
        except OmnirouteError as exc:
            reply = {"type": "error", "id": request_id, "code": exc.code, "message": exc.message}
        except Exception:
            log.exception("agent command %r failed", cmd.get("type"))
            reply = {
                "type": "error",
                "id": request_id,
                "code": "internal",
                "message": "the command failed; it can be retried",
            }
        if reply is not None:
            try:
                await conn.send(reply)
            except Exception:
                # The client left while its command ran: the command took effect and the
                # client sees its outcome in the events it gets when it resumes.
                return


def _template(value: Any) -> dict[str, Any] | None:
    """A reply's provider template: ``{name, language, params?}`` (strings), else refused."""
    if value is None:
        return None
    ok = (
        isinstance(value, dict)
        and set(value) <= {"name", "language", "params"}
        and isinstance(value.get("name"), str)
        and isinstance(value.get("language"), str)
        and isinstance(value.get("params", []), list)
        and all(isinstance(p, str) for p in value.get("params", []))
    )
    if not ok:
        raise InvalidInput("template: expected {name, language, params: [strings]}")
    return dict(value)
