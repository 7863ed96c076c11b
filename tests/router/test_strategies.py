"""Assignment strategies: the SQL order (candidate_agents) and the batch matcher's order in
memory choose the same agent, on SQLite and PostgreSQL (a property test over random agents,
queues and conversations, through the real database functions)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, update

from adapters.clock import FakeClock
from router.agents import create_agent
from router.assignment.core import candidate_agents
from router.assignment.matcher import _candidates, _pick, _pool, eligibility
from router.assignment.strategies import STRATEGIES, Strategy, TotalUsed
from router.auth import create_user
from router.db import Database, Tx
from router.models import Agent, AgentLoad, AgentSkill
from router.types import CAPACITY_KEYS
from routing_rules import STRATEGIES as RULE_STRATEGIES
from routing_rules import QueueSpec

# Enough to find a disagreement in the orders within seconds per backend; raise it locally
# for a deeper search (OMNIROUTE_STRATEGY_EXAMPLES=2000).
EXAMPLES = int(os.environ.get("OMNIROUTE_STRATEGY_EXAMPLES", "250"))
NAMES = tuple(f"agent{i}" for i in range(7))
SKILLS = ("billing", "sales", "lang_de", "lang_fr")
CHANNELS = ("sms", "webchat", "voice", "email")
BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class AgentState:
    presence: str
    disconnected: bool
    idle_since: datetime
    rr_position: int
    skills: dict[str, int]
    exclusive: list[str]
    load: dict[str, tuple[int, int]]  # channel (and total) -> (used, cap)


@dataclass(frozen=True)
class Row:
    """A waiting conversation as the matcher reads it (matcher._WAITING)."""

    channel: str
    required_skills: dict[str, int]
    language: str | None
    data: dict[str, Any] = field(default_factory=dict)
    id: int = 1
    queue: str = "own"
    preferred_agent_id: int | None = None


# Few distinct values, so that ties (on idle time, rotation, occupancy, levels) are common
# and the tie-breaks are what is tested; most agents online with some room, so that most
# examples have several eligible agents to order.
held_skills = st.dictionaries(st.sampled_from(SKILLS), st.integers(1, 4), min_size=1, max_size=4)
asked_skills = st.just({}) | st.dictionaries(
    st.sampled_from(SKILLS), st.integers(1, 3), min_size=1, max_size=2
)


def used_of(cap: int) -> st.SearchStrategy[int]:
    # mostly below the cap; at it, or above it after a supervisor's override, now and then
    return st.sampled_from((*range(cap), *range(cap), cap, cap + 1))


@st.composite
def agent_states(draw: st.DrawFn) -> AgentState:
    load: dict[str, tuple[int, int]] = {}
    for channel in CHANNELS:
        cap = draw(st.sampled_from((0, 1, 2, 3, 3, 3)))
        load[channel] = (draw(used_of(cap)), cap)
    total_cap = draw(st.sampled_from((0, 2, 4, 6, 6)))
    load["total"] = (draw(used_of(total_cap)), total_cap)
    return AgentState(
        presence=draw(st.sampled_from(("online",) * 6 + ("away", "offline"))),
        disconnected=draw(st.sampled_from((False,) * 7 + (True,))),
        idle_since=BASE
        + timedelta(
            seconds=draw(st.integers(0, 3)), microseconds=draw(st.sampled_from((0, 250_000)))
        ),
        rr_position=draw(st.integers(0, 3)),
        skills=draw(held_skills),
        exclusive=draw(st.sampled_from(([], [], ["voice"], ["voice", "webchat"]))),
        load=load,
    )


@st.composite
def queue_specs(draw: st.DrawFn, name: str) -> QueueSpec:
    members = None
    if draw(st.sampled_from((False, False, False, True))):  # mostly by skills
        members = draw(st.lists(st.sampled_from((*NAMES, "nobody")), unique=True, max_size=5))
    return QueueSpec(
        name=name,
        skills=draw(asked_skills),
        strategy=draw(st.sampled_from(RULE_STRATEGIES)),
        members=tuple(members) if members is not None else None,
        language_required=draw(st.booleans()),
    )


@st.composite
def conversations(draw: st.DrawFn) -> Row:
    return Row(
        channel=draw(st.sampled_from(CHANNELS)),
        required_skills=draw(asked_skills),
        language=draw(st.sampled_from((None, None, "de", "fr"))),
    )


@dataclass
class Floor:
    """A database with a fixed set of agents, rearranged for each example."""

    db: Database
    ids: list[int]

    def arrange(self, tx: Tx, states: list[AgentState]) -> None:
        tx.execute(delete(AgentSkill))
        for agent_id, state in zip(self.ids, states, strict=True):
            tx.execute(
                update(Agent)
                .where(Agent.id == agent_id)
                .values(
                    presence=state.presence,
                    disconnected_at=tx.now if state.disconnected else None,
                    idle_since=state.idle_since,
                    rr_position=state.rr_position,
                    exclusive_channels=state.exclusive,
                )
            )
            if state.skills:
                tx.execute(
                    insert(AgentSkill),
                    [
                        {"agent_id": agent_id, "skill": s, "level": n}
                        for s, n in state.skills.items()
                    ],
                )
            for channel, (used, cap) in state.load.items():
                tx.execute(
                    update(AgentLoad)
                    .where(AgentLoad.agent_id == agent_id, AgentLoad.channel == channel)
                    .values(used=used, cap=cap)
                )

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """As the matcher runs: in the writer's transaction on SQLite (dispatch_batch), in a
        read on PostgreSQL (plan_batch)."""
        if self.db.dialect == "sqlite":
            return await self.db.write(fn, *args)
        return await self.db.read(fn, *args)


@pytest.fixture
async def floor(db_url: str) -> AsyncIterator[Floor]:
    db = Database(db_url, clock=FakeClock(BASE))
    await db.start()

    def add(tx: Tx) -> list[int]:
        ids = []
        for name in NAMES:
            user_id, _ = create_user(tx, name, "agent")
            ids.append(create_agent(tx, user_id, name, {}, dict.fromkeys(CAPACITY_KEYS, 0)))
        return ids

    try:
        yield Floor(db, await db.write(add))
    finally:
        await db.close()


def _first(ids: list[int]) -> int | None:
    return ids[0] if ids else None


def _pick_id(pool: list[Any], row: Row, spec: QueueSpec, ways: Any) -> int | None:
    agent = _pick(pool, row, spec, ways, set(), allow_declined=False)
    return agent.id if agent is not None else None


def picks(pool: list[Any], row: Row, spec: QueueSpec, ways: Any) -> list[int]:
    """The batch matcher's picks one after another, each agent leaving the pool once picked:
    its whole order of the eligible agents."""
    pool, out = list(pool), []
    while (agent := _pick(pool, row, spec, ways, set(), allow_declined=False)) is not None:
        out.append(agent.id)
        pool.remove(agent)
    return out


def observe(conn: Any, row: Row, queues: dict[str, QueueSpec]) -> dict[str, Any]:
    """Both paths' orders and choices for one conversation."""
    spec = queues["own"]
    pool = _pool(conn)  # every agent who could take anything, as the matcher reads them
    ways = eligibility(queues, row)
    return {
        # candidate_agents' ORDER BY: every eligible agent, and the first n
        "sql": candidate_agents(conn, row, spec, exclude=set(), limit=len(NAMES)),
        "sql_first": {
            n: candidate_agents(conn, row, spec, exclude=set(), limit=n) for n in (1, 2, 3)
        },
        # the batch matcher's order in memory
        "python": picks(pool, row, spec, [(spec, row)]),
        # with a queue an overflow step added: the matcher's queries per conversation, and
        # its order in memory
        "sql_ways": _candidates(conn, row, ways, set()),
        "python_ways": picks(pool, row, spec, ways),
        # the slices of the longest idle agents the matcher reads for a longest-idle batch
        "pool": [a.id for a in pool],
        "slices": {k: [a.id for a in _pool(conn, k)] for k in range(1, len(NAMES) + 1)},
    }


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    states=st.lists(agent_states(), min_size=len(NAMES), max_size=len(NAMES)),
    spec=queue_specs("own"),
    extra=queue_specs("extra"),
    row=conversations(),
)
async def test_sql_and_python_orders_choose_the_same_agent(
    floor: Floor, states: list[AgentState], spec: QueueSpec, extra: QueueSpec, row: Row
) -> None:
    await floor.db.write(floor.arrange, states)
    row = Row(row.channel, row.required_skills, row.language, data={"extra_queues": ["extra"]})
    got = await floor.run(observe, row, {"own": spec, "extra": extra})
    assert got["sql"] == got["python"], got  # the same order, tie-breaks included
    for n, first in got["sql_first"].items():
        assert first == got["sql"][:n], (n, got)
    assert got["sql_ways"] == got["python_ways"], got
    for k, ids in got["slices"].items():
        assert ids == got["pool"][:k], (k, got)


def test_the_registry_implements_exactly_the_strategies_of_the_rules_language() -> None:
    # routing_rules validates `strategy:` and must not import the router: the names are
    # declared there, and every one of them needs an implementation here (and no more)
    assert set(STRATEGIES) == set(RULE_STRATEGIES)
    assert all(name == strategy.name for name, strategy in STRATEGIES.items())


def test_a_strategy_ends_with_the_agent_id_so_its_order_is_total() -> None:
    with pytest.raises(ValueError, match="the last key must be the agent id"):
        Strategy("unfair", (TotalUsed(),))


# -- what the property test found around the two orders (each test failed before its fix) --


def state(
    used: int = 0, idle: int = 0, *, online: bool = True, skills: dict[str, int] | None = None
) -> AgentState:
    load = dict.fromkeys(CHANNELS, (0, 3))
    load["total"] = (used, 6)
    return AgentState(
        "online" if online else "offline",
        False,
        BASE + timedelta(seconds=idle),
        0,
        skills or {},
        [],
        load,
    )


def on_a_call(idle: int) -> AgentState:
    """Busy on an exclusive voice call: takes nothing else meanwhile."""
    busy = state(1, idle)
    return replace(busy, exclusive=["voice"], load={**busy.load, "voice": (1, 3)})


OFFLINE = state(online=False)


async def test_candidate_agents_looks_past_agents_on_an_exclusive_call(floor: Floor) -> None:
    # the two first in the order are on calls: the query used to read 2 x limit rows and
    # drop those, finding nobody although the third agent is free
    await floor.db.write(floor.arrange, [on_a_call(0), on_a_call(1), state(1, 5)] + [OFFLINE] * 4)
    spec = QueueSpec(name="own")
    first = await floor.run(
        lambda c: candidate_agents(c, Row("sms", {}, None), spec, exclude=set(), limit=1)
    )
    assert first == [floor.ids[2]]


async def test_the_slice_of_busy_agents_is_in_longest_idle_order(floor: Floor) -> None:
    # nobody free of work: the one holding the least comes first, however long the other
    # has been idle (the slice used to be ordered by idle time alone)
    await floor.db.write(floor.arrange, [state(2, 0), state(1, 5)] + [OFFLINE] * 5)
    sliced = await floor.run(lambda c: [a.id for a in _pool(c, 1)])
    assert sliced == [floor.ids[1]]
    row = Row("sms", {}, None)
    assert await floor.run(
        lambda c: candidate_agents(c, row, QueueSpec(name="own"), exclude=set())
    ) == [floor.ids[1], floor.ids[0]]


async def test_an_added_queues_agents_come_after_the_queues_own_by_their_strategy(
    floor: Floor,
) -> None:
    extra = QueueSpec(name="extra", strategy="longest_idle")
    row = Row("sms", {"billing": 2}, None, data={"extra_queues": ["extra"]})

    def both(conn: Any, own: QueueSpec) -> tuple[int | None, int | None]:
        ways = eligibility({"own": own, "extra": extra}, row)
        return _first(_candidates(conn, row, ways, set())), _pick_id(_pool(conn), row, own, ways)

    # eligible by the added queue only: ranked by its strategy (longest idle), not by the
    # queue's own (the highest levels)
    idle_long, billing_1 = state(0, 0), state(0, 3, skills={"billing": 1})
    await floor.db.write(floor.arrange, [idle_long, billing_1] + [OFFLINE] * 5)
    own = QueueSpec(name="own", strategy="most_skilled", skills={"billing": 2})
    assert await floor.run(both, own) == (floor.ids[0], floor.ids[0])
    # eligible by the queue itself: first, however long an agent of the added queue is idle
    billing_2 = state(0, 3, skills={"billing": 2})
    await floor.db.write(floor.arrange, [idle_long, billing_2] + [OFFLINE] * 5)
    own = QueueSpec(name="own", skills={"billing": 2})
    assert await floor.run(both, own) == (floor.ids[1], floor.ids[1])
