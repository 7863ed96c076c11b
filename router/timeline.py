"""The contact's timeline: every message across channels and conversations, in order.

Agents see it on accept and in the conversation view. A web-chat visitor never sees it:
visitors get only their own messages (``visitor_history``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Connection, or_, select

from router.models import (
    Contact,
    Conversation,
    ConversationEvent,
    Inbox,
    Message,
    RoutingDecision,
)
from router.serialize import iso, message_payload, visitor_payload

__all__ = ["contact_timeline", "conversation_detail", "visitor_history"]


def contact_timeline(
    conn: Connection,
    contact_id: int,
    *,
    limit: int = 100,
    before: int | None = None,
    visible: ColumnElement[bool] | None = None,
) -> dict[str, Any]:
    """The newest ``limit`` messages of the contact (before message id ``before``), oldest
    first, with the conversations they belong to, how each was routed and their events
    (routing, assignment, merges...) over the same span. A merged contact's timeline is
    its survivor's. ``visible`` (router.policy) keeps the conversations the reader may
    read; the others' messages and events are left out."""
    for _ in range(16):
        merged_into = conn.execute(
            select(Contact.merged_into_id).where(Contact.id == contact_id)
        ).scalar_one_or_none()
        if merged_into is None:
            break
        contact_id = int(merged_into)
    # each message's channel is its inbox's: one conversation may hold several channels
    # (a call answered by SMS, a chat continued by email)
    query = (
        select(Message, Inbox.channel.label("inbox_channel"))
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(Inbox, Inbox.id == Message.inbox_id)
        .where(Conversation.contact_id == contact_id)
    )
    if visible is not None:
        query = query.where(visible)
    if before is not None:
        query = query.where(Message.id < before)
    rows = conn.execute(query.order_by(Message.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit][::-1]
    conversation_ids = sorted({r.conversation_id for r in rows})
    conversations = {
        c.id: {
            "id": c.id,
            "channel": c.channel,
            "state": c.state,
            "queue": c.queue,
            "created_at": iso(c.created_at),
            "previous_id": c.previous_id,
        }
        for c in conn.execute(select(Conversation).where(Conversation.id.in_(conversation_ids)))
    }
    for d in conn.execute(
        select(RoutingDecision)
        .where(RoutingDecision.conversation_id.in_(conversation_ids))
        .order_by(RoutingDecision.id)
    ):
        conversations[d.conversation_id].setdefault("decisions", []).append(
            {
                "id": d.id,
                "rule": d.decision.get("rule"),
                "queue": d.decision.get("queue"),
                "at": iso(d.created_at),
            }
        )
    events = select(ConversationEvent).where(
        ConversationEvent.conversation_id.in_(conversation_ids)
    )
    if rows and more:  # the events of this page's span of time; the older page has the rest
        events = events.where(ConversationEvent.at >= rows[0].created_at)
    if rows and before is not None:
        events = events.where(ConversationEvent.at <= rows[-1].created_at)
    return {
        "contact_id": contact_id,
        "messages": [message_payload(r, r.inbox_channel) for r in rows],
        "events": [
            {
                "conversation_id": e.conversation_id,
                "kind": e.kind,
                "at": iso(e.at),
                "actor": e.actor,
                "agent_id": e.agent_id,
                "queue": e.queue,
                "data": e.data or {},
            }
            for e in conn.execute(events.order_by(ConversationEvent.id).limit(1000))
        ],
        "conversations": [conversations[i] for i in conversation_ids],
        "next_before": rows[0].id if more and rows else None,
    }


def conversation_detail(
    conn: Connection,
    conversation_id: int,
    *,
    limit: int = 100,
    visible: ColumnElement[bool] | None = None,
) -> dict[str, Any] | None:
    conversation = conn.execute(
        select(Conversation).where(Conversation.id == conversation_id)
    ).first()
    if conversation is None:
        return None
    contact = conn.execute(
        select(Contact.id, Contact.name, Contact.language, Contact.vip).where(
            Contact.id == conversation.contact_id
        )
    ).one()
    return {
        "conversation": {
            "id": conversation.id,
            "channel": conversation.channel,
            "state": conversation.state,
            "queue": conversation.queue,
            "priority": conversation.priority,
            "tags": conversation.tags or [],
            "subject": conversation.subject,
            "agent_id": conversation.assigned_agent_id,
            "language": conversation.language,
            "created_at": iso(conversation.created_at),
            "first_response_at": iso(conversation.first_response_at),
            "resolved_at": iso(conversation.resolved_at),
        },
        "contact": {
            "id": contact.id,
            "name": contact.name,
            "language": contact.language,
            "vip": contact.vip,
        },
        "timeline": contact_timeline(conn, conversation.contact_id, limit=limit, visible=visible),
    }


def visitor_history(
    conn: Connection, identity_id: int, *, limit: int = 200
) -> list[dict[str, Any]]:
    """What a web-chat visitor may see: their own messages and the replies sent to them."""
    rows = conn.execute(
        select(Message)
        .where(
            Message.identity_id == identity_id,
            Message.is_note.is_(False),
            or_(Message.direction == "in", Message.direction == "out"),
        )
        .order_by(Message.id.desc())
        .limit(limit)
    ).all()
    return [visitor_payload(r) for r in reversed(rows)]
