"""``/ws/supervisor``: the supervisor dashboard's live feed (docs/console.md, "Supervisors").

The hello carries a token, or the console's session cookie is used (our own origin only,
as on the agent socket); the user needs the supervisor role. The socket sends a
``snapshot`` (queues with waiting count, longest wait and SLA state; agents with presence
and load per channel) at once and again whenever it changed (checked every
``OMNIROUTE_SUPERVISOR_SNAPSHOT_INTERVAL``, 1 s), and forwards the supervisors' stream
events (CSAT answers, presence changes, SLA warnings and breaches, abandoned calls) as
they happen. It answers ``ping`` with ``pong`` and anything else with an ``error`` frame
(frames are read by ``router.ws_frames``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from sqlalchemy import Connection, select
from starlette.websockets import WebSocketDisconnected

from router import policy
from router.api.agents import agents_view
from router.api.deps import declare
from router.api.queues import queue_stats
from router.assignment.sla import NO_DUE
from router.auth import Principal
from router.credentials import CLOSE_CODE, MESSAGES, Credential
from router.events import SUPERVISORS
from router.exceptions import InvalidInput, OmnirouteError, Unauthorized
from router.hub import Session
from router.models import Conversation
from router.policy import Caller, Rule
from router.runtime import Runtime
from router.serialize import shared_frame_text
from router.sessions import hello_principal
from router.types import OPEN_STATES
from router.ws_frames import BadFrame, receive

__all__ = ["COMMANDS", "dashboard", "router", "scoped"]

# Every command of /ws/supervisor with its rule (router.policy).
COMMANDS: dict[str, Rule] = {"ping": policy.DASHBOARD}

router = APIRouter()
log = logging.getLogger(__name__)
HELLO_TIMEOUT = 10.0


def _sla_state(conn: Connection, now: datetime) -> dict[str, dict[str, int]]:
    """Per queue, open conversations whose SLA is at risk (its warning fired) or breached."""
    out: dict[str, dict[str, int]] = {}
    for queue, data, due in conn.execute(
        select(Conversation.queue, Conversation.data, Conversation.sla_due_at).where(
            Conversation.state.in_([s.value for s in OPEN_STATES]),
            Conversation.sla_due_at < NO_DUE,
        )
    ):
        fired = set((data or {}).get("sla_fired", []))
        entry = out.setdefault(queue or "", {"sla_at_risk": 0, "sla_breached": 0})
        due = due if due is None or due.tzinfo else due.replace(tzinfo=now.tzinfo)
        if any(f.endswith("breach") for f in fired) or (due is not None and due <= now):
            entry["sla_breached"] += 1
        elif any(f.endswith("warning") for f in fired):
            entry["sla_at_risk"] += 1
    return out


def dashboard(conn: Connection, now: datetime) -> dict[str, Any]:
    sla = _sla_state(conn, now)
    queues = [
        {
            **{k: v for k, v in q.items() if k != "spec"},
            **sla.get(q["name"], {"sla_at_risk": 0, "sla_breached": 0}),
        }
        for q in queue_stats(conn, now)
    ]
    agents = [
        {
            "id": a["id"],
            "user": a["user"],
            "name": a["name"],
            "presence": a["presence"],
            "busy": any(v["used"] for k, v in a["load"].items() if k != "total"),
            "load": a["load"],
        }
        for a in agents_view(conn)
    ]
    return {"queues": queues, "agents": agents}


class _Snapshots:
    """One dashboard read per interval for all the supervisor sockets of a process."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.taken_at = float("-inf")
        self.value: dict[str, Any] = {}


_snapshots: weakref.WeakKeyDictionary[Runtime, _Snapshots] = weakref.WeakKeyDictionary()


async def _shared_snapshot(runtime: Runtime) -> dict[str, Any]:
    shared = _snapshots.setdefault(runtime, _Snapshots())
    async with shared.lock:
        loop = asyncio.get_running_loop()
        if loop.time() - shared.taken_at >= runtime.settings.supervisor_snapshot_interval:
            shared.value = await runtime.db.read(dashboard, runtime.clock.now())
            shared.taken_at = loop.time()
        return shared.value


def scoped(snapshot: dict[str, Any], caller: Caller, agent_ids: set[int]) -> dict[str, Any]:
    """The dashboard as ``caller`` may see it: their teams' queues and agents."""
    if caller.queues is None:
        return snapshot
    return {
        "queues": [q for q in snapshot["queues"] if q["name"] in caller.queues],
        "agents": [a for a in snapshot["agents"] if a["id"] in agent_ids],
    }


async def _principal(
    ws: WebSocket, runtime: Runtime, hello: dict[str, Any]
) -> tuple[Principal, Credential]:
    principal, credential = await hello_principal(ws, runtime.db, hello)
    return policy.check_role(principal, policy.SUPERVISOR_SOCKET), credential


async def _scope(runtime: Runtime, principal: Any) -> tuple[Caller, set[int]]:
    ruleset = runtime.rules.active
    unlimited = policy.sees_everything(principal, ruleset)
    if unlimited is not None:
        return unlimited, set()
    caller: Caller = await runtime.db.read(policy.caller_of, principal, ruleset)
    agents: set[int] = (
        set()
        if caller.sees_all
        else await runtime.db.read(policy.visible_agent_ids, caller, ruleset)
    )
    return caller, agents


@router.websocket("/ws/supervisor", dependencies=[declare(policy.SUPERVISOR_SOCKET)])
async def supervisor_socket(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    with runtime.socket_open(ws, "supervisor"):
        await _supervisor_socket(ws)


async def _supervisor_socket(ws: WebSocket) -> None:
    runtime: Runtime = ws.app.state.runtime
    await ws.accept()
    lock = asyncio.Lock()

    async def send(frame: dict[str, Any]) -> None:
        async with lock:
            await ws.send_text(shared_frame_text(frame))

    try:
        hello = await asyncio.wait_for(receive(ws), HELLO_TIMEOUT)
        if hello.get("type") != "hello":
            raise Unauthorized('the first frame must be {"type": "hello"}')
        principal, credential = await _principal(ws, runtime, hello)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await ws.close(1008, 'the first frame must be {"type": "hello"}')
        return
    except OmnirouteError as exc:
        with contextlib.suppress(Exception):
            await send({"type": "error", "code": exc.code, "message": exc.message})
            await ws.close(1008, exc.message[:120])
        return
    except WebSocketDisconnect:
        return

    async def signed_out(reason: str) -> None:
        """The credential ended (router.revocation): say why, close with 4401 and the reason."""
        message = MESSAGES[reason]
        async with lock:
            with contextlib.suppress(Exception):
                await ws.send_text(
                    json.dumps({"type": "signed_out", "reason": reason, "message": message})
                )
        await ws.close(CLOSE_CODE, message)

    with runtime.guard.watching(credential, signed_out) as watch:

        async def send_checked(frame: dict[str, Any]) -> None:
            if not await watch.valid():
                raise WebSocketDisconnected()  # signed out: nothing more goes to it
            await send(frame)

        try:
            await _serve_supervisor(ws, runtime, principal, send_checked)
        finally:
            await watch.closed()  # a socket signed out leaves with its code and reason


async def _serve_supervisor(
    ws: WebSocket,
    runtime: Runtime,
    principal: Principal,
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    scope: Caller | None = None
    scope_agents: set[int] = set()

    async def send_event(frame: dict[str, Any]) -> None:
        if scope is None or policy.frame_visible(scope, frame, scope_agents):
            await send(frame)

    session = Session(runtime.db, runtime.bus, send_event)
    pusher: asyncio.Task[None] | None = None
    try:
        scope, scope_agents = await _scope(runtime, principal)
        await session.open({SUPERVISORS: None}, [])
        await send({"type": "welcome", "user": principal.name, "role": principal.role.value})
        session.start()

        async def push() -> None:
            nonlocal scope, scope_agents
            last = None
            while True:
                snapshot = await _shared_snapshot(runtime)
                if snapshot != last:
                    # the scope follows rules and skill changes along with the snapshot
                    scope, scope_agents = await _scope(runtime, principal)
                    await send({"type": "snapshot", **scoped(snapshot, scope, scope_agents)})
                    last = snapshot
                await asyncio.sleep(runtime.settings.supervisor_snapshot_interval)

        pusher = asyncio.create_task(push(), name="supervisor-snapshots")
        while True:  # the socket listens for its commands (and for the client leaving)
            try:
                frame = await receive(ws)
            except BadFrame as exc:
                await send(exc.frame())
                continue
            await _command(principal, frame, send)
    except (WebSocketDisconnect, WebSocketDisconnected):
        pass
    finally:
        if pusher is not None:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pusher
        await session.close()


async def _command(principal: Any, cmd: dict[str, Any], send: Any) -> None:
    """One frame from the dashboard (a JSON object, read by router.ws_frames): ``ping``
    (answered ``pong``); anything else is an ``error`` frame."""
    kind = cmd.get("type")
    try:
        rule = COMMANDS.get(kind) if isinstance(kind, str) else None
        if rule is None:
            raise InvalidInput(
                f'unknown command "{kind}"' if isinstance(kind, str) else 'a frame needs a "type"'
            )
        policy.check_role(principal, rule)
    except OmnirouteError as exc:
        await send({"type": "error", "code": exc.code, "message": exc.message})
        return
    if kind == "ping":
        await send({"type": "pong"})
