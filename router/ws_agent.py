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
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from sqlalchemy import Connection, select
from starlette.websockets import WebSocketDisconnected

from router import policy
from router.agents import agent_by_name
from router.api.contacts import merge_visible
from router.api.deps import declare
from router.assignment.core import conversation_summary
from router.auth import Principal
from router.credentials import CLOSE_CODE, MESSAGES, PRESENCE_REASONS, REVOKED, Credential
from router.events import SUPERVISORS, agent_stream
from router.exceptions import InvalidInput, NotFound, OmnirouteError, Unauthorized
from router.hub import Session
from router.messaging import agent_write
from router.models import ContactIdentity, Conversation, Message, Offer
from router.outbox import resend
from router.policy import Caller, Rule
from router.revocation import Watch
from router.runtime import Runtime
from router.sessions import hello_principal
from router.timeline import contact_timeline
from router.types import AgentPresence, OfferState
from router.ws_frames import BadFrame, receive

__all__ = ["COMMANDS", "agent_state", "router"]

router = APIRouter()
log = logging.getLogger(__name__)
HELLO_TIMEOUT = 10.0


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


def _visitor_of(conn: Connection, conversation_id: int, holder: int | None) -> str | None:
    """The web-chat visitor of the conversation, if ``holder`` holds it (None: anyone)."""
    query = (
        select(ContactIdentity.address)
        .join(Message, Message.identity_id == ContactIdentity.id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.conversation_id == conversation_id,
            Message.direction == "in",
            ContactIdentity.kind == "webchat",
        )
        .order_by(Message.id.desc())
        .limit(1)
    )
    if holder is not None:
        query = query.where(Conversation.assigned_agent_id == holder)
    return conn.execute(query).scalar_one_or_none()


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


Handler = Callable[["AgentConnection", dict[str, Any], Caller], Awaitable[dict[str, Any]]]


class SignedOut(Exception):
    """The socket's credential ended: nothing more is sent to it."""


class AgentConnection:
    def __init__(self, ws: WebSocket, runtime: Runtime, principal: Principal) -> None:
        self.ws = ws
        self.runtime = runtime
        self.principal = principal
        assert principal.agent_id is not None
        self.agent_id: int = principal.agent_id
        self.logged_out = False
        self._send_lock = asyncio.Lock()
        # what stream events may reach this socket (router.policy.frame_visible)
        self.scope: Caller | None = None
        self.scope_agents: set[int] = set()
        self.watch: Watch | None = None

    async def send(self, frame: dict[str, Any]) -> None:
        if self.watch is not None and not await self.watch.valid():
            raise SignedOut(self.watch.ended)
        async with self._send_lock:
            await self.ws.send_text(json.dumps(frame, default=str))

    async def send_event(self, frame: dict[str, Any]) -> None:
        if self.scope is None or policy.frame_visible(self.scope, frame, self.scope_agents):
            await self.send(frame)

    async def authorize(self, rule: Rule, cmd: dict[str, Any]) -> Caller:
        """The command's rule (router.policy): 403 without its role, 404 for an object the
        agent may not see (named by the command's ``<target>_id`` field)."""
        policy.check_role(self.principal, rule)
        object_id = _int(cmd, rule.target.field) if rule.target is not None else None
        rt = self.runtime
        caller: Caller = await rt.db.read(
            policy.authorize, self.principal, rule, rt.rules.active, object_id
        )
        return caller

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
        entry = COMMANDS.get(kind) if isinstance(kind, str) else None
        if entry is None:
            raise InvalidInput(
                f'unknown command "{kind}"' if isinstance(kind, str) else 'a command needs a "type"'
            )
        rule, handler = entry
        return await handler(self, cmd, await self.authorize(rule, cmd))

    # -- the commands (COMMANDS below: each with its rule) ----------------------------------
    async def ping(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        return {}

    async def logout(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        self.logged_out = True  # the loop closes the socket after the answer
        return {}

    async def accept(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rt = self.runtime
        result = await rt.assignment.accept(self.agent_id, _int(cmd, "offer_id"))
        contact_id = await rt.db.read(
            lambda c: c.execute(
                select(Conversation.contact_id).where(Conversation.id == result["conversation_id"])
            ).scalar_one()
        )
        # held now: the scope is read again, so the new conversation is in it
        visible = policy.visible_conversations(
            await rt.db.read(policy.caller_of, self.principal, rt.rules.active)
        )
        result["timeline"] = await rt.db.read(
            lambda c: contact_timeline(c, int(contact_id), visible=visible)
        )
        return result

    async def reject(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        await self.runtime.assignment.reject(
            self.agent_id, _int(cmd, "offer_id"), _text(cmd, "reason", required=False)
        )
        return {}

    async def write(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rt = self.runtime
        identity = cmd.get("identity_id")
        result: dict[str, Any] = await rt.db.write(
            agent_write,
            self.agent_id,
            _int(cmd, "conversation_id"),
            _text(cmd, "text") or "",
            note=cmd.get("type") == "note",
            client_id=_text(cmd, "client_id", required=False),
            identity_id=identity if isinstance(identity, int) else None,
            inbox_id=rt.inbox_id_of(_text(cmd, "inbox", required=False)),
            supervisor=policy.may_work_unheld(caller),
            template=_template(cmd.get("template")),
            attachments=cmd.get("attachments") or None,
        )
        rt.outbox.wake()
        return result

    async def transfer(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rt = self.runtime
        to_agent_name = _text(cmd, "to_agent", required=False)
        to_agent = None
        if to_agent_name is not None:
            to_agent = await rt.db.read(agent_by_name, to_agent_name)
            if to_agent is None:
                raise NotFound(f'no agent "{to_agent_name}"')
        await rt.assignment.transfer(
            self.agent_id,
            _int(cmd, "conversation_id"),
            to_queue=_text(cmd, "to_queue", required=False),
            to_agent=to_agent,
            note=_text(cmd, "note", required=False),
        )
        return {}

    async def resolve(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        resolved = await self.runtime.assignment.resolve(
            self.agent_id, _int(cmd, "conversation_id")
        )
        return {"wrap_up_until": resolved["wrap_up_until"]} if resolved["wrap_up_until"] else {}

    async def end_wrap_up(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        await self.runtime.assignment.end_wrap_up(self.agent_id, _int(cmd, "conversation_id"))
        return {}

    async def escalate(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        queue = await self.runtime.assignment.escalate(
            self.agent_id, _int(cmd, "conversation_id"), _text(cmd, "reason") or ""
        )
        return {"queue": queue}

    async def merge_contacts(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rt = self.runtime
        result: dict[str, Any] = await rt.db.write(
            merge_visible,
            caller,
            _int(cmd, "contact_id"),
            _int(cmd, "from_contact_id"),
            rt.rules.active,
            _text(cmd, "reason", required=False),
        )
        return result

    async def send_to_routing(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        await self.runtime.assignment.send_to_routing(
            self.agent_id, _int(cmd, "conversation_id"), _text(cmd, "note", required=False)
        )
        return {}

    async def set_status(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        status = cmd.get("status")
        if status not in ("online", "away"):
            raise InvalidInput('"status" must be "online" or "away"')
        await self.runtime.assignment.set_status(
            self.agent_id, AgentPresence(status), "set by agent"
        )
        return {"status": status}

    async def typing(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rt = self.runtime
        holder = None if policy.may_work_unheld(caller) else self.agent_id
        visitor = await rt.db.read(_visitor_of, _int(cmd, "conversation_id"), holder)
        if visitor is not None:
            await rt.bus.publish(
                f"ephemeral:visitor:{visitor}", {"type": "typing", "from": "agent"}
            )
        return {}

    async def resend(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rt = self.runtime
        outbox_id = await rt.db.read(_outbox_of_message, _int(cmd, "message_id"), self.agent_id)
        if outbox_id is None or not await rt.db.write(
            resend, outbox_id, f"resend requested by {self.principal.name}"
        ):
            raise NotFound("no uncertain or failed message of yours with that id")
        rt.outbox.wake()
        return {}

    async def timeline(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        rt = self.runtime
        before = cmd.get("before")
        conversation_id = _int(cmd, "conversation_id")
        contact_id = await rt.db.read(
            lambda c: c.execute(
                select(Conversation.contact_id).where(Conversation.id == conversation_id)
            ).scalar_one_or_none()
        )
        if contact_id is None:
            raise NotFound("no such conversation")
        visible = policy.visible_conversations(caller)
        return await rt.db.read(
            lambda c: contact_timeline(
                c,
                int(contact_id),
                before=before if isinstance(before, int) else None,
                visible=visible,
            )
        )

    async def state(self, cmd: dict[str, Any], caller: Caller) -> dict[str, Any]:
        state: dict[str, Any] = await self.runtime.db.read(agent_state, self.agent_id)
        return state


# Every command of /ws/agent with its rule (router.policy): a command not in this table does
# not exist, so none can skip its check.
C = AgentConnection
COMMANDS: dict[str, tuple[Rule, Handler]] = {
    "ping": (policy.SELF, C.ping),
    "logout": (policy.OWN_WORK, C.logout),
    "state": (policy.OWN_WORK, C.state),
    "set_status": (policy.OWN_WORK, C.set_status),
    "accept": (policy.OWN_OFFER, C.accept),
    "reject": (policy.OWN_OFFER, C.reject),
    "reply": (policy.WRITE_CONVERSATION, C.write),
    "note": (policy.WRITE_CONVERSATION, C.write),
    "transfer": (policy.WORK_CONVERSATION, C.transfer),
    "resolve": (policy.WORK_CONVERSATION, C.resolve),
    "end_wrap_up": (policy.WORK_CONVERSATION, C.end_wrap_up),
    "escalate": (policy.WORK_CONVERSATION, C.escalate),
    "send_to_routing": (policy.WORK_CONVERSATION, C.send_to_routing),
    "typing": (policy.WORK_CONVERSATION, C.typing),
    "resend": (policy.RESEND_MESSAGE, C.resend),
    "timeline": (policy.READ_CONVERSATION, C.timeline),
    "merge_contacts": (policy.MERGE_CONTACTS, C.merge_contacts),
}
del C


async def _hello(ws: WebSocket, runtime: Runtime) -> tuple[Principal, Credential, dict[str, Any]]:
    try:
        hello = await asyncio.wait_for(receive(ws), HELLO_TIMEOUT)
    except TimeoutError:
        raise Unauthorized("send hello with your token first") from None
    except BadFrame as exc:
        if exc.code == "invalid":
            raise Unauthorized("the first frame must be a JSON hello") from None
        raise
    if hello.get("type") != "hello":
        raise Unauthorized('the first frame must be {"type": "hello", "token": ...}')
    principal, credential = await hello_principal(ws, runtime.db, hello)
    return policy.check_role(principal, policy.AGENT_SOCKET), credential, hello


@router.websocket("/ws/agent", dependencies=[declare(policy.AGENT_SOCKET)])
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
    if policy.permits(principal, policy.DASHBOARD):
        streams[SUPERVISORS] = _seq(resume.get(SUPERVISORS))
        scope = await runtime.db.read(policy.caller_of, principal, runtime.rules.active)
        if not scope.sees_all:
            conn.scope = scope
            conn.scope_agents = await runtime.db.read(
                policy.visible_agent_ids, scope, runtime.rules.active
            )
    session = Session(runtime.db, runtime.bus, conn.send_event)
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
            await conn.send_event(frame)
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
        logout = conn.logged_out
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
        try:
            cmd = await receive(ws)
        except BadFrame as exc:
            await conn.send(exc.frame("id"))
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
        if conn.logged_out:
            await ws.close(1000, "logged out")
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
