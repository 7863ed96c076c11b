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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, select

from router.assignment.core import candidate_agents, strategy_rank, try_offer
from router.db import Tx
from router.models import Agent, AgentLoad, AgentSkill, Conversation, Offer, User
from router.types import AgentPresence, ConversationState, OfferState
from routing_rules import QueueSpec

__all__ = ["dispatch_batch", "plan_batch"]

BATCH = 500
SMALL = 32  # at most this many waiting: per-conversation indexed candidate queries

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
    select(Agent.id, Agent.idle_since, Agent.exclusive_channels, Agent.rr_position, User.name)
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
    rr_position: int
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

    def take(self, channel: str, spec: QueueSpec) -> None:
        for key in (channel, "total"):
            self.load.setdefault(key, [0, 0])[0] += 1
        if spec.strategy == "round_robin":
            self.rr_position = 1 << 62  # rotated to the back (the database holds the real value)


def _pool(conn: Connection, limit: int | None = None) -> list[_Candidate]:
    """Agents who could take something: all of them, or the ``limit`` longest idle (an
    index walk, so a run with few waiting does not read thousands of agents)."""
    query = (
        _FREE_AGENTS
        if limit is None
        else _FREE_AGENTS.order_by(Agent.idle_since, Agent.id).limit(limit)
    )
    agents = {
        r.id: _Candidate(
            r.id, r.name, r.idle_since, list(r.exclusive_channels or []), int(r.rr_position)
        )
        for r in conn.execute(query)
    }
    if not agents:
        return []
    ids = list(agents)
    for skill in conn.execute(_SKILLS, {"ids": ids}):
        agents[skill.agent_id].skills[skill.skill] = skill.level
    for load in conn.execute(_LOADS, {"ids": ids}):
        agents[load.agent_id].load[load.channel] = [load.used, load.cap]
    # Longest idle first: the default strategy picks the first qualified agent in this order.
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
    """The best qualified agent for ``row`` by the queue's strategy (the pool is in longest-idle
    order, so for that strategy the first qualified agent is the best)."""
    if row.preferred_agent_id is not None:  # its preferred agent only, until its wait is over
        return next(
            (a for a in pool if a.id == row.preferred_agent_id and a.qualifies(spec, row)), None
        )
    qualified = (
        a
        for a in pool
        if a.qualifies(spec, row) and (allow_declined or (row.id, a.id) not in declined)
    )
    if spec.strategy == "longest_idle":
        return next(qualified, None)
    required = row.required_skills or {}
    return min(
        qualified,
        key=lambda a: strategy_rank(
            spec, required, a.idle_since, a.id, a.rr_position, a.skills, a.load
        ),
        default=None,
    )


Attempt = Callable[[Any, int, QueueSpec], bool]


def _match(conn: Connection, queues: dict[str, QueueSpec], limit: int, attempt: Attempt) -> int:
    """Match waiting conversations to agents in queue order and call ``attempt`` for each
    match (it returns whether an offer was made). Two passes: first nobody is offered a
    conversation they declined before; then, for what is still waiting, an agent who
    declined it is the last resort (when nobody else is eligible)."""
    made = 0
    taken: set[int] = set()
    for allow_declined in (False, True):
        waiting = [r for r in conn.execute(_WAITING, {"limit": limit}).all() if r.id not in taken]
        if not waiting:
            break
        declined = _declined(conn, (r.id for r in waiting))
        if (
            len(waiting) <= SMALL
        ):  # few waiting: indexed candidate queries, whatever the agent count
            for row in waiting:
                spec = queues.get(row.queue)
                if spec is None:
                    continue
                if row.preferred_agent_id is not None:
                    candidates = [
                        a
                        for a in candidate_agents(conn, row, spec, exclude=set(), limit=50)
                        if a == row.preferred_agent_id
                    ]
                else:
                    exclude = (
                        set()
                        if allow_declined
                        else {agent for conversation, agent in declined if conversation == row.id}
                    )
                    candidates = candidate_agents(conn, row, spec, exclude=exclude)
                for agent_id in candidates:
                    if attempt(row, agent_id, spec):
                        made += 1
                        taken.add(row.id)
                        break
            continue
        # With only the default strategy in play the longest idle agents are the best ones:
        # read a slice of them; otherwise every free agent, so any strategy's order is exact.
        longest_idle_only = all(
            queues[r.queue].strategy == "longest_idle" for r in waiting if r.queue in queues
        )
        pool = _pool(conn, limit=4 * len(waiting) + 100 if longest_idle_only else None)
        if not pool:
            break
        unmatched = []
        for row in waiting:
            spec = queues.get(row.queue)
            if spec is None:
                continue
            agent = _pick(pool, row, spec, declined, allow_declined=allow_declined)
            if agent is not None and attempt(row, agent.id, spec):
                agent.take(row.channel, spec)
                made += 1
                taken.add(row.id)
            elif agent is None:
                unmatched.append(row)
            if not any(a.free_any() for a in pool):
                break
        if longest_idle_only:
            # Eligible agents beyond the slice (skills, members) are found per conversation.
            for row in unmatched[:SMALL]:
                spec = queues[row.queue]
                exclude = (
                    set()
                    if allow_declined
                    else {agent for conversation, agent in declined if conversation == row.id}
                )
                exclude |= {a.id for a in pool}
                for agent_id in (
                    candidate_agents(conn, row, spec, exclude=exclude)
                    if row.preferred_agent_id is None
                    else []
                ):
                    if attempt(row, agent_id, spec):
                        made += 1
                        taken.add(row.id)
                        break
    return made


def dispatch_batch(
    tx: Tx, queues: dict[str, QueueSpec], limit: int = BATCH
) -> list[dict[str, Any]]:
    """Match and offer in this one transaction (SQLite: one writer, so no lock cycles; the
    offers are committed together)."""
    made: list[dict[str, Any]] = []

    def attempt(row: Any, agent_id: int, spec: QueueSpec) -> bool:
        result = try_offer(tx, row.id, agent_id, spec)
        if result is not None:
            made.append(result)
        return result is not None

    _match(tx.conn, queues, limit, attempt)
    return made


def plan_batch(
    conn: Connection, queues: dict[str, QueueSpec], limit: int = BATCH
) -> list[tuple[int, int, str]]:
    """Match in a read; the caller makes each offer in a transaction of its own (PostgreSQL:
    one transaction per decision locks one conversation and one agent, always in the same
    order, so concurrent processes never deadlock). A stale plan loses its conditional
    update and is retried by the next run."""
    plan: list[tuple[int, int, str]] = []

    def attempt(row: Any, agent_id: int, spec: QueueSpec) -> bool:
        plan.append((int(row.id), agent_id, str(row.queue)))
        return True

    _match(conn, queues, limit, attempt)
    return plan
