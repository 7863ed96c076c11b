"""The assignment service: when to decide (event-driven), plus the timer worker.

Decisions are triggered by what changes who can take what: a conversation routed or sent
back to a queue, an agent freeing capacity or coming online, a ruleset activation. A worker
fires stored due times (offer expiry, presence grace after a socket loss, the conversation
timers of :mod:`router.assignment.timers`: overflow steps, a preferred agent's wait, SLA
warnings and breaches, wrap-up, closing) and unassigns the work of agents absent beyond
their queue's ``unassign_after``; it also sweeps waiting work as a safety net. A restart
fires what fell due while the process was down, once, because each firing is a
conditional update or a delete of the timer row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, exists, insert, or_, select, update

from router.assignment import core, flow
from router.assignment.matcher import BATCH, dispatch_batch, plan_batch
from router.assignment.timers import active_ruleset, due_timers
from router.credentials import MESSAGES, Credential, problem_now
from router.db import Database, Tx
from router.exceptions import Unauthorized, Unavailable
from router.models import Agent, AgentConnection, AgentStatusEvent, Process
from router.tasks import periodic
from router.types import AgentPresence
from routing_rules import QueueSpec, Ruleset

__all__ = ["Assignment", "register_process"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _lock_agent(tx: Tx, agent_id: int) -> None:
    """Serialize the socket bookkeeping of one agent (PostgreSQL): two sockets closing at
    once must not each see the other's row and both leave the agent online."""
    tx.execute(select(Agent.id).where(Agent.id == agent_id).with_for_update())


def _connect(tx: Tx, agent_id: int, process_id: str, credential: Credential | None) -> int:
    if credential is not None:
        # The credential may have ended since the hello: then no socket row (nor presence)
        # may outlive the transaction that ended it (docs/security.md, "Revocation").
        problem = problem_now(tx, credential)
        if problem is not None:
            raise Unauthorized(MESSAGES[problem], reason=problem)
    _lock_agent(tx, agent_id)
    connection_id = int(
        tx.execute(
            insert(AgentConnection)
            .values(
                agent_id=agent_id,
                process_id=process_id,
                connected_at=tx.now,
                session_id=credential.session_id if credential is not None else None,
            )
            .returning(AgentConnection.id)
        ).scalar_one()
    )
    tx.execute(update(Agent).where(Agent.id == agent_id).values(disconnected_at=None))
    core.set_presence(tx, agent_id, AgentPresence.ONLINE, "connected")
    return connection_id


def _signed_off(tx: Tx, agent_id: int, reason: str, logout: bool) -> list[int]:
    """The agent has no socket left and signed off: offline now (no presence grace),
    pending offers withdrawn; ``logout``: their work returns to its queues."""
    tx.execute(
        update(Agent)
        .where(Agent.id == agent_id, Agent.disconnected_at.is_(None))
        .values(disconnected_at=tx.now)
    )
    withdrawn = core.set_presence(tx, agent_id, AgentPresence.OFFLINE, reason)
    if logout:
        withdrawn += flow.unassign_all(tx, agent_id, f"agent signed off ({reason})")
    return withdrawn


def _disconnect(
    tx: Tx, agent_id: int, connection_id: int, logout: bool, ended: str | None = None
) -> list[int]:
    """A socket closed: pending offers are withdrawn at once; presence waits out the grace
    period (a reconnect keeps it); logging out goes offline now. A socket closed because
    its credential ended (``ended``: why, as presence reasons say it) whose row is already
    gone was taken care of by the transaction that ended the credential; otherwise (a
    session that expired) the agent goes offline now when it was their last socket."""
    _lock_agent(tx, agent_id)
    gone = tx.execute(delete(AgentConnection).where(AgentConnection.id == connection_id)).rowcount
    if ended is not None and not gone:
        return []
    others = tx.execute(
        select(AgentConnection.id).where(AgentConnection.agent_id == agent_id).limit(1)
    ).first()
    if others is not None and not logout:
        return []
    if logout:
        withdrawn = core.set_presence(tx, agent_id, AgentPresence.OFFLINE, "logout")
        return withdrawn + flow.unassign_all(tx, agent_id, "agent logged out")
    if ended is not None:
        return _signed_off(tx, agent_id, ended, logout=False)
    tx.execute(update(Agent).where(Agent.id == agent_id).values(disconnected_at=tx.now))
    return core.withdraw_offers(tx, agent_id, "socket lost")


def end_sockets(
    tx: Tx,
    agent_id: int,
    *,
    token: bool,
    sessions: list[int],
    reason: str,
    logout: bool,
    everything: bool,
) -> list[int]:
    """In the transaction that ended credentials of the agent's user (the agent row is
    locked): the sockets that signed in with the API token (``token``) or one of
    ``sessions`` end now. When that leaves the agent without a socket, or with
    ``everything`` (every socket ends: a revoked user), the agent signs off now."""
    if everything:
        tx.execute(delete(AgentConnection).where(AgentConnection.agent_id == agent_id))
        return _signed_off(tx, agent_id, reason, logout)
    which = []
    if token:
        which.append(AgentConnection.session_id.is_(None))
    if sessions:
        which.append(AgentConnection.session_id.in_(sessions))
    if not which:
        return []
    gone = tx.execute(
        delete(AgentConnection).where(AgentConnection.agent_id == agent_id, or_(*which))
    ).rowcount
    if not gone:
        return []
    others = tx.execute(
        select(AgentConnection.id).where(AgentConnection.agent_id == agent_id).limit(1)
    ).first()
    if others is not None:
        return []
    return _signed_off(tx, agent_id, reason, logout)


def _presence_timeouts(tx: Tx, grace: float, alive_after: Any, me: str) -> list[int]:
    """Socket losses: a process that died took its agents' sockets with it (their grace
    starts now, their offers are withdrawn); an agent whose socket has been gone for longer
    than the grace goes offline. An agent set online without ever having a socket (through
    the API) is left alone. A process never judges its own sockets by its own heartbeat (a
    database outage delays the heartbeat of a process that is alive)."""
    live_processes = select(Process.id).where(Process.heartbeat_at >= alive_after)
    orphans = tx.execute(
        select(AgentConnection.id, AgentConnection.agent_id).where(
            AgentConnection.process_id.not_in(live_processes), AgentConnection.process_id != me
        )
    ).all()
    withdrawn: list[int] = []
    if orphans:
        tx.execute(delete(AgentConnection).where(AgentConnection.id.in_([o.id for o in orphans])))
        for agent_id in {int(o.agent_id) for o in orphans}:
            if (
                tx.execute(
                    select(AgentConnection.id).where(AgentConnection.agent_id == agent_id).limit(1)
                ).first()
                is None
            ):
                tx.execute(
                    update(Agent)
                    .where(Agent.id == agent_id, Agent.disconnected_at.is_(None))
                    .values(disconnected_at=tx.now)
                )
                withdrawn.extend(core.withdraw_offers(tx, agent_id, "socket lost"))
    live = exists().where(AgentConnection.agent_id == Agent.id)
    stale = (
        tx.execute(
            select(Agent.id).where(
                Agent.presence != AgentPresence.OFFLINE.value,
                ~live,
                Agent.disconnected_at.is_not(None),
                Agent.disconnected_at <= tx.now - timedelta(seconds=grace),
            )
        )
        .scalars()
        .all()
    )
    for agent_id in stale:
        core.set_presence(tx, int(agent_id), AgentPresence.OFFLINE, "socket lost")
    return withdrawn


def _reassert(
    tx: Tx, process_id: str, sockets: dict[int, tuple[int, Credential | None]]
) -> dict[int, int]:
    """This process is alive and holds these agent sockets (connection id -> agent id and
    what the socket signed in with): make the database say so again. After an outage
    another process (or this one's own sweep) may have judged it dead by its late heartbeat,
    deleted its connections and set its agents offline: their rows come back, and an agent
    set offline only because the socket seemed lost is online again. A socket whose
    credential ended is not brought back (it is being closed). Returns the connection ids
    that were re-created (old id -> new id)."""
    if (
        tx.execute(
            update(Process).where(Process.id == process_id).values(heartbeat_at=tx.now)
        ).rowcount
        == 0
    ):
        register_process(tx, process_id)
    if not sockets:
        return {}
    present = set(
        tx.execute(
            select(AgentConnection.id).where(AgentConnection.id.in_(list(sockets)))
        ).scalars()
    )
    renamed: dict[int, int] = {}
    agents: set[int] = set()
    for connection_id, (agent_id, credential) in sockets.items():
        if connection_id in present:
            continue
        if credential is not None and problem_now(tx, credential) is not None:
            continue  # revoked, rotated, signed out: its row went with its credential
        _lock_agent(tx, agent_id)
        renamed[connection_id] = int(
            tx.execute(
                insert(AgentConnection)
                .values(
                    agent_id=agent_id,
                    process_id=process_id,
                    connected_at=tx.now,
                    session_id=credential.session_id if credential is not None else None,
                )
                .returning(AgentConnection.id)
            ).scalar_one()
        )
        agents.add(agent_id)
    for agent_id in agents:
        tx.execute(update(Agent).where(Agent.id == agent_id).values(disconnected_at=None))
        presence = tx.execute(select(Agent.presence).where(Agent.id == agent_id)).scalar_one()
        last_reason = tx.execute(
            select(AgentStatusEvent.reason)
            .where(AgentStatusEvent.agent_id == agent_id)
            .order_by(AgentStatusEvent.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        if presence == AgentPresence.OFFLINE.value and last_reason == "socket lost":
            core.set_presence(tx, agent_id, AgentPresence.ONLINE, "socket re-asserted")
        log.warning(
            "agent %s: its socket here is open but the database had lost it (an outage?):"
            " re-asserted",
            agent_id,
        )
    return renamed


def register_process(tx: Tx, process_id: str) -> None:
    tx.execute(
        insert(Process).values(
            id=process_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=tx.now,
            heartbeat_at=tx.now,
            last_error={},
        )
    )


class Assignment:
    def __init__(
        self,
        db: Database,
        queues: Callable[[], dict[str, QueueSpec]],
        *,
        process_id: str,
        presence_grace: float,
        dead_after: float,
    ) -> None:
        self.db = db
        self.queues = queues
        self.process_id = process_id
        self.presence_grace = presence_grace
        self.dead_after = dead_after
        self.decisions = 0
        self.rerouted: list[Callable[[], Awaitable[Any]]] = []  # what routes conversations
        # what rings an agent's phone when they accept a call (runtime.calls.connect)
        self.connecting: list[Callable[[dict[str, Any]], Awaitable[Any]]] = []
        self._lock = asyncio.Lock()
        self._dirty = False
        # this process's agent connections: id -> (agent id, what the socket signed in with)
        self.sockets: dict[int, tuple[int, Credential | None]] = {}
        self._renamed: dict[int, int] = {}  # connection ids re-created by a re-assertion

    # -- triggers -------------------------------------------------------------------------
    async def dispatch(self) -> int:
        """Offer waiting work to free agents now. Concurrent calls coalesce: while a run is in
        progress, further triggers make it run once more instead of running in parallel."""
        self._dirty = True
        offered = 0
        async with self._lock:
            while self._dirty:
                self._dirty = False
                while True:
                    made, full = await self._run_once()
                    offered += made
                    if not full:
                        break
        self.decisions += offered
        return offered

    async def _write_and_dispatch(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(tx, ...)`` in a write transaction, then offer waiting work to free agents.

        On SQLite the offers are made at the end of the same transaction (once for all the
        jobs of its group commit that ask): one trip through the writer instead of two. A
        full batch, or offers that failed there, fall back to ``dispatch`` after the commit.
        On PostgreSQL ``dispatch`` runs after the commit (offers planned, then made
        concurrently)."""
        if self.db.dialect != "sqlite":
            result = await self.db.write(fn, *args, **kwargs)
            await self.dispatch()
            return result
        settled: list[bool] = []

        def run(tx: Tx) -> Any:
            result = fn(tx, *args, **kwargs)
            tx.at_batch_end(self.dispatch_in, settled)
            return result

        result = await self.db.write(run)
        if not (settled and settled[0]):
            await self.dispatch()
        return result

    def dispatch_in(self, tx: Tx) -> bool:
        """Offer waiting work in ``tx`` itself (SQLite's batch end: after agent actions, and
        after the routing of a commit's ingests). True when no work is left."""
        made = dispatch_batch(tx, self.queues())

        def count() -> None:
            self.decisions += len(made)

        tx.on_commit(count)
        return len(made) < BATCH

    async def _run_once(self) -> tuple[int, bool]:
        queues = self.queues()
        if self.db.dialect == "sqlite":
            made = await self.db.write(dispatch_batch, queues)
            return len(made), len(made) >= BATCH
        plan = await self.db.read(plan_batch, queues)
        limit = asyncio.Semaphore(8)

        async def offer(conversation_id: int, agent_id: int, queue: str) -> bool:
            async with limit:
                try:
                    await self.db.write(core.offer_now, conversation_id, agent_id, queues[queue])
                except core.LostRace:
                    return False  # the plan was stale: the next run takes it from here
                return True

        results = await asyncio.gather(*(offer(*step) for step in plan))
        return sum(results), len(plan) >= BATCH

    # -- agent actions --------------------------------------------------------------------
    async def connect(self, agent_id: int, credential: Credential | None = None) -> int:
        """A socket of the agent is live: online, offers may come. With ``credential``, what
        the socket signed in with: refused (Unauthorized) if it ended meanwhile."""
        connection_id = await self.db.write(_connect, agent_id, self.process_id, credential)
        self.sockets[connection_id] = (agent_id, credential)
        await self.dispatch()
        return connection_id

    async def disconnect(
        self,
        agent_id: int,
        connection_id: int,
        *,
        logout: bool = False,
        ended: str | None = None,
    ) -> None:
        connection_id = self.current_id(connection_id)
        self.sockets.pop(connection_id, None)
        if await self.db.write(_disconnect, agent_id, connection_id, logout, ended):
            await self.dispatch()

    def current_id(self, connection_id: int) -> int:
        """A connection's id now (a re-assertion may have given it a new row)."""
        while connection_id in self._renamed:
            connection_id = self._renamed[connection_id]
        return connection_id

    async def reassert(self) -> None:
        """Heartbeat: this process is alive, and these are its agents' open sockets (after a
        database outage, the database may have lost them). Then offer work, if any came
        back."""
        renamed = await self.db.write(_reassert, self.process_id, dict(self.sockets))
        if renamed:
            for old, new in renamed.items():
                self._renamed[old] = new
                agent = self.sockets.pop(old, None)
                if agent is not None:
                    self.sockets[new] = agent
            await self.dispatch()

    async def accept(self, agent_id: int, offer_id: int) -> dict[str, Any]:
        result = await self.db.write(core.accept_offer, agent_id, offer_id)
        if "connect" in result:  # a call: assigned once the agent's phone answers
            for connect in self.connecting:
                await connect(result)
        return result

    async def reject(self, agent_id: int, offer_id: int, reason: str | None) -> None:
        # The declined conversation goes to someone else, or back to this agent only if
        # nobody else is eligible; the agent gets the best work they have not declined.
        await self._write_and_dispatch(core.reject_offer, agent_id, offer_id, reason)

    def ruleset(self) -> Ruleset:
        ruleset = active_ruleset(self.db.context)
        if ruleset is None:
            raise Unavailable("no active ruleset")
        return ruleset

    async def resolve(self, agent_id: int, conversation_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._write_and_dispatch(
            core.resolve_conversation, agent_id, conversation_id
        )
        return result

    async def end_wrap_up(self, agent_id: int, conversation_id: int) -> None:
        await self._write_and_dispatch(flow.end_wrap_up, agent_id, conversation_id)

    async def escalate(self, agent_id: int, conversation_id: int, reason: str) -> str:
        queue: str = await self._write_and_dispatch(
            flow.escalate, agent_id, conversation_id, self.ruleset(), reason
        )
        return queue

    async def send_to_routing(self, agent_id: int, conversation_id: int, note: str | None) -> None:
        """Out of the agent's hands and through the rules again (the runtime's router picks it
        up: ``reroute`` is called with the conversation id)."""
        await self.db.write(flow.send_back_to_routing, agent_id, conversation_id, note)
        for listener in self.rerouted:
            await listener()
        await self.dispatch()

    async def transfer(
        self,
        agent_id: int,
        conversation_id: int,
        *,
        to_queue: str | None,
        to_agent: int | None,
        note: str | None,
    ) -> None:
        await self._write_and_dispatch(
            flow.transfer,
            agent_id,
            conversation_id,
            self.ruleset(),
            queue=to_queue,
            to_agent=to_agent,
            note=note,
        )

    async def assign(self, conversation_id: int, agent_id: int, *, by: str, override: bool) -> None:
        await self._write_and_dispatch(
            core.assign_manually, conversation_id, agent_id, by=by, override=override
        )

    async def set_status(
        self,
        agent_id: int,
        status: AgentPresence,
        reason: str,
        then: Callable[[Tx], T] | None = None,
    ) -> T | None:
        """Change the agent's presence; ``then(tx)``, if given, runs in the same transaction
        after the change and its result is returned (the REST API's view of the agent)."""

        def change(tx: Tx) -> T | None:
            core.set_presence(tx, agent_id, status, reason)
            return then(tx) if then is not None else None

        result: T | None = await self._write_and_dispatch(change)
        return result

    # -- the timer worker -------------------------------------------------------------------
    async def tick(self, sweep: bool = True) -> None:
        queues = self.queues()
        expired = await asyncio.gather(
            *(
                self.db.write(core.expire_offer, offer_id, queues)
                for offer_id in await self.db.read(core.due_offers, self.db.clock.now())
            )
        )
        changed = any(c is not None for c in expired)
        alive_after = self.db.clock.now() - timedelta(seconds=self.dead_after)
        changed |= bool(
            await self.db.write(
                _presence_timeouts, self.presence_grace, alive_after, self.process_id
            )
        )
        changed |= bool(await self.db.write(flow.unassign_absent, queues))
        ruleset = active_ruleset(self.db.context)
        if ruleset is not None:
            fired = await asyncio.gather(
                *(
                    self.db.write(flow.fire_timer, timer_id, ruleset)
                    for timer_id in await self.db.read(due_timers, self.db.clock.now())
                )
            )
            changed |= any(fired)
        if changed or sweep:
            await self.dispatch()

    async def run(self, interval: float) -> None:
        await periodic(self.tick, interval, "assignment tick")
