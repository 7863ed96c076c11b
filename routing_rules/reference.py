"""A plain reference evaluator: every rule in order, every condition interpreted.

It is written straight from docs/rules.md without any of the compiled engine's tricks,
so it serves three purposes: the oracle the engine is property-tested against, the naive
baseline in ``bench/rules.py``, and ``rules explain --trace``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from routing_rules.facts import MATCH_LIMIT, FactType, flatten_facts, fold, is_number, parse_time
from routing_rules.model import AllOf, AnyOf, Condition, Decision, NotOf, Ruleset, Test

__all__ = ["TraceStep", "holds", "reference_evaluate"]


@dataclass(frozen=True, slots=True)
class TraceStep:
    rule: str
    matched: bool
    reason: str | None  # the first condition that failed


def _folded_text(value: Any) -> str | None:
    return fold(value) if isinstance(value, str) else None


def holds(test: Test, value: Any) -> bool:
    """Whether one operator test holds for a fact value (``None`` means missing)."""
    op, arg, kind = test.op, test.arg, test.fact.type
    if value is None:
        return op == "exists" and arg is False
    if op == "exists":
        return arg is True
    if kind is FactType.TIME:
        at = parse_time(value)
        return at is not None and arg.is_open(at)
    if kind is FactType.LIST:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            return False
        elements = [fold(v) for v in value]
        if op == "in":
            return any(e in arg for e in elements)
        if op == "not_in":
            return all(e not in arg for e in elements)
        return arg in elements
    if op == "matches":
        return isinstance(value, str) and arg.search(value[:MATCH_LIMIT]) is not None
    if kind in (FactType.STRING, FactType.ENUM):
        text = _folded_text(value)
        if text is None:
            return False
        if op == "eq":
            return text == arg
        if op == "in":
            return text in arg
        if op == "not_in":
            return text not in arg
        if op == "contains":
            return arg in text
        return text.startswith(arg)
    if kind is FactType.BOOL:
        if not isinstance(value, bool):
            return False
        if op == "eq":
            return value == arg
        return (value in arg) if op == "in" else (value not in arg)
    if not is_number(value):
        return False
    comparisons = {
        "eq": lambda: value == arg,
        "in": lambda: value in arg,
        "not_in": lambda: value not in arg,
        "gt": lambda: value > arg,
        "gte": lambda: value >= arg,
        "lt": lambda: value < arg,
        "lte": lambda: value <= arg,
    }
    return bool(comparisons[op]())


def _check(cond: Condition, facts: Mapping[str, Any]) -> tuple[bool, str | None]:
    if isinstance(cond, Test):
        value = facts.get(cond.fact.name)
        if holds(cond, value):
            return True, None
        got = "missing" if value is None else repr(value)
        return False, f"{cond.where}: {cond.describe()} is false ({cond.fact.name} is {got})"
    if isinstance(cond, AllOf):
        for item in cond.items:
            ok, why = _check(item, facts)
            if not ok:
                return False, why
        return True, None
    if isinstance(cond, AnyOf):
        if any(_check(item, facts)[0] for item in cond.items):
            return True, None
        return False, f"{cond.where}: none of {len(cond.items)} alternatives holds"
    assert isinstance(cond, NotOf)
    ok, _ = _check(cond.item, facts)
    return (not ok), (f"{cond.where}: the negated condition holds" if ok else None)


def reference_evaluate(
    facts: Mapping[str, Any], ruleset: Ruleset, trace: list[TraceStep] | None = None
) -> Decision:
    flat = flatten_facts(facts)
    for rule in ruleset.rules:
        ok, why = (True, None) if rule.when is None else _check(rule.when, flat)
        if trace is not None:
            trace.append(TraceStep(rule.id, ok, why))
        if ok:
            return ruleset.decide(rule)
    return ruleset.decide(None)
