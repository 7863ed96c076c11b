"""Matching waiting conversations to agents, in batches, in queue order.

One run reads the waiting conversations in queue order (priority, then time in queue) and
the agents who could take anything (online, connected, ``total`` not full), matches them in
memory by each queue's rules and strategy, and makes each offer with conditional updates
(capacity claim by rowcount, conversation ``queued -> offered``), so a run that raced
another process simply skips what it lost. Triggers (a conversation routed or back in its
queue, capacity freed, an agent online, a ruleset activated) coalesce into runs.

With few conversations waiting and many agents free, a run asks the database for the best
candidates of each conversation instead (indexed), so a decision does not cost more with
more agents.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, select

from router.assignment.core import candidate_agents, try_offer
from router.db import Tx
from router.models import Agent, AgentLoad, AgentSkill, Conversation, Offer, User
from router.types import AgentPresence, ConversationState, OfferState
from routing_rules import QueueSpec

__all__ = ["dispatch_batch"]

BATCH = 500
SMALL = 8  # at most this many waiting: per-conversation indexed candidate queries

_WAITING = (
    select(
        Conversation.id,
        Conversation.queue,
        Conversation.channel,
        Conversation.required_skills,
        Conversation.language,
        Conversation.preferred_agent_id,
    )
    .where(Conversation.state == ConversationState.QUEUED.value)
    .order_by(Conversation.priority.desc(), Conversation.queued_at, Conversation.id)
    .limit(bindparam("limit"))
)
_FREE_AGENTS = (
    select(Agent.id, Agent.idle_since, Agent.exclusive_channels, User.name)
    .join(User, User.id == Agent.user_id)
    .join(
        AgentLoad,
        and_(
            AgentLoad.agent_id == Agent.id,
            AgentLoad.channel == "total",
            AgentLoad.used < AgentLoad.cap,
        ),
    )
    .where(Agent.presence == AgentPresence.ONLINE.value, Agent.disconnected_at.is_(None))
)
_SKILLS = select(AgentSkill.agent_id, AgentSkill.skill, AgentSkill.level).where(
    AgentSkill.agent_id.in_(bindparam("ids", expanding=True))
)
_LOADS = select(AgentLoad.agent_id, AgentLoad.channel, AgentLoad.used, AgentLoad.cap).where(
    AgentLoad.agent_id.in_(bindparam("ids", expanding=True))
)
_DECLINED = select(Offer.conversation_id, Offer.agent_id).where(
    Offer.conversation_id.in_(bindparam("ids", expanding=True)),
    Offer.state.in_([OfferState.REJECTED.value, OfferState.EXPIRED.value]),
)


@dataclass
class _Candidate:
    id: int
    name: str
    idle_since: datetime
    exclusive: list[str]
    skills: dict[str, int] = field(default_factory=dict)
    load: dict[str, list[int]] = field(default_factory=dict)  # channel -> [used, cap]

    def free(self, channel: str) -> bool:
        used, cap = self.load.get(channel, (0, 0))
        total_used, total_cap = self.load.get("total", (0, 0))
        if used >= cap or total_used >= total_cap:
            return False
        # exclusive_channels: [voice] takes nothing else while on a call
        return not (
            self.exclusive
            and channel not in self.exclusive
            and any(self.load.get(c, (0, 0))[0] > 0 for c in self.exclusive)
        )

    def qualifies(self, spec: QueueSpec, row: Any) -> bool:
        if not self.free(row.channel):
            return False
        if spec.members is not None:
            if self.name not in spec.members:
                return False
        elif any(
            self.skills.get(skill, 0) < level
            for skill, level in (row.required_skills or {}).items()
        ):
            return False
        return not (
            spec.language_required
            and row.language
            and self.skills.get(f"lang_{row.language}", 0) < 1
        )

    def free_any(self) -> bool:
        used, cap = self.load.get("total", (0, 0))
        return used < cap

    def take(self, channel: str) -> None:
        for key in (channel, "total"):
            self.load.setdefault(key, [0, 0])[0] += 1


def _pool(conn: Connection) -> list[_Candidate]:
    agents = {
        r.id: _Candidate(r.id, r.name, r.idle_since, list(r.exclusive_channels or []))
        for r in conn.execute(_FREE_AGENTS)
    }
    if not agents:
        return []
    ids = list(agents)
    for skill in conn.execute(_SKILLS, {"ids": ids}):
        agents[skill.agent_id].skills[skill.skill] = skill.level
    for load in conn.execute(_LOADS, {"ids": ids}):
        agents[load.agent_id].load[load.channel] = [load.used, load.cap]
    # longest idle first (the default strategy; the others arrive with assignment part 1)
    return sorted(agents.values(), key=lambda a: (a.idle_since, a.id))


def _declined(conn: Connection, ids: Iterable[int]) -> set[tuple[int, int]]:
    return {
        (int(r.conversation_id), int(r.agent_id))
        for r in conn.execute(_DECLINED, {"ids": list(ids)})
    }


def _pick(
    pool: list[_Candidate],
    row: Any,
    spec: QueueSpec,
    declined: set[tuple[int, int]],
    *,
    allow_declined: bool,
) -> _Candidate | None:
    if (
        row.preferred_agent_id is not None
    ):  # offered to its preferred agent only, until its wait is over
        return next(
            (a for a in pool if a.id == row.preferred_agent_id and a.qualifies(spec, row)), None
        )
    for agent in pool:
        if agent.qualifies(spec, row) and (allow_declined or (row.id, agent.id) not in declined):
            return agent
    return None


def _small_batch(
    tx: Tx, waiting: list[Any], queues: dict[str, QueueSpec], allow_declined: bool
) -> list[dict[str, Any]]:
    made = []
    declined = _declined(tx.conn, (r.id for r in waiting))
    for row in waiting:
        spec = queues.get(row.queue)
        if spec is None:
            continue
        if row.preferred_agent_id is not None:
            candidates = [
                a
                for a in candidate_agents(tx.conn, row, spec, exclude=set(), limit=50)
                if a == row.preferred_agent_id
            ]
        else:
            exclude = (
                set()
                if allow_declined
                else {agent for conversation, agent in declined if conversation == row.id}
            )
            candidates = candidate_agents(tx.conn, row, spec, exclude=exclude)
        for agent_id in candidates:
            result = try_offer(tx, row.id, agent_id, spec)
            if result is not None:
                made.append(result)
                break
    return made


def dispatch_batch(
    tx: Tx, queues: dict[str, QueueSpec], limit: int = BATCH
) -> list[dict[str, Any]]:
    """Offer as much waiting work as free agents can take, in queue order. Two passes: first
    nobody is offered a conversation they declined before; then, for what is still waiting,
    an agent who declined it is the last resort (when nobody else is eligible)."""
    made: list[dict[str, Any]] = []
    for allow_declined in (False, True):
        waiting = tx.execute(_WAITING, {"limit": limit}).all()
        if not waiting:
            break
        if len(waiting) <= SMALL:
            made.extend(_small_batch(tx, waiting, queues, allow_declined))
            continue
        pool = _pool(tx.conn)
        if not pool:
            break
        declined = _declined(tx.conn, (r.id for r in waiting))
        for row in waiting:
            spec = queues.get(row.queue)
            if spec is None:
                continue
            agent = _pick(pool, row, spec, declined, allow_declined=allow_declined)
            if agent is None:
                continue
            result = try_offer(tx, row.id, agent.id, spec)
            if result is not None:
                agent.take(row.channel)
                made.append(result)
            if not any(a.free_any() for a in pool):
                break
    return made
