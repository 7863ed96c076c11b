"""A conversation's life around its queue: entering a queue (overflow plan, after-hours
reply, SLA clocks), the timers that drive it (see :mod:`router.assignment.timers`),
preferred and sticky agents, transfers, escalation, sending back to routing, unassigning
absent agents' work, wrap-up and closing resolved conversations.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, select, update

from router.assignment import sla
from router.assignment.capacity import holds_while_waiting, release
from router.assignment.timers import (
    CLOSE,
    OVERFLOW,
    PREFERRED,
    SLA_TIMERS,
    WRAP_UP,
    clear_timers,
    current_ruleset,
    set_timer,
    take_timer,
)
from router.db import Tx, prepared
from router.events import add_event, agent_stream, queue_stream
from router.exceptions import Conflict, InvalidInput, NotFound
from router.models import Agent, AgentConnection, Conversation, Inbox, Timer, table
from router.outbox import enqueue_message
from router.types import Actor, ConversationState, EventKind, Priority
from routing_rules import OverflowStep, QueueSpec, Ruleset

__all__ = [
    "DEFAULT_PREFERRED_WAIT",
    "after_resolve",
    "end_wrap_up",
    "enter_queue",
    "escalate",
    "fire_timer",
    "holds_capacity",
    "owned",
    "prefer",
    "reserve",
    "send_back_to_routing",
    "sticky_wait",
    "transfer",
    "unassign",
    "unassign_absent",
    "unassign_all",
]

S = ConversationState
DEFAULT_PREFERRED_WAIT = timedelta(seconds=20)
_WAITING_STATES = (S.QUEUED.value, S.OFFERED.value)
_OWNED_STATES = (S.ASSIGNED.value, S.WAITING_CUSTOMER.value)
_timers = table(Timer)


def fire_timer(tx: Tx, timer_id: int, ruleset: Ruleset) -> bool:
    """Fire one due timer (once: whoever deletes the row). True when waiting work or
    eligibility may have changed, so the caller runs the matcher."""
    timer = take_timer(tx, timer_id)
    if timer is None:
        return False  # fired elsewhere, or cleared
    conversation = tx.execute(
        select(Conversation).where(Conversation.id == timer.conversation_id)
    ).first()
    if conversation is None:
        return False
    kind, data = timer.kind, timer.data or {}
    if kind == OVERFLOW:
        return _overflow(tx, conversation, ruleset, data)
    if kind == PREFERRED:
        return _preferred_wait_over(tx, conversation, data)
    if kind in SLA_TIMERS:
        sla.fire(tx, conversation, kind)
        return False
    if kind == WRAP_UP:
        _wrap_up_over(tx, conversation, data, early=False)
        return True
    if kind == CLOSE:
        _close(tx, conversation)
        return False
    return False


# -- entering a queue -------------------------------------------------------------------------
def _plan(spec: QueueSpec, plan: str) -> tuple[OverflowStep, ...]:
    return spec.after_hours_overflow if plan == "after_hours" else spec.overflow


_ENTERED = prepared(
    update(Conversation)
    .where(Conversation.id == bindparam("cid"))
    .values(queue_entered_at=bindparam("now"), overflow_step=0, data=bindparam("data"))
)


def enter_queue(
    tx: Tx,
    conversation_id: int,
    ruleset: Ruleset,
    queue: str,
    *,
    row: Any = None,
    facts: dict[str, Any] | None = None,
) -> None:
    """The conversation (already updated to ``queue``; ``row`` is its current row, read if
    not given) entered it now: overflow counting restarts (the after-hours plan when the
    queue is closed), the after-hours reply goes out once per conversation, and the SLA due
    times follow the queue."""
    spec = ruleset.queues[queue]
    hours = sla.queue_hours(ruleset, spec)
    closed = hours is not None and not hours.is_open(tx.now)
    plan = "after_hours" if closed and spec.after_hours_overflow else "overflow"
    if row is None:
        row = tx.execute(select(Conversation).where(Conversation.id == conversation_id)).one()
    data = dict(row.data or {})
    data.pop("extra_queues", None)
    replied = bool(data.get("after_hours_replied"))
    if closed and spec.after_hours_reply and not replied and not data.get("no_auto_reply"):
        template = ruleset.templates.get(spec.after_hours_reply)
        if template is not None:
            from router.routing import conversation_facts

            text = template.render(
                facts or conversation_facts(tx.conn, conversation_id, ruleset, tx.now)
            )
            enqueue_message(
                tx,
                conversation_id,
                text,
                author=Actor.SYSTEM,
                is_auto=True,
                template=spec.after_hours_reply,
            )
            data["after_hours_replied"] = True
    data["overflow_plan"] = plan
    tx.execute(_ENTERED, {"cid": conversation_id, "now": tx.now, "data": data})
    steps = _plan(spec, plan)
    if not steps:
        if row.queue_entered_at is not None:  # it was in a queue before: its step may be armed
            clear_timers(tx, conversation_id, OVERFLOW)
    else:
        set_timer(
            tx,
            conversation_id,
            OVERFLOW,
            tx.now + steps[0].after,
            {"queue": queue, "plan": plan, "step": 0},
        )
    sla.arm(tx, sla.view(row, data=data), ruleset, queue)


def _overflow(tx: Tx, conversation: Any, ruleset: Ruleset, data: dict[str, Any]) -> bool:
    queue, plan, step = data.get("queue"), data.get("plan", "overflow"), int(data.get("step", 0))
    if (
        conversation.state not in _WAITING_STATES
        or conversation.queue != queue
        or conversation.overflow_step != step
        or queue not in ruleset.queues
    ):
        return False  # picked up, moved or re-entered since: this step no longer applies
    steps = _plan(ruleset.queues[queue], plan)
    if step >= len(steps):
        return False
    action = steps[step]
    add_event(
        tx,
        conversation.id,
        EventKind.OVERFLOW,
        queue=queue,
        step=step,
        action=action.kind,
        value=action.value,
        plan=plan,
    )
    tx.emit(
        queue_stream(queue),
        "overflow",
        {"conversation_id": conversation.id, "step": step, "action": action.kind},
    )
    changes: dict[str, Any] = {"overflow_step": step + 1, "updated_at": tx.now}
    if action.kind == "relax_skills":
        required = dict(conversation.required_skills or {})
        for skill, level in dict(action.value).items():
            if skill in required:
                required[skill] = min(int(required[skill]), int(level))
        changes["required_skills"] = required
    elif action.kind == "priority":
        changes["priority"] = max(int(conversation.priority), int(Priority.parse(action.value)))
    elif action.kind == "add_queue":
        extra = list((conversation.data or {}).get("extra_queues", []))
        if action.value not in extra:
            extra.append(action.value)
        changes["data"] = {**(conversation.data or {}), "extra_queues": extra}
    elif action.kind == "move_to":
        _move(tx, conversation, ruleset, str(action.value), f"overflow step {step + 1} of {queue}")
        return True
    tx.execute(update(Conversation).where(Conversation.id == conversation.id).values(**changes))
    if step + 1 < len(steps) and conversation.queue_entered_at is not None:
        set_timer(
            tx,
            conversation.id,
            OVERFLOW,
            conversation.queue_entered_at + steps[step + 1].after,
            {"queue": queue, "plan": plan, "step": step + 1},
        )
    return True


def _move(tx: Tx, conversation: Any, ruleset: Ruleset, to: str, why: str) -> None:
    """Overflow's ``move_to``: into another queue, with an event and a note on the timeline."""
    if to not in ruleset.queues:
        return
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation.id)
        .values(
            queue=to,
            required_skills=dict(ruleset.queues[to].skills),
            queued_at=tx.now,
            updated_at=tx.now,
        )
    )
    add_event(
        tx, conversation.id, EventKind.MOVED, queue=to, from_queue=conversation.queue, reason=why
    )
    enqueue_message(
        tx,
        conversation.id,
        f"Moved from {conversation.queue} to {to} ({why}).",
        author=Actor.SYSTEM,
        is_note=True,
    )
    add_event(tx, conversation.id, EventKind.QUEUED, queue=to)
    enter_queue(tx, conversation.id, ruleset, to)


# -- preferred and sticky agents --------------------------------------------------------------
def prefer(tx: Tx, conversation_id: int, agent_id: int, wait: timedelta) -> None:
    """Reserve a queued conversation for ``agent_id`` for ``wait`` (then anyone eligible);
    an offer the agent rejects or misses ends the reservation at once."""
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(preferred_agent_id=agent_id)
    )
    reserve(tx, conversation_id, agent_id, wait)


def reserve(tx: Tx, conversation_id: int, agent_id: int, wait: timedelta) -> None:
    """Arm the end of a reservation for ``agent_id`` (whose ``preferred_agent_id`` the caller
    sets in its own update): after ``wait`` anyone eligible may take it."""
    set_timer(tx, conversation_id, PREFERRED, tx.now + wait, {"agent_id": agent_id})


def _preferred_wait_over(tx: Tx, conversation: Any, data: dict[str, Any]) -> bool:
    if conversation.state != S.QUEUED or conversation.preferred_agent_id != data.get("agent_id"):
        return False
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation.id)
        .values(preferred_agent_id=None, updated_at=tx.now)
    )
    return True


def sticky_wait(spec: QueueSpec | None) -> timedelta:
    return (
        spec.sticky.wait if spec is not None and spec.sticky is not None else DEFAULT_PREFERRED_WAIT
    )


# -- agents hand work on ----------------------------------------------------------------------
def owned(tx: Tx, agent_id: int | None, conversation_id: int) -> Any:
    row = tx.execute(select(Conversation).where(Conversation.id == conversation_id)).first()
    if row is None:
        raise NotFound(f"no conversation {conversation_id}")
    if row.state not in _OWNED_STATES or (
        agent_id is not None and row.assigned_agent_id != agent_id
    ):
        raise Conflict("the conversation is not assigned to you")
    return row


def holds_capacity(row: Any) -> bool:
    return row.state == S.ASSIGNED or (
        row.state == S.WAITING_CUSTOMER and holds_while_waiting(row.channel)
    )


def _let_go(tx: Tx, row: Any, reason: str) -> None:
    """The owner lets go: capacity back, and the clock runs again if the customer had the turn."""
    if row.assigned_agent_id is not None and holds_capacity(row):
        release(tx, row.assigned_agent_id, row.channel, reason)
    if row.state == S.WAITING_CUSTOMER:
        sla.on_customer_turn(tx, row.id, current_ruleset(tx))


def transfer(
    tx: Tx,
    agent_id: int | None,
    conversation_id: int,
    ruleset: Ruleset,
    *,
    queue: str | None = None,
    to_agent: int | None = None,
    note: str | None = None,
    actor: Actor = Actor.AGENT,
    kind: EventKind = EventKind.TRANSFERRED,
    **event: Any,
) -> Any:
    """Hand a conversation on, with a note that travels with it: into ``queue`` with that
    queue's skills and SLA (the rules are not evaluated again), or to the agent ``to_agent``
    (offered to them only, skills aside; back to the queue's strategy when the offer is
    declined or expires, or when it could not be offered within the queue's offer timeout).
    Either way the overflow count restarts."""
    if (queue is None) == (to_agent is None):
        raise InvalidInput("transfer to a queue or to an agent")
    if queue is not None and queue not in ruleset.queues:
        raise InvalidInput(f'unknown queue "{queue}"')
    if to_agent is not None:
        if tx.execute(select(Agent.id).where(Agent.id == to_agent)).first() is None:
            raise NotFound(f"no agent {to_agent}")
        if to_agent == agent_id:
            raise InvalidInput("the conversation is already yours")
    row = owned(tx, agent_id, conversation_id)
    target = queue or row.queue
    if target not in ruleset.queues:
        raise InvalidInput(f'queue "{target}" is not in the active ruleset')
    _let_go(tx, row, kind.value)
    values: dict[str, Any] = {
        "state": S.QUEUED.value,
        "queue": target,
        "assigned_agent_id": None,
        "preferred_agent_id": None,
        "queued_at": tx.now,
        "updated_at": tx.now,
        "data": {**(row.data or {}), "direct_to": to_agent},
    }
    if queue is not None:
        values["required_skills"] = dict(ruleset.queues[queue].skills)
    tx.execute(update(Conversation).where(Conversation.id == conversation_id).values(**values))
    add_event(
        tx,
        conversation_id,
        kind,
        actor,
        agent_id=row.assigned_agent_id,
        queue=target,
        from_queue=row.queue,
        to_queue=queue,
        to_agent=to_agent,
        note=note,
        **event,
    )
    if note:
        enqueue_message(
            tx, conversation_id, note, author=Actor(actor), agent_id=agent_id, is_note=True
        )
    add_event(tx, conversation_id, EventKind.QUEUED, queue=target)
    enter_queue(tx, conversation_id, ruleset, target)
    if to_agent is not None:
        prefer(tx, conversation_id, to_agent, ruleset.queues[target].offer_timeout)
    if row.assigned_agent_id is not None:
        tx.emit(
            agent_stream(row.assigned_agent_id),
            "conversation_updated",
            {"conversation_id": conversation_id, "state": S.QUEUED.value, kind.value: True},
        )
    return row


def escalate(tx: Tx, agent_id: int, conversation_id: int, ruleset: Ruleset, reason: str) -> str:
    """To the queue's ``escalate_to`` with a reason; the history goes along."""
    if not reason or not reason.strip():
        raise InvalidInput("an escalation needs a reason")
    row = owned(tx, agent_id, conversation_id)
    spec = ruleset.queues.get(row.queue)
    target = spec.escalate_to if spec is not None else None
    if not target:
        raise InvalidInput(f'queue "{row.queue}" has no escalate_to')
    escalations = int((row.data or {}).get("escalations", 0)) + 1
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(data={**(row.data or {}), "escalations": escalations})
    )
    transfer(
        tx,
        agent_id,
        conversation_id,
        ruleset,
        queue=target,
        note=f"Escalated: {reason.strip()}",
        kind=EventKind.ESCALATED,
        reason=reason.strip(),
        count=escalations,
    )
    return target


def send_back_to_routing(
    tx: Tx, agent_id: int | None, conversation_id: int, note: str | None
) -> None:
    """Out of the agent's hands and through the rules again (the only path that re-evaluates
    them for a conversation already routed)."""
    row = owned(tx, agent_id, conversation_id)
    _let_go(tx, row, "rerouted")
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(
            state=S.NEW.value,
            assigned_agent_id=None,
            preferred_agent_id=None,
            queued_at=None,
            updated_at=tx.now,
            data={**(row.data or {}), "rerouted": True},
        )
    )
    clear_timers(tx, conversation_id, OVERFLOW, PREFERRED)
    add_event(
        tx,
        conversation_id,
        EventKind.UNASSIGNED,
        Actor.AGENT,
        agent_id=row.assigned_agent_id,
        queue=row.queue,
        reason="sent back to routing",
    )
    if note:
        enqueue_message(
            tx, conversation_id, note, author=Actor.AGENT, agent_id=agent_id, is_note=True
        )
    if row.assigned_agent_id is not None:
        tx.emit(
            agent_stream(row.assigned_agent_id),
            "conversation_updated",
            {"conversation_id": conversation_id, "state": S.NEW.value, "rerouted": True},
        )


def unassign(tx: Tx, row: Any, reason: str) -> None:
    """Assigned work returns to the head of its queue (it keeps the time it entered it)."""
    _let_go(tx, row, "unassigned")
    tx.execute(
        update(Conversation)
        .where(Conversation.id == row.id, Conversation.state.in_(_OWNED_STATES))
        .values(
            state=S.QUEUED.value,
            assigned_agent_id=None,
            preferred_agent_id=None,
            queued_at=row.queue_entered_at or row.queued_at or tx.now,
            updated_at=tx.now,
        )
    )
    add_event(
        tx,
        row.id,
        EventKind.UNASSIGNED,
        agent_id=row.assigned_agent_id,
        queue=row.queue,
        reason=reason,
    )
    add_event(tx, row.id, EventKind.QUEUED, queue=row.queue, head=True)
    tx.emit(
        agent_stream(row.assigned_agent_id),
        "unassigned",
        {"conversation_id": row.id, "reason": reason},
    )


def unassign_all(tx: Tx, agent_id: int, reason: str) -> list[int]:
    rows = tx.execute(
        select(Conversation).where(
            Conversation.assigned_agent_id == agent_id, Conversation.state.in_(_OWNED_STATES)
        )
    ).all()
    for row in rows:
        unassign(tx, row, reason)
    return [int(row.id) for row in rows]


def unassign_absent(tx: Tx, queues: dict[str, QueueSpec]) -> int:
    """Work of agents whose socket has been gone for their queue's ``unassign_after``."""
    live = select(AgentConnection.id).where(AgentConnection.agent_id == Agent.id).exists()
    rows = tx.execute(
        select(Conversation, Agent.disconnected_at.label("gone_at"))
        .join(Agent, Agent.id == Conversation.assigned_agent_id)
        .where(
            Conversation.state.in_(_OWNED_STATES),
            Agent.disconnected_at.is_not(None),
            ~live,
        )
    ).all()
    count = 0
    for row in rows:
        spec = queues.get(row.queue)
        after = spec.unassign_after if spec is not None else timedelta(minutes=10)
        if tx.now - row.gone_at >= after:
            unassign(tx, row, f"agent absent for {int(after.total_seconds())}s")
            count += 1
    return count


# -- resolving: wrap-up and closing -----------------------------------------------------------
def after_resolve(tx: Tx, row: Any, ruleset: Ruleset | None) -> datetime | None:
    """Called as ``row`` (its state before) is resolved: the SLA clocks stop, the agent's
    capacity is released now or after the queue's wrap-up, and closing is scheduled for
    when the reopen window ends. Returns the end of the wrap-up, if any."""
    sla.stop(tx, row, ruleset)
    clear_timers(tx, row.id, OVERFLOW, PREFERRED)
    window = tx.execute(select(Inbox.reopen_window_s).where(Inbox.id == row.inbox_id)).scalar_one()
    set_timer(tx, row.id, CLOSE, tx.now + timedelta(seconds=int(window)))
    if row.assigned_agent_id is None or not holds_capacity(row):
        return None
    spec = ruleset.queues.get(row.queue) if ruleset is not None and row.queue else None
    wrap_up = spec.wrap_up if spec is not None else timedelta(0)
    if wrap_up <= timedelta(0):
        release(tx, row.assigned_agent_id, row.channel, "resolved")
        return None
    until = tx.now + wrap_up
    set_timer(
        tx, row.id, WRAP_UP, until, {"agent_id": row.assigned_agent_id, "channel": row.channel}
    )
    return until


def _wrap_up_over(tx: Tx, conversation: Any, data: dict[str, Any], *, early: bool) -> None:
    agent_id, channel = int(data["agent_id"]), str(data["channel"])
    release(tx, agent_id, channel, "wrap-up ended")
    add_event(
        tx,
        conversation.id,
        EventKind.WRAP_UP_ENDED,
        Actor.AGENT if early else Actor.SYSTEM,
        agent_id=agent_id,
        queue=conversation.queue,
        early=early,
    )
    tx.emit(agent_stream(agent_id), "wrap_up_ended", {"conversation_id": conversation.id})


def end_wrap_up(tx: Tx, agent_id: int, conversation_id: int) -> None:
    """The agent is done with the after-work before the wrap-up time is over."""
    timer = tx.execute(
        delete(_timers)
        .where(and_(_timers.c.conversation_id == conversation_id, _timers.c.kind == WRAP_UP))
        .returning(_timers.c.data)
    ).first()
    if timer is None or int((timer.data or {}).get("agent_id", -1)) != agent_id:
        raise Conflict("no wrap-up of yours on this conversation")
    conversation = tx.execute(select(Conversation).where(Conversation.id == conversation_id)).one()
    _wrap_up_over(tx, conversation, timer.data, early=True)


def _close(tx: Tx, conversation: Any) -> None:
    closed = tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation.id, Conversation.state == S.RESOLVED.value)
        .values(state=S.CLOSED.value, closed_at=tx.now, updated_at=tx.now)
    ).rowcount
    if closed:
        add_event(tx, conversation.id, EventKind.CLOSED, queue=conversation.queue)
