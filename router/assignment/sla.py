"""SLA clocks of a conversation, counted in business time when its queue has ``hours``.

First response runs from the start of the cycle (the first customer message, or the
reopening one) until an agent answers. Resolution runs from the same start until resolved,
paused while the customer has the turn (``waiting_customer``). At 80% of a target an
``sla_warning``, at 100% an ``sla_breached`` event (and a stream event to the assigned agent,
the queue and supervisors), each once per clock and cycle: what fired is kept on the
conversation, so a transfer that recomputes the due times for the new queue, or a restart,
does not repeat it. The earliest due time is kept in ``sla_due_at`` (it breaks ties in
queue order).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import bindparam, select, update

from router.assignment.timers import (
    FRT_BREACH,
    FRT_WARNING,
    RES_BREACH,
    RES_WARNING,
    SLA_TIMERS,
    clear_timers,
    replace_timers,
)
from router.db import Tx, prepared
from router.events import SUPERVISORS, add_event, agent_stream, queue_stream
from router.models import Conversation
from router.types import ConversationState, EventKind
from routing_rules import Hours, QueueSpec, Ruleset

__all__ = [
    "NO_DUE",
    "agent_answered",
    "arm",
    "fire",
    "on_customer_turn",
    "queue_hours",
    "stop",
    "view",
]

S = ConversationState
WARN_AT = 0.8  # the at-risk warning, as a share of the target
# "No SLA running": sorts after every real due time and keeps sla_due_at non-null, so the
# queue order is one index walk on every database.
NO_DUE = datetime(9999, 12, 31, tzinfo=UTC)


def queue_hours(ruleset: Ruleset | None, spec: QueueSpec | None) -> Hours | None:
    if ruleset is None or spec is None or not spec.hours:
        return None
    return ruleset.hours.get(spec.hours)


def _add(hours: Hours | None, start: datetime, seconds: float) -> datetime:
    seconds = max(0.0, seconds)
    return (
        hours.add(start, timedelta(seconds=seconds))
        if hours
        else start + timedelta(seconds=seconds)
    )


def _elapsed(hours: Hours | None, start: datetime, end: datetime) -> float:
    if end <= start:
        return 0.0
    return hours.business_seconds(start, end) if hours else (end - start).total_seconds()


def _fired(conversation: Any) -> set[str]:
    return set((conversation.data or {}).get("sla_fired", []))


def _earliest(*values: datetime | None) -> datetime:
    """The earliest due time, for the queue order (NO_DUE when no clock runs)."""
    present = [v for v in values if v is not None]
    return min(present) if present else NO_DUE


def cycle_values(data: dict[str, Any], start: datetime) -> dict[str, Any]:
    """Column values that start a new SLA cycle at ``start`` (``data`` is the conversation's):
    both clocks run from then, nothing fired yet, the first-response clock waits for an
    agent's answer. The due times are set when it enters its queue (:func:`arm`)."""
    data = {k: v for k, v in data.items() if k != "sla_fired"}
    data.update(sla_cycle_at=start.isoformat(), sla_awaiting_response=True)
    return {
        "data": data,
        "sla_first_response_due_at": None,
        "sla_resolution_due_at": None,
        "sla_resolution_since": start,
        "sla_resolution_used_s": 0.0,
        "sla_due_at": NO_DUE,
    }


def view(row: Any, **changes: Any) -> SimpleNamespace:
    """A conversation row (or a view of one) with some values changed."""
    values = row._asdict() if hasattr(row, "_asdict") else dict(vars(row))
    return SimpleNamespace(**{**values, **changes})


def _has_timers(c: Any) -> bool:
    """SLA timers exist only while a due time is set (every path keeps it so)."""
    return c.sla_first_response_due_at is not None or c.sla_resolution_due_at is not None


_SET_DUE = prepared(
    update(Conversation)
    .where(Conversation.id == bindparam("cid"))
    .values(
        sla_first_response_due_at=bindparam("sla_first_response_due_at"),
        sla_resolution_due_at=bindparam("sla_resolution_due_at"),
        sla_due_at=bindparam("sla_due_at"),
    )
)


def arm(tx: Tx, c: Any, ruleset: Ruleset, queue: str) -> None:
    """(Re)compute the due times of conversation ``c`` (its current row) for ``queue``'s SLA
    and arm the timers not yet fired."""
    spec = ruleset.queues[queue]
    hours = queue_hours(ruleset, spec)
    data = c.data or {}
    fired = _fired(c)
    cycle = datetime.fromisoformat(data["sla_cycle_at"]) if "sla_cycle_at" in data else c.created_at
    frt_due = res_due = None
    timers: list[tuple[str, datetime, dict[str, Any]]] = []
    target = spec.sla.first_response
    if target is not None and data.get("sla_awaiting_response"):
        seconds = target.total_seconds()
        frt_due = _add(hours, cycle, seconds)
        due = {"due": frt_due.isoformat()}
        if "first_response:warning" not in fired:
            timers.append((FRT_WARNING, _add(hours, cycle, WARN_AT * seconds), due))
        if "first_response:breach" not in fired:
            timers.append((FRT_BREACH, frt_due, due))
    target = spec.sla.resolution
    if target is not None and c.sla_resolution_since is not None:
        seconds, since = target.total_seconds(), c.sla_resolution_since
        used = float(c.sla_resolution_used_s or 0)
        res_due = _add(hours, since, seconds - used)
        due = {"due": res_due.isoformat()}
        if "resolution:warning" not in fired:
            timers.append((RES_WARNING, _add(hours, since, WARN_AT * seconds - used), due))
        if "resolution:breach" not in fired:
            timers.append((RES_BREACH, res_due, due))
    if _has_timers(c):
        replace_timers(tx, c.id, SLA_TIMERS, timers)
    elif timers:
        replace_timers(tx, c.id, (), timers)
    values = {
        "sla_first_response_due_at": frt_due,
        "sla_resolution_due_at": res_due,
        "sla_due_at": _earliest(frt_due, res_due),
    }
    if any(getattr(c, k) != v for k, v in values.items()):
        tx.execute(_SET_DUE, {"cid": c.id, **values})


def fire(tx: Tx, conversation: Any, kind: str) -> None:
    """An SLA timer of ``kind`` fell due: the warning or breach, once, if its clock still runs."""
    clock = "first_response" if kind in (FRT_WARNING, FRT_BREACH) else "resolution"
    level = "warning" if kind in (FRT_WARNING, RES_WARNING) else "breach"
    running = (
        conversation.sla_first_response_due_at is not None
        if clock == "first_response"
        else conversation.sla_resolution_since is not None
        and conversation.state not in (S.RESOLVED.value, S.CLOSED.value)
    )
    if not running or f"{clock}:{level}" in _fired(conversation):
        return
    due = (
        conversation.sla_first_response_due_at
        if clock == "first_response"
        else conversation.sla_resolution_due_at
    )
    data = dict(conversation.data or {})
    data["sla_fired"] = sorted(_fired(conversation) | {f"{clock}:{level}"})
    tx.execute(update(Conversation).where(Conversation.id == conversation.id).values(data=data))
    event = EventKind.SLA_WARNING if level == "warning" else EventKind.SLA_BREACHED
    add_event(
        tx,
        conversation.id,
        event,
        agent_id=conversation.assigned_agent_id,
        queue=conversation.queue,
        sla=clock,
        due_at=due.isoformat() if due else None,
    )
    payload = {
        "conversation_id": conversation.id,
        "sla": clock,
        "level": level,
        "due_at": due.isoformat() if due else None,
        "queue": conversation.queue,
    }
    streams = [SUPERVISORS, queue_stream(conversation.queue)]
    if conversation.assigned_agent_id is not None:
        streams.append(agent_stream(conversation.assigned_agent_id))
    for stream in streams:
        tx.emit(stream, "sla", payload)


def agent_answered(tx: Tx, c: Any, ruleset: Ruleset | None, *, customer_turn: bool) -> None:
    """An agent answered conversation ``c`` (its row before): the first-response clock of
    this cycle stops; with ``customer_turn`` (it is waiting for the customer now) the
    resolution clock pauses, the business time it ran being kept."""
    values: dict[str, Any] = {}
    kinds: list[str] = []
    frt_due, res_due = c.sla_first_response_due_at, c.sla_resolution_due_at
    if (c.data or {}).get("sla_awaiting_response"):
        values["data"] = {k: v for k, v in c.data.items() if k != "sla_awaiting_response"}
        values["sla_first_response_due_at"] = frt_due = None
        kinds += [FRT_WARNING, FRT_BREACH]
    if customer_turn and c.sla_resolution_since is not None:
        spec = ruleset.queues.get(c.queue) if ruleset is not None and c.queue else None
        hours = queue_hours(ruleset, spec)
        used = float(c.sla_resolution_used_s or 0) + _elapsed(hours, c.sla_resolution_since, tx.now)
        values.update(sla_resolution_since=None, sla_resolution_used_s=used)
        values["sla_resolution_due_at"] = res_due = None
        kinds += [RES_WARNING, RES_BREACH]
    if not values:
        return
    values["sla_due_at"] = _earliest(frt_due, res_due)
    tx.execute(update(Conversation).where(Conversation.id == c.id).values(**values))
    if _has_timers(c):
        clear_timers(tx, c.id, *kinds)


def on_customer_turn(tx: Tx, conversation_id: int, ruleset: Ruleset | None) -> None:
    """The customer wrote while it was their turn: the resolution clock runs again."""
    c = tx.execute(select(Conversation).where(Conversation.id == conversation_id)).one()
    if c.sla_resolution_since is not None or c.state in (S.RESOLVED.value, S.CLOSED.value):
        return
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(sla_resolution_since=tx.now)
    )
    if ruleset is not None and c.queue in ruleset.queues:
        arm(tx, view(c, sla_resolution_since=tx.now), ruleset, c.queue)


def stop(tx: Tx, c: Any, ruleset: Ruleset | None) -> None:
    """Resolved (``c`` is its row before): both clocks stop."""
    agent_answered(tx, c, ruleset, customer_turn=True)
