"""Decisions: ordering, first match, default, skill merging, the JSON shape, templates."""

from __future__ import annotations

from pathlib import Path

import pytest

import routing_rules
from routing_rules import RulesError, evaluate, load_cases, parse_template, run_cases
from tests.routing_rules.helpers import load_ruleset

ROOT = Path(__file__).resolve().parents[2]

RULES = """\
version: 1
queues:
  general: {}
  billing: {skills: {billing: 3, lang_en: 2}}
templates:
  ack: "Hello {contact.name|there}"
rules:
  - {id: low, order: -5, when: {channel: sms}, then: {queue: general, tags: [low]}}
  - {id: first, when: {channel: sms}, then: {queue: billing, skills: {billing: 5, lang_de: 2}, tags: [a, b]}}
  - {id: second, when: {channel: sms}, then: {queue: general}}
  - {id: high, order: 10, when: {contact.vip: true}, then: {priority: urgent, reply: ack, agent: anna}}
  - {id: catch-all, order: -10, then: {tags: [fallback]}}
default: {queue: general}
"""


def test_higher_order_first_then_file_order_first_match_wins() -> None:
    ruleset = load_ruleset(RULES)
    assert [r.id for r in ruleset.rules] == ["high", "first", "second", "low", "catch-all"]
    assert evaluate({"channel": "sms"}, ruleset).rule == "first"
    assert evaluate({"channel": "sms", "contact.vip": True}, ruleset).rule == "high"
    assert evaluate({"channel": "email"}, ruleset).rule == "catch-all"


def test_decision_json_has_every_key_and_merges_skills_keeping_the_higher_minimum() -> None:
    ruleset = load_ruleset(RULES)
    assert evaluate({"channel": "sms"}, ruleset).to_dict() == {
        "rule": "first",
        "queue": "billing",
        "priority": "normal",
        "skills": {"billing": 5, "lang_en": 2, "lang_de": 2},
        "tags": ["a", "b"],
        "reply": None,
        "agent": None,
        "ruleset": ruleset.version,
    }


def test_then_without_queue_uses_the_default_queue_but_nothing_else_of_default() -> None:
    ruleset = load_ruleset(
        RULES.replace(
            "default: {queue: general}", "default: {queue: general, priority: low, tags: [d]}"
        )
    )
    decision = evaluate({"contact.vip": True}, ruleset)
    assert (
        decision.rule,
        decision.queue,
        decision.priority,
        decision.tags,
        decision.reply,
        decision.agent,
    ) == (
        "high",
        "general",
        "urgent",
        [],
        "ack",
        "anna",
    )


def test_no_match_uses_default() -> None:
    ruleset = load_ruleset(
        RULES.replace("  - {id: catch-all, order: -10, then: {tags: [fallback]}}\n", "")
    )
    decision = evaluate({}, ruleset)
    assert (decision.rule, decision.queue, decision.priority) == (None, "general", "normal")


def test_version_is_the_sha256_of_the_bytes() -> None:
    import hashlib

    assert load_ruleset(RULES).version == "sha256:" + hashlib.sha256(RULES.encode()).hexdigest()


def test_index_narrows_candidates_without_changing_results() -> None:
    lines = ["version: 1", "queues: {q: {}, r: {}}", "rules:"]
    for i in range(200):
        lines.append(
            f"  - {{id: r{i}, when: {{inbox: i{i % 20}, channel: {['sms', 'email'][i % 2]}}}, then: {{queue: r}}}}"
        )
    lines.append("  - {id: any-vip, when: {contact.vip: true}, then: {queue: r}}")
    lines.append("default: {queue: q}")
    ruleset = load_ruleset("\n".join(lines) + "\n")
    candidates = ruleset.engine.candidates({"inbox": "i3", "channel": "email"})
    assert "r3" in candidates and "any-vip" in candidates and len(candidates) < 20
    assert evaluate({"inbox": "I3", "channel": "email"}, ruleset).rule == "r3"
    assert evaluate({"inbox": "i3", "channel": "sms"}, ruleset).rule is None
    assert evaluate({"inbox": "nowhere", "contact.vip": True}, ruleset).rule == "any-vip"


@pytest.mark.parametrize(
    ("text", "facts", "rendered"),
    [
        ("Hi {contact.name|there}!", {"contact.name": "Ann"}, "Hi Ann!"),
        ("Hi {contact.name|there}!", {}, "Hi there!"),
        ("Hi {contact.name|there}!", {"contact.name": ""}, "Hi there!"),
        ("Hi {contact.name}!", {}, "Hi !"),
        ("{{literal}} {channel}", {"channel": "sms"}, "{literal} sms"),
        ("tags: {conversation.tags|none}", {"conversation.tags": ["a", "b"]}, "tags: a, b"),
        ("vip: {contact.vip}", {"contact.vip": True}, "vip: yes"),
        (
            "{contact.name}",
            {"contact.name": "{channel}"},
            "{channel}",
        ),  # values are never re-expanded
    ],
)
def test_template_rendering(text: str, facts: dict[str, object], rendered: str) -> None:
    assert parse_template("t", text).render(facts) == rendered


@pytest.mark.parametrize("text", ["Hi {name", "Hi }", "Hi {}", "{a{b}}"])
def test_malformed_templates(text: str) -> None:
    with pytest.raises(ValueError):
        parse_template("t", text)


def test_shipped_example_uses_every_feature_and_its_cases_pass() -> None:
    text = (ROOT / "examples" / "rules.yaml").read_text()
    ruleset = load_ruleset(text, "examples/rules.yaml")
    operators = {
        "in:",
        "not_in:",
        "contains:",
        "starts_with:",
        "matches:",
        "gte:",
        "exists:",
        "within:",
    }
    keys = {
        "attributes:",
        "hours:",
        "holidays:",
        "strategy:",
        "offer_timeout:",
        "sla:",
        "members:",
        "language_required:",
        "auto_accept:",
        "sticky:",
        "max_missed_offers:",
        "unassign_after:",
        "wrap_up:",
        "voicemail_after:",
        "escalate_to:",
        "after_hours:",
        "relax_skills:",
        "add_queue:",
        "move_to:",
        "templates:",
        "order:",
        "all:",
        "any:",
        "not:",
        "reply:",
        "skills:",
        "tags:",
    }
    missing = {k for k in operators | keys if k not in text}
    assert not missing
    cases = load_cases((ROOT / "examples" / "rules-cases.yaml").read_text())
    results = run_cases(ruleset, cases)
    assert [r.differences for r in results if not r.passed] == []
    assert len(results) >= 8


def test_the_channel_vocabulary_is_the_callers() -> None:
    """The rules language declares no channels: ``channel`` takes the ids it is handed."""
    text = (
        "version: 1\nqueues: {q: {}}\n"
        "rules:\n  - {id: t, when: {channel: telegram}, then: {queue: q}}\n"
        "default: {queue: q}\n"
    )
    ruleset = routing_rules.load_ruleset(text, channels=("sms", "telegram"))
    assert evaluate({"channel": "telegram"}, ruleset).rule == "t"
    with pytest.raises(RulesError, match='unknown channel "telegram"'):
        routing_rules.load_ruleset(text, channels=("sms", "email"))
    with pytest.raises(ValueError, match="at least one channel"):
        routing_rules.load_ruleset(text, channels=())
