"""Rule test cases: ``- {name, facts, expect: {...}}``, run by ``omniroute rules test``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from routing_rules.errors import LocatedError, RulesError, did_you_mean
from routing_rules.model import Decision, Ruleset
from routing_rules.yamlsafe import MapNode, SeqNode, load_yaml, to_python

__all__ = ["Case", "CaseResult", "load_cases", "run_cases"]

_DECISION_KEYS = ("rule", "queue", "priority", "skills", "tags", "reply", "agent", "ruleset")


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    facts: dict[str, Any]
    expect: dict[str, Any]
    line: int


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    decision: Decision
    differences: list[str]

    @property
    def passed(self) -> bool:
        return not self.differences


def load_cases(data: bytes | str, source: str = "rules-cases.yaml") -> list[Case]:
    root = load_yaml(data, source)
    errors: list[LocatedError] = []
    cases: list[Case] = []
    if not isinstance(root, SeqNode):
        raise RulesError(
            [LocatedError(root.line, root.col, "", "expected a list of cases")], source
        )
    names: set[str] = set()
    for i, node in enumerate(root.items):
        where = f"[{i}]"
        if not isinstance(node, MapNode):
            errors.append(
                LocatedError(node.line, node.col, where, "expected a case {name, facts, expect}")
            )
            continue
        for key, _ in node:
            if key.text not in ("name", "facts", "expect"):
                hint = did_you_mean(key.text, ("name", "facts", "expect"))
                errors.append(
                    LocatedError(key.line, key.col, where, f'unknown key "{key.text}"{hint}')
                )
        name, facts, expect = (
            to_python(n) if (n := node.get(k)) is not None else None
            for k in ("name", "facts", "expect")
        )
        if not isinstance(name, str) or not name:
            errors.append(LocatedError(node.line, node.col, where, "a case needs a name"))
            continue
        if name in names:
            errors.append(LocatedError(node.line, node.col, where, f'duplicate case name "{name}"'))
        names.add(name)
        if not isinstance(facts, dict):
            errors.append(LocatedError(node.line, node.col, where, "facts must be a mapping"))
            continue
        expect_node = node.get("expect")
        if not isinstance(expect, dict) or not expect or expect_node is None:
            errors.append(
                LocatedError(node.line, node.col, where, "expect must be a non-empty mapping")
            )
            continue
        assert isinstance(expect_node, MapNode)
        for key, _ in expect_node:
            if key.text not in _DECISION_KEYS:
                hint = did_you_mean(key.text, _DECISION_KEYS)
                errors.append(
                    LocatedError(
                        key.line,
                        key.col,
                        f"{where}.expect",
                        f'unknown decision key "{key.text}"{hint}',
                    )
                )
        cases.append(Case(name, facts, expect, node.line))
    if errors:
        raise RulesError(errors, source)
    return cases


def run_cases(ruleset: Ruleset, cases: list[Case]) -> list[CaseResult]:
    results = []
    for case in cases:
        decision = ruleset.engine.evaluate(case.facts)
        actual = decision.to_dict()
        differences = []
        for key, want in case.expect.items():
            got = actual.get(key)
            if key == "tags" and isinstance(want, list):
                same = sorted(map(str, want)) == sorted(map(str, got or []))
            else:
                same = got == want
            if not same:
                differences.append(f"{key}: expected {json.dumps(want)}, got {json.dumps(got)}")
        results.append(CaseResult(case, decision, differences))
    return results
