"""Property tests: evaluation is total, deterministic, ordered, and the compiled engine agrees
with the straightforward reference evaluator on random rulesets and facts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.base import CHANNEL_IDS
from routing_rules import evaluate, flatten_facts, reference_evaluate
from tests.routing_rules.helpers import load_ruleset

CHANNELS = list(CHANNEL_IDS)
INBOXES = ["support", "sales", "Billing", "é-shop"]
WORDS = ["refund", "Refund", "money", "hello", "straße", "STRASSE", "", "vip"]

HEADER = {
    "version": 1,
    "attributes": {"ltv": "number", "plan": "string", "beta": "bool"},
    "hours": {
        "office": {
            "timezone": "Europe/Berlin",
            "weekly": {"mon-fri": ["08:00-18:00"]},
            "holidays": ["2026-12-25"],
        }
    },
    "queues": {"q0": {}, "q1": {"skills": {"billing": 3}}, "q2": {}},
}

# -- random conditions ------------------------------------------------------------------
scalar_tests = st.one_of(
    st.builds(lambda v: {"channel": v}, st.sampled_from(CHANNELS)),
    st.builds(
        lambda v: {"channel": {"in": v}},
        st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3),
    ),
    st.builds(
        lambda v: {"channel": {"not_in": v}},
        st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=2),
    ),
    st.builds(lambda v: {"inbox": v}, st.sampled_from(INBOXES)),
    st.builds(
        lambda v: {"inbox": {"in": v}}, st.lists(st.sampled_from(INBOXES), min_size=1, max_size=2)
    ),
    st.builds(lambda v: {"contact.vip": v}, st.booleans()),
    st.builds(lambda v: {"contact.beta": {"in": [v]}}, st.booleans()),
    st.builds(lambda v: {"contact.ltv": v}, st.integers(-2, 5)),
    st.builds(
        lambda o, v: {"contact.ltv": {o: v}},
        st.sampled_from(["gt", "gte", "lt", "lte"]),
        st.integers(-2, 5) | st.floats(-2, 5),
    ),
    st.builds(
        lambda v: {"contact.ltv": {"in": v}}, st.lists(st.integers(0, 4), min_size=1, max_size=3)
    ),
    st.builds(lambda v: {"contact.plan": v}, st.sampled_from(WORDS[:6])),
    st.builds(lambda v: {"message.text": {"contains": v}}, st.sampled_from(WORDS)),
    st.builds(lambda v: {"message.text": {"starts_with": v}}, st.sampled_from(WORDS)),
    st.builds(
        lambda v: {"message.text": {"matches": v}},
        st.sampled_from(["refund", "(?i)refund", "^h", "ß|ss", "money$"]),
    ),
    st.builds(lambda v: {"conversation.tags": {"contains": v}}, st.sampled_from(WORDS)),
    st.builds(
        lambda v: {"conversation.tags": {"in": v}},
        st.lists(st.sampled_from(WORDS[:4]), min_size=1, max_size=2),
    ),
    st.builds(
        lambda v: {"conversation.tags": {"not_in": v}},
        st.lists(st.sampled_from(WORDS[:4]), min_size=1, max_size=2),
    ),
    st.builds(
        lambda f, v: {f: {"exists": v}},
        st.sampled_from(["contact.email", "message.text", "conversation.tags", "time"]),
        st.booleans(),
    ),
    st.just({"time": {"within": "office"}}),
)

indexable_tests = st.one_of(
    st.builds(lambda v: {"channel": v}, st.sampled_from(CHANNELS)),
    st.builds(
        lambda v: {"channel": {"in": v}},
        st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3),
    ),
    st.builds(lambda v: {"inbox": v}, st.sampled_from(INBOXES)),
    st.builds(lambda v: {"contact.vip": v}, st.booleans()),
    st.builds(
        lambda v: {"contact.ltv": {"in": v}}, st.lists(st.integers(0, 4), min_size=1, max_size=3)
    ),
)

conditions = st.recursive(
    scalar_tests,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
        st.builds(lambda a, b: {**a, **b}, inner, inner),
    ),
    max_leaves=6,
)


@st.composite
def rulesets(draw: Any) -> Any:
    rules = []
    for i in range(draw(st.integers(0, 40))):
        rule: dict[str, Any] = {
            "id": f"r{i}",
            "then": {"queue": draw(st.sampled_from(["q0", "q1", "q2"]))},
        }
        if draw(st.booleans()):
            rule["order"] = draw(st.integers(-3, 3))
        if draw(st.integers(0, 9)):
            rule["when"] = draw(conditions)
            if draw(st.booleans()):  # a top-level channel/inbox test, so the index is exercised
                rule["when"] = {**draw(indexable_tests), **rule["when"]}
        rules.append(rule)
    doc = {**HEADER, "rules": rules, "default": {"queue": "q0"}}
    return load_ruleset(yaml.dump(doc, Dumper=_NoAliases, allow_unicode=True, sort_keys=False))


class _NoAliases(yaml.SafeDumper):
    """Hypothesis reuses objects; the rules loader (rightly) refuses anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# -- random facts, including wrong types, nulls and nesting -------------------------------
any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(WORDS + CHANNELS + INBOXES),
    st.lists(st.sampled_from(WORDS), max_size=3),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=2),
    st.sampled_from(
        ["2026-11-25T10:00:00+01:00", "2026-12-25T10:00:00Z", "2026-11-25T10:00:00", "garbage"]
    ),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FACT_NAMES = [
    "channel",
    "inbox",
    "contact.vip",
    "contact.beta",
    "contact.ltv",
    "contact.plan",
    "contact.email",
    "message.text",
    "conversation.tags",
    "time",
    "unknown.fact",
]
typed = {
    "channel": st.sampled_from(CHANNELS),
    "inbox": st.sampled_from(INBOXES),
    "contact.vip": st.booleans(),
    "contact.beta": st.booleans(),
    "contact.ltv": st.integers(-2, 5) | st.floats(-2, 5),
    "contact.plan": st.sampled_from(WORDS),
    "message.text": st.sampled_from(WORDS) | st.text(max_size=20),
    "conversation.tags": st.lists(st.sampled_from(WORDS), max_size=3),
    "time": st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.isoformat()),
}
facts_strategy = st.fixed_dictionaries(
    {}, optional={n: st.one_of(typed.get(n, any_value), any_value) for n in FACT_NAMES}
)

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(rulesets(), st.lists(facts_strategy, min_size=1, max_size=25))
def test_engine_agrees_with_reference(ruleset: Any, many: list[dict[str, Any]]) -> None:
    for facts in many:
        assert evaluate(facts, ruleset) == reference_evaluate(facts, ruleset)


@SETTINGS
@given(
    rulesets(), st.lists(st.dictionaries(st.text(max_size=20), any_value, max_size=6), max_size=25)
)
def test_random_facts_never_raise_and_evaluation_is_deterministic(
    ruleset: Any, many: list[dict[str, Any]]
) -> None:
    for facts in many:
        first = evaluate(facts, ruleset)
        assert (
            evaluate(dict(reversed(list(facts.items()))), ruleset)
            == first
            == evaluate(facts, ruleset)
        )
        assert first.queue in ruleset.queues


@SETTINGS
@given(rulesets(), st.lists(facts_strategy, min_size=1, max_size=25))
def test_order_semantics(ruleset: Any, many: list[dict[str, Any]]) -> None:
    """The winner is the matching rule with the highest order; ties go to the earlier rule in the file."""
    from routing_rules.reference import _check

    for given_facts in many:
        facts = flatten_facts(given_facts)  # as evaluate() reads them: {"contact": {...}} nests
        matching = [r for r in ruleset.rules if r.when is None or _check(r.when, facts)[0]]
        expected = min(matching, key=lambda r: (-r.order, r.index)).id if matching else None
        assert evaluate(facts, ruleset).rule == expected
