"""Small builders shared by the rules tests."""

from __future__ import annotations

from typing import Any

import routing_rules
from channels.base import CHANNEL_IDS
from routing_rules import RulesError, Ruleset, evaluate, reference_evaluate

HEADER = """\
version: 1
attributes: {ltv: number, plan: string, beta: bool}
hours:
  office:
    timezone: Europe/Berlin
    weekly: {mon-fri: ["08:00-18:00"], sat: ["10:00-14:00"]}
    holidays: ["2026-12-25"]
queues:
  q: {}
  other: {}
"""


def load_ruleset(data: bytes | str, source: str = "rules.yaml") -> Ruleset:
    """:func:`routing_rules.load_ruleset` with omniroute's channel ids (as the core passes)."""
    return routing_rules.load_ruleset(data, source, channels=CHANNEL_IDS)


def one_rule(when: str) -> Ruleset:
    """A ruleset whose only rule ``r`` has the given ``when`` (flow YAML)."""
    return load_ruleset(
        HEADER
        + f"rules:\n  - id: r\n    when: {when}\n    then: {{queue: q}}\ndefault: {{queue: other}}\n"
    )


def holds(when: str, facts: dict[str, Any]) -> bool:
    """Whether rule ``r`` matches; the compiled engine and the reference must agree."""
    ruleset = one_rule(when)
    compiled = evaluate(facts, ruleset).rule == "r"
    reference = reference_evaluate(facts, ruleset).rule == "r"
    assert compiled == reference, f"engine {compiled} != reference {reference} for {when} {facts}"
    return compiled


def errors_of(text: str) -> list[str]:
    """Every error of a file as ``LINE:COL: where: message``."""
    try:
        load_ruleset(text)
    except RulesError as exc:
        return [e.format("f")[2:] for e in exc.errors]
    return []
