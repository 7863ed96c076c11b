"""Every operator, combinator and fact type, table-driven (engine and reference must agree)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.routing_rules.helpers import holds

LONG = "x" * 9_994

CASES: list[tuple[str, dict[str, Any], bool]] = [
    # equality on strings: NFC + casefold, type-strict
    ("{channel: sms}", {"channel": "sms"}, True),
    ("{channel: sms}", {"channel": "SMS"}, True),
    ("{channel: sms}", {"channel": "email"}, False),
    ("{channel: sms}", {}, False),
    ("{channel: sms}", {"channel": None}, False),
    ("{channel: sms}", {"channel": 1}, False),
    ('{contact.name: "Zoë"}', {"contact.name": "Zoe\u0308"}, True),
    ('{contact.name: "STRASSE"}', {"contact.name": "straße"}, True),
    ('{contact.plan: "1"}', {"contact.plan": 1}, False),
    ('{contact.plan: "1"}', {"contact.plan": "1"}, True),
    ("{contact.plan: no}", {"contact.plan": "no"}, True),  # YAML 1.1 would read false
    ("{inbox: support}", {"inbox": "Support"}, True),
    # booleans: strict
    ("{contact.vip: true}", {"contact.vip": True}, True),
    ("{contact.vip: true}", {"contact.vip": 1}, False),
    ("{contact.vip: true}", {"contact.vip": "true"}, False),
    ("{contact.vip: false}", {"contact.vip": False}, True),
    ("{contact.vip: false}", {"contact.vip": 0}, False),
    ("{contact.vip: false}", {}, False),
    ("{contact.beta: true}", {"contact.beta": True}, True),
    # numbers: ints and floats compare, booleans are not numbers
    ("{contact.ltv: 1}", {"contact.ltv": 1}, True),
    ("{contact.ltv: 1}", {"contact.ltv": 1.0}, True),
    ("{contact.ltv: 1}", {"contact.ltv": True}, False),
    ("{contact.ltv: 1}", {"contact.ltv": "1"}, False),
    # in / not_in on scalars
    ("{channel: {in: [sms, email]}}", {"channel": "EMAIL"}, True),
    ("{channel: {in: [sms, email]}}", {"channel": "voice"}, False),
    ("{channel: {in: [sms]}}", {}, False),
    ("{channel: {not_in: [sms]}}", {"channel": "email"}, True),
    ("{channel: {not_in: [sms]}}", {"channel": "sms"}, False),
    ("{channel: {not_in: [sms]}}", {}, False),
    ("{not: {channel: sms}}", {}, True),
    ("{contact.ltv: {in: [1, 2.5]}}", {"contact.ltv": 2.5}, True),
    ("{contact.ltv: {in: [1]}}", {"contact.ltv": True}, False),
    ("{contact.ltv: {not_in: [1]}}", {"contact.ltv": True}, False),
    ("{contact.vip: {in: [true]}}", {"contact.vip": True}, True),
    ("{contact.vip: {in: [true]}}", {"contact.vip": 1}, False),
    ("{contact.vip: {not_in: [true]}}", {"contact.vip": False}, True),
    # list facts: in = any element, not_in = no element, contains = membership
    ("{conversation.tags: {in: [a, b]}}", {"conversation.tags": ["x", "B"]}, True),
    ("{conversation.tags: {in: [a]}}", {"conversation.tags": []}, False),
    ("{conversation.tags: {not_in: [a]}}", {"conversation.tags": []}, True),
    ("{conversation.tags: {not_in: [a]}}", {"conversation.tags": ["x", "A"]}, False),
    ("{conversation.tags: {not_in: [a]}}", {}, False),
    ("{conversation.tags: {contains: vip}}", {"conversation.tags": ["VIP"]}, True),
    ("{conversation.tags: {contains: vip}}", {"conversation.tags": ["vipp"]}, False),
    ("{conversation.tags: {contains: vip}}", {"conversation.tags": "vip"}, False),
    ("{conversation.tags: {contains: vip}}", {"conversation.tags": ["vip", 3]}, False),
    # substring and prefix
    ("{message.text: {contains: refund}}", {"message.text": "A REFUND now"}, True),
    ("{message.text: {contains: refund}}", {"message.text": "refun"}, False),
    ("{message.text: {contains: refund}}", {"message.text": ["refund"]}, False),
    ('{message.subject: {starts_with: "[beta]"}}', {"message.subject": "[BETA] crash"}, True),
    ('{message.subject: {starts_with: "[beta]"}}', {"message.subject": "re: [beta]"}, False),
    # regular expressions: RE2 search, case-sensitive unless (?i), first 10,000 characters
    ('{message.text: {matches: "refund|money back"}}', {"message.text": "give money back"}, True),
    ('{message.text: {matches: "refund"}}', {"message.text": "REFUND"}, False),
    ('{message.text: {matches: "(?i)refund"}}', {"message.text": "REFUND"}, True),
    ('{message.text: {matches: "^\\\\d{5}$"}}', {"message.text": "12345"}, True),
    ('{message.text: {matches: "refund"}}', {"message.text": LONG + "refund"}, True),
    ('{message.text: {matches: "refund"}}', {"message.text": LONG + "xrefund"}, False),
    ('{message.text: {matches: "1"}}', {"message.text": 1}, False),
    ('{channel: {matches: "^s"}}', {"channel": "sms"}, True),
    # numeric comparisons
    ("{contact.ltv: {gt: 3}}", {"contact.ltv": 5}, True),
    ("{contact.ltv: {gt: 3}}", {"contact.ltv": 3}, False),
    ("{contact.ltv: {gte: 3}}", {"contact.ltv": 3}, True),
    ("{contact.ltv: {lt: 3}}", {"contact.ltv": 2.99}, True),
    ("{contact.ltv: {lt: 3}}", {"contact.ltv": 3}, False),
    ("{contact.ltv: {lte: 3}}", {"contact.ltv": 3}, True),
    ("{contact.ltv: {gt: 0}}", {"contact.ltv": True}, False),
    ("{contact.ltv: {gt: 0}}", {"contact.ltv": "5"}, False),
    ("{contact.ltv: {gte: 3, lt: 7}}", {"contact.ltv": 5}, True),
    ("{contact.ltv: {gte: 3, lt: 7}}", {"contact.ltv": 7}, False),
    # exists
    ("{contact.email: {exists: true}}", {"contact.email": ""}, True),
    ("{conversation.tags: {exists: true}}", {"conversation.tags": []}, True),
    ("{contact.email: {exists: true}}", {"contact.email": None}, False),
    ("{contact.email: {exists: true}}", {}, False),
    ("{contact.email: {exists: false}}", {}, True),
    ("{contact.email: {exists: false}}", {"contact.email": None}, True),
    ("{contact.email: {exists: false}}", {"contact.email": ""}, False),
    ("{time: {exists: true}}", {"time": "not a time"}, True),
    # within: hours in the zone, holidays, naive times rejected
    ("{time: {within: office}}", {"time": "2026-11-25T10:00:00+01:00"}, True),
    ("{time: {within: office}}", {"time": "2026-11-25T09:00:00Z"}, True),
    ("{time: {within: office}}", {"time": "2026-11-25T17:00:00Z"}, False),
    ("{time: {within: office}}", {"time": "2026-11-25T07:59:59+01:00"}, False),
    ("{time: {within: office}}", {"time": "2026-11-25T18:00:00+01:00"}, False),
    ("{time: {within: office}}", {"time": "2026-11-28T13:59:00+01:00"}, True),
    ("{time: {within: office}}", {"time": "2026-11-29T12:00:00+01:00"}, False),
    ("{time: {within: office}}", {"time": "2026-12-25T10:00:00+01:00"}, False),
    ("{time: {within: office}}", {"time": "2026-11-25T10:00:00"}, False),
    ("{time: {within: office}}", {"time": "2026-11-25"}, False),
    ("{time: {within: office}}", {"time": 1795600000}, False),
    ("{time: {within: office}}", {"time": datetime(2026, 11, 25, 9, tzinfo=UTC)}, True),
    ("{time: {within: office}}", {"time": datetime(2026, 11, 25, 9)}, False),
    # combinators
    ("{}", {}, True),
    ("{all: [{channel: sms}, {contact.vip: true}]}", {"channel": "sms", "contact.vip": True}, True),
    ("{all: [{channel: sms}, {contact.vip: true}]}", {"channel": "sms"}, False),
    ("{any: [{channel: sms}, {contact.vip: true}]}", {"contact.vip": True}, True),
    ("{any: [{channel: sms}, {contact.vip: true}]}", {}, False),
    ("{not: {any: [{channel: sms}, {channel: voice}]}}", {"channel": "email"}, True),
    ("{not: {not: {channel: sms}}}", {"channel": "sms"}, True),
    ("{channel: sms, contact.vip: true}", {"channel": "sms", "contact.vip": False}, False),
    (
        "{any: [{all: [{channel: sms}, {not: {contact.vip: true}}]}, {inbox: x}], not: {contact.ltv: {gt: 9}}}",
        {"channel": "sms", "contact.ltv": 3},
        True,
    ),
    ("{any: [{channel: sms}], all: [{inbox: a}]}", {"channel": "sms", "inbox": "b"}, False),
]


@pytest.mark.parametrize(
    ("when", "facts", "expected"), CASES, ids=[f"{i}:{c[0][:40]}" for i, c in enumerate(CASES)]
)
def test_operator(when: str, facts: dict[str, Any], expected: bool) -> None:
    assert holds(when, facts) is expected


def test_nested_facts_are_flattened() -> None:
    assert holds(
        "{contact.vip: true, message.text: {contains: hi}}",
        {"contact": {"vip": True}, "message": {"text": "Hi"}},
    )
