"""Matching waiting conversations to agents, in batches, in queue order.

One run reads the waiting conversations in queue order (priority, then the SLA due
soonest, then time in queue) and
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

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, String, and_, bindparam, cast, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import aliased
from sqlalchemy.sql.functions import FunctionElement

from router.assignment.core import candidate_agents, try_offer
from router.assignment.strategies import LONGEST_IDLE, Scope, strategy_of
from router.db import Tx, any_of, prepared
from router.models import Agent, AgentLoad, AgentSkill, Conversation, Offer, User
from router.types import AgentPresence, ConversationState, OfferState
from routing_rules import QueueSpec

__all__ = ["dispatch_batch", "eligibility", "plan_batch"]

BATCH = 500
Reads = Connection | Tx  # a read's connection (plan_batch) or the writer's transaction
SMALL = 32  # at most this many waiting: per-conversation indexed candidate queries

_WAITING = (
    select(
        Conversation.id,
        Conversation.queue,
        Conversation.channel,
        Conversation.required_skills,
        Conversation.language,
        Conversation.preferred_agent_id,
        Conversation.data,
    )
    .where(Conversation.state == ConversationState.QUEUED.value)
    .order_by(
        Conversation.priority.desc(),
        Conversation.sla_due_at,
        Conversation.queued_at,
        Conversation.id,
    )
    .limit(bindparam("limit"))
)
_LOAD = aliased(AgentLoad)


class _joined(FunctionElement[str]):
    """The group's values joined with commas. Like ``func.aggregate_strings`` but with the
    separator written into the SQL rather than bound when executed, so the statements that
    use it can be prepared (router.db.prepared)."""

    type = String()
    inherit_cache = True


@compiles(_joined, "sqlite")
def _joined_sqlite(element: _joined, compiler: Any, **kw: Any) -> str:
    return f"group_concat({compiler.process(element.clauses, **kw)}, ',')"


@compiles(_joined, "postgresql")
def _joined_postgresql(element: _joined, compiler: Any, **kw: Any) -> str:
    return f"string_agg({compiler.process(element.clauses, **kw)}, ',')"


# Skills and loads ride along as "name:level,..." and "channel:used:cap,...": one query.
_SKILL_LIST = (
    select(_joined(AgentSkill.skill + ":" + cast(AgentSkill.level, String)))
    .where(AgentSkill.agent_id == Agent.id)
    .scalar_subquery()
)
_LOAD_LIST = (
    select(_joined(_LOAD.channel + ":" + cast(_LOAD.used, String) + ":" + cast(_LOAD.cap, String)))
    .where(_LOAD.agent_id == Agent.id)
    .scalar_subquery()
)
_FREE_AGENTS = (
    select(
        Agent.id,
        Agent.idle_since,
        Agent.exclusive_channels,
        Agent.rr_position,
        User.name,
        _SKILL_LIST.label("skills"),
        _LOAD_LIST.label("loads"),
    )
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
_IDLE_SLICE = (
    _FREE_AGENTS.where(AgentLoad.used == 0)
    .order_by(Agent.idle_since, Agent.id)
    .limit(bindparam("n"))
)
# Both slices in longest-idle order, so that together they are a prefix of it (the idle one
# is that order among agents free of work: an index walk by idle time).
_BUSY_SLICE = (
    _FREE_AGENTS.where(AgentLoad.used > 0)
    .order_by(*LONGEST_IDLE.order_by(Scope(), AgentLoad))
    .limit(bindparam("n"))
)
# the dispatch runs them in the writer's transaction on SQLite (router.db.prepared)
prepared(_WAITING)
prepared(_FREE_AGENTS)
prepared(_IDLE_SLICE)
prepared(_BUSY_SLICE)
# The offers of the waiting conversations, by their index: a condition on the state in SQL
# let SQLite walk the state index instead, through every offer ever declined or expired.
_OFFERS_OF = prepared(
    select(Offer.conversation_id, Offer.agent_id, Offer.state).where(
        any_of(Offer.conversation_id, "ids")
    )
)
_DECLINED_STATES = frozenset((OfferState.REJECTED.value, OfferState.EXPIRED.value))


_NO_SCOPE = Scope()


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

    def idle_key(self) -> tuple[Any, ...]:
        """The longest idle order (the pool's order)."""
        return LONGEST_IDLE.rank(self, _NO_SCOPE)

    def free_any(self) -> bool:
        used, cap = self.load.get("total", (0, 0))
        return used < cap

    def take(self, channel: str, spec: QueueSpec) -> None:
        for key in (channel, "total"):
            self.load.setdefault(key, [0, 0])[0] += 1
        if strategy_of(spec).rotates:
            self.rr_position = 1 << 62  # rotated to the back (the database holds the real value)


def _pool(conn: Reads, limit: int | None = None) -> list[_Candidate]:
    """Agents who could take something: all of them, or the ``limit`` longest idle (an
    index walk, so a run with few waiting does not read thousands of agents)."""
    if limit is None:
        rows = list(conn.execute(_FREE_AGENTS))
    else:
        # Agents free of work first (an index walk in idle order), then, if that is not
        # enough, agents already holding some.
        rows = list(conn.execute(_IDLE_SLICE, {"n": limit}))
        if len(rows) < limit:
            rows += conn.execute(_BUSY_SLICE, {"n": limit - len(rows)})
    agents = []
    for r in rows:
        agent = _Candidate(
            r.id, r.name, r.idle_since, list(r.exclusive_channels or []), int(r.rr_position)
        )
        for item in (r.skills or "").split(","):
            if item:
                skill, level = item.split(":")
                agent.skills[skill] = int(level)
        for item in (r.loads or "").split(","):
            if item:
                channel, used, cap = item.split(":")
                agent.load[channel] = [int(used), int(cap)]
        agents.append(agent)
    # Longest idle first: the default strategy picks the first qualified agent in this order.
    return sorted(agents, key=_Candidate.idle_key)


def _declined(conn: Reads, ids: Iterable[int]) -> set[tuple[int, int]]:
    return {
        (int(r.conversation_id), int(r.agent_id))
        for r in conn.execute(_OFFERS_OF, {"ids": list(ids)})
        if r.state in _DECLINED_STATES
    }


@dataclass(frozen=True, slots=True)
class _View:
    """What eligibility looks at, for one way a conversation can be taken."""

    id: int
    channel: str
    required_skills: dict[str, int]
    language: str | None


Ways = list[tuple[QueueSpec, Any]]


def eligibility(queues: dict[str, QueueSpec], row: Any) -> Ways:
    """The ways an agent can be eligible for a waiting conversation, as (queue, view) pairs:
    by its own queue; by a queue an overflow step added (that queue's skills and members);
    or, transferred to a named agent, by free capacity alone (skills aside) while it is
    reserved for them."""
    own = queues[row.queue]
    data = row.data or {}
    if row.preferred_agent_id is not None and data.get("direct_to") == row.preferred_agent_id:
        anyone = replace(own, members=None, language_required=False)
        return [(anyone, _View(row.id, row.channel, {}, None))]
    ways: Ways = [(own, row)]
    for name in data.get("extra_queues", ()):
        if name in queues and name != row.queue:
            extra = queues[name]
            ways.append((extra, _View(row.id, row.channel, dict(extra.skills), row.language)))
    return ways


def _pick(
    pool: list[_Candidate],
    row: Any,
    spec: QueueSpec,
    ways: Ways,
    declined: set[tuple[int, int]],
    *,
    allow_declined: bool,
) -> _Candidate | None:
    """The best qualified agent for ``row``, in the order :func:`_candidates` asks the
    database for: agents eligible by its own queue first, then those eligible by a queue an
    overflow step added, each by that queue's strategy. (The pool is in longest-idle order, so
    with that strategy and one way to be eligible the first qualified agent is the best.)"""

    def qualifies(agent: _Candidate) -> bool:
        return any(agent.qualifies(s, view) for s, view in ways)

    if row.preferred_agent_id is not None:  # its preferred agent only, until its wait is over
        return next((a for a in pool if a.id == row.preferred_agent_id and qualifies(a)), None)
    orders = [(s, view, strategy_of(s), Scope.of(s, view)) for s, view in ways]
    allowed = (a for a in pool if allow_declined or (row.id, a.id) not in declined)
    if len(orders) == 1 and orders[0][2] is LONGEST_IDLE:
        return next((a for a in allowed if a.qualifies(orders[0][0], orders[0][1])), None)
    best: _Candidate | None = None
    best_key: tuple[Any, ...] = ()
    for agent in allowed:
        for tier, (s, view, strategy, scope) in enumerate(orders):
            if agent.qualifies(s, view):
                key = (tier, strategy.rank(agent, scope))
                if best is None or key < best_key:
                    best, best_key = agent, key
                break
    return best


Attempt = Callable[[Any, int, QueueSpec], bool]


def _candidates(conn: Reads, row: Any, ways: Ways, exclude: set[int]) -> list[int]:
    """Indexed candidate query for one conversation: its preferred agent only while it waits
    for them (whether or not they declined it before), else the best eligible agents (by its
    own queue first, then by queues an overflow step added)."""
    found: list[int] = []
    for spec, view in ways:
        if row.preferred_agent_id is not None:
            found += candidate_agents(conn, view, spec, exclude=set(), only=row.preferred_agent_id)
        else:
            found += candidate_agents(conn, view, spec, exclude=exclude | set(found))
    return list(dict.fromkeys(found))


def _match(conn: Reads, queues: dict[str, QueueSpec], limit: int, attempt: Attempt) -> int:
    """Match waiting conversations to agents in queue order and call ``attempt`` for each
    match (it returns whether an offer was made). Two passes: first nobody is offered a
    conversation they declined before; then, for what is still waiting and was declined,
    an agent who declined it is the last resort (when nobody else is eligible)."""
    made = 0
    taken: set[int] = set()
    waiting = [r for r in conn.execute(_WAITING, {"limit": limit}).all() if r.queue in queues]
    if not waiting:
        return 0
    declined = _declined(conn, (r.id for r in waiting))
    # With only the default strategy in play the longest idle agents are the best ones: one
    # read of a slice of them serves the whole batch. Otherwise, with few waiting, indexed
    # candidate queries per conversation cost less than reading every free agent. (A queue an
    # overflow step added ranks its agents after the queue's own, by its own strategy: a
    # slice in longest-idle order is not enough for that.)
    longest_idle_only = all(
        [s.strategy for s, _ in eligibility(queues, r)] == [LONGEST_IDLE.name] for r in waiting
    )
    per_conversation = len(waiting) <= SMALL and not longest_idle_only
    pool: list[_Candidate] | None = None
    complete = False

    def by_query(rows: list[Any], allow_declined: bool, skip: set[int]) -> None:
        nonlocal made
        for row in rows:
            spec = queues[row.queue]
            exclude = skip if allow_declined else skip | declined_by(row.id)
            for agent_id in _candidates(conn, row, eligibility(queues, row), exclude):
                if attempt(row, agent_id, spec):
                    made += 1
                    taken.add(row.id)
                    break

    def declined_by(conversation_id: int) -> set[int]:
        return {agent for conversation, agent in declined if conversation == conversation_id}

    for allow_declined in (False, True):
        if allow_declined:  # the second pass is only for what someone declined
            declined_ids = {conversation for conversation, _ in declined}
            waiting = [r for r in waiting if r.id not in taken and r.id in declined_ids]
            if not waiting:
                break
        if per_conversation:
            by_query(waiting, allow_declined, set())
            continue
        # A slice of the longest idle agents, or every free agent so that any strategy's
        # order is exact. The second pass reuses it (its loads are kept up to date).
        if pool is None:
            slice_size = 4 * len(waiting) + 100 if longest_idle_only else None
            pool = _pool(conn, limit=slice_size)
            # a slice shorter than asked for holds every agent who could take anything
            complete = slice_size is None or len(pool) < slice_size
        if not pool:
            break
        unmatched = []
        for index, row in enumerate(waiting):
            spec = queues[row.queue]
            ways = eligibility(queues, row)
            agent = _pick(pool, row, spec, ways, declined, allow_declined=allow_declined)
            if agent is not None and attempt(row, agent.id, spec):
                agent.take(row.channel, spec)
                pool.remove(agent)  # now holding more work: it moves back in idle order
                bisect.insort(pool, agent, key=_Candidate.idle_key)
                made += 1
                taken.add(row.id)
            elif agent is None:
                unmatched.append(row)
            if not any(a.free_any() for a in pool):
                # the slice is used up: the rest may still have agents beyond it
                unmatched.extend(waiting[index + 1 :])
                break
        if longest_idle_only and not complete:
            # Eligible agents beyond the slice (skills, members) are found per conversation.
            by_query(unmatched[:SMALL], allow_declined, {a.id for a in pool})
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

    _match(tx, queues, limit, attempt)  # the writer's prepared statements on SQLite
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
