"""``teams:`` in rules.yaml: which queues each supervisor oversees (docs/rules.md, "Teams"),
and the queue eligibility and tested facts the authorization policy reads."""

from __future__ import annotations

from routing_rules import QueueSpec, Team
from tests.routing_rules.helpers import HEADER, errors_of, load_ruleset

TAIL = "default: {queue: other}\n"


def test_teams_are_loaded_with_their_queues_and_supervisors() -> None:
    ruleset = load_ruleset(
        HEADER + "teams:\n  payments: {queues: [q], supervisors: [sue, sam]}\n"
        "  all: {queues: [q, other]}\n" + TAIL
    )
    assert ruleset.teams == {
        "payments": Team("payments", ("q",), ("sue", "sam")),
        "all": Team("all", ("q", "other"), ()),
    }
    assert load_ruleset(HEADER + TAIL).teams == {}  # teams are optional


def test_bad_teams_get_located_errors() -> None:
    # HEADER is 10 lines: "teams:" is line 11
    text = (
        HEADER
        + "teams:\n"
        + "  pay:\n"
        + "    queues: [q, qq, q]\n"
        + "    supervisors: [sue, 'bad name', sue]\n"
        + "    boss: x\n"
        + "  empty: {queues: []}\n"
        + "  none: {supervisors: [x]}\n"
        + "  scalar: 3\n"
        + "  'no good': {queues: [q]}\n"
        + TAIL
    )
    assert errors_of(text) == [
        '13:17: teams.pay.queues[1]: unknown queue "qq" (did you mean "q"?)',
        '13:21: teams.pay.queues[2]: "q" is listed twice',
        '14:24: teams.pay.supervisors[1]: invalid user name "bad name"',
        '14:36: teams.pay.supervisors[2]: "sue" is listed twice',
        '15:5: teams.pay: unknown key "boss"',
        "16:19: teams.empty.queues: a team needs at least one queue",
        '17:9: teams.none: missing required key "queues"',
        "18:11: teams.scalar: expected a mapping with queues and supervisors",
        '19:3: teams: invalid team name "no good"',
    ]
    assert errors_of(HEADER + "teams: {}\n" + TAIL) == [
        "11:8: teams: define at least one team (or leave teams out)"
    ]


def test_queue_eligibility_is_membership_else_skills() -> None:
    members = QueueSpec("q", skills={"billing": 3}, members=("anna",))
    assert members.admits("anna", {}) and not members.admits("ben", {"billing": 9})
    skilled = QueueSpec("q", skills={"billing": 3, "lang_de": 1})
    assert skilled.admits("ben", {"billing": 3, "lang_de": 2})
    assert not skilled.admits("ben", {"billing": 2, "lang_de": 2})
    assert not skilled.admits("ben", {"billing": 5})
    assert QueueSpec("open").admits("anyone", {})


def test_tested_facts_are_collected_from_every_condition() -> None:
    ruleset = load_ruleset(
        HEADER
        + "rules:\n"
        + "  - id: a\n    when: {all: [{contact.vip: true}, {not: {contact.name: x}}]}\n"
        + "    then: {queue: q}\n"
        + "  - id: b\n    when: {any: [{contact.plan: gold}, {channel: sms}]}\n"
        + "    then: {queue: q}\n"
        + TAIL
    )
    assert ruleset.tested_facts() == {"contact.vip", "contact.name", "contact.plan", "channel"}
