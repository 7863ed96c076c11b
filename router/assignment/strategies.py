"""Assignment strategies: the order in which a queue's eligible agents get its conversations.

A strategy is data: a name and a sequence of sort keys, best first. Each key is written once
with both of its forms side by side: the SQL expression that orders ``candidate_agents``'
query (one indexed query per conversation) and the value the batch matcher ranks the agents
it has read in memory with. Both orders are generated from the same keys, and
tests/router/test_strategies.py checks by property, on SQLite and PostgreSQL, that the two
paths choose the same agent, tie-breaks included.

Adding a strategy:

1. Name it in ``routing_rules.model.STRATEGIES`` (the rules language validates a queue's
   ``strategy:``; routing_rules imports nothing of the router, so the names live there).
2. Register a :class:`Strategy` under the same name in :data:`STRATEGIES` below, built from
   the keys of this module or from a new :class:`Key` subclass that defines both forms. A
   strategy that cannot be said as keys subclasses :class:`Strategy` and overrides
   ``order_by`` and ``rank`` together, next to each other.
3. Describe it in docs/rules.md (Strategies). tests/router/test_strategies.py fails until
   the registry and the rules language name the same strategies, and its property test
   covers the new strategy (it draws from the rules language's names).

Rules for keys, so that SQL and Python cannot disagree: a key is never NULL (SQLite sorts
NULL first, PostgreSQL last, Python does not compare None); a descending key is a number
(its Python form is negated); the last key is the agent id, so the order is total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

from sqlalchemy import ColumnElement, Float, cast, func, select

from router.models import Agent, AgentSkill
from routing_rules import QueueSpec

__all__ = [
    "LONGEST_IDLE",
    "STRATEGIES",
    "AgentFacts",
    "Key",
    "Scope",
    "Strategy",
    "strategy_of",
]


class AgentFacts(Protocol):
    """What the in-memory form of a key reads of an agent (the matcher's candidates)."""

    @property
    def id(self) -> int: ...
    @property
    def idle_since(self) -> datetime: ...
    @property
    def rr_position(self) -> int: ...
    @property
    def skills(self) -> Mapping[str, int]: ...
    @property
    def load(self) -> Mapping[str, Sequence[int]]: ...  # channel or "total" -> [used, cap]


@dataclass(frozen=True, slots=True)
class Scope:
    """What an order may depend on besides the agent: the skills whose levels count."""

    skills: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: QueueSpec, conversation: Any) -> Scope:
        """The conversation's required skills, else the queue's."""
        return cls(tuple(conversation.required_skills or spec.skills or {}))


class Key:
    """One sort key in its two forms. ``total`` in :meth:`sql` is the agent's ``total`` row
    of ``agent_load`` as the query joined it."""

    descending: ClassVar[bool] = False

    def sql(self, scope: Scope, total: Any) -> ColumnElement[Any]:
        raise NotImplementedError

    def value(self, agent: AgentFacts, scope: Scope) -> Any:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class AgentColumn(Key):
    """A column of the agent's row: ``idle_since``, ``rr_position``, ``id``."""

    name: str

    def sql(self, scope: Scope, total: Any) -> ColumnElement[Any]:
        return getattr(Agent, self.name)

    def value(self, agent: AgentFacts, scope: Scope) -> Any:
        return getattr(agent, self.name)


@dataclass(frozen=True, slots=True)
class TotalUsed(Key):
    """Capacity in use across channels (offered and assigned conversations)."""

    def sql(self, scope: Scope, total: Any) -> ColumnElement[Any]:
        return total.used

    def value(self, agent: AgentFacts, scope: Scope) -> Any:
        return agent.load["total"][0]


@dataclass(frozen=True, slots=True)
class Occupancy(Key):
    """The share of the total capacity in use. An eligible agent has ``used < cap``, so
    ``cap > 0``; both forms divide in IEEE doubles, so equal ratios (1/2, 2/4) tie in both."""

    def sql(self, scope: Scope, total: Any) -> ColumnElement[Any]:
        return cast(total.used, Float) / total.cap

    def value(self, agent: AgentFacts, scope: Scope) -> Any:
        used, cap = agent.load["total"][:2]
        return used / cap if cap else 1.0


@dataclass(frozen=True, slots=True)
class SkillLevels(Key):
    """The sum of the agent's levels on the skills in scope, highest first (0 without)."""

    descending: ClassVar[bool] = True

    def sql(self, scope: Scope, total: Any) -> ColumnElement[Any]:
        return (
            select(func.coalesce(func.sum(AgentSkill.level), 0))
            .where(AgentSkill.agent_id == Agent.id, AgentSkill.skill.in_(scope.skills))
            .scalar_subquery()
        )

    def value(self, agent: AgentFacts, scope: Scope) -> Any:
        return sum(agent.skills.get(skill, 0) for skill in scope.skills)


IDLE_SINCE = AgentColumn("idle_since")  # when the agent last became free of work
AGENT_ID = AgentColumn("id")


@dataclass(frozen=True, slots=True)
class Strategy:
    """A named order of eligible agents, best first, in SQL (:meth:`order_by`) and in memory
    (:meth:`rank`, smaller is better), both from :attr:`keys`. With ``rotates``, an offer
    moves the agent to the back of the stored rotation (``agents.rr_position``)."""

    name: str
    keys: tuple[Key, ...]
    rotates: bool = False

    def __post_init__(self) -> None:
        if not self.keys or self.keys[-1] != AGENT_ID:
            raise ValueError(f"strategy {self.name}: the last key must be the agent id")

    def order_by(self, scope: Scope, total: Any) -> list[ColumnElement[Any]]:
        """The ORDER BY terms; ``total`` is the agent's ``total`` load row in the query."""
        terms = []
        for key in self.keys:
            term = key.sql(scope, total)
            terms.append(term.desc() if key.descending else term)
        return terms

    def rank(self, agent: AgentFacts, scope: Scope) -> tuple[Any, ...]:
        """The sort key of an agent in memory: the same order as :meth:`order_by`."""
        return tuple(
            -key.value(agent, scope) if key.descending else key.value(agent, scope)
            for key in self.keys
        )


# An agent holding work is not idle: agents free of work first (then those holding the
# least), each group longest idle first (since their last work ended).
LONGEST_IDLE = Strategy("longest_idle", (TotalUsed(), IDLE_SINCE, AGENT_ID))

STRATEGIES: Mapping[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        LONGEST_IDLE,
        # the lowest share of the total capacity in use, then the longest idle
        Strategy("least_busy", (Occupancy(), IDLE_SINCE, AGENT_ID)),
        # the stored rotation, so it survives restarts: each offer sends the agent to the back
        Strategy("round_robin", (AgentColumn("rr_position"), AGENT_ID), rotates=True),
        # the highest levels on the required skills, then as longest_idle
        Strategy("most_skilled", (SkillLevels(), TotalUsed(), IDLE_SINCE, AGENT_ID)),
    )
}


def strategy_of(spec: QueueSpec) -> Strategy:
    """The queue's strategy (its name was validated with the rules)."""
    return STRATEGIES[spec.strategy]
