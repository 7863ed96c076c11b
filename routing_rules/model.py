"""The validated, typed form of a rules file, and the Decision it produces."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from routing_rules.facts import Fact, FactRegistry, FactType
from routing_rules.hours import Hours
from routing_rules.templates import Template

if TYPE_CHECKING:
    from routing_rules.engine import Engine

__all__ = [
    "PRIORITIES",
    "STRATEGIES",
    "Action",
    "AllOf",
    "AnyOf",
    "Condition",
    "Decision",
    "NotOf",
    "OverflowStep",
    "QueueSpec",
    "Rule",
    "Ruleset",
    "Sla",
    "Sticky",
    "Team",
    "Test",
]

PRIORITIES = ("low", "normal", "high", "urgent")
STRATEGIES = ("longest_idle", "least_busy", "round_robin", "most_skilled")


# -- conditions ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Test:
    """One operator applied to one fact. ``arg`` is prepared for evaluation:
    folded strings, frozensets for ``in``, compiled patterns, :class:`Hours`."""

    where: str
    fact: Fact
    op: str  # "eq" for a scalar value, else the operator name
    arg: Any
    raw: Any  # the value as written, for explanations

    def describe(self) -> str:
        shown = json.dumps(self.raw, ensure_ascii=False, default=str)
        if self.op == "eq":
            return f"{self.fact.name} = {shown}"
        return f"{self.fact.name} {self.op} {shown}"


@dataclass(frozen=True, slots=True)
class AllOf:
    where: str
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    where: str
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class NotOf:
    where: str
    item: Condition


Condition = Test | AllOf | AnyOf | NotOf


# -- queues -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OverflowStep:
    after: timedelta
    kind: str  # relax_skills | priority | add_queue | move_to
    value: Any  # dict[str, int] | str


@dataclass(frozen=True, slots=True)
class Sla:
    first_response: timedelta | None = None
    resolution: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Sticky:
    window: timedelta
    wait: timedelta = timedelta(seconds=20)


@dataclass(frozen=True)
class QueueSpec:
    name: str
    skills: dict[str, int] = field(default_factory=dict)
    strategy: str = "longest_idle"
    offer_timeout: timedelta = timedelta(seconds=30)
    hours: str | None = None
    sla: Sla = Sla()
    members: tuple[str, ...] | None = None
    language_required: bool = False
    auto_accept: bool = False
    sticky: Sticky | None = None
    max_missed_offers: int = 3
    unassign_after: timedelta = timedelta(minutes=10)
    wrap_up: timedelta = timedelta(0)
    voicemail_after: timedelta | None = None
    escalate_to: str | None = None
    abandon_after: timedelta | None = None
    after_hours_reply: str | None = None
    after_hours_overflow: tuple[OverflowStep, ...] = ()
    overflow: tuple[OverflowStep, ...] = ()

    def admits(self, user: str, skills: Mapping[str, int]) -> bool:
        """Whether an agent is eligible for this queue at all: a member when ``members`` is
        set, else holding each of the queue's skills at its minimum. (A conversation may
        ask for more: a rule's skills, the language; an overflow step may ask for less.)"""
        if self.members is not None:
            return user in self.members
        return all(skills.get(skill, 0) >= level for skill, level in self.skills.items())


@dataclass(frozen=True, slots=True)
class Team:
    """Who supervises which queues (``teams:``): with teams configured, a supervisor sees
    the conversations of their teams' queues only."""

    name: str
    queues: tuple[str, ...]
    supervisors: tuple[str, ...] = ()


# -- rules --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Action:
    queue: str | None = None
    priority: str | None = None
    skills: dict[str, int] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    reply: str | None = None
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    order: int
    index: int  # position in the file
    when: Condition | None
    then: Action
    line: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of routing. ``to_dict`` always carries every key (null where unset)."""

    rule: str | None
    queue: str
    priority: str
    skills: dict[str, int]
    tags: list[str]
    reply: str | None
    agent: str | None
    ruleset: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "queue": self.queue,
            "priority": self.priority,
            "skills": dict(self.skills),
            "tags": list(self.tags),
            "reply": self.reply,
            "agent": self.agent,
            "ruleset": self.ruleset,
        }


@dataclass
class Ruleset:
    version: str  # "sha256:<hex of the file's bytes>"
    source: str
    text: str
    attributes: dict[str, FactType]
    facts: FactRegistry
    hours: dict[str, Hours]
    queues: dict[str, QueueSpec]
    templates: dict[str, Template]
    rules: list[Rule]  # sorted: higher order first, ties in file order
    default: Action
    teams: dict[str, Team] = field(default_factory=dict)
    _engine: Engine | None = field(default=None, repr=False)

    def tested_facts(self) -> frozenset[str]:
        """The facts the rules test (``contact.vip``, ``contact.plan``...)."""
        found: set[str] = set()

        def walk(cond: Condition | None) -> None:
            if isinstance(cond, Test):
                found.add(cond.fact.name)
            elif isinstance(cond, NotOf):
                walk(cond.item)
            elif isinstance(cond, AllOf | AnyOf):
                for item in cond.items:
                    walk(item)

        for rule in self.rules:
            walk(rule.when)
        return frozenset(found)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from routing_rules.engine import Engine

            self._engine = Engine(self)
        return self._engine

    def decide(self, rule: Rule | None) -> Decision:
        """The Decision for a matched rule (or the default when ``rule`` is None)."""
        action = rule.then if rule else self.default
        queue = action.queue or self.default.queue
        assert queue is not None
        skills = dict(self.queues[queue].skills)
        for skill, level in action.skills.items():
            skills[skill] = max(level, skills.get(skill, 0))
        return Decision(
            rule=rule.id if rule else None,
            queue=queue,
            priority=action.priority or "normal",
            skills=skills,
            tags=list(dict.fromkeys(action.tags)),
            reply=action.reply,
            agent=action.agent,
            ruleset=self.version,
        )
