"""The routing rules language: a YAML file admins edit, validated and compiled.

Pure: no database or network I/O. Typical use::

    ruleset = load_ruleset(Path("rules.yaml").read_bytes(), "rules.yaml", channels=("sms", "email"))
    decision = evaluate({"channel": "sms", "message.text": "refund please"}, ruleset)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from routing_rules.cases import Case, CaseResult, load_cases, run_cases
from routing_rules.durations import format_duration, parse_duration
from routing_rules.errors import LocatedError, RulesError, did_you_mean, format_errors
from routing_rules.facts import (
    Fact,
    FactRegistry,
    FactType,
    builtin_facts,
    flatten_facts,
    parse_time,
)
from routing_rules.hours import Hours
from routing_rules.model import (
    PRIORITIES,
    STRATEGIES,
    Action,
    Decision,
    OverflowStep,
    QueueSpec,
    Rule,
    Ruleset,
    Sla,
    Sticky,
    Team,
)
from routing_rules.reference import TraceStep, reference_evaluate
from routing_rules.schema import OPERATORS, load_ruleset
from routing_rules.templates import Template, parse_template
from routing_rules.yamlsafe import load_yaml, to_python

__all__ = [
    "OPERATORS",
    "PRIORITIES",
    "STRATEGIES",
    "Action",
    "Case",
    "CaseResult",
    "Decision",
    "Fact",
    "FactRegistry",
    "FactType",
    "Hours",
    "LocatedError",
    "OverflowStep",
    "QueueSpec",
    "Rule",
    "RulesError",
    "Ruleset",
    "Sla",
    "Sticky",
    "Team",
    "Template",
    "TraceStep",
    "builtin_facts",
    "did_you_mean",
    "evaluate",
    "flatten_facts",
    "format_duration",
    "format_errors",
    "load_cases",
    "load_ruleset",
    "load_yaml",
    "parse_duration",
    "parse_template",
    "parse_time",
    "reference_evaluate",
    "run_cases",
    "to_python",
]


def evaluate(facts: Mapping[str, Any], ruleset: Ruleset) -> Decision:
    """Route one conversation: the Decision of the first matching rule, or the default.

    Pure and total: any facts (missing, null, wrong types) give a Decision, never an
    exception. The returned Decision is shared per rule; treat it as read-only.
    """
    return ruleset.engine.evaluate(facts)
