"""Every kind of load error, each with its exact LINE:COL and where-path."""

from __future__ import annotations

import pytest

from routing_rules import RulesError
from tests.routing_rules.helpers import HEADER, errors_of, load_ruleset


def rule(when: str = "{channel: sms}", then: str = "{queue: q}") -> str:
    # The rule's `when` value starts at line 13, column 11; `then` at line 14, column 11.
    return (
        HEADER
        + f"rules:\n  - id: r\n    when: {when}\n    then: {then}\ndefault: {{queue: other}}\n"
    )


RULE_ERRORS = [
    ("{chanel: sms}", 'rules[0].when: unknown fact "chanel" (did you mean "channel"?)', "13:12"),
    (
        "{contact.plann: x}",
        'rules[0].when: unknown fact "contact.plann" (did you mean "contact.plan"?)',
        "13:12",
    ),
    (
        "{contact.xyzzy42: x}",
        'rules[0].when: unknown fact "contact.xyzzy42" (declare custom contact facts under attributes:)',
        "13:12",
    ),
    (
        "{channel: {match: x}}",
        'rules[0].when: unknown operator "match" (did you mean "matches"?)',
        "13:22",
    ),
    ("{channel: emial}", 'rules[0].when: unknown channel "emial" (did you mean "email"?)', "13:21"),
    (
        "{channel: [sms, email]}",
        "rules[0].when: channel: a list is not a value; write {in: [...]}",
        "13:21",
    ),
    ("{channel: {}}", "rules[0].when: channel: empty operator mapping", "13:21"),
    (
        "{channel: null}",
        "rules[0].when: channel: null is not a value; write {exists: false}",
        "13:21",
    ),
    (
        "{contact.name: {gt: 3}}",
        'rules[0].when: "gt" needs a number fact; contact.name is a string',
        "13:27",
    ),
    ("{contact.ltv: {gt: true}}", 'rules[0].when: "gt" takes a number, got "true"', "13:30"),
    ('{contact.ltv: {lt: "3"}}', 'rules[0].when: "lt" takes a number, got "3"', "13:30"),
    (
        '{contact.ltv: "3"}',
        'rules[0].when: type mismatch: contact.ltv is a number, got "3"',
        "13:25",
    ),
    (
        "{contact.vip: 1}",
        'rules[0].when: type mismatch: contact.vip is true or false, got "1"',
        "13:25",
    ),
    (
        "{contact.vip: yes}",
        'rules[0].when: type mismatch: contact.vip is true or false, got "yes"',
        "13:25",
    ),
    (
        "{contact.plan: 1}",
        'rules[0].when: type mismatch: contact.plan holds a string, got a number (quote it: "1")',
        "13:26",
    ),
    (
        "{conversation.tags: vip}",
        "rules[0].when: conversation.tags is a list; write {contains: VALUE} or {in: [...]}",
        "13:31",
    ),
    ('{time: "2026"}', 'rules[0].when: time takes only "within" and "exists"', "13:18"),
    (
        "{channel: {within: office}}",
        'rules[0].when: "within" applies to time, not channel',
        "13:22",
    ),
    (
        "{time: {within: offce}}",
        'rules[0].when: unknown hours "offce" (did you mean "office"?)',
        "13:27",
    ),
    (
        '{message.text: {matches: "(a"}}',
        'rules[0].when: invalid regular expression "(a": missing ): (a',
        "13:36",
    ),
    (
        '{message.text: {matches: "(a)\\\\1"}}',
        'rules[0].when: invalid regular expression "(a)\\1": invalid escape sequence: \\1',
        "13:36",
    ),
    ("{contact.vip: {in: []}}", 'rules[0].when: "in" takes a non-empty list of values', "13:30"),
    ("{channel: {in: sms}}", 'rules[0].when: "in" takes a non-empty list of values', "13:26"),
    ("{contact.vip: {exists: 1}}", 'rules[0].when: expected true or false, got "1"', "13:34"),
    (
        "{contact.vip: {starts_with: x}}",
        'rules[0].when: "starts_with" needs a string fact; contact.vip is true or false',
        "13:26",
    ),
    (
        "{contact.ltv: {contains: x}}",
        'rules[0].when: "contains" needs a string or list fact; contact.ltv is a number',
        "13:26",
    ),
    ("{all: []}", 'rules[0].when.all: "all" takes a non-empty list of conditions', "13:17"),
    (
        "{any: {channel: sms}}",
        'rules[0].when.any: "any" takes a non-empty list of conditions',
        "13:17",
    ),
    (
        "{not: [{channel: sms}]}",
        "rules[0].when.not: expected a condition (a mapping of facts, all, any or not)",
        "13:17",
    ),
    (
        "{any: [{channel: sms}, {inbox: [a]}]}",
        "rules[0].when.any[1]: inbox: a list is not a value; write {in: [...]}",
        "13:42",
    ),
    ("sms", "rules[0].when: expected a condition (a mapping of facts, all, any or not)", "13:11"),
]


@pytest.mark.parametrize(
    ("when", "message", "position"), RULE_ERRORS, ids=[c[1][15:60] for c in RULE_ERRORS]
)
def test_condition_errors(when: str, message: str, position: str) -> None:
    assert errors_of(rule(when)) == [f"{position}: {message}"]


THEN_ERRORS = [
    ("{queue: billng}", 'rules[0].then.queue: unknown queue "billng"', "14:19"),
    (
        "{queue: q, priority: hi}",
        'rules[0].then.priority: invalid priority "hi" (one of low | normal | high | urgent) (did you mean "high"?)',
        "14:32",
    ),
    (
        "{queue: q, skills: {billing: 0}}",
        "rules[0].then.skills.billing: a skill level must be between 1 and 10, got 0",
        "14:40",
    ),
    (
        "{queue: q, skills: {billing: 11}}",
        "rules[0].then.skills.billing: a skill level must be between 1 and 10, got 11",
        "14:40",
    ),
    (
        "{queue: q, skills: {Billing: 3}}",
        'rules[0].then.skills: invalid skill name "Billing" (lowercase letters, digits, _)',
        "14:31",
    ),
    ("{queue: q, reply: nope}", 'rules[0].then.reply: unknown template "nope"', "14:29"),
    ("{queue: q, tags: vip}", "rules[0].then.tags: expected a list of tags", "14:28"),
    ("{queue: q, tag: [vip]}", 'rules[0].then: unknown key "tag" (did you mean "tags"?)', "14:22"),
]


@pytest.mark.parametrize(
    ("then", "message", "position"), THEN_ERRORS, ids=[c[1][:50] for c in THEN_ERRORS]
)
def test_action_errors(then: str, message: str, position: str) -> None:
    assert errors_of(rule(then=then)) == [f"{position}: {message}"]


def test_every_error_is_reported_sorted() -> None:
    text = """\
version: 2
hours:
  office: {timezone: Europe/Berln, weekly: {mon-fri: ["08:00-18:00"], fri: ["25:00-26:00"], xmas: []}}
queues:
  general: {strategyy: longest_idle, offer_timeout: 0s, wrap_up: 30}
  billing: {skills: {billing: 11}, overflow: [{after: 2x, priority: urgent}, {after: 1m}], escalate_to: billing}
templates:
  t: "Hi {contact.nam}"
  u: "unclosed {"
rules:
  - id: a
    when:
      any:
        - message.text: {match: "refund"}
        - channel: emial
      contact.vip: 1
    then: {queue: billng}
  - id: a
    order: high
    then: {queue: general}
  - {when: {}, then: {}}
"""
    assert errors_of(text) == [
        '1:1: missing required key "default"',
        '1:10: version: unsupported version "2" (this omniroute reads version 1)',
        '3:22: hours.office.timezone: unknown time zone "Europe/Berln" (did you mean "Europe/Berlin"?)',
        '3:71: hours.office.weekly: fri is already listed under "mon-fri"',
        '3:77: hours.office.weekly.fri[0]: invalid time in interval "25:00-26:00"',
        '3:93: hours.office.weekly: invalid day "xmas" (use mon..sun or a range like mon-fri)',
        '5:13: queues.general: unknown key "strategyy" (did you mean "strategy"?)',
        '5:53: queues.general.offer_timeout: duration "0s" must be greater than zero',
        "5:66: queues.general.wrap_up: expected a duration like 30s, 5m, 8h or 7d, got a number",
        "6:31: queues.billing.skills.billing: a skill level must be between 1 and 10, got 11",
        '6:55: queues.billing.overflow[0].after: invalid duration "2x" (use a number and s, m, h or d, like 30s or 5m)',
        "6:78: queues.billing.overflow[1]: a step takes exactly one of relax_skills, priority, add_queue, move_to",
        '6:105: queues.billing.escalate_to: queue "billing" cannot point at itself',
        '8:6: templates.t: unknown placeholder "{contact.nam}" (did you mean "contact.name"?)',
        '9:6: templates.u: unclosed "{" at character 10',
        '14:26: rules[0].when.any[0]: unknown operator "match" (did you mean "matches"?)',
        '15:20: rules[0].when.any[1]: unknown channel "emial" (did you mean "email"?)',
        '16:20: rules[0].when: type mismatch: contact.vip is true or false, got "1"',
        '17:19: rules[0].then.queue: unknown queue "billng" (did you mean "billing"?)',
        '18:9: rules[1].id: duplicate rule id "a" (first at line 11)',
        '19:12: rules[1].order: expected an integer, got "high"',
        '21:5: rules[2]: missing required key "id"',
    ]


SECTION_ERRORS = [
    (
        "version: 1\nqueues: {}\ndefault: {queue: x}\n",
        ["2:9: queues: define at least one queue", '3:18: default.queue: unknown queue "x"'],
    ),
    (
        "version: 1\nqueues: {q: {}}\ndefault: {priority: high}\n",
        ['3:10: default: missing required key "queue"'],
    ),
    (
        "version: 1\nqueues: {q: {}}\ndefault: {queue: q}\nrulez: []\n",
        ['4:1: unknown key "rulez" (did you mean "rules"?)'],
    ),
    (
        "version: 1\nqueues: [q]\ndefault: {queue: q}\n",
        ["2:9: queues: expected a mapping", '3:18: default.queue: unknown queue "q"'],
    ),
    ("- 1\n", ["1:1: the rules file must be a mapping with version, queues, rules and default"]),
    (
        "version: 1\nattributes: {vip: bool, tier2: integer, Bad: string}\nqueues: {q: {}}\ndefault: {queue: q}\n",
        [
            '2:14: attributes: "vip" is a built-in contact fact',
            '2:32: attributes.tier2: invalid attribute type "integer" (one of number | string | bool)',
            '2:41: attributes: invalid attribute name "Bad"',
        ],
    ),
    (
        'version: 1\nhours: {h: {timezone: UTC, weekly: {mon: ["18:00-08:00", "08:00-24:30", 9]}, holidays: ["2026-02-30"]}}\nqueues: {q: {}}\ndefault: {queue: q}\n',
        [
            '2:43: hours.h.weekly.mon[0]: interval "18:00-08:00" ends before it starts',
            '2:58: hours.h.weekly.mon[1]: invalid time in interval "08:00-24:30"',
            '2:73: hours.h.weekly.mon[2]: expected an interval like "08:00-18:00", got a number',
            '2:89: hours.h.holidays[0]: invalid date "2026-02-30" (use YYYY-MM-DD)',
        ],
    ),
    (
        'version: 1\nhours: {h: {timezone: UTC, weekly: {fri-mon: ["08:00-09:00"]}}}\nqueues: {q: {}}\ndefault: {queue: q}\n',
        [
            '2:37: hours.h.weekly: day range "fri-mon" runs backwards (write it from mon towards sun)'
        ],
    ),
    (
        "version: 1\nhours: {h: {timezone: UTC, weekly: {}}}\nqueues: {q: {}}\ndefault: {queue: q}\n",
        ["2:36: hours.h.weekly: no opening hours: list at least one day"],
    ),
    (
        "version: 1\nqueues:\n  q: {after_hours: {reply: t}, sticky: {wait: 5s}, members: [ann, ann], sla: {}, strategy: fifo}\ntemplates: {t: hi}\ndefault: {queue: q}\n",
        [
            "3:7: queues.q: after_hours needs the queue's hours",
            '3:40: queues.q.sticky: missing required key "window"',
            '3:67: queues.q.members[1]: "ann" is listed twice',
            "3:78: queues.q.sla: set first_response, resolution or both",
            '3:92: queues.q.strategy: invalid strategy "fifo" (one of longest_idle | least_busy | round_robin | most_skilled)',
        ],
    ),
    (
        "version: 1\nqueues:\n  q: {overflow: [{after: 0s, move_to: q}, {after: 1m, add_queue: nope}, {after: -1m, priority: high}]}\ndefault: {queue: q}\n",
        [
            '3:39: queues.q.overflow[0].move_to: queue "q" cannot point at itself',
            '3:66: queues.q.overflow[1].add_queue: unknown queue "nope"',
            '3:81: queues.q.overflow[2].after: invalid duration "-1m" (use a number and s, m, h or d, like 30s or 5m)',
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), SECTION_ERRORS, ids=[str(i) for i in range(len(SECTION_ERRORS))]
)
def test_section_errors(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_error_carries_source_path() -> None:
    with pytest.raises(RulesError) as info:
        load_ruleset("version: 1\nqueues: {q: {}}\n", "conf/rules.yaml")
    assert str(info.value) == 'conf/rules.yaml:1:1: missing required key "default"'
