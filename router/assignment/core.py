"""Assignment decisions, each one transaction of conditional updates.

Eligibility: online AND (in the queue's ``members`` if set, else every required skill at or
above its minimum) AND free capacity for the channel and in ``total`` AND (when the queue
has ``language_required``) the ``lang_<code>`` skill of the conversation's language AND not
exclusively busy (``exclusive_channels: [voice]`` takes nothing else while on a call).

Queue order: priority (urgent first), then the SLA due soonest, then time in queue. An offer reserves capacity until
it is accepted, rejected, expired or withdrawn; accepting is
``UPDATE offers ... WHERE state = 'pending' AND expires_at > now`` checked by rowcount, so
accept racing expiry has exactly one winner. A partial unique index allows one pending
offer per conversation; conversation moves are conditional on the state they leave.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.orm import aliased

from router.agents import record_status
from router.assignment import flow
from router.assignment.capacity import CapacityFull, claim, release, release_many, take
from router.assignment.strategies import Scope, strategy_of
from router.assignment.timers import PREFERRED, clear_timers, current_ruleset
from router.csat import send_survey
from router.db import Tx, any_of, prepared, prepared_each
from router.events import SUPERVISORS, add_event, agent_stream
from router.exceptions import CapacityExceeded, Conflict, NotFound
from router.models import (
    Agent,
    AgentLoad,
    AgentSkill,
    Contact,
    Conversation,
    Message,
    Offer,
    User,
    table,
)
from router.serialize import iso
from router.types import Actor, AgentPresence, ConversationState, EventKind, OfferState
from routing_rules import QueueSpec

__all__ = [
    "LostRace",
    "accept_offer",
    "assign_manually",
    "candidate_agents",
    "conversation_summary",
    "due_offers",
    "expire_offer",
    "offer_now",
    "reject_offer",
    "resolve_conversation",
    "set_presence",
    "try_offer",
    "withdraw_offers",
]

S = ConversationState


def candidate_agents(
    conn: Connection | Tx,
    conversation: Any,
    spec: QueueSpec,
    *,
    exclude: set[int],
    limit: int = 10,
    only: int | None = None,
) -> list[int]:
    """Eligible agents for a conversation, in the queue strategy's order (longest idle first);
    with ``only``, that one agent if eligible."""
    channel_load, total_load = aliased(AgentLoad), aliased(AgentLoad)
    query = (
        select(Agent.id, Agent.exclusive_channels)
        .join(
            channel_load,
            and_(
                channel_load.agent_id == Agent.id,
                channel_load.channel == conversation.channel,
                channel_load.used < channel_load.cap,
            ),
        )
        .join(
            total_load,
            and_(
                total_load.agent_id == Agent.id,
                total_load.channel == "total",
                total_load.used < total_load.cap,
            ),
        )
        .where(Agent.presence == AgentPresence.ONLINE.value, Agent.disconnected_at.is_(None))
    )
    if spec.members is not None:
        query = query.join(User, User.id == Agent.user_id).where(User.name.in_(list(spec.members)))
    else:
        for skill, level in (conversation.required_skills or {}).items():
            query = query.where(
                exists().where(
                    AgentSkill.agent_id == Agent.id,
                    AgentSkill.skill == skill,
                    AgentSkill.level >= level,
                )
            )
    if spec.language_required and conversation.language:
        query = query.where(
            exists().where(
                AgentSkill.agent_id == Agent.id,
                AgentSkill.skill == f"lang_{conversation.language}",
                AgentSkill.level >= 1,
            )
        )
    if exclude:
        query = query.where(Agent.id.not_in(list(exclude)))
    if only is not None:
        query = query.where(Agent.id == only)
    query = query.order_by(*strategy_of(spec).order_by(Scope.of(spec, conversation), total_load))
    out: list[int] = []
    page, offset = limit * 2, 0
    while len(out) < limit:  # paging on past agents busy on an exclusive channel
        rows = conn.execute(query.offset(offset).limit(page)).all()
        for row in rows:
            exclusive = row.exclusive_channels or []
            if exclusive and conversation.channel not in exclusive:
                busy = conn.execute(
                    select(func.coalesce(func.sum(AgentLoad.used), 0)).where(
                        AgentLoad.agent_id == row.id, AgentLoad.channel.in_(exclusive)
                    )
                ).scalar_one()
                if busy:
                    continue
            out.append(int(row.id))
            if len(out) >= limit:
                break
        if len(rows) < page:
            break
        offset += page
    return out


def _summary_columns(conversation_id: Any, contact_id: Any) -> tuple[Any, ...]:
    """The summary's columns, with the two references its subqueries correlate on (in a
    RETURNING clause they must be spelled out: SQLAlchemy renders its columns unqualified,
    and a bare ``id`` inside a subquery would mean the subquery's own table)."""
    return (
        Conversation.id,
        Conversation.channel,
        Conversation.state,
        Conversation.queue,
        Conversation.priority,
        Conversation.tags,
        Conversation.subject,
        Conversation.contact_id,
        Conversation.assigned_agent_id,
        Conversation.queued_at,
        Conversation.language,
        select(Contact.name)
        .where(Contact.id == contact_id)
        .scalar_subquery()
        .label("contact_name"),
        select(Message.text)
        .where(Message.conversation_id == conversation_id, Message.direction == "in")
        .order_by(Message.id.desc())
        .limit(1)
        .scalar_subquery()
        .label("preview"),
    )


_SUMMARY_COLUMNS = _summary_columns(Conversation.id, Conversation.contact_id)
_RETURNING_SUMMARY = _summary_columns(
    literal_column("conversations.id"), literal_column("conversations.contact_id")
)
_SUMMARY = prepared(select(*_SUMMARY_COLUMNS).where(Conversation.id == bindparam("cid")))
_ROTATE = prepared(
    update(table(Agent))
    .where(table(Agent).c.id == bindparam("p_agent"))
    .values(rr_position=select(func.coalesce(func.max(Agent.rr_position), 0) + 1).scalar_subquery())
)


def conversation_summary(conn: Connection, conversation_id: int) -> dict[str, Any]:
    return _summary(conn.execute(_SUMMARY, {"cid": conversation_id}).one())


def _summary(row: Any) -> dict[str, Any]:
    return {
        "conversation_id": row.id,
        "channel": row.channel,
        "state": row.state,
        "queue": row.queue,
        "priority": row.priority,
        "tags": row.tags or [],
        "subject": row.subject,
        "contact_id": row.contact_id,
        "contact_name": row.contact_name,
        "agent_id": row.assigned_agent_id,
        "queued_at": iso(row.queued_at),
        "language": row.language,
        "preview": (row.preview or "")[:280],
    }


# queued -> offered/assigned, returning the summary the agent is sent (one round trip)
_MOVE_QUEUED = prepared_each(
    {
        target: update(Conversation)
        .where(
            Conversation.id == bindparam("cid"),
            Conversation.state == S.QUEUED.value,
        )
        .values(
            state=target.value,
            updated_at=bindparam("now"),
            **({"assigned_agent_id": bindparam("p_agent")} if target == S.ASSIGNED else {}),
        )
        .returning(*_RETURNING_SUMMARY)
        for target in (S.OFFERED, S.ASSIGNED)
    }
)
_NEW_OFFER = prepared(insert(table(Offer)).returning(table(Offer).c.id))


# offers that still hold the agent's capacity and end by a decision or their expiry
_OPEN_OFFER = (OfferState.PENDING.value, OfferState.CONNECTING.value)


class LostRace(Exception):
    """The conversation left ``queued``, or the agent filled up, under us: roll back."""


def offer_now(tx: Tx, conversation_id: int, agent_id: int, spec: QueueSpec) -> dict[str, Any]:
    """One decision: offer a queued conversation to an agent (on an ``auto_accept`` queue,
    assign it). Raises :class:`LostRace` when the conversation is no longer queued or the
    agent has no capacity left; the caller's transaction (or savepoint) is then rolled back.
    The conversation is locked before the agent's capacity, the order every path keeps."""
    target = S.ASSIGNED if spec.auto_accept else S.OFFERED
    conversation = tx.execute(
        _MOVE_QUEUED[target], {"cid": conversation_id, "now": tx.now, "p_agent": agent_id}
    ).first()
    if conversation is None:
        raise LostRace
    try:
        take(tx, agent_id, conversation.channel, "offered", presence=AgentPresence.ONLINE.value)
    except CapacityFull:
        raise LostRace from None
    if strategy_of(spec).rotates:
        tx.execute(_ROTATE, {"p_agent": agent_id})
    if spec.auto_accept:
        add_event(
            tx,
            conversation.id,
            EventKind.ASSIGNED,
            Actor.SYSTEM,
            agent_id=agent_id,
            queue=conversation.queue,
            auto_accept=True,
        )
        tx.emit(
            agent_stream(agent_id),
            "assigned",
            {"conversation": _summary(conversation)},
        )
        return {"conversation_id": conversation.id, "agent_id": agent_id, "assigned": True}
    expires = tx.now + spec.offer_timeout
    offer_id = int(
        tx.execute(
            _NEW_OFFER,
            {
                "conversation_id": conversation.id,
                "agent_id": agent_id,
                "channel": conversation.channel,
                "state": OfferState.PENDING.value,
                "created_at": tx.now,
                "expires_at": expires,
            },
        ).scalar_one()
    )
    add_event(
        tx,
        conversation.id,
        EventKind.OFFERED,
        Actor.SYSTEM,
        agent_id=agent_id,
        queue=conversation.queue,
        offer_id=offer_id,
    )
    summary = _summary(conversation)
    tx.emit(
        agent_stream(agent_id),
        "offer",
        {"offer_id": offer_id, "expires_at": expires.isoformat(), "conversation": summary},
    )
    return {
        "conversation_id": conversation.id,
        "agent_id": agent_id,
        "offer_id": offer_id,
        "assigned": False,
    }


def try_offer(
    tx: Tx, conversation_id: int, agent_id: int, spec: QueueSpec
) -> dict[str, Any] | None:
    """:func:`offer_now` inside a savepoint: None (and nothing changed) if it lost a race."""
    try:
        with tx.savepoint():
            return offer_now(tx, conversation_id, agent_id, spec)
    except LostRace:
        return None


# An agent's phone leg rings for the offer timeout; its status callback may come a little later
LEG_GRACE = timedelta(seconds=30)


def _offer_gone(tx: Tx, agent_id: int, offer_id: int) -> Exception:
    row = tx.execute(
        select(Offer.state, Offer.agent_id, Offer.expires_at).where(Offer.id == offer_id)
    ).first()
    if row is None or row.agent_id != agent_id:
        return NotFound(f"no offer {offer_id} for you")
    state = "expired" if row.state == OfferState.PENDING and row.expires_at <= tx.now else row.state
    return Conflict(f"the offer is {state}", offer_state=state)


def _live_call(tx: Tx, offer_id: int) -> Any:
    """The offer's conversation if it is a call in progress (holding for an agent, or
    talking to one who transfers it): accepting it rings the agent's phone."""
    row = tx.execute(
        select(Conversation.id, Conversation.queue, Conversation.data)
        .join(Offer, Offer.conversation_id == Conversation.id)
        .where(Offer.id == offer_id)
    ).first()
    call = (row.data or {}).get("call") if row is not None else None
    return row if call and call.get("stage") in ("queued", "connected") else None


def _connect_offer(tx: Tx, agent_id: int, offer_id: int, conversation: Any) -> dict[str, Any]:
    """Accepting a waiting call rings the agent's phone into the caller's conference: the
    offer is ``connecting`` until that leg answers (then assigned) or does not (then the
    caller waits for the next agent). Capacity stays taken meanwhile."""
    phone = tx.execute(select(Agent.phone, Agent.sip).where(Agent.id == agent_id)).first()
    to = (phone.sip or phone.phone) if phone is not None else None
    if not to:
        raise Conflict("to take calls, your agent profile needs a phone number or SIP address")
    ruleset = current_ruleset(tx)
    spec = ruleset.queues.get(conversation.queue) if ruleset is not None else None
    ring = spec.offer_timeout if spec is not None else timedelta(seconds=30)
    moved = tx.execute(
        update(Offer)
        .where(
            Offer.id == offer_id,
            Offer.agent_id == agent_id,
            Offer.state == OfferState.PENDING.value,
            Offer.expires_at > tx.now,
        )
        .values(state=OfferState.CONNECTING.value, expires_at=tx.now + ring + LEG_GRACE)
        .returning(Offer.conversation_id)
    ).scalar_one_or_none()
    if moved is None:
        raise _offer_gone(tx, agent_id, offer_id)
    add_event(
        tx,
        conversation.id,
        EventKind.CALL,
        Actor.AGENT,
        agent_id=agent_id,
        what="ringing_agent",
        offer_id=offer_id,
    )
    payload = {"offer_id": offer_id, "conversation_id": conversation.id, "to": to}
    tx.emit(agent_stream(agent_id), "connecting", payload)
    return {
        "conversation_id": conversation.id,
        "offer_id": offer_id,
        "connect": {"agent_id": agent_id, "to": to, "timeout": int(ring.total_seconds())},
    }


def take_offered(tx: Tx, conversation_id: int, agent_id: int, offer_id: int, **data: Any) -> bool:
    """The offered conversation becomes the agent's, with its ``assigned`` event (``data``
    added to it) and the agent told; False if it is no longer offered."""
    moved = tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.state == S.OFFERED.value)
        .values(
            state=S.ASSIGNED.value,
            assigned_agent_id=agent_id,
            preferred_agent_id=None,
            updated_at=tx.now,
        )
        .returning(Conversation.queue, Conversation.queued_at)
    ).first()
    if moved is None:
        return False
    observe = tx.context.get("assignment_latency")
    if observe is not None and moved.queued_at is not None:
        waited = (tx.now - moved.queued_at).total_seconds()
        tx.on_commit(lambda: observe(max(0.0, waited)))
    tx.execute(update(Agent).where(Agent.id == agent_id).values(missed_offers=0))
    clear_timers(tx, conversation_id, PREFERRED)
    add_event(
        tx,
        conversation_id,
        EventKind.ASSIGNED,
        Actor.AGENT,
        agent_id=agent_id,
        queue=moved.queue,
        offer_id=offer_id,
        **data,
    )
    summary = conversation_summary(tx.conn, conversation_id)
    tx.emit(agent_stream(agent_id), "assigned", {"offer_id": offer_id, "conversation": summary})
    return True


def accept_offer(tx: Tx, agent_id: int, offer_id: int) -> dict[str, Any]:
    call = _live_call(tx, offer_id)
    if call is not None:
        return _connect_offer(tx, agent_id, offer_id, call)
    accepted = tx.execute(
        update(Offer)
        .where(
            Offer.id == offer_id,
            Offer.agent_id == agent_id,
            Offer.state == OfferState.PENDING.value,
            Offer.expires_at > tx.now,
        )
        .values(state=OfferState.ACCEPTED.value, decided_at=tx.now)
        .returning(Offer.conversation_id)
    ).scalar_one_or_none()
    if accepted is None:
        raise _offer_gone(tx, agent_id, offer_id)
    conversation_id = int(accepted)
    if not take_offered(tx, conversation_id, agent_id, offer_id):
        raise Conflict("the conversation was withdrawn")
    return {"conversation_id": conversation_id, "offer_id": offer_id}


_BACK_TO_QUEUE = prepared(
    update(Conversation)
    .where(any_of(Conversation.id, "ids"), Conversation.state == S.OFFERED.value)
    .values(state=S.QUEUED.value, updated_at=bindparam("now"))
)
_END_RESERVATION = prepared(
    update(Conversation)
    .where(any_of(Conversation.id, "ids"), Conversation.preferred_agent_id == bindparam("p_agent"))
    .values(preferred_agent_id=None)
    .returning(Conversation.id)
)


def _return_to_queue(tx: Tx, conversation_ids: list[int], agent_id: int) -> None:
    """Offers ended without an accept: the conversations go back to the queue. One that was
    reserved for this agent (preferred, sticky or a transfer to them) loses the reservation."""
    tx.execute(_BACK_TO_QUEUE, {"ids": conversation_ids, "now": tx.now})
    for row in tx.execute(_END_RESERVATION, {"ids": conversation_ids, "p_agent": agent_id}):
        clear_timers(tx, int(row.id), PREFERRED)


def reject_offer(tx: Tx, agent_id: int, offer_id: int, reason: str | None) -> int:
    row = tx.execute(
        update(Offer)
        .where(
            Offer.id == offer_id,
            Offer.agent_id == agent_id,
            Offer.state == OfferState.PENDING.value,
        )
        .values(
            state=OfferState.REJECTED.value, decided_at=tx.now, reason=(reason or "rejected")[:64]
        )
        .returning(Offer.conversation_id, Offer.channel)
    ).first()
    if row is None:
        raise Conflict("the offer is no longer pending")
    release(tx, agent_id, row.channel, "offer_rejected")
    _return_to_queue(tx, [row.conversation_id], agent_id)
    add_event(
        tx,
        row.conversation_id,
        EventKind.OFFER_REJECTED,
        Actor.AGENT,
        agent_id=agent_id,
        offer_id=offer_id,
        reason=reason,
    )
    return int(row.conversation_id)


def end_offer(tx: Tx, offer: Any, state: OfferState, kind: EventKind, reason: str) -> None:
    end_offers(tx, offer.agent_id, [offer], state, kind, reason)


def end_offers(
    tx: Tx, agent_id: int, offers: list[Any], state: OfferState, kind: EventKind, reason: str
) -> None:
    """Offers of one agent ended (their rows already updated): capacity back, conversations
    back to their queue, in statements per agent rather than per offer, so that a whole floor
    of agents dropping at once does not stall the writer; an event and a frame per offer."""
    release_many(tx, agent_id, Counter(o.channel for o in offers), f"offer_{state.value}")
    _return_to_queue(tx, [int(o.conversation_id) for o in offers], agent_id)
    for offer in offers:
        add_event(
            tx,
            offer.conversation_id,
            kind,
            Actor.SYSTEM,
            agent_id=agent_id,
            offer_id=offer.id,
            reason=reason,
        )
        tx.emit(
            agent_stream(agent_id),
            "offer_withdrawn",
            {"offer_id": offer.id, "conversation_id": offer.conversation_id, "reason": reason},
        )


def due_offers(conn: Connection, now: Any, limit: int = 500) -> list[int]:
    """Pending offers whose time is up (each is expired in a transaction of its own)."""
    return [
        int(i)
        for i in conn.execute(
            select(Offer.id)
            .where(Offer.state.in_(_OPEN_OFFER), Offer.expires_at <= now)
            .order_by(Offer.id)
            .limit(limit)
        ).scalars()
    ]


def expire_offer(tx: Tx, offer_id: int, queues: dict[str, QueueSpec]) -> int | None:
    """Expire one due offer: capacity back, the conversation back to its queue, a miss
    counted; ``max_missed_offers`` misses in a row set the agent away. Conditional, so it
    fires once however many processes try (and again after a restart if it was missed)."""
    offer = tx.execute(
        update(Offer)
        .where(
            Offer.id == offer_id,
            Offer.state.in_(_OPEN_OFFER),
            Offer.expires_at <= tx.now,
        )
        .values(state=OfferState.EXPIRED.value, decided_at=tx.now)
        .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
    ).first()
    if offer is None:
        return None
    end_offer(tx, offer, OfferState.EXPIRED, EventKind.OFFER_EXPIRED, "expired")
    missed = tx.execute(
        update(Agent)
        .where(Agent.id == offer.agent_id)
        .values(missed_offers=Agent.missed_offers + 1)
        .returning(Agent.missed_offers, Agent.presence)
    ).one()
    queue = tx.execute(
        select(Conversation.queue).where(Conversation.id == offer.conversation_id)
    ).scalar_one()
    limit_missed = queues[queue].max_missed_offers if queue in queues else 3
    if missed.missed_offers >= limit_missed and missed.presence == AgentPresence.ONLINE:
        set_presence(
            tx, offer.agent_id, AgentPresence.AWAY, f"missed {missed.missed_offers} offers in a row"
        )
    return int(offer.conversation_id)


_WITHDRAW = prepared(
    update(Offer)
    .where(Offer.agent_id == bindparam("p_agent"), Offer.state == OfferState.PENDING.value)
    .values(state=OfferState.WITHDRAWN.value, decided_at=bindparam("now"), reason=bindparam("why"))
    .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
)
_PRESENCE_OF = prepared(select(Agent.presence).where(Agent.id == bindparam("p_agent")))
_SET_PRESENCE = prepared_each(
    {
        online: update(Agent)
        .where(Agent.id == bindparam("p_agent"))
        .values(
            presence=bindparam("presence"),
            presence_changed_at=bindparam("now"),
            **({"missed_offers": 0} if online else {}),
        )
        for online in (True, False)
    }
)


def withdraw_offers(tx: Tx, agent_id: int, reason: str) -> list[int]:
    pending = tx.execute(_WITHDRAW, {"p_agent": agent_id, "now": tx.now, "why": reason[:64]}).all()
    if pending:
        end_offers(tx, agent_id, pending, OfferState.WITHDRAWN, EventKind.OFFER_WITHDRAWN, reason)
    return [int(o.conversation_id) for o in pending]


def set_presence(tx: Tx, agent_id: int, presence: AgentPresence, reason: str) -> list[int]:
    """Change presence; going away or offline withdraws pending offers (returned)."""
    current = tx.execute(_PRESENCE_OF, {"p_agent": agent_id}).scalar_one_or_none()
    if current is None:
        raise NotFound(f"no agent {agent_id}")
    withdrawn: list[int] = []
    online = presence == AgentPresence.ONLINE
    if not online:
        withdrawn = withdraw_offers(tx, agent_id, f"agent {presence.value}")
    if current != presence.value:
        tx.execute(
            _SET_PRESENCE[online],
            {"p_agent": agent_id, "presence": presence.value, "now": tx.now},
        )
        record_status(tx, agent_id, presence.value, reason)
        payload = {"agent_id": agent_id, "presence": presence.value, "reason": reason}
        tx.emit(agent_stream(agent_id), "presence", payload)
        tx.emit(SUPERVISORS, "agent_presence", payload)
    return withdrawn


def resolve_conversation(tx: Tx, agent_id: int, conversation_id: int) -> dict[str, Any]:
    """The agent resolved it: the SLA clocks stop, capacity is released (after the queue's
    wrap-up, if any) and closing is scheduled for the end of the reopen window."""
    row = flow.owned(tx, agent_id, conversation_id)
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(state=S.RESOLVED.value, resolved_at=tx.now, updated_at=tx.now)
    )
    add_event(
        tx, conversation_id, EventKind.RESOLVED, Actor.AGENT, agent_id=agent_id, queue=row.queue
    )
    until = flow.after_resolve(tx, row, current_ruleset(tx))
    send_survey(tx, conversation_id)
    payload = {
        "conversation_id": conversation_id,
        "state": S.RESOLVED.value,
        "wrap_up_until": iso(until),
    }
    tx.emit(agent_stream(agent_id), "conversation_updated", payload)
    return payload


def assign_manually(
    tx: Tx, conversation_id: int, agent_id: int, *, by: str, override: bool = False
) -> None:
    """A supervisor assigns (or reassigns) a conversation. Capacity is respected unless the
    supervisor explicitly overrides it, which is recorded on the event."""
    row = tx.execute(select(Conversation).where(Conversation.id == conversation_id)).first()
    if row is None:
        raise NotFound(f"no conversation {conversation_id}")
    if row.state not in (S.QUEUED, S.OFFERED, S.ASSIGNED, S.WAITING_CUSTOMER):
        raise Conflict(f"a {row.state} conversation cannot be assigned")
    if row.assigned_agent_id == agent_id:
        return
    name = tx.execute(
        select(User.name).join(Agent, Agent.user_id == User.id).where(Agent.id == agent_id)
    ).scalar_one_or_none()
    if name is None:
        raise NotFound(f"no agent {agent_id}")
    if row.state == S.OFFERED:
        pending = tx.execute(
            update(Offer)
            .where(
                Offer.conversation_id == conversation_id, Offer.state == OfferState.PENDING.value
            )
            .values(
                state=OfferState.WITHDRAWN.value,
                decided_at=tx.now,
                reason="assigned by a supervisor",
            )
            .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
        ).all()
        for offer in pending:
            end_offer(
                tx,
                offer,
                OfferState.WITHDRAWN,
                EventKind.OFFER_WITHDRAWN,
                "assigned by a supervisor",
            )
    elif row.assigned_agent_id is not None:
        if flow.holds_capacity(row):
            release(tx, row.assigned_agent_id, row.channel, "reassigned")
        add_event(
            tx,
            conversation_id,
            EventKind.UNASSIGNED,
            Actor.SUPERVISOR,
            agent_id=row.assigned_agent_id,
            queue=row.queue,
            by=by,
        )
        tx.emit(
            agent_stream(row.assigned_agent_id),
            "unassigned",
            {"conversation_id": conversation_id, "reason": f"reassigned by {by}"},
        )
    if not claim(tx, agent_id, row.channel, "assigned by a supervisor", force=override):
        raise CapacityExceeded(
            f"{name} has no free {row.channel} capacity (a supervisor may override it explicitly)"
        )
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(
            state=S.ASSIGNED.value,
            assigned_agent_id=agent_id,
            preferred_agent_id=None,
            updated_at=tx.now,
        )
    )
    add_event(
        tx,
        conversation_id,
        EventKind.ASSIGNED,
        Actor.SUPERVISOR,
        agent_id=agent_id,
        queue=row.queue,
        by=by,
        manual=True,
        override=override,
    )
    tx.emit(
        agent_stream(agent_id),
        "assigned",
        {"conversation": conversation_summary(tx.conn, conversation_id)},
    )


_WAITING_STATES = (S.NEW.value, S.QUEUED.value, S.OFFERED.value)
_OPEN_OFFERS = (OfferState.PENDING.value, OfferState.CONNECTING.value)


def abandon(tx: Tx, conversation_id: int, waited: float | None, reason: str, **data: Any) -> bool:
    """The customer left before an agent joined (a caller hung up, a web-chat visitor went
    away): offers withdrawn, capacity freed, the conversation closed, an ``abandoned`` event
    with the wait. ``data`` is merged into the conversation's data. False if an agent had
    already taken it."""
    row = tx.execute(
        select(Conversation).where(Conversation.id == conversation_id).with_for_update()
    ).first()
    if row is None or row.state not in _WAITING_STATES:
        return False
    offers = tx.execute(
        update(Offer)
        .where(Offer.conversation_id == conversation_id, Offer.state.in_(_OPEN_OFFERS))
        .values(state=OfferState.WITHDRAWN.value, decided_at=tx.now, reason=reason)
        .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
    ).all()
    for offer in offers:
        end_offer(tx, offer, OfferState.WITHDRAWN, EventKind.OFFER_WITHDRAWN, reason)
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(
            state=S.CLOSED.value,
            closed_at=tx.now,
            updated_at=tx.now,
            data={**(row.data or {}), **data},
        )
    )
    clear_timers(tx, conversation_id)
    add_event(
        tx,
        conversation_id,
        EventKind.ABANDONED,
        queue=row.queue,
        wait_seconds=waited,
        reason=reason,
    )
    tx.emit(
        SUPERVISORS,
        "abandoned",
        {
            "conversation_id": conversation_id,
            "queue": row.queue,
            "wait_seconds": waited,
            "reason": reason,
        },
    )
    return True
