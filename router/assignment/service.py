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
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, exists, insert, select, update

from router.assignment import core, flow
from router.assignment.matcher import BATCH, dispatch_batch, plan_batch
from router.assignment.timers import active_ruleset, due_timers
from router.db import Database, Tx
from router.exceptions import Unavailable
from router.models import Agent, AgentConnection, Process
from router.tasks import periodic
from router.types import AgentPresence
from routing_rules import QueueSpec, Ruleset

__all__ = ["Assignment"]

log = logging.getLogger(__name__)


def _connect(tx: Tx, agent_id: int, process_id: str) -> int:
    connection_id = int(
        tx.execute(
            insert(AgentConnection)
            .values(agent_id=agent_id, process_id=process_id, connected_at=tx.now)
            .returning(AgentConnection.id)
        ).scalar_one()
    )
    tx.execute(update(Agent).where(Agent.id == agent_id).values(disconnected_at=None))
    core.set_presence(tx, agent_id, AgentPresence.ONLINE, "connected")
    return connection_id


def _disconnect(tx: Tx, agent_id: int, connection_id: int, logout: bool) -> list[int]:
    """A socket closed: pending offers are withdrawn at once; presence waits out the grace
    period (a reconnect keeps it); logging out goes offline now."""
    tx.execute(delete(AgentConnection).where(AgentConnection.id == connection_id))
    others = tx.execute(
        select(AgentConnection.id).where(AgentConnection.agent_id == agent_id).limit(1)
    ).first()
    if others is not None and not logout:
        return []
    if logout:
        withdrawn = core.set_presence(tx, agent_id, AgentPresence.OFFLINE, "logout")
        return withdrawn + flow.unassign_all(tx, agent_id, "agent logged out")
    tx.execute(update(Agent).where(Agent.id == agent_id).values(disconnected_at=tx.now))
    return core.withdraw_offers(tx, agent_id, "socket lost")


def _presence_timeouts(tx: Tx, grace: float, alive_after: Any) -> list[int]:
    """Socket losses: a process that died took its agents' sockets with it (their grace
    starts now, their offers are withdrawn); an agent whose socket has been gone for longer
    than the grace goes offline. An agent set online without ever having a socket (through
    the API) is left alone."""
    live_processes = select(Process.id).where(Process.heartbeat_at >= alive_after)
    orphans = tx.execute(
        select(AgentConnection.id, AgentConnection.agent_id).where(
            AgentConnection.process_id.not_in(live_processes)
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
        # what rings an agent's phone when they accept a call (runtime.voice.connect)
        self.connecting: list[Callable[[dict[str, Any]], Awaitable[Any]]] = []
        self._lock = asyncio.Lock()
        self._dirty = False

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
    async def connect(self, agent_id: int) -> int:
        connection_id = await self.db.write(_connect, agent_id, self.process_id)
        await self.dispatch()
        return connection_id

    async def disconnect(self, agent_id: int, connection_id: int, *, logout: bool = False) -> None:
        if await self.db.write(_disconnect, agent_id, connection_id, logout):
            await self.dispatch()

    async def accept(self, agent_id: int, offer_id: int) -> dict[str, Any]:
        result = await self.db.write(core.accept_offer, agent_id, offer_id)
        if "connect" in result:  # a call: assigned once the agent's phone answers
            for connect in self.connecting:
                await connect(result)
        return result

    async def reject(self, agent_id: int, offer_id: int, reason: str | None) -> None:
        await self.db.write(core.reject_offer, agent_id, offer_id, reason)
        # The declined conversation goes to someone else, or back to this agent only if
        # nobody else is eligible; the agent gets the best work they have not declined.
        await self.dispatch()

    def ruleset(self) -> Ruleset:
        ruleset = active_ruleset(self.db.context)
        if ruleset is None:
            raise Unavailable("no active ruleset")
        return ruleset

    async def resolve(self, agent_id: int, conversation_id: int) -> dict[str, Any]:
        result = await self.db.write(core.resolve_conversation, agent_id, conversation_id)
        await self.dispatch()
        return result

    async def end_wrap_up(self, agent_id: int, conversation_id: int) -> None:
        await self.db.write(flow.end_wrap_up, agent_id, conversation_id)
        await self.dispatch()

    async def escalate(self, agent_id: int, conversation_id: int, reason: str) -> str:
        queue = await self.db.write(
            flow.escalate, agent_id, conversation_id, self.ruleset(), reason
        )
        await self.dispatch()
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
        await self.db.write(
            flow.transfer,
            agent_id,
            conversation_id,
            self.ruleset(),
            queue=to_queue,
            to_agent=to_agent,
            note=note,
        )
        await self.dispatch()

    async def assign(self, conversation_id: int, agent_id: int, *, by: str, override: bool) -> None:
        await self.db.write(
            core.assign_manually, conversation_id, agent_id, by=by, override=override
        )
        await self.dispatch()

    async def set_status(self, agent_id: int, status: AgentPresence, reason: str) -> None:
        await self.db.write(core.set_presence, agent_id, status, reason)
        await self.dispatch()

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
        changed |= bool(await self.db.write(_presence_timeouts, self.presence_grace, alive_after))
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
