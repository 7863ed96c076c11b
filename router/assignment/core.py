"""Assignment decisions, each one transaction of conditional updates.

Eligibility: online AND (in the queue's ``members`` if set, else every required skill at or
above its minimum) AND free capacity for the channel and in ``total`` AND (when the queue
has ``language_required``) the ``lang_<code>`` skill of the conversation's language AND not
exclusively busy (``exclusive_channels: [voice]`` takes nothing else while on a call).

Queue order: priority (urgent first), then time in queue. An offer reserves capacity until
it is accepted, rejected, expired or withdrawn; accepting is
``UPDATE offers ... WHERE state = 'pending' AND expires_at > now`` checked by rowcount, so
accept racing expiry has exactly one winner. A partial unique index allows one pending
offer per conversation; conversation moves are conditional on the state they leave.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, func, insert, select, update
from sqlalchemy.orm import aliased

from router.agents import record_status
from router.assignment.capacity import claim, holds_while_waiting, release
from router.db import Tx
from router.events import SUPERVISORS, add_event, agent_stream
from router.exceptions import Conflict, InvalidInput, NotFound
from router.models import Agent, AgentLoad, AgentSkill, Contact, Conversation, Message, Offer, User
from router.serialize import iso
from router.types import Actor, AgentPresence, ConversationState, EventKind, OfferState
from routing_rules import QueueSpec

__all__ = [
    "accept_offer",
    "candidate_agents",
    "conversation_summary",
    "expire_offers",
    "reject_offer",
    "resolve_conversation",
    "set_presence",
    "transfer_conversation",
    "try_offer",
    "withdraw_offers",
]

S = ConversationState


def candidate_agents(
    conn: Connection, conversation: Any, spec: QueueSpec, *, exclude: set[int], limit: int = 10
) -> list[int]:
    """Eligible agents for a conversation, in the queue strategy's order (longest idle first)."""
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
    rows = conn.execute(query.order_by(Agent.idle_since, Agent.id).limit(limit * 2)).all()
    out = []
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
    return out


_PREVIEW = (
    select(Message.text)
    .where(Message.conversation_id == Conversation.id, Message.direction == "in")
    .order_by(Message.id.desc())
    .limit(1)
    .scalar_subquery()
)
_SUMMARY = (
    select(
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
        Contact.name.label("contact_name"),
        _PREVIEW.label("preview"),
    )
    .join(Contact, Contact.id == Conversation.contact_id)
    .where(Conversation.id == bindparam("cid"))
)
_QUEUED = select(Conversation.id, Conversation.channel, Conversation.queue).where(
    Conversation.id == bindparam("cid"), Conversation.state == S.QUEUED.value
)
_QUEUED_LOCKED = _QUEUED.with_for_update(skip_locked=True, key_share=True)


def conversation_summary(conn: Connection, conversation_id: int) -> dict[str, Any]:
    row = conn.execute(_SUMMARY, {"cid": conversation_id}).one()
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


def _lock_queued(tx: Tx, conversation_id: int) -> Any:
    return tx.execute(
        _QUEUED_LOCKED if tx.dialect == "postgresql" else _QUEUED, {"cid": conversation_id}
    ).first()


def _make_offer(tx: Tx, conversation: Any, agent_id: int, spec: QueueSpec) -> dict[str, Any] | None:
    """Reserve capacity and offer (or, on an auto_accept queue, assign). None if it lost a race."""
    if not claim(tx, agent_id, conversation.channel, "offered"):
        return None
    target = S.ASSIGNED if spec.auto_accept else S.OFFERED
    values: dict[str, Any] = {"state": target.value, "updated_at": tx.now}
    if spec.auto_accept:
        values["assigned_agent_id"] = agent_id
    moved = tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation.id, Conversation.state == S.QUEUED.value)
        .values(**values)
    ).rowcount
    if not moved:
        raise _LostRace
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
        summary = conversation_summary(tx.conn, conversation.id)
        tx.emit(agent_stream(agent_id), "assigned", {"conversation": summary})
        return {"conversation_id": conversation.id, "agent_id": agent_id, "assigned": True}
    expires = tx.now + spec.offer_timeout
    offer_id = int(
        tx.execute(
            insert(Offer)
            .values(
                conversation_id=conversation.id,
                agent_id=agent_id,
                channel=conversation.channel,
                state=OfferState.PENDING.value,
                created_at=tx.now,
                expires_at=expires,
            )
            .returning(Offer.id)
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
    summary = conversation_summary(tx.conn, conversation.id)
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


class _LostRace(Exception):
    """The conversation left ``queued`` under us: undo this attempt (savepoint)."""


def try_offer(
    tx: Tx, conversation_id: int, agent_id: int, spec: QueueSpec
) -> dict[str, Any] | None:
    """Offer one queued conversation to one agent, or None (and nothing changed) if either lost a race."""
    try:
        with tx.savepoint():
            conversation = _lock_queued(tx, conversation_id)
            if conversation is None:
                raise _LostRace
            return _make_offer(tx, conversation, agent_id, spec)
    except _LostRace:
        return None


def accept_offer(tx: Tx, agent_id: int, offer_id: int) -> dict[str, Any]:
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
        row = tx.execute(
            select(Offer.state, Offer.agent_id, Offer.expires_at).where(Offer.id == offer_id)
        ).first()
        if row is None or row.agent_id != agent_id:
            raise NotFound(f"no offer {offer_id} for you")
        state = (
            "expired" if row.state == OfferState.PENDING and row.expires_at <= tx.now else row.state
        )
        raise Conflict(f"the offer is {state}", offer_state=state)
    conversation_id = int(accepted)
    moved = tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.state == S.OFFERED.value)
        .values(
            state=S.ASSIGNED.value,
            assigned_agent_id=agent_id,
            preferred_agent_id=None,
            updated_at=tx.now,
        )
    ).rowcount
    if not moved:
        raise Conflict("the conversation was withdrawn")
    tx.execute(update(Agent).where(Agent.id == agent_id).values(missed_offers=0))
    queue = tx.execute(
        select(Conversation.queue).where(Conversation.id == conversation_id)
    ).scalar_one()
    add_event(
        tx,
        conversation_id,
        EventKind.ASSIGNED,
        Actor.AGENT,
        agent_id=agent_id,
        queue=queue,
        offer_id=offer_id,
    )
    summary = conversation_summary(tx.conn, conversation_id)
    tx.emit(agent_stream(agent_id), "assigned", {"offer_id": offer_id, "conversation": summary})
    return {"conversation_id": conversation_id, "offer_id": offer_id}


def _return_to_queue(tx: Tx, conversation_id: int, from_state: S) -> None:
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.state == from_state.value)
        .values(state=S.QUEUED.value, updated_at=tx.now)
    )


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
    _return_to_queue(tx, row.conversation_id, S.OFFERED)
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


def _end_offer(tx: Tx, offer: Any, state: OfferState, kind: EventKind, reason: str) -> None:
    release(tx, offer.agent_id, offer.channel, f"offer_{state.value}")
    _return_to_queue(tx, offer.conversation_id, S.OFFERED)
    add_event(
        tx,
        offer.conversation_id,
        kind,
        Actor.SYSTEM,
        agent_id=offer.agent_id,
        offer_id=offer.id,
        reason=reason,
    )
    tx.emit(
        agent_stream(offer.agent_id),
        "offer_withdrawn",
        {"offer_id": offer.id, "conversation_id": offer.conversation_id, "reason": reason},
    )


def expire_offers(tx: Tx, queues: dict[str, QueueSpec], limit: int = 200) -> list[int]:
    """Expire due offers: capacity back, conversation back to its queue, a miss counted.
    An agent who misses ``max_missed_offers`` in a row is set away."""
    due = tx.execute(
        update(Offer)
        .where(
            Offer.id.in_(
                select(Offer.id)
                .where(Offer.state == OfferState.PENDING.value, Offer.expires_at <= tx.now)
                .limit(limit)
            ),
            Offer.state == OfferState.PENDING.value,
        )
        .values(state=OfferState.EXPIRED.value, decided_at=tx.now)
        .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
    ).all()
    for offer in due:
        _end_offer(tx, offer, OfferState.EXPIRED, EventKind.OFFER_EXPIRED, "expired")
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
                tx,
                offer.agent_id,
                AgentPresence.AWAY,
                f"missed {missed.missed_offers} offers in a row",
            )
    return [int(o.conversation_id) for o in due]


def withdraw_offers(tx: Tx, agent_id: int, reason: str) -> list[int]:
    pending = tx.execute(
        update(Offer)
        .where(Offer.agent_id == agent_id, Offer.state == OfferState.PENDING.value)
        .values(state=OfferState.WITHDRAWN.value, decided_at=tx.now, reason=reason[:64])
        .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
    ).all()
    for offer in pending:
        _end_offer(tx, offer, OfferState.WITHDRAWN, EventKind.OFFER_WITHDRAWN, reason)
    return [int(o.conversation_id) for o in pending]


def set_presence(tx: Tx, agent_id: int, presence: AgentPresence, reason: str) -> list[int]:
    """Change presence; going away or offline withdraws pending offers (returned)."""
    current = tx.execute(select(Agent.presence).where(Agent.id == agent_id)).scalar_one_or_none()
    if current is None:
        raise NotFound(f"no agent {agent_id}")
    withdrawn: list[int] = []
    if presence != AgentPresence.ONLINE:
        withdrawn = withdraw_offers(tx, agent_id, f"agent {presence.value}")
    values: dict[str, Any] = {"presence": presence.value, "presence_changed_at": tx.now}
    if presence == AgentPresence.ONLINE:
        values["missed_offers"] = 0
    if current != presence.value:
        tx.execute(update(Agent).where(Agent.id == agent_id).values(**values))
        record_status(tx, agent_id, presence.value, reason)
        payload = {"agent_id": agent_id, "presence": presence.value, "reason": reason}
        tx.emit(agent_stream(agent_id), "presence", payload)
        tx.emit(SUPERVISORS, "agent_presence", payload)
    return withdrawn


def _owned(tx: Tx, agent_id: int, conversation_id: int) -> Any:
    row = tx.execute(select(Conversation).where(Conversation.id == conversation_id)).first()
    if row is None:
        raise NotFound(f"no conversation {conversation_id}")
    if row.assigned_agent_id != agent_id or row.state not in (S.ASSIGNED, S.WAITING_CUSTOMER):
        raise Conflict("the conversation is not assigned to you")
    return row


def _holds_capacity(row: Any) -> bool:
    return row.state == S.ASSIGNED or (
        row.state == S.WAITING_CUSTOMER and holds_while_waiting(row.channel)
    )


def resolve_conversation(tx: Tx, agent_id: int, conversation_id: int) -> None:
    row = _owned(tx, agent_id, conversation_id)
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(state=S.RESOLVED.value, resolved_at=tx.now, updated_at=tx.now)
    )
    if _holds_capacity(row):
        release(tx, agent_id, row.channel, "resolved")
    add_event(
        tx, conversation_id, EventKind.RESOLVED, Actor.AGENT, agent_id=agent_id, queue=row.queue
    )
    tx.emit(
        agent_stream(agent_id),
        "conversation_updated",
        {"conversation_id": conversation_id, "state": S.RESOLVED.value},
    )


def transfer_conversation(
    tx: Tx,
    agent_id: int,
    conversation_id: int,
    queues: dict[str, QueueSpec],
    *,
    to_queue: str | None,
    to_agent: int | None,
    note: str | None,
) -> None:
    """Hand over: to a queue (it enters with that queue's skills) or to a named agent (offered
    to them only). A note travels with it."""
    row = _owned(tx, agent_id, conversation_id)
    if (to_queue is None) == (to_agent is None):
        raise InvalidInput("transfer to a queue or to an agent")
    queue = to_queue or row.queue
    if queue not in queues:
        raise InvalidInput(f'unknown queue "{queue}"')
    if (
        to_agent is not None
        and tx.execute(select(Agent.id).where(Agent.id == to_agent)).first() is None
    ):
        raise NotFound(f"no agent {to_agent}")
    if _holds_capacity(row):
        release(tx, agent_id, row.channel, "transferred")
    skills = dict(queues[queue].skills) if to_queue else row.required_skills
    tx.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(
            state=S.QUEUED.value,
            queue=queue,
            required_skills=skills,
            assigned_agent_id=None,
            preferred_agent_id=to_agent,
            queued_at=tx.now,
            updated_at=tx.now,
        )
    )
    add_event(
        tx,
        conversation_id,
        EventKind.TRANSFERRED,
        Actor.AGENT,
        agent_id=agent_id,
        queue=queue,
        to_queue=to_queue,
        to_agent=to_agent,
        note=note,
    )
    add_event(tx, conversation_id, EventKind.QUEUED, Actor.SYSTEM, queue=queue)
    tx.emit(
        agent_stream(agent_id),
        "conversation_updated",
        {"conversation_id": conversation_id, "state": S.QUEUED.value, "transferred": True},
    )
