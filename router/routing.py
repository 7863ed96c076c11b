"""Routing: evaluate the rules for a conversation and record the decision.

Runs when a conversation is created, reopened, or explicitly sent back to routing; never on
every message. The move out of ``new`` is a conditional update, so two processes (or the
sweep and the hand-off racing) route a conversation exactly once. Every decision is stored
with its facts and ruleset version and can be replayed (``rules explain --decision``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from router.db import Tx
from router.events import add_event
from router.models import Agent as AgentRow
from router.models import (
    Contact,
    ContactIdentity,
    Conversation,
    Inbox,
    Message,
    RoutingDecision,
    User,
)
from router.outbox import enqueue_message
from router.types import Actor, ConversationState, EventKind, Priority
from routing_rules import Decision, Ruleset, evaluate

__all__ = ["RouteResult", "build_facts", "route_conversation"]


@dataclass(frozen=True, slots=True)
class RouteResult:
    conversation_id: int
    queue: str
    priority: int
    decision_id: int
    reply_message_id: int | None


def _routing_message(conn: Connection, conversation: Conversation) -> Any:
    """The message that opened (or reopened) the conversation: its text routes it."""
    query = select(Message).where(
        Message.conversation_id == conversation.id, Message.direction == "in"
    )
    reopen_external = (conversation.data or {}).get("reopen_message")
    if reopen_external:
        query = query.where(Message.external_id == reopen_external)
    return conn.execute(query.order_by(Message.id).limit(1)).first()


def build_facts(
    conn: Connection, conversation: Conversation, ruleset: Ruleset, now_iso: str
) -> dict[str, Any]:
    """The facts registry's values for this conversation (JSON-safe, stored with the decision)."""
    contact = conn.execute(select(Contact).where(Contact.id == conversation.contact_id)).one()
    inbox = conn.execute(select(Inbox.slug).where(Inbox.id == conversation.inbox_id)).scalar_one()
    message = _routing_message(conn, conversation)
    email = (
        contact.email
        or conn.execute(
            select(ContactIdentity.address)
            .where(
                ContactIdentity.contact_id == contact.id,
                ContactIdentity.kind == "email",
                ContactIdentity.verified.is_(True),
            )
            .limit(1)
        ).scalar_one_or_none()
    )
    facts: dict[str, Any] = {
        "channel": conversation.channel,
        "inbox": inbox,
        "contact.name": contact.name,
        "contact.email": email,
        "contact.phone": contact.phone,
        "contact.language": contact.language,
        "contact.tier": contact.tier,
        "contact.vip": bool(contact.vip),
        "message.text": message.text if message is not None else None,
        "message.subject": (message.subject if message is not None else None)
        or conversation.subject,
        "message.language": (message.data or {}).get("language") if message is not None else None,
        "conversation.tags": list(conversation.tags or []),
        "conversation.reopened": bool((conversation.data or {}).get("reopened")),
        "time": now_iso,
    }
    for name in ruleset.attributes:
        facts[f"contact.{name}"] = (contact.attributes or {}).get(name)
    return {k: v for k, v in facts.items() if v is not None}


def _decision_for_inbox(
    decision: Decision, ruleset: Ruleset, default_queue: str | None
) -> Decision:
    """When no rule matched, the inbox's ``default_queue`` (if set) replaces ``default.queue``."""
    if decision.rule is not None or not default_queue or default_queue not in ruleset.queues:
        return decision
    skills = dict(ruleset.queues[default_queue].skills)
    for skill, level in ruleset.default.skills.items():
        skills[skill] = max(level, skills.get(skill, 0))
    return Decision(
        None,
        default_queue,
        decision.priority,
        skills,
        decision.tags,
        decision.reply,
        decision.agent,
        decision.ruleset,
    )


def route_conversation(tx: Tx, conversation_id: int, ruleset: Ruleset) -> RouteResult | None:
    """Route a ``new`` conversation; None if it is not ``new`` any more (someone else did)."""
    query = select(Conversation).where(Conversation.id == conversation_id)
    if tx.dialect == "postgresql":
        query = query.with_for_update(skip_locked=True, key_share=True)
    conversation = tx.execute(query).first()
    if conversation is None or conversation.state != ConversationState.NEW:
        return None
    facts = build_facts(tx.conn, conversation, ruleset, tx.now.isoformat())
    default_queue = tx.execute(
        select(Inbox.default_queue).where(Inbox.id == conversation.inbox_id)
    ).scalar_one_or_none()
    decision = _decision_for_inbox(evaluate(facts, ruleset), ruleset, default_queue)
    decision_id = int(
        tx.execute(
            insert(RoutingDecision)
            .values(
                conversation_id=conversation_id,
                ruleset_version=ruleset.version,
                facts=facts,
                decision=decision.to_dict(),
                created_at=tx.now,
            )
            .returning(RoutingDecision.id)
        ).scalar_one()
    )
    preferred = None
    if decision.agent:
        preferred = tx.execute(
            select(AgentRow.id)
            .join(User, User.id == AgentRow.user_id)
            .where(User.name == decision.agent)
        ).scalar_one_or_none()
    tags = list(dict.fromkeys([*(conversation.tags or []), *decision.tags]))
    priority = int(Priority.parse(decision.priority))
    data = {k: v for k, v in (conversation.data or {}).items() if k != "reopen_message"}
    moved = tx.execute(
        update(Conversation)
        .where(
            Conversation.id == conversation_id, Conversation.state == ConversationState.NEW.value
        )
        .values(
            state=ConversationState.QUEUED.value,
            queue=decision.queue,
            priority=priority,
            required_skills=dict(decision.skills),
            tags=tags,
            routing_decision_id=decision_id,
            preferred_agent_id=preferred,
            queued_at=tx.now,
            updated_at=tx.now,
            data=data,
        )
    ).rowcount
    if moved != 1:
        return None
    add_event(
        tx,
        conversation_id,
        EventKind.ROUTED,
        queue=decision.queue,
        decision_id=decision_id,
        rule=decision.rule,
        ruleset=ruleset.version,
    )
    add_event(
        tx, conversation_id, EventKind.QUEUED, queue=decision.queue, priority=decision.priority
    )
    reply_id = None
    if decision.reply and not conversation.auto_reply_sent and decision.reply in ruleset.templates:
        text = ruleset.templates[decision.reply].render(facts)
        reply_id = enqueue_message(
            tx, conversation_id, text, author=Actor.SYSTEM, is_auto=True, template=decision.reply
        )
        if reply_id is not None:
            tx.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(auto_reply_sent=True)
            )
    return RouteResult(conversation_id, decision.queue, priority, decision_id, reply_id)
