"""Service KPIs from the event log (docs/kpis.md).

Every measurement comes from a conversation's ConversationEvents, walked in order, and is
dated by the event that completes it (a first response at the reply, a resolution at the
resolve...). A report keeps the measurements dated within ``[start, end)`` and groups them
by queue, agent or channel. First response and resolution times are counted in business
time when the queue has hours.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, func, select, true

from router.models import Agent, AgentLoad, Conversation, ConversationEvent, User
from router.serialize import iso
from router.types import OPEN_STATES, EventKind
from routing_rules import Ruleset
from routing_rules.hours import Hours

__all__ = ["GROUPS", "Measurement", "backlog", "fairness", "kpi_report", "measure", "to_csv"]

GROUPS = ("queue", "agent", "channel")
K = EventKind


@dataclass(frozen=True, slots=True)
class Measurement:
    kind: str
    at: datetime
    queue: str | None
    agent_id: int | None
    channel: str
    value: float = 1.0


@dataclass
class _Cycle:
    start: datetime | None = None
    answered: bool = False
    breached: bool = False


@dataclass
class _Walk:
    channel: str
    elapsed: Callable[[str | None, datetime, datetime], float]
    has_sla: Callable[[str | None], bool]
    wrapping: frozenset[str] = frozenset()  # queues with a wrap-up after resolving
    out: list[Measurement] = field(default_factory=list)
    queue: str | None = None
    cycle: _Cycle = field(default_factory=_Cycle)
    handling: dict[int, datetime] = field(default_factory=dict)  # agent -> since
    # agent -> since, for a conversation resolved and still in its wrap-up
    wrap: dict[int, datetime] = field(default_factory=dict)
    # each resolve: when, by whom, in which queue (FCR counts at the first, for its agent)
    resolved: list[tuple[datetime, int | None, str | None]] = field(default_factory=list)
    reopened: bool = False
    transferred: bool = False

    def add(self, kind: str, at: datetime, agent: int | None = None, value: float = 1.0) -> None:
        self.out.append(Measurement(kind, at, self.queue, agent, self.channel, value))

    def release(self, agent: int | None, at: datetime) -> None:
        since = self.handling.pop(agent, None) if agent is not None else None
        if since is not None:
            self.add("handle", at, agent, (at - since).total_seconds())

    def release_all(self, at: datetime) -> None:
        for agent in list(self.handling):
            self.release(agent, at)
        for agent, since in list(self.wrap.items()):
            self.add("handle", at, agent, (at - since).total_seconds())
        self.wrap.clear()


def measure(
    events: Iterable[Any],
    channel: str,
    elapsed: Callable[[str | None, datetime, datetime], float],
    has_sla: Callable[[str | None], bool],
    wrapping: frozenset[str] = frozenset(),
) -> list[Measurement]:
    """The measurements of one conversation from its events (oldest first)."""
    w = _Walk(channel, elapsed, has_sla, wrapping)
    for e in events:
        if e.queue:
            w.queue = e.queue
        kind, at, agent, data = e.kind, e.at, e.agent_id, e.data or {}
        if kind == K.MESSAGE_IN and w.cycle.start is None:
            w.cycle.start = at
        elif kind == K.REOPENED:
            w.cycle, w.reopened = _Cycle(start=at), True
        elif (
            kind == K.MESSAGE_OUT
            and e.actor == "agent"
            and not data.get("auto")
            and not w.cycle.answered
            and w.cycle.start is not None
        ):
            w.cycle.answered = True
            w.add("first_response", at, agent, elapsed(w.queue, w.cycle.start, at))
            if has_sla(w.queue):
                w.add("sla_met", at, agent, 0.0 if w.cycle.breached else 1.0)
        elif kind == K.SLA_BREACHED and data.get("sla") == "first_response":
            w.cycle.breached = True
        elif kind == K.OFFERED:
            w.add("offered", at, agent)
        elif kind == K.OFFER_EXPIRED:
            w.add("offer_missed", at, agent)
        elif kind == K.OFFER_REJECTED:
            w.add("offer_rejected", at, agent)
        elif kind == K.ASSIGNED and agent is not None:
            for other in [a for a in w.handling if a != agent]:
                w.release(other, at)
            w.handling.setdefault(agent, at)
            w.add("assigned", at, agent)
        elif kind == K.RESOLVED:
            since = w.handling.pop(agent, None) if agent is not None else None
            if since is not None and agent is not None:
                w.wrap[agent] = since  # handle time runs on through a wrap-up, if any
            w.resolved.append((at, agent, w.queue))
            if w.cycle.start is not None:
                w.add("resolution", at, agent, elapsed(w.queue, w.cycle.start, at))
            if w.queue not in w.wrapping:  # no wrap-up: the handling ends with the resolve
                _end_wrap(w, agent, at)
        elif kind == K.WRAP_UP_ENDED and agent is not None:
            _end_wrap(w, agent, at)
        elif kind in (K.TRANSFERRED, K.ESCALATED):
            w.release(agent, at)
            w.transferred = True
            w.add("transfer" if kind == K.TRANSFERRED else "escalation", at, agent)
            w.queue = e.queue or w.queue
        elif kind == K.UNASSIGNED:
            w.release(agent, at)
        elif kind == K.ABANDONED:
            w.add("abandoned", at, None, float(data.get("wait_seconds") or 0))
            w.release_all(at)
        elif kind == K.CLOSED:
            w.release_all(at)
        elif kind == K.CSAT and isinstance(data.get("score"), int | float):
            w.add(
                "nps" if data.get("scale") == "nps" else "csat",
                at,
                agent,
                float(data["score"]),
            )
    if w.resolved:
        fcr = len(w.resolved) == 1 and not w.reopened and not w.transferred
        # dated, queued and credited as the first resolve: per agent, ``resolved`` and
        # ``fcr_rate`` count the conversations that agent resolved first
        at, agent, queue = w.resolved[0]
        w.out.append(Measurement("fcr", at, queue, agent, w.channel, 1.0 if fcr else 0.0))
    return w.out


def _end_wrap(w: _Walk, agent: int | None, at: datetime) -> None:
    if agent is None or agent not in w.wrap:
        return
    since = w.wrap.pop(agent)
    w.add("handle", at, agent, (at - since).total_seconds())


def _rows(
    conn: Connection,
    start: datetime,
    end: datetime,
    queue: str | None,
    channel: str | None,
    visible: ColumnElement[bool] | None = None,
) -> dict[int, list[Any]]:
    """The events of every conversation with an event in the period (all of their events:
    a first response in the period may measure from a message before it)."""
    touched = select(ConversationEvent.conversation_id).where(
        ConversationEvent.at >= start, ConversationEvent.at < end
    )
    query = (
        select(ConversationEvent, Conversation.channel.label("conversation_channel"))
        .join(Conversation, Conversation.id == ConversationEvent.conversation_id)
        .where(ConversationEvent.conversation_id.in_(touched), ConversationEvent.at < end)
        .order_by(ConversationEvent.conversation_id, ConversationEvent.id)
    )
    if channel:
        query = query.where(Conversation.channel == channel)
    if visible is not None:
        query = query.where(visible)
    by: dict[int, list[Any]] = defaultdict(list)
    for row in conn.execute(query):
        by[row.conversation_id].append(row)
    return by


def _agent_names(conn: Connection) -> dict[int, str]:
    return {
        int(a.id): a.name
        for a in conn.execute(select(Agent.id, User.name).join(User, User.id == Agent.user_id))
    }


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "avg": None, "median": None, "max": None}
    return {
        "count": len(values),
        "avg": round(statistics.fmean(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def kpi_report(
    conn: Connection,
    ruleset: Ruleset,
    start: datetime,
    end: datetime,
    *,
    by: str = "queue",
    queue: str | None = None,
    channel: str | None = None,
    agent_id: int | None = None,
    visible: ColumnElement[bool] | None = None,
) -> dict[str, Any]:
    """KPIs per queue, agent or channel for measurements dated in ``[start, end)``, of the
    conversations ``visible`` keeps (router.policy; all without it)."""
    if by not in GROUPS:
        raise ValueError(f"by must be one of {', '.join(GROUPS)}")

    def hours_of(q: str | None) -> Hours | None:
        spec = ruleset.queues.get(q) if q else None
        return ruleset.hours.get(spec.hours) if spec is not None and spec.hours else None

    def elapsed(q: str | None, a: datetime, b: datetime) -> float:
        hours = hours_of(q)
        if b <= a:
            return 0.0
        return hours.business_seconds(a, b) if hours else (b - a).total_seconds()

    def has_sla(q: str | None) -> bool:
        spec = ruleset.queues.get(q) if q else None
        return bool(spec is not None and spec.sla is not None and spec.sla.first_response)

    wrapping = frozenset(name for name, q in ruleset.queues.items() if q.wrap_up)
    measurements = [
        m
        for rows in _rows(conn, start, end, queue, channel, visible).values()
        for m in measure(rows, rows[0].conversation_channel, elapsed, has_sla, wrapping)
        if start <= m.at < end
    ]
    if queue:
        measurements = [m for m in measurements if m.queue == queue]
    if agent_id is not None:
        measurements = [m for m in measurements if m.agent_id == agent_id]
    names = _agent_names(conn)
    groups: dict[Any, list[Measurement]] = defaultdict(list)
    for m in measurements:
        key = {"queue": m.queue, "agent": m.agent_id, "channel": m.channel}[by]
        if key is not None:
            groups[key].append(m)
    rows = []
    for key in sorted(groups, key=str):
        ms = groups[key]

        def values(kind: str, ms: list[Measurement] = ms) -> list[float]:
            return [m.value for m in ms if m.kind == kind]

        resolved = values("fcr")
        abandoned = values("abandoned")
        sla = values("sla_met")
        csat = values("csat")
        handled = values("handle")
        rows.append(
            {
                by: names.get(key, str(key)) if by == "agent" else key,
                **({"agent_id": key} if by == "agent" else {}),
                "first_response_seconds": _summary(values("first_response")),
                "handle_seconds": {**_summary(handled), "total": round(sum(handled), 3)},
                "resolution_seconds": _summary(values("resolution")),
                "resolved": len(resolved),
                "fcr_rate": round(sum(resolved) / len(resolved), 4) if resolved else None,
                "abandoned": len(abandoned),
                "abandon_wait_seconds": _summary(abandoned),
                "sla_first_response_attainment": round(sum(sla) / len(sla), 4) if sla else None,
                "transfers": len(values("transfer")),
                "escalations": len(values("escalation")),
                "offers": len(values("offered")),
                "offers_missed": len(values("offer_missed")),
                "offers_rejected": len(values("offer_rejected")),
                "csat": {**_summary(csat), "satisfied_rate": _rate(csat, 4)},
                "nps": _nps(values("nps")),
            }
        )
    return {"start": iso(start), "end": iso(end), "by": by, "rows": rows}


def _rate(scores: list[float], threshold: float) -> float | None:
    return round(sum(1 for s in scores if s >= threshold) / len(scores), 4) if scores else None


def _nps(scores: list[float]) -> dict[str, Any]:
    if not scores:
        return {"count": 0, "score": None}
    promoters = sum(1 for s in scores if s >= 9)
    detractors = sum(1 for s in scores if s <= 6)
    return {"count": len(scores), "score": round(100 * (promoters - detractors) / len(scores), 1)}


def backlog(
    conn: Connection, now: datetime, visible: ColumnElement[bool] | None = None
) -> list[dict[str, Any]]:
    """Open conversations per queue now (of those ``visible`` keeps), with the oldest
    one's age."""
    rows = conn.execute(
        select(
            Conversation.queue,
            Conversation.state,
            func.count(),
            func.min(Conversation.created_at),
        )
        .where(
            Conversation.state.in_([s.value for s in OPEN_STATES]),
            true() if visible is None else visible,
        )
        .group_by(Conversation.queue, Conversation.state)
    ).all()
    out: dict[str, dict[str, Any]] = {}
    for queue, state, count, oldest in rows:
        entry = out.setdefault(
            queue or "(routing)",
            {"queue": queue or "(routing)", "open": 0, "by_state": {}, "oldest_seconds": 0.0},
        )
        entry["open"] += int(count)
        entry["by_state"][state] = int(count)
        if oldest is not None:
            age = (
                now - (oldest if oldest.tzinfo else oldest.replace(tzinfo=now.tzinfo))
            ).total_seconds()
            entry["oldest_seconds"] = max(entry["oldest_seconds"], round(age, 3))
    return [out[k] for k in sorted(out)]


def fairness(report: dict[str, Any], conn: Connection) -> list[dict[str, Any]]:
    """Offers and handled work per agent against their capacity (from an agent report)."""
    capacity: dict[int, dict[str, int]] = defaultdict(dict)
    for load in conn.execute(select(AgentLoad.agent_id, AgentLoad.channel, AgentLoad.cap)):
        capacity[int(load.agent_id)][load.channel] = int(load.cap)
    out = []
    for row in report["rows"]:
        cap = capacity.get(int(row["agent_id"]), {})
        total = cap.get("total") or sum(v for k, v in cap.items() if k != "total") or None
        out.append(
            {
                "agent": row["agent"],
                "agent_id": row["agent_id"],
                "capacity_total": total,
                "offers": row["offers"],
                "offers_missed": row["offers_missed"],
                "handled": row["handle_seconds"]["count"],
                "handle_seconds_total": row["handle_seconds"]["total"],
                "handled_per_capacity": round(row["handle_seconds"]["count"] / total, 3)
                if total
                else None,
            }
        )
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Flatten report rows (nested summaries become ``name.field`` columns)."""
    flat = []
    for row in rows:
        item: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, dict):
                        continue
                    item[f"{key}.{sub}"] = v
            else:
                item[key] = value
        flat.append(item)
    columns: list[str] = []
    for item in flat:
        columns.extend(c for c in item if c not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()
