"""Validate a rules file node by node and build a :class:`Ruleset`.

Every problem is collected (not just the first) with the line and column of the node
at fault and a ``where`` path like ``rules[1].when.any[0]``, so ``rules check`` can
show an admin all of them at once.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import zoneinfo
from collections.abc import Iterable
from datetime import date, timedelta
from functools import lru_cache
from typing import Any

import re2

from routing_rules.durations import parse_duration
from routing_rules.errors import LocatedError, RulesError, did_you_mean
from routing_rules.facts import Fact, FactRegistry, FactType, builtin_facts, fold, is_number
from routing_rules.hours import DAYS, Hours
from routing_rules.model import (
    PRIORITIES,
    STRATEGIES,
    Action,
    AllOf,
    AnyOf,
    Condition,
    NotOf,
    OverflowStep,
    QueueSpec,
    Rule,
    Ruleset,
    Sla,
    Sticky,
    Team,
    Test,
)
from routing_rules.templates import Template, parse_template
from routing_rules.yamlsafe import MapNode, Node, ScalarNode, SeqNode, load_yaml

__all__ = ["OPERATORS", "load_ruleset"]

OPERATORS = (
    "in",
    "not_in",
    "contains",
    "starts_with",
    "matches",
    "gt",
    "gte",
    "lt",
    "lte",
    "exists",
    "within",
)

_TOP_KEYS = (
    "version",
    "attributes",
    "hours",
    "queues",
    "teams",
    "templates",
    "rules",
    "default",
)
_TEAM_KEYS = ("queues", "supervisors")
_QUEUE_KEYS = (
    "skills",
    "strategy",
    "offer_timeout",
    "hours",
    "sla",
    "members",
    "language_required",
    "auto_accept",
    "sticky",
    "max_missed_offers",
    "unassign_after",
    "wrap_up",
    "voicemail_after",
    "escalate_to",
    "abandon_after",
    "after_hours",
    "overflow",
)
_STEP_KINDS = ("relax_skills", "priority", "add_queue", "move_to")
_ACTION_KEYS = ("queue", "priority", "skills", "tags", "reply", "agent")
_RULE_KEYS = ("id", "order", "description", "when", "then")
_ATTRIBUTE_TYPES = {"number": FactType.NUMBER, "string": FactType.STRING, "bool": FactType.BOOL}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SKILL = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_ATTR = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_INTERVAL = re.compile(r"^(\d\d):(\d\d)-(\d\d):(\d\d)$")
_TYPE_NAMES = {
    FactType.STRING: "a string",
    FactType.ENUM: "a string",
    FactType.BOOL: "true or false",
    FactType.NUMBER: "a number",
    FactType.LIST: "a list of strings",
    FactType.TIME: "a timestamp",
}


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # we report the error ourselves, located
    options.never_capture = True  # rules only ask whether a pattern occurs
    options.max_mem = 8 << 20  # a pathological pattern is refused, not compiled huge
    return options


_RE2_OPTIONS = _re2_options()


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if is_number(value):
        return "a number"
    return "a string"


class _Checker:
    def __init__(self, registry: FactRegistry) -> None:
        self.errors: list[LocatedError] = []
        self.registry = registry
        self.hours_names: set[str] = set()
        self.template_names: set[str] = set()
        self.queue_names: set[str] = set()
        self.hours: dict[str, Hours] = {}

    # -- primitives -----------------------------------------------------------------
    def err(self, node: Node, where: str, message: str) -> None:
        self.errors.append(LocatedError(node.line, node.col, where, message))

    def mapping(self, node: Node, where: str, what: str = "a mapping") -> MapNode | None:
        if isinstance(node, MapNode):
            return node
        self.err(node, where, f"expected {what}")
        return None

    def keys(
        self, node: MapNode, where: str, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> None:
        allowed = tuple(allowed)
        for key, _ in node:
            if key.text not in allowed:
                self.err(key, where, f'unknown key "{key.text}"{did_you_mean(key.text, allowed)}')
        for name in required:
            if node.get(name) is None:
                self.err(node, where, f'missing required key "{name}"')

    def scalar(self, node: Node, where: str, what: str) -> ScalarNode | None:
        if isinstance(node, ScalarNode):
            return node
        self.err(node, where, f"expected {what}")
        return None

    def string(self, node: Node, where: str, what: str = "a string") -> str | None:
        s = self.scalar(node, where, what)
        if s is None:
            return None
        if not isinstance(s.value, str):
            self.err(node, where, f"expected {what}, got {_kind(s.value)}")
            return None
        return s.value

    def name(self, node: Node, where: str, pattern: re.Pattern[str], what: str) -> str | None:
        value = self.string(node, where, what)
        if value is not None and not pattern.match(value):
            self.err(node, where, f'invalid {what} "{value}"')
            return None
        return value

    def boolean(self, node: Node, where: str) -> bool | None:
        s = self.scalar(node, where, "true or false")
        if s is None:
            return None
        if not isinstance(s.value, bool):
            self.err(node, where, f'expected true or false, got "{s.text}"')
            return None
        return s.value

    def integer(
        self, node: Node, where: str, lo: int, hi: int, what: str = "an integer"
    ) -> int | None:
        s = self.scalar(node, where, what)
        if s is None:
            return None
        if isinstance(s.value, bool) or not isinstance(s.value, int):
            self.err(node, where, f'expected {what}, got "{s.text}"')
            return None
        if not lo <= s.value <= hi:
            self.err(node, where, f"{what} must be between {lo} and {hi}, got {s.value}")
            return None
        return int(s.value)

    def duration(self, node: Node, where: str, *, allow_zero: bool = False) -> timedelta | None:
        text = self.string(node, where, "a duration like 30s, 5m, 8h or 7d")
        if text is None:
            return None
        try:
            return parse_duration(text, allow_zero=allow_zero)
        except ValueError as exc:
            self.err(node, where, str(exc))
            return None

    def ref(self, node: Node, where: str, names: set[str], what: str) -> str | None:
        value = self.string(node, where, f"a {what} name")
        if value is None:
            return None
        if value not in names:
            self.err(node, where, f'unknown {what} "{value}"{did_you_mean(value, sorted(names))}')
            return None
        return value

    def enum(self, node: Node, where: str, choices: tuple[str, ...], what: str) -> str | None:
        value = self.string(node, where, what)
        if value is None:
            return None
        if value not in choices:
            options = " | ".join(choices)
            self.err(
                node,
                where,
                f'invalid {what} "{value}" (one of {options}){did_you_mean(value, choices)}',
            )
            return None
        return value

    def skills(self, node: Node, where: str) -> dict[str, int]:
        out: dict[str, int] = {}
        m = self.mapping(node, where, "a mapping of skill: level (1-10)")
        if m is None:
            return out
        for key, value in m:
            if not _SKILL.match(key.text):
                self.err(
                    key, where, f'invalid skill name "{key.text}" (lowercase letters, digits, _)'
                )
                continue
            level = self.integer(value, f"{where}.{key.text}", 1, 10, "a skill level")
            if level is not None:
                out[key.text] = level
        return out

    def each(self, node: Node, where: str, what: str) -> list[tuple[str, Node]]:
        if not isinstance(node, SeqNode):
            self.err(node, where, f"expected a list of {what}")
            return []
        return [(f"{where}[{i}]", item) for i, item in enumerate(node.items)]

    def strings(self, node: Node, where: str, pattern: re.Pattern[str], what: str) -> list[str]:
        out: list[str] = []
        for w, item in self.each(node, where, f"{what}s"):
            value = self.name(item, w, pattern, what)
            if value is None:
                continue
            if value in out:
                self.err(item, w, f'"{value}" is listed twice')
            else:
                out.append(value)
        return out

    def section(self, root: MapNode, key: str) -> MapNode | None:
        node = root.get(key)
        return None if node is None else self.mapping(node, key)

    # -- attributes, hours, templates ----------------------------------------------
    def attributes(self, node: MapNode | None) -> dict[str, FactType]:
        out: dict[str, FactType] = {}
        for key, value in node or ():
            where = f"attributes.{key.text}"
            if not _ATTR.match(key.text):
                self.err(key, "attributes", f'invalid attribute name "{key.text}"')
                continue
            if f"contact.{key.text}" in self.registry:
                self.err(key, "attributes", f'"{key.text}" is a built-in contact fact')
                continue
            kind = self.enum(value, where, tuple(_ATTRIBUTE_TYPES), "attribute type")
            if kind is not None:
                out[key.text] = _ATTRIBUTE_TYPES[kind]
        return out

    def hours_entry(self, name: str, node: Node) -> None:
        where = f"hours.{name}"
        m = self.mapping(node, where)
        if m is None:
            return
        self.keys(m, where, ("timezone", "weekly", "holidays"), ("timezone", "weekly"))
        tz_node, weekly_node = m.get("timezone"), m.get("weekly")
        timezone = self.string(tz_node, f"{where}.timezone") if tz_node else None
        if timezone is not None and timezone not in _zones():
            self.err(
                tz_node or m,
                f"{where}.timezone",
                f'unknown time zone "{timezone}"{did_you_mean(timezone, _zones())}',
            )
            timezone = None
        weekly: dict[int, list[tuple[int, int]]] = {}
        seen_day: dict[int, str] = {}
        wm = self.mapping(weekly_node, f"{where}.weekly") if weekly_node else None
        errors_before = len(self.errors)
        for key, value in wm or ():
            days = self.day_key(key, f"{where}.weekly")
            intervals = self.intervals(value, f"{where}.weekly.{key.text}")
            for day in days:
                if day in seen_day:
                    self.err(
                        key,
                        f"{where}.weekly",
                        f'{DAYS[day]} is already listed under "{seen_day[day]}"',
                    )
                    continue
                seen_day[day] = key.text
                weekly[day] = intervals
        if wm is not None and not any(weekly.values()) and len(self.errors) == errors_before:
            self.err(wm, f"{where}.weekly", "no opening hours: list at least one day")
        holidays: set[date] = set()
        hol_node = m.get("holidays")
        for w, item in self.each(hol_node, f"{where}.holidays", "dates") if hol_node else []:
            text = self.string(item, w, "a date like 2026-12-25")
            if text is None:
                continue
            try:
                holidays.add(date.fromisoformat(text))
            except ValueError:
                self.err(item, w, f'invalid date "{text}" (use YYYY-MM-DD)')
        if timezone is not None and wm is not None:
            self.hours[name] = Hours(
                name, timezone, {d: tuple(v) for d, v in weekly.items() if v}, frozenset(holidays)
            )

    def day_key(self, key: ScalarNode, where: str) -> list[int]:
        text = key.text
        first, sep, last = text.partition("-")
        if first not in DAYS or (sep and last not in DAYS):
            self.err(
                key,
                where,
                f'invalid day "{text}" (use mon..sun or a range like mon-fri){did_you_mean(text, DAYS)}',
            )
            return []
        a = DAYS.index(first)
        b = DAYS.index(last) if sep else a
        if b < a:
            self.err(
                key, where, f'day range "{text}" runs backwards (write it from mon towards sun)'
            )
            return []
        return list(range(a, b + 1))

    def intervals(self, node: Node, where: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for w, item in self.each(node, where, 'intervals like "08:00-18:00"'):
            text = self.string(item, w, 'an interval like "08:00-18:00"')
            if text is None:
                continue
            match = _INTERVAL.match(text)
            if not match:
                self.err(item, w, f'invalid interval "{text}" (use HH:MM-HH:MM)')
                continue
            h1, m1, h2, m2 = (int(g) for g in match.groups())
            if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
                self.err(item, w, f'invalid time in interval "{text}"')
                continue
            start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
            if end <= start:
                self.err(item, w, f'interval "{text}" ends before it starts')
                continue
            out.append((start, end))
        out.sort()
        merged: list[tuple[int, int]] = []
        for start, end in out:  # overlapping intervals of one day are joined
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged

    def templates(self, node: MapNode | None) -> dict[str, Template]:
        out: dict[str, Template] = {}
        for key, value in node or ():
            where = f"templates.{key.text}"
            if not _NAME.match(key.text):
                self.err(key, "templates", f'invalid template name "{key.text}"')
                continue
            text = self.string(value, where, "the template text")
            if text is None:
                continue
            try:
                template = parse_template(key.text, text)
            except ValueError as exc:
                self.err(value, where, str(exc))
                continue
            for fact in template.placeholders:
                if fact not in self.registry:
                    hint = did_you_mean(fact, self.registry.names())
                    self.err(value, where, f'unknown placeholder "{{{fact}}}"{hint}')
            out[key.text] = template
        return out

    # -- queues ---------------------------------------------------------------------
    def queue(self, name: str, node: Node) -> QueueSpec | None:
        where = f"queues.{name}"
        if isinstance(node, ScalarNode) and node.value is None:
            return QueueSpec(name)
        m = self.mapping(node, where)
        if m is None:
            return None
        self.keys(m, where, _QUEUE_KEYS)
        kw: dict[str, Any] = {}
        has_hours = False
        for key, value in m:
            field = key.text
            w = f"{where}.{field}"
            if field == "skills":
                kw["skills"] = self.skills(value, w)
            elif field == "strategy":
                kw["strategy"] = self.enum(value, w, STRATEGIES, "strategy")
            elif field in (
                "offer_timeout",
                "unassign_after",
                "wrap_up",
                "voicemail_after",
                "abandon_after",
            ):
                kw[field] = self.duration(value, w)
            elif field == "hours":
                kw["hours"] = self.ref(value, w, self.hours_names, "hours")
                has_hours = True
            elif field == "sla":
                kw["sla"] = self.sla(value, w)
            elif field == "members":
                kw["members"] = tuple(self.strings(value, w, _USER, "user name"))
            elif field in ("language_required", "auto_accept"):
                kw[field] = self.boolean(value, w)
            elif field == "sticky":
                kw["sticky"] = self.sticky(value, w)
            elif field == "max_missed_offers":
                kw[field] = self.integer(value, w, 1, 1000)
            elif field == "escalate_to":
                kw[field] = self.other_queue(value, w, name)
            elif field == "after_hours":
                self.after_hours(value, w, name, kw)
            elif field == "overflow":
                kw["overflow"] = self.steps(value, w, name)
        if m.get("after_hours") is not None and not has_hours:
            self.err(m.key_node("after_hours") or m, where, "after_hours needs the queue's hours")
        clean = {k: v for k, v in kw.items() if v is not None}
        return QueueSpec(name, **clean)

    # -- teams ----------------------------------------------------------------------
    def team(self, name: str, node: Node) -> Team | None:
        where = f"teams.{name}"
        m = self.mapping(node, where, "a mapping with queues and supervisors")
        if m is None:
            return None
        self.keys(m, where, _TEAM_KEYS, ("queues",))
        queues: list[str] = []
        queues_node = m.get("queues")
        if queues_node is not None:
            for w, item in self.each(queues_node, f"{where}.queues", "queue names"):
                queue = self.ref(item, w, self.queue_names, "queue")
                if queue is None:
                    continue
                if queue in queues:
                    self.err(item, w, f'"{queue}" is listed twice')
                else:
                    queues.append(queue)
            if isinstance(queues_node, SeqNode) and not queues_node.items:
                self.err(queues_node, f"{where}.queues", "a team needs at least one queue")
        supervisors_node = m.get("supervisors")
        supervisors = (
            self.strings(supervisors_node, f"{where}.supervisors", _USER, "user name")
            if supervisors_node is not None
            else []
        )
        return Team(name, tuple(queues), tuple(supervisors))

    def other_queue(self, node: Node, where: str, own: str) -> str | None:
        target = self.ref(node, where, self.queue_names, "queue")
        if target == own:
            self.err(node, where, f'queue "{own}" cannot point at itself')
            return None
        return target

    def sla(self, node: Node, where: str) -> Sla | None:
        m = self.mapping(node, where)
        if m is None:
            return None
        self.keys(m, where, ("first_response", "resolution"))
        fr, res = m.get("first_response"), m.get("resolution")
        if fr is None and res is None:
            self.err(m, where, "set first_response, resolution or both")
        return Sla(
            self.duration(fr, f"{where}.first_response") if fr else None,
            self.duration(res, f"{where}.resolution") if res else None,
        )

    def sticky(self, node: Node, where: str) -> Sticky | None:
        m = self.mapping(node, where)
        if m is None:
            return None
        self.keys(m, where, ("window", "wait"), ("window",))
        window_node, wait_node = m.get("window"), m.get("wait")
        window = self.duration(window_node, f"{where}.window") if window_node else None
        wait = self.duration(wait_node, f"{where}.wait") if wait_node else timedelta(seconds=20)
        return Sticky(window, wait) if window and wait else None

    def after_hours(self, node: Node, where: str, own: str, kw: dict[str, Any]) -> None:
        m = self.mapping(node, where)
        if m is None:
            return
        self.keys(m, where, ("reply", "overflow"))
        reply, overflow = m.get("reply"), m.get("overflow")
        if reply is not None:
            kw["after_hours_reply"] = self.ref(
                reply, f"{where}.reply", self.template_names, "template"
            )
        if overflow is not None:
            kw["after_hours_overflow"] = self.steps(overflow, f"{where}.overflow", own)

    def steps(self, node: Node, where: str, own: str) -> tuple[OverflowStep, ...]:
        out: list[OverflowStep] = []
        for w, item in self.each(node, where, "overflow steps"):
            m = self.mapping(item, w, "an overflow step like {after: 2m, priority: high}")
            if m is None:
                continue
            self.keys(m, w, ("after", *_STEP_KINDS), ("after",))
            kinds = [k for k in m.keys() if k in _STEP_KINDS]  # noqa: SIM118 - MapNode iterates pairs
            if len(kinds) != 1:
                self.err(m, w, f"a step takes exactly one of {', '.join(_STEP_KINDS)}")
                continue
            after_node = m.get("after")
            after = self.duration(after_node, f"{w}.after", allow_zero=True) if after_node else None
            kind = kinds[0]
            value_node = m.get(kind)
            assert value_node is not None
            value: Any
            if kind == "relax_skills":
                value = self.skills(value_node, f"{w}.{kind}")
            elif kind == "priority":
                value = self.enum(value_node, f"{w}.{kind}", PRIORITIES, "priority")
            else:
                value = self.other_queue(value_node, f"{w}.{kind}", own)
            if after is not None and value is not None:
                out.append(OverflowStep(after, kind, value))
        return tuple(sorted(out, key=lambda s: s.after))

    # -- rules ----------------------------------------------------------------------
    def action(self, node: Node, where: str, *, need_queue: bool) -> Action | None:
        m = self.mapping(node, where)
        if m is None:
            return None
        self.keys(m, where, _ACTION_KEYS, ("queue",) if need_queue else ())
        kw: dict[str, Any] = {}
        for key, value in m:
            w = f"{where}.{key.text}"
            if key.text == "queue":
                kw["queue"] = self.ref(value, w, self.queue_names, "queue")
            elif key.text == "priority":
                kw["priority"] = self.enum(value, w, PRIORITIES, "priority")
            elif key.text == "skills":
                kw["skills"] = self.skills(value, w)
            elif key.text == "tags":
                kw["tags"] = tuple(self.strings(value, w, _NAME, "tag"))
            elif key.text == "reply":
                kw["reply"] = self.ref(value, w, self.template_names, "template")
            elif key.text == "agent":
                kw["agent"] = self.name(value, w, _USER, "user name")
        return Action(**{k: v for k, v in kw.items() if v is not None})

    def rules(self, node: Node | None) -> list[Rule]:
        out: list[Rule] = []
        ids: dict[str, int] = {}
        for index, (where, item) in enumerate(self.each(node, "rules", "rules") if node else []):
            m = self.mapping(item, where, "a rule (a mapping with id, when, then)")
            if m is None:
                continue
            self.keys(m, where, _RULE_KEYS, ("id", "then"))
            id_node, order_node = m.get("id"), m.get("order")
            when_node, then_node = m.get("when"), m.get("then")
            rule_id = self.name(id_node, f"{where}.id", _NAME, "rule id") if id_node else None
            if rule_id is not None and id_node is not None:
                if rule_id in ids:
                    self.err(
                        id_node,
                        f"{where}.id",
                        f'duplicate rule id "{rule_id}" (first at line {ids[rule_id]})',
                    )
                else:
                    ids[rule_id] = id_node.line
            order = self.integer(order_node, f"{where}.order", -(10**9), 10**9) if order_node else 0
            when = self.condition(when_node, f"{where}.when") if when_node is not None else None
            then = self.action(then_node, f"{where}.then", need_queue=False) if then_node else None
            if rule_id is not None and then is not None and order is not None:
                out.append(Rule(rule_id, order, index, when, then, m.line))
        return sorted(out, key=lambda r: (-r.order, r.index))

    def condition(self, node: Node, where: str) -> Condition | None:
        m = self.mapping(node, where, "a condition (a mapping of facts, all, any or not)")
        if m is None:
            return None
        parts: list[Condition | None] = []
        for key, value in m:
            if key.text in ("all", "any"):
                w = f"{where}.{key.text}"
                if not isinstance(value, SeqNode) or not value.items:
                    self.err(value, w, f'"{key.text}" takes a non-empty list of conditions')
                    parts.append(None)
                    continue
                subs = [self.condition(item, f"{w}[{i}]") for i, item in enumerate(value.items)]
                ok = [s for s in subs if s is not None]
                group = AllOf(w, tuple(ok)) if key.text == "all" else AnyOf(w, tuple(ok))
                parts.append(group if len(ok) == len(subs) else None)
            elif key.text == "not":
                sub = self.condition(value, f"{where}.not")
                parts.append(NotOf(f"{where}.not", sub) if sub is not None else None)
            else:
                parts.extend(self.fact_tests(key, value, where))
        if any(p is None for p in parts):
            return None
        done = [p for p in parts if p is not None]
        return done[0] if len(done) == 1 else AllOf(where, tuple(done))

    def fact_tests(self, key: ScalarNode, value: Node, where: str) -> list[Condition | None]:
        fact = self.registry.get(key.text)
        if fact is None:
            hint = _suggest_fact(key.text, [*self.registry.names(), "all", "any", "not"])
            if not hint and key.text.startswith("contact."):
                hint = " (declare custom contact facts under attributes:)"
            self.err(key, where, f'unknown fact "{key.text}"{hint}')
            return [None]
        if isinstance(value, SeqNode):
            self.err(value, where, f"{fact.name}: a list is not a value; write {{in: [...]}}")
            return [None]
        if isinstance(value, ScalarNode):
            return [self.test(fact, "eq", value, where)]
        assert isinstance(value, MapNode)
        if not value.items:
            self.err(value, where, f"{fact.name}: empty operator mapping")
            return [None]
        out: list[Condition | None] = []
        for op_key, arg in value:
            if op_key.text not in OPERATORS:
                self.err(
                    op_key,
                    where,
                    f'unknown operator "{op_key.text}"{did_you_mean(op_key.text, OPERATORS)}',
                )
                out.append(None)
            else:
                out.append(self.test(fact, op_key.text, arg, where, op_key))
        return out

    def test(
        self, fact: Fact, op: str, node: Node, where: str, op_node: Node | None = None
    ) -> Test | None:
        prepared = self._prepare(fact, op, node, where, op_node or node)
        if prepared is _BAD:
            return None
        raw = (
            node.value
            if isinstance(node, ScalarNode)
            else [getattr(i, "value", None) for i in getattr(node, "items", [])]
        )
        return Test(where, fact, op, prepared, raw)

    def _fail(self, node: Node, where: str, message: str) -> object:
        self.err(node, where, message)
        return _BAD

    def _prepare(self, fact: Fact, op: str, node: Node, where: str, op_node: Node) -> Any:
        """Check ``op`` applies to ``fact`` (errors at ``op_node``) and prepare its argument
        (errors at ``node``)."""
        name, kind = fact.name, fact.type
        if op == "exists":
            b = self.boolean(node, where)
            return _BAD if b is None else b
        if kind is FactType.TIME and op != "within":
            return self._fail(node, where, f'{name} takes only "within" and "exists"')
        if op == "within":
            if kind is not FactType.TIME:
                return self._fail(op_node, where, f'"within" applies to time, not {name}')
            target = self.ref(node, where, self.hours_names, "hours")
            return _BAD if target is None else _HoursRef(target)
        if op in ("gt", "gte", "lt", "lte"):
            if kind is not FactType.NUMBER:
                return self._fail(
                    op_node, where, f'"{op}" needs a number fact; {name} is {_TYPE_NAMES[kind]}'
                )
            return self.number(node, where, op)
        if op in ("in", "not_in"):
            if not isinstance(node, SeqNode) or not node.items:
                return self._fail(node, where, f'"{op}" takes a non-empty list of values')
            keys = [self.value(fact, item, where, element=True) for item in node.items]
            return _BAD if any(k is _BAD for k in keys) else frozenset(keys)
        if op == "contains":
            if kind not in (FactType.STRING, FactType.ENUM, FactType.LIST):
                return self._fail(
                    op_node,
                    where,
                    f'"contains" needs a string or list fact; {name} is {_TYPE_NAMES[kind]}',
                )
            text = self.string(node, where)
            return _BAD if text is None else fold(text)
        if op == "starts_with":
            if not fact.is_text:
                return self._fail(
                    op_node,
                    where,
                    f'"starts_with" needs a string fact; {name} is {_TYPE_NAMES[kind]}',
                )
            text = self.string(node, where)
            return _BAD if text is None else fold(text)
        if op == "matches":
            if not fact.is_text:
                return self._fail(
                    op_node, where, f'"matches" needs a string fact; {name} is {_TYPE_NAMES[kind]}'
                )
            pattern = self.string(node, where, "a regular expression")
            if pattern is None:
                return _BAD
            try:
                return re2.compile(pattern, _RE2_OPTIONS)
            except re2.error as exc:
                reason = (
                    exc.args[0].decode("utf-8", "replace")
                    if exc.args and isinstance(exc.args[0], bytes)
                    else str(exc)
                )
                return self._fail(node, where, f'invalid regular expression "{pattern}": {reason}')
        assert op == "eq"
        if kind is FactType.LIST:
            return self._fail(
                node, where, f"{name} is a list; write {{contains: VALUE}} or {{in: [...]}}"
            )
        return self.value(fact, node, where, element=False)

    def number(self, node: Node, where: str, op: str) -> Any:
        s = self.scalar(node, where, "a number")
        if s is None or not is_number(s.value) or not math.isfinite(s.value):
            return self._fail(
                node, where, f'"{op}" takes a number, got "{getattr(node, "text", "?")}"'
            )
        return s.value

    def value(self, fact: Fact, node: Node, where: str, *, element: bool) -> Any:
        """A literal compared with ``fact``: folded for strings, typed-checked for the rest."""
        s = self.scalar(node, where, "a value")
        if s is None:
            return _BAD
        v, name = s.value, fact.name
        if v is None:
            return self._fail(node, where, f"{name}: null is not a value; write {{exists: false}}")
        if fact.type in (FactType.STRING, FactType.ENUM, FactType.LIST):
            if not isinstance(v, str):
                quoted = f' (quote it: "{s.text}")' if s.plain else ""
                expected = "a string" if fact.type is not FactType.LIST else "strings"
                return self._fail(
                    node, where, f"type mismatch: {name} holds {expected}, got {_kind(v)}{quoted}"
                )
            if fact.type is FactType.ENUM and v not in fact.values:
                return self._fail(
                    node, where, f'unknown {name} "{v}"{did_you_mean(v, fact.values)}'
                )
            return fold(v)
        if fact.type is FactType.BOOL:
            if not isinstance(v, bool):
                return self._fail(
                    node, where, f'type mismatch: {name} is true or false, got "{s.text}"'
                )
            return v
        if fact.type is FactType.NUMBER:
            if not is_number(v) or not math.isfinite(v):
                return self._fail(node, where, f'type mismatch: {name} is a number, got "{s.text}"')
            return v
        return self._fail(node, where, f"{name} cannot be compared with a value")


def _suggest_fact(name: str, names: list[str]) -> str:
    """Did-you-mean for dotted names: among facts sharing the prefix, compare the last part,
    so "contact.xyz" is not "close" to "contact.vip" merely by the shared "contact."."""
    prefix, dot, leaf = name.rpartition(".")
    siblings = {n.rpartition(".")[2]: n for n in names if dot and n.rpartition(".")[0] == prefix}
    if siblings:
        close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        return f' (did you mean "{siblings[close[0]]}"?)' if close else ""
    return did_you_mean(name, names)


class _HoursRef(str):
    """The name of an hours entry, resolved to :class:`Hours` once all hours are known."""


_BAD = object()


def _resolve_hours(cond: Condition | None, hours: dict[str, Hours]) -> Condition | None:
    if cond is None:
        return None
    if isinstance(cond, Test):
        if isinstance(cond.arg, _HoursRef):
            return Test(cond.where, cond.fact, cond.op, hours[str(cond.arg)], cond.raw)
        return cond
    if isinstance(cond, NotOf):
        inner = _resolve_hours(cond.item, hours)
        assert inner is not None
        return NotOf(cond.where, inner)
    items = tuple(c for c in (_resolve_hours(i, hours) for i in cond.items) if c is not None)
    return type(cond)(cond.where, items)


def _names(section: MapNode | None) -> set[str]:
    return {key.text for key, _ in section or () if _NAME.match(key.text)}


def load_ruleset(
    data: bytes | str, source: str = "rules.yaml", *, channels: Iterable[str]
) -> Ruleset:
    """Validate and compile a rules file; raise :class:`RulesError` listing every problem.

    ``channels`` are the channel ids the ``channel`` fact may take: the caller's vocabulary
    (omniroute passes the channel contract's ``CHANNEL_IDS``), never one of this package."""
    registry = builtin_facts(channels)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    version = "sha256:" + hashlib.sha256(raw).hexdigest()
    try:
        root = load_yaml(raw, source)
    except RulesError as exc:
        raise RulesError(exc.errors, source) from None
    checker = _Checker(registry)
    if not isinstance(root, MapNode):
        checker.err(
            root, "", "the rules file must be a mapping with version, queues, rules and default"
        )
        raise RulesError(checker.errors, source)
    checker.keys(root, "", _TOP_KEYS, ("version", "queues", "default"))

    version_node = root.get("version")
    if version_node is not None:
        number = checker.scalar(version_node, "version", "1")
        if number is not None and (number.value != 1 or isinstance(number.value, bool)):
            checker.err(
                version_node,
                "version",
                f'unsupported version "{number.text}" (this omniroute reads version 1)',
            )

    attributes = checker.attributes(checker.section(root, "attributes"))
    checker.registry = registry.with_attributes(attributes)

    hours_section = checker.section(root, "hours")
    templates_section = checker.section(root, "templates")
    queues_section = checker.section(root, "queues")
    checker.hours_names = _names(hours_section)
    checker.template_names = _names(templates_section)
    checker.queue_names = _names(queues_section)

    for key, value in hours_section or ():
        if not _NAME.match(key.text):
            checker.err(key, "hours", f'invalid hours name "{key.text}"')
            continue
        checker.hours_entry(key.text, value)
    templates = checker.templates(templates_section)

    queues: dict[str, QueueSpec] = {}
    if queues_section is not None and not queues_section.items:
        checker.err(queues_section, "queues", "define at least one queue")
    for key, value in queues_section or ():
        if not _NAME.match(key.text):
            checker.err(key, "queues", f'invalid queue name "{key.text}"')
            continue
        spec = checker.queue(key.text, value)
        if spec is not None:
            queues[key.text] = spec

    teams: dict[str, Team] = {}
    teams_section = checker.section(root, "teams")
    if teams_section is not None and not teams_section.items:
        checker.err(teams_section, "teams", "define at least one team (or leave teams out)")
    for key, value in teams_section or ():
        if not _NAME.match(key.text):
            checker.err(key, "teams", f'invalid team name "{key.text}"')
            continue
        team = checker.team(key.text, value)
        if team is not None:
            teams[key.text] = team

    rules = checker.rules(root.get("rules"))
    default_node = root.get("default")
    default = checker.action(default_node, "default", need_queue=True) if default_node else None

    if checker.errors or default is None:
        raise RulesError(checker.errors, source)
    rules = [
        Rule(r.id, r.order, r.index, _resolve_hours(r.when, checker.hours), r.then, r.line)
        for r in rules
    ]
    text = raw.decode("utf-8-sig")
    return Ruleset(
        version=version,
        source=source,
        text=text,
        attributes=attributes,
        facts=checker.registry,
        hours=checker.hours,
        queues=queues,
        templates=templates,
        rules=rules,
        default=default,
        teams=teams,
    )
