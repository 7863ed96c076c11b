"""Routing: evaluate the rules for conversations and record each decision.

Runs when a conversation is created, reopened, or explicitly sent back to routing; never on
every message. Conversations are routed after their ingest committed, in batches (one
transaction, a savepoint each): what the ingest created while a batch ran is routed by the
next. The move out of ``new`` is a conditional update (and ``SKIP LOCKED`` on PostgreSQL),
so two processes route a conversation exactly once. Every decision is stored with its facts
and ruleset version and can be replayed (``omniroute rules explain --decision``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, case, func, insert, select, update

from router.assignment import flow, sla
from router.csat import last_score
from router.db import Tx, any_of, prepared
from router.events import add_event
from router.models import (
    Agent,
    Contact,
    ContactIdentity,
    Conversation,
    Inbox,
    Message,
    RoutingDecision,
    User,
    table,
)
from router.outbox import enqueue_message
from router.types import OPEN_STATES, Actor, ConversationState, EventKind, Priority
from routing_rules import Decision, Ruleset, evaluate

__all__ = ["ROUTE_BATCH", "RouteResult", "conversation_facts", "decision_for_inbox", "route_batch"]

ROUTE_BATCH = 200

_CLOCKS = (
    Conversation.sla_first_response_due_at,
    Conversation.sla_resolution_due_at,
    Conversation.sla_resolution_since,
    Conversation.sla_resolution_used_s,
    Conversation.sla_due_at,
)
_CONVERSATION = (
    select(
        Conversation.id,
        Conversation.channel,
        Conversation.tags,
        Conversation.data,
        Conversation.subject,
        Conversation.auto_reply_sent,
        Conversation.created_at,
        Conversation.contact_id,
        Contact.name,
        Contact.email,
        Contact.phone,
        Contact.language,
        Contact.tier,
        Contact.vip,
        Contact.attributes,
        Inbox.slug,
        Inbox.default_queue,
        Conversation.queue_entered_at,
        *_CLOCKS,
    )
    .join(Contact, Contact.id == Conversation.contact_id)
    .join(Inbox, Inbox.id == Conversation.inbox_id)
)
_NEW = prepared(
    _CONVERSATION.where(Conversation.state == ConversationState.NEW.value)
    .order_by(Conversation.id)
    .limit(bindparam("limit"))
)
_ONE = prepared(_CONVERSATION.where(Conversation.id == bindparam("cid")))
_FIRST_IN = prepared(
    select(Message.conversation_id, Message.text, Message.subject, Message.data).where(
        Message.id.in_(
            select(func.min(Message.id))
            .where(any_of(Message.conversation_id, "ids"), Message.direction == "in")
            .group_by(Message.conversation_id)
        )
    )
)
_BY_EXTERNAL = prepared(
    select(Message.text, Message.subject, Message.data).where(
        Message.conversation_id == bindparam("cid"), Message.external_id == bindparam("external")
    )
)
_EMAILS = prepared(
    select(ContactIdentity.contact_id, func.min(ContactIdentity.address).label("address"))
    .where(
        any_of(ContactIdentity.contact_id, "ids"),
        ContactIdentity.kind == "email",
        ContactIdentity.verified.is_(True),
    )
    .group_by(ContactIdentity.contact_id)
)
_DECISION = prepared(insert(table(RoutingDecision)).returning(table(RoutingDecision).c.id))
_ROUTED = prepared(
    update(table(Conversation))
    .where(
        table(Conversation).c.id == bindparam("cid"),
        table(Conversation).c.state == ConversationState.NEW.value,
    )
    .values(
        state=ConversationState.QUEUED.value,
        queue=bindparam("queue"),
        priority=bindparam("priority"),
        required_skills=bindparam("skills"),
        tags=bindparam("tags"),
        routing_decision_id=bindparam("decision_id"),
        preferred_agent_id=bindparam("preferred"),
        queued_at=bindparam("now"),
        updated_at=bindparam("now"),
        data=bindparam("data"),
        **{c.key: bindparam(c.key) for c in _CLOCKS},
    )
)
_LAST_AGENT = (
    select(Conversation.assigned_agent_id)
    .where(
        Conversation.contact_id == bindparam("contact"),
        Conversation.id != bindparam("cid"),
        Conversation.queue == bindparam("queue"),
        Conversation.assigned_agent_id.is_not(None),
        Conversation.updated_at >= bindparam("since"),
    )
    .order_by(Conversation.updated_at.desc())
    .limit(1)
)
AUTO_REPLY_INTERVAL = timedelta(minutes=10)
_RECENT_AUTO = (
    select(Message.id)
    .join(Conversation, Conversation.id == Message.conversation_id)
    .where(
        Conversation.contact_id == bindparam("contact"),
        Message.direction == "out",
        Message.is_auto.is_(True),
        Message.created_at >= bindparam("since"),
    )
    .limit(1)
)
_AGENT_BY_NAME = (
    select(Agent.id).join(User, User.id == Agent.user_id).where(User.name == bindparam("name"))
)


@dataclass(frozen=True, slots=True)
class RouteResult:
    conversation_id: int
    queue: str
    priority: int
    decision_id: int
    reply_message_id: int | None
    created_at: datetime


_HISTORY = select(
    func.count(),
    func.sum(
        case(
            (
                and_(
                    Conversation.state.in_([s.value for s in OPEN_STATES]),
                    Conversation.channel != bindparam("channel"),
                ),
                1,
            ),
            else_=0,
        )
    ),
).where(Conversation.contact_id == bindparam("contact"), Conversation.id != bindparam("cid"))
_LAST_EARLIER = (
    select(Conversation.queue, User.name)
    .select_from(Conversation)
    .outerjoin(Agent, Agent.id == Conversation.assigned_agent_id)
    .outerjoin(User, User.id == Agent.user_id)
    .where(
        Conversation.contact_id == bindparam("contact"),
        Conversation.id < bindparam("cid"),
        Conversation.queue.is_not(None),
    )
    .order_by(Conversation.id.desc())
    .limit(1)
)
_LAST_EARLIER_AGENT = (
    select(User.name)
    .select_from(Conversation)
    .join(Agent, Agent.id == Conversation.assigned_agent_id)
    .join(User, User.id == Agent.user_id)
    .where(Conversation.contact_id == bindparam("contact"), Conversation.id < bindparam("cid"))
    .order_by(Conversation.id.desc())
    .limit(1)
)


def history_facts(conn: Connection | Tx, row: Any) -> dict[str, Any]:
    """The ``history.*`` facts: the contact's other conversations on every channel."""
    key = {"contact": row.contact_id, "cid": row.id, "channel": row.channel}
    total, open_elsewhere = conn.execute(_HISTORY, key).one()
    facts: dict[str, Any] = {
        "history.conversations": int(total or 0),
        "history.open_elsewhere": int(open_elsewhere or 0),
    }
    if total:
        last = conn.execute(_LAST_EARLIER, key).first()
        if last is not None:
            facts["history.last_queue"] = last.queue
        agent = conn.execute(_LAST_EARLIER_AGENT, key).scalar_one_or_none()
        if agent is not None:
            facts["history.last_agent"] = agent

    score = last_score(conn, row.contact_id)  # this conversation's own, when reopened
    if score is not None:
        facts["history.last_csat"] = score
    return facts


def _facts(
    row: Any,
    message: Any,
    email: str | None,
    ruleset: Ruleset,
    now_iso: str,
    history: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The facts registry's values for one conversation (JSON-safe: stored with the decision)."""
    facts: dict[str, Any] = {
        "channel": row.channel,
        "inbox": row.slug,
        "contact.name": row.name,
        "contact.email": row.email or email,
        "contact.phone": row.phone,
        "contact.language": row.language,
        "contact.tier": row.tier,
        "contact.vip": bool(row.vip),
        "message.text": message.text if message is not None else None,
        "message.subject": (message.subject if message is not None else None) or row.subject,
        "message.language": (message.data or {}).get("language") if message is not None else None,
        "ivr.choice": (message.data or {}).get("ivr_choice") if message is not None else None,
        "conversation.tags": list(row.tags or []),
        "conversation.reopened": bool((row.data or {}).get("reopened")),
        "time": now_iso,
    }
    for name in ruleset.attributes:
        facts[f"contact.{name}"] = (row.attributes or {}).get(name)
    facts.update(history or {})
    return {k: v for k, v in facts.items() if v is not None}


def decision_for_inbox(decision: Decision, ruleset: Ruleset, default_queue: str | None) -> Decision:
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


def _route_one(
    tx: Tx, row: Any, message: Any, email: str | None, ruleset: Ruleset
) -> RouteResult | None:
    # the history.* facts cost a few queries: only when the rules (or templates) use them
    history = history_facts(tx, row) if "history." in ruleset.text else None
    facts = _facts(row, message, email, ruleset, tx.now.isoformat(), history)
    decision = decision_for_inbox(evaluate(facts, ruleset), ruleset, row.default_queue)
    decision_id = int(
        tx.execute(
            _DECISION,
            {
                "conversation_id": row.id,
                "ruleset_version": ruleset.version,
                "facts": facts,
                "decision": decision.to_dict(),
                "created_at": tx.now,
            },
        ).scalar_one()
    )
    data = {k: v for k, v in (row.data or {}).items() if k not in ("reopen_message", "rerouted")}
    clocks = {c.key: getattr(row, c.key) for c in _CLOCKS}
    if not (row.data or {}).get("rerouted"):  # a new or reopened conversation: SLA clocks start
        reopened = bool(data.get("reopened")) and data.get("reopened_at")
        start = datetime.fromisoformat(data["reopened_at"]) if reopened else row.created_at
        clocks = sla.cycle_values(data, start)
        data = clocks.pop("data")
    preferred = _preferred(tx, row, decision, ruleset, data)
    moved = tx.execute(
        _ROUTED,
        {
            "cid": row.id,
            "queue": decision.queue,
            "priority": int(Priority.parse(decision.priority)),
            "skills": dict(decision.skills),
            "tags": list(dict.fromkeys([*(row.tags or []), *decision.tags])),
            "decision_id": decision_id,
            "preferred": preferred,
            "now": tx.now,
            "data": data,
            **clocks,
        },
    ).rowcount
    if moved != 1:
        raise _Gone
    add_event(
        tx,
        row.id,
        EventKind.ROUTED,
        queue=decision.queue,
        decision_id=decision_id,
        rule=decision.rule,
        ruleset=ruleset.version,
    )
    add_event(tx, row.id, EventKind.QUEUED, queue=decision.queue, priority=decision.priority)
    current = sla.view(row, data=data, **clocks)
    flow.enter_queue(tx, row.id, ruleset, decision.queue, row=current, facts=facts)
    if preferred is not None:  # reserved for them until the wait is over
        flow.reserve(tx, row.id, preferred, flow.sticky_wait(ruleset.queues[decision.queue]))
    reply_id = None
    if (
        decision.reply
        and decision.reply in ruleset.templates
        and not row.auto_reply_sent
        and not data.get("no_auto_reply")  # lists, bulk, noreply senders: never answered
        # at most one automatic reply per contact and interval
        and tx.execute(
            _RECENT_AUTO, {"contact": row.contact_id, "since": tx.now - AUTO_REPLY_INTERVAL}
        ).first()
        is None
    ):
        text = ruleset.templates[decision.reply].render(facts)
        reply_id = enqueue_message(
            tx, row.id, text, author=Actor.SYSTEM, is_auto=True, template=decision.reply
        )
        tx.execute(
            update(Conversation).where(Conversation.id == row.id).values(auto_reply_sent=True)
        )
    return RouteResult(
        row.id,
        decision.queue,
        int(Priority.parse(decision.priority)),
        decision_id,
        reply_id,
        row.created_at,
    )


def _preferred(
    tx: Tx, row: Any, decision: Decision, ruleset: Ruleset, data: dict[str, Any]
) -> int | None:
    """Who is offered it first: the rule's ``agent``; else, on reopen, the agent who had it;
    else the contact's last agent in this queue within its ``sticky.window``."""
    if decision.agent:
        agent = tx.execute(_AGENT_BY_NAME, {"name": decision.agent}).scalar_one_or_none()
        if agent is not None:
            return int(agent)
    if data.get("reopened") and data.get("last_agent_id"):
        return int(data["last_agent_id"])
    sticky = ruleset.queues[decision.queue].sticky
    if sticky is None:
        return None
    last = tx.execute(
        _LAST_AGENT,
        {
            "contact": row.contact_id,
            "cid": row.id,
            "queue": decision.queue,
            "since": tx.now - sticky.window,
        },
    ).scalar_one_or_none()
    return int(last) if last is not None else None


def conversation_facts(
    conn: Connection, conversation_id: int, ruleset: Ruleset, now: datetime
) -> dict[str, Any]:
    """The facts of a conversation as the rules see them (for templates outside routing)."""
    row = conn.execute(_ONE, {"cid": conversation_id}).one()
    message = conn.execute(_FIRST_IN, {"ids": [conversation_id]}).first()
    email = None if row.email else conn.execute(_EMAILS, {"ids": [row.contact_id]}).first()
    return _facts(
        row,
        message,
        email[1] if email else None,
        ruleset,
        now.isoformat(),
        history_facts(conn, row),
    )


class _Gone(Exception):
    """Another process routed it first: roll this one back and go on."""


def route_batch(tx: Tx, ruleset: Ruleset, limit: int = ROUTE_BATCH) -> list[RouteResult]:
    """Route up to ``limit`` conversations waiting in ``new``, oldest first."""
    query = _NEW
    if tx.dialect == "postgresql":
        query = query.with_for_update(of=Conversation, skip_locked=True, key_share=True)
    rows = tx.execute(query, {"limit": limit}).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    first = {m.conversation_id: m for m in tx.execute(_FIRST_IN, {"ids": ids})}
    emails = (
        dict(tx.execute(_EMAILS, {"ids": [r.contact_id for r in rows if not r.email]}).all())
        if any(not r.email for r in rows)
        else {}
    )
    results = []
    for row in rows:
        reopen = (row.data or {}).get("reopen_message")
        message = (
            tx.execute(_BY_EXTERNAL, {"cid": row.id, "external": reopen}).first()
            if reopen
            else first.get(row.id)
        )
        try:
            with tx.savepoint():
                result = _route_one(tx, row, message, emails.get(row.contact_id), ruleset)
        except _Gone:
            continue
        if result is not None:
            results.append(result)
    return results
