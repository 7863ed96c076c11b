"""The ingest pipeline: one path for every channel.

    items from a channel (webhook or poller)
      -> dedupe by (inbox, external_id)
      -> resolve the contact by identity (only verified identities ever link contacts)
      -> join the contact's open conversation (the inbox's continuity policy), reopen a
         resolved one inside its reopen window, or open a new one linked to the last
      -> persist message + events + stream events in ONE transaction, commit
      -> (after the commit, and after the provider got its 2xx) route new conversations

Everything a provider sent is persisted before we answer it: the caller answers 2xx only
after ``accept`` returns. A bad item of a batch is quarantined with its raw bytes and the
rest go on. Concurrency: the contact's row is locked (``FOR UPDATE`` on PostgreSQL; the
single writer on SQLite) before choosing a conversation, so two messages from one person
can never open two conversations, and the unique ``(inbox_id, external_id)`` key makes a
concurrent duplicate a no-op.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    InternalError,
    OperationalError,
)

from channels.base import InboundMessage, ParsedItem, Reject, Sender, StatusUpdate
from channels.threading import token_conversation
from router.assignment import sla
from router.assignment.capacity import claim, holds_while_waiting
from router.assignment.flow import reserve, sticky_wait
from router.assignment.timers import CLOSE, clear_timers, current_ruleset
from router.csat import answer_of, record_score
from router.db import Database, Tx, database_trouble, is_retryable, prepared, prepared_each
from router.events import add_event, agent_stream
from router.failpoints import failpoint
from router.identity import SAME_NUMBER, join_same_number, link_same_number
from router.models import (
    Contact,
    ContactHint,
    ContactIdentity,
    Conversation,
    Inbox,
    Message,
    Outbox,
    Quarantine,
    table,
)
from router.outbox import set_opt_out
from router.serialize import message_payload
from router.types import OPEN_STATES, Actor, ConversationState, DeliveryStatus, Direction, EventKind

__all__ = [
    "InboxInfo",
    "IngestOutcome",
    "Pipeline",
    "apply_status",
    "ingest_message",
    "is_stored",
    "quarantine",
    "quarantine_reject",
    "resolve_contact",
]

log = logging.getLogger(__name__)
S = ConversationState
_STATUS_ORDER = {"queued": 1, "sending": 2, "sent": 3, "delivered": 4, "read": 5}
_TERMINAL = {"failed", "undelivered"}


@dataclass(frozen=True, slots=True)
class InboxInfo:
    id: int
    slug: str
    channel: str
    provider: str
    continuity: str
    reopen_window_s: int
    default_queue: str | None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    message_id: int | None
    conversation_id: int | None
    duplicate: bool = False
    created: bool = False  # a new conversation: it must be routed
    reopened: bool = False  # a resolved conversation reopened: it must be routed again
    requeued: bool = False  # back in its queue (its agent was full): it must be offered
    quarantined: bool = False
    contact_id: int | None = None
    agent_id: int | None = None
    settled: bool = False  # routed and offered in the ingest's own transaction


class DuplicateMessage(Exception):
    """Raised inside the transaction when a concurrent delivery stored the message first."""

    def __init__(self, message_id: int | None, conversation_id: int | None) -> None:
        super().__init__("duplicate")
        self.message_id = message_id
        self.conversation_id = conversation_id


_messages, _conversations, _contacts, _identities, _hints = (
    table(Message),
    table(Conversation),
    table(Contact),
    table(ContactIdentity),
    table(ContactHint),
)
_SEEN = prepared(
    select(_messages.c.id, _messages.c.conversation_id, _messages.c.data).where(
        _messages.c.inbox_id == bindparam("inbox"), _messages.c.external_id == bindparam("external")
    )
)
_IDENTITY = prepared(
    select(_identities.c.id, _identities.c.contact_id).where(
        _identities.c.kind == bindparam("kind"),
        _identities.c.address == bindparam("address"),
        _identities.c.verified == bindparam("verified"),
    )
)
_NEW_CONTACT = prepared(insert(_contacts).returning(_contacts.c.id))
_DROP_CONTACT = delete(_contacts).where(_contacts.c.id == bindparam("p_id"))
_NEW_IDENTITY = prepared_each(
    {
        "sqlite": sqlite_insert(_identities).on_conflict_do_nothing().returning(_identities.c.id),
        "postgresql": pg_insert(_identities).on_conflict_do_nothing().returning(_identities.c.id),
    }
)
_LOCK_CONTACT = prepared(
    select(_contacts.c.merged_into_id)
    .where(_contacts.c.id == bindparam("p_id"))
    .with_for_update(key_share=True)
)
_OPEN = [s.value for s in OPEN_STATES]
_PICK = prepared_each(
    {
        (scope, kind): select(_conversations)
        .where(
            _conversations.c.contact_id == bindparam("contact"),
            *([_conversations.c.state.in_(_OPEN)] if kind == "open" else []),
            *([_conversations.c.inbox_id == bindparam("inbox")] if scope == "per_channel" else []),
        )
        .order_by(_conversations.c.id.desc())
        .limit(1)
        for scope in ("join_open", "per_channel")
        for kind in ("open", "last")
    }
)
_CONTACT_LANGUAGE = prepared(
    select(_contacts.c.language).where(_contacts.c.id == bindparam("p_id"))
)
_NEW_CONVERSATION = prepared(insert(_conversations).returning(_conversations.c.id))
_NEW_MESSAGE = prepared(insert(_messages).returning(_messages.c.id))
_quarantine = table(Quarantine)
_SETTLE_QUARANTINED = prepared(
    update(_quarantine)
    .where(
        _quarantine.c.inbox_id == bindparam("inbox"),
        _quarantine.c.external_id == bindparam("external"),
        _quarantine.c.resolved_at.is_(None),
    )
    .values(resolved_at=bindparam("now"))
)
_HINT_KNOWN = prepared(
    select(_hints.c.id).where(
        _hints.c.contact_id == bindparam("contact"),
        _hints.c.kind == bindparam("kind"),
        _hints.c.value == bindparam("value"),
    )
)
_NEW_HINT = prepared(insert(_hints))


def _lock_contact(tx: Tx, contact_id: int) -> int:
    """Serialize writers per contact; returns the contact to write to. FOR NO KEY UPDATE, not
    FOR UPDATE: the latter would also block the KEY SHARE locks of foreign-key checks on rows
    referencing the contact, and deadlock with a transaction that updates one of its
    conversations twice. A merge that committed while we waited moved the contact on: follow
    it to the survivor (SQLite has one writer, so there nothing moves under us)."""
    if tx.dialect != "postgresql":
        return contact_id
    for _ in range(16):
        merged_into = tx.execute(_LOCK_CONTACT, {"p_id": contact_id}).scalar_one_or_none()
        if merged_into is None:
            return contact_id
        contact_id = int(merged_into)
    raise AssertionError(f"contact {contact_id}: a chain of more than 16 merges")


def _lock_number(tx: Tx, address: str) -> None:
    """Serialize the first deliveries from one number (PostgreSQL: a transaction-scoped
    advisory lock), so an SMS and a WhatsApp message arriving together from a new number
    cannot make two contacts. SQLite's single writer serializes them already."""
    if tx.dialect != "postgresql":
        return
    digest = hashlib.sha256(f"omniroute number {address}".encode()).digest()
    tx.execute(
        text("SELECT pg_advisory_xact_lock(:key)"),
        {"key": int.from_bytes(digest[:8], "big", signed=True)},
    )


def resolve_contact(tx: Tx, sender: Sender) -> tuple[int, int, bool]:
    """The contact owning ``sender``'s identity, created if new. Returns ``(contact_id,
    identity_id, created)``.

    An identity belongs to exactly one contact; a new identity joins an existing contact
    here only when that contact holds the same number verified under the other kind
    (phone and whatsapp: one number, one customer); other linking is only ever through
    verified proofs, in router.identity. An unverified sender is looked up among unverified
    claims only: claiming an address never reaches the contact that proved it.
    """
    key = {"kind": sender.kind, "address": sender.address, "verified": bool(sender.verified)}
    found = tx.execute(_IDENTITY, key).first()
    # one number, one customer: a verified phone and whatsapp identity share their contact
    other_kind = SAME_NUMBER.get(sender.kind) if sender.verified else None
    if found is not None:
        contact_id, identity_id = int(found.contact_id), int(found.id)
        if other_kind is not None:
            other = tx.execute(_IDENTITY, {**key, "kind": other_kind}).first()
            if other is not None and int(other.contact_id) != contact_id:
                first, second = sorted((contact_id, int(other.contact_id)))
                live = {first: _lock_contact(tx, first), second: _lock_contact(tx, second)}
                contact_id = join_same_number(
                    tx,
                    live[contact_id],
                    identity_id,
                    live[int(other.contact_id)],
                    int(other.id),
                )
        return contact_id, identity_id, False
    if other_kind is not None:
        _lock_number(tx, sender.address)
        found = tx.execute(_IDENTITY, key).first()
        if found is not None:  # a concurrent delivery created it while we waited
            return int(found.contact_id), int(found.id), False
        other = tx.execute(_IDENTITY, {**key, "kind": other_kind}).first()
        if other is not None:  # the number's contact: this identity joins it
            contact_id = _lock_contact(tx, int(other.contact_id))
            identity_id = int(
                tx.execute(
                    _NEW_IDENTITY[tx.dialect],
                    {
                        "contact_id": contact_id,
                        "kind": sender.kind,
                        "address": sender.address,
                        "verified": True,
                        "verified_by": sender.verified_by,
                        "data": {},
                        "created_at": tx.now,
                    },
                ).scalar_one()
            )
            link_same_number(tx, contact_id, identity_id, sender.kind, sender.address)
            return contact_id, identity_id, False
    contact_id = int(
        tx.execute(
            _NEW_CONTACT,
            {
                "name": _clean(sender.name, 200),
                "attributes": {},
                "vip": False,
                "created_at": tx.now,
                "updated_at": tx.now,
                "email": sender.address if sender.verified and sender.kind == "email" else None,
                "phone": sender.address if other_kind is not None else None,
            },
        ).scalar_one()
    )
    identity_id = tx.execute(
        _NEW_IDENTITY[tx.dialect],
        {
            "contact_id": contact_id,
            "kind": sender.kind,
            "address": sender.address,
            "verified": sender.verified,
            "verified_by": sender.verified_by,
            "data": {},
            "created_at": tx.now,
        },
    ).scalar_one_or_none()
    if identity_id is not None:
        return contact_id, int(identity_id), True
    # a concurrent transaction created this identity first: use theirs
    tx.execute(_DROP_CONTACT, {"p_id": contact_id})
    row = tx.execute(_IDENTITY, key).one()
    return int(row.contact_id), int(row.id), False


def _add_hints(tx: Tx, contact_id: int, hints: dict[str, str]) -> None:
    """Unverified claims (a typed email): stored once, shown to agents, never used to link."""
    for kind, value in hints.items():
        hint = {"contact": contact_id, "kind": kind, "value": value[:320]}
        if tx.execute(_HINT_KNOWN, hint).first() is None:
            tx.execute(
                _NEW_HINT,
                {
                    "contact_id": contact_id,
                    "kind": kind,
                    "value": value[:320],
                    "source": "channel",
                    "created_at": tx.now,
                },
            )


_BY_THREAD_ID = (
    select(_messages.c.conversation_id)
    .where(
        _messages.c.inbox_id == bindparam("inbox"),
        _messages.c.thread_id.in_(bindparam("ids", expanding=True)),
    )
    .order_by(_messages.c.id.desc())
    .limit(1)
)
_CONVERSATION = prepared(select(_conversations).where(_conversations.c.id == bindparam("cid")))
_LAST_RECIPIENTS = (
    select(_messages.c.data)
    .where(
        _messages.c.conversation_id == bindparam("cid"),
        _messages.c.direction == Direction.OUT.value,
        _messages.c.is_note.is_(False),
    )
    .order_by(_messages.c.id.desc())
    .limit(1)
)


def _threaded(tx: Tx, inbox: InboxInfo, contact_id: int, msg: InboundMessage) -> tuple[Any, Any]:
    """The conversation a reply threads into, by the ids it refers to (only ids this inbox
    sent or stored) or a valid thread token: ``(row, None)`` when the sender may join it (an
    identity of its contact, or a recipient of our last message in it), ``(None, row)`` when
    not (the message starts a new conversation, marked related), ``(None, None)`` when it
    refers to nothing of ours."""
    conversation_id = None
    references = [r for r in msg.references if r][-50:]
    if references:
        conversation_id = tx.execute(
            _BY_THREAD_ID, {"inbox": inbox.id, "ids": references}
        ).scalar_one_or_none()
    secret = tx.context.get("thread_secret")
    if conversation_id is None and msg.thread_token and secret:
        conversation_id = token_conversation(secret, msg.thread_token)
    if conversation_id is None:
        return None, None
    row = tx.execute(_CONVERSATION, {"cid": conversation_id}).first()
    if row is None or row.inbox_id != inbox.id:
        return None, None
    if row.contact_id == contact_id:
        return row, None
    last = tx.execute(_LAST_RECIPIENTS, {"cid": row.id}).scalar_one_or_none() or {}
    if msg.sender.address.lower() in [r.lower() for r in last.get("recipients", [])]:
        return row, None
    return None, row


def _pick_conversation(
    tx: Tx, inbox: InboxInfo, contact_id: int, msg: InboundMessage, new_contact: bool = False
) -> tuple[Any, str, Any]:
    """Choose the conversation a message belongs to: ``(row, how, related)`` with how in
    join | reopen | attach | new (row is the predecessor for new; ``related`` a conversation
    the message referred to but may not join)."""
    threaded, related = (
        _threaded(tx, inbox, contact_id, msg)
        if msg.references or msg.thread_token
        else (None, None)
    )
    if threaded is not None:
        return (*_continue(tx, inbox, threaded, msg.auto), None)
    if new_contact:  # created in this transaction: no conversation of theirs to look for
        return None, "new", related
    params = {"contact": contact_id, "inbox": inbox.id}
    open_row = tx.execute(_PICK[(inbox.continuity, "open")], params).first()
    if open_row is not None and related is None:
        return open_row, "join", None
    last = tx.execute(_PICK[(inbox.continuity, "last")], params).first()
    if last is None or related is not None:
        return last, "new", related
    return (*_continue(tx, inbox, last, msg.auto), None)


def _continue(tx: Tx, inbox: InboxInfo, row: Any, auto: bool) -> tuple[Any, str]:
    """How a message goes on in the conversation ``row``: joins it while open; reopens it
    when resolved within the reopen window; otherwise starts a new one linked to it. An
    automatic message (out-of-office) is attached, never reopens anything."""
    if row.state in _OPEN:
        return row, "join"
    if auto:
        return row, "attach"
    window = timedelta(seconds=inbox.reopen_window_s)
    if (
        row.state == S.RESOLVED
        and row.resolved_at is not None
        and tx.now - row.resolved_at <= window
    ):
        return row, "reopen"
    return row, "new"


def _customer_turn_over(tx: Tx, conversation: Any) -> dict[str, Any]:
    """``waiting_customer -> assigned``. On channels that released the agent's capacity while
    waiting, take it back; if the agent is full now, the conversation returns to its queue
    reserved for that agent (offered back to them first), never over capacity."""
    agent_id = conversation.assigned_agent_id
    ruleset = current_ruleset(tx)
    sla.on_customer_turn(tx, conversation.id, ruleset)  # the resolution clock runs again
    if (
        agent_id is None
        or holds_while_waiting(conversation.channel)
        or claim(tx, agent_id, conversation.channel, "customer_replied")
    ):
        return {"state": S.ASSIGNED.value}
    spec = ruleset.queues.get(conversation.queue) if ruleset is not None else None
    reserve(tx, conversation.id, agent_id, sticky_wait(spec))
    add_event(
        tx,
        conversation.id,
        EventKind.UNASSIGNED,
        Actor.SYSTEM,
        agent_id=agent_id,
        queue=conversation.queue,
        reason="agent at capacity",
    )
    add_event(tx, conversation.id, EventKind.QUEUED, Actor.SYSTEM, queue=conversation.queue)
    tx.emit(
        agent_stream(agent_id),
        "unassigned",
        {
            "conversation_id": conversation.id,
            "reason": "at capacity; it will be offered back to you",
        },
    )
    return {
        "state": S.QUEUED.value,
        "assigned_agent_id": None,
        "preferred_agent_id": agent_id,
        "queued_at": tx.now,
    }


def _reused_id(seen: Any, msg: InboundMessage) -> bool:
    """A stored message with the same external_id is another message only when both
    carry fingerprints and they differ (an email client reusing a Message-ID); a copy of
    the same message (another alias's delivery, the mailbox read again) is a duplicate."""
    theirs = (seen.data or {}).get("fingerprint")
    return bool(msg.fingerprint and theirs and theirs != msg.fingerprint)


def _clean(value: str | None, limit: int | None) -> str | None:
    """Text as every database stores it: no NUL characters (PostgreSQL refuses them in text)
    and at most ``limit`` characters (a column's size; a 10,000-character Subject exists)."""
    if value is None:
        return None
    value = value.replace("\x00", "\ufffd")
    return value[:limit] if limit is not None else value


def ingest_message(tx: Tx, inbox: InboxInfo, msg: InboundMessage) -> IngestOutcome:
    """Persist one inbound message and everything it changes, in the caller's transaction."""
    seen_key = {"inbox": inbox.id, "external": msg.external_id}
    seen = tx.execute(_SEEN, seen_key).first()
    if seen is not None and _reused_id(seen, msg):
        msg = replace(msg, external_id=f"{msg.external_id}#{msg.fingerprint}")
        seen_key = {"inbox": inbox.id, "external": msg.external_id}
        seen = tx.execute(_SEEN, seen_key).first()
    if seen is not None:
        return IngestOutcome(int(seen.id), int(seen.conversation_id), duplicate=True)
    contact_id, identity_id, new_contact = resolve_contact(tx, msg.sender)
    contact_id = _lock_contact(tx, contact_id)
    _add_hints(tx, contact_id, msg.hints)
    if msg.data.get("opt_out") in ("stop", "start"):
        set_opt_out(tx, identity_id, msg.data["opt_out"] == "stop", "keyword")
    if tx.dialect == "postgresql":  # a concurrent delivery may have committed while we waited
        seen = tx.execute(_SEEN, seen_key).first()
        if seen is not None:
            raise DuplicateMessage(int(seen.id), int(seen.conversation_id))
    # a survey answer ("4") is stored with the surveyed conversation and never reopens it
    answer = answer_of(tx, contact_id, msg.text) if not msg.attachments else None
    if answer is not None:
        conversation, how, related = answer[0], "attach", None
    else:
        conversation, how, related = _pick_conversation(tx, inbox, contact_id, msg, new_contact)
    now = tx.now
    created = reopened = requeued = False
    agent_id: int | None = None
    if how == "new":
        language = (
            None
            if new_contact
            else tx.execute(_CONTACT_LANGUAGE, {"p_id": contact_id}).scalar_one_or_none()
        ) or msg.language
        previous = conversation.id if conversation is not None else None
        conversation_id = int(
            tx.execute(
                _NEW_CONVERSATION,
                {
                    "contact_id": contact_id,
                    "inbox_id": inbox.id,
                    "channel": inbox.channel,
                    "state": S.NEW.value,
                    "priority": 1,
                    "required_skills": {},
                    "tags": [],
                    "language": language,
                    "subject": _clean(msg.subject, 998),
                    "previous_id": previous,
                    "first_inbound_at": now,
                    "last_inbound_at": now,
                    # the columns' defaults, given: a prepared statement takes every value
                    "auto_reply_sent": False,
                    "overflow_step": 0,
                    "sla_resolution_used_s": 0.0,
                    "data": {
                        k: v
                        for k, v in (
                            ("related_to", related.id if related is not None else None),
                            ("no_auto_reply", msg.no_auto_reply or None),
                        )
                        if v is not None
                    },
                    "created_at": now,
                    "updated_at": now,
                },
            ).scalar_one()
        )
        add_event(
            tx,
            conversation_id,
            EventKind.CREATED,
            Actor.CUSTOMER,
            channel=inbox.channel,
            inbox=inbox.slug,
            previous=previous,
            **({"related": related.id} if related is not None else {}),
        )
        created = True
    else:
        conversation_id = int(conversation.id)
        agent_id = conversation.assigned_agent_id
        changes: dict[str, Any] = {"last_inbound_at": now, "updated_at": now}
        if how == "reopen":
            # Back through routing (the rules run again on reopen); timers restart.
            changes.update(
                state=S.NEW.value,
                resolved_at=None,
                assigned_agent_id=None,
                queued_at=None,
                data={
                    **(conversation.data or {}),
                    "reopened": True,
                    "reopened_at": now.isoformat(),
                    "reopen_message": msg.external_id,
                    "last_agent_id": conversation.assigned_agent_id,
                },
            )
            clear_timers(tx, conversation_id, CLOSE)
            add_event(
                tx,
                conversation_id,
                EventKind.REOPENED,
                Actor.CUSTOMER,
                agent_id=conversation.assigned_agent_id,
            )
            reopened, agent_id = True, None
        elif how == "join" and conversation.state == S.WAITING_CUSTOMER:
            changes.update(_customer_turn_over(tx, conversation))
            if changes["state"] == S.QUEUED.value:
                requeued, agent_id = True, None
        if conversation.first_inbound_at is None:
            changes["first_inbound_at"] = now
        tx.execute(update(Conversation).where(Conversation.id == conversation_id).values(**changes))
    values = {
        "conversation_id": conversation_id,
        "inbox_id": inbox.id,
        "direction": Direction.IN.value,
        "external_id": msg.external_id,
        "thread_id": _clean(msg.thread_id, 998),
        "author": Actor.CUSTOMER.value,
        "agent_id": None,
        "identity_id": identity_id,
        "text": _clean(msg.text, None) or "",
        "subject": _clean(msg.subject, 998),
        "attachments": [_attachment(a) for a in msg.attachments],
        "delivery_status": DeliveryStatus.RECEIVED.value,
        "error": None,
        "is_auto": msg.auto,
        "is_note": False,
        "provider_ts": msg.provider_ts,
        "data": {
            k: v
            for k, v in {
                "language": msg.language,
                "html": msg.html,
                "fingerprint": msg.fingerprint,
                **msg.data,
            }.items()
            if v is not None
        },
        "created_at": now,
    }
    message_id = int(tx.execute(_NEW_MESSAGE, values).scalar_one())
    if msg.fingerprint is not None:
        # the whole message arrived after a part of it (an oversized mail's headers, one that
        # could not be parsed before a fix) was quarantined: that item is settled now
        tx.execute(
            _SETTLE_QUARANTINED, {"inbox": inbox.id, "external": msg.external_id, "now": now}
        )
    add_event(
        tx,
        conversation_id,
        EventKind.MESSAGE_IN,
        Actor.CUSTOMER,
        message_id=message_id,
        channel=inbox.channel,
        auto=msg.auto,
    )
    if answer is not None:
        record_score(tx, answer[0], answer[1], inbox.channel)
    if agent_id is not None:
        row = SimpleNamespace(id=message_id, **values)
        tx.emit(
            agent_stream(agent_id),
            "message",
            {"conversation_id": conversation_id, "message": message_payload(row, inbox.channel)},
        )
    return IngestOutcome(
        message_id,
        conversation_id,
        created=created,
        reopened=reopened,
        requeued=requeued,
        contact_id=contact_id,
        agent_id=agent_id,
    )


def _attachment(a: Any) -> dict[str, Any]:
    return {
        "filename": a.filename,
        "content_type": a.content_type,
        "size": a.size,
        "blob_key": a.blob_key,
        "url": a.url,
        "inline": a.inline,
    }


_WATERMARK_LIMIT = 200  # the newest messages a watermark moves (older ones moved before)


_BOUNCE_LOOKBACK = timedelta(days=7)  # a bounce names a message sent at most this long ago


def apply_status(tx: Tx, inbox: InboxInfo, status: StatusUpdate) -> bool | None:
    """Move an outbound message's delivery status forward only (failed is terminal); a
    watermark moves every earlier message to that recipient. Returns whether a message
    moved, or None when the status names none of this inbox's messages."""
    if status.recipient is not None:
        rows = tx.execute(
            select(Message.id, Message.delivery_status, Message.conversation_id, Message.agent_id)
            .join(ContactIdentity, ContactIdentity.id == Message.identity_id)
            .where(
                Message.inbox_id == inbox.id,
                Message.direction == Direction.OUT.value,
                ContactIdentity.address == status.recipient,
                Message.created_at <= (status.at or tx.now),
                Message.external_id.is_not(None),
            )
            .order_by(Message.id.desc())
            .limit(_WATERMARK_LIMIT)
        ).all()
        return any([_move_status(tx, row, status) for row in rows]) if rows else None
    row = tx.execute(
        select(
            Message.id, Message.delivery_status, Message.conversation_id, Message.agent_id
        ).where(
            Message.inbox_id == inbox.id,
            Message.direction == Direction.OUT.value,
            Message.external_id == status.provider_id,
        )
    ).first()
    if row is None and status.failed_recipient:
        row = _last_sent_to(tx, inbox, status.failed_recipient, status.at or tx.now)
    if row is None:
        if status.message_id is not None:
            return _another_copy(tx, inbox, status)
        return None
    return _move_status(tx, row, status)


def _last_sent_to(tx: Tx, inbox: InboxInfo, address: str, before: Any) -> Any:
    """The latest message this inbox sent to ``address`` in the lookback before ``before``
    (what a bounce naming only its failed recipient reports on)."""
    return tx.execute(
        select(Message.id, Message.delivery_status, Message.conversation_id, Message.agent_id)
        .join(ContactIdentity, ContactIdentity.id == Message.identity_id)
        .where(
            Message.inbox_id == inbox.id,
            Message.direction == Direction.OUT.value,
            ContactIdentity.address == address.lower(),
            Message.external_id.is_not(None),
            Message.created_at <= before,
            Message.created_at >= before - _BOUNCE_LOOKBACK,
        )
        .order_by(Message.id.desc())
        .limit(1)
    ).first()


def _another_copy(tx: Tx, inbox: InboxInfo, status: StatusUpdate) -> bool | None:
    """The provider reports on a message it holds for our message ``status.message_id``
    under an id that message does not have: a create given up on (a timeout, a 5xx) landed
    after all, beside the copy we kept. The customer got it twice: shown on the message
    (``possible_duplicate``, ``duplicate_ids``), counted on its outbox row and logged."""
    row = tx.execute(
        select(
            Message.id,
            Message.external_id,
            Message.data,
            Message.delivery_status,
            Message.conversation_id,
            Message.agent_id,
        ).where(
            Message.id == status.message_id,
            Message.inbox_id == inbox.id,
            Message.direction == Direction.OUT.value,
        )
    ).first()
    if row is None:
        return None
    if row.external_id is None:
        return False  # still being sent: its look-up finds that copy
    if status.status in _TERMINAL or status.status == "canceled":
        return False  # that copy never reached the customer
    data = dict(row.data or {})
    known = {row.external_id, *data.get("part_ids", []), *data.get("duplicate_ids", [])}
    if status.provider_id in known:
        return False
    duplicates = [*data.get("duplicate_ids", []), status.provider_id]
    data.update(possible_duplicate=True, duplicate_ids=duplicates)
    tx.execute(update(Message).where(Message.id == row.id).values(data=data))
    counted = tx.execute(
        select(Outbox.id, Outbox.uncertain_resends).where(Outbox.message_id == row.id)
    ).first()
    if counted is not None and counted.uncertain_resends < len(duplicates):
        tx.execute(
            update(Outbox).where(Outbox.id == counted.id).values(uncertain_resends=len(duplicates))
        )
    log.warning(
        "inbox %s, message %s: the provider holds another copy (%s): sent twice",
        inbox.slug,
        row.id,
        status.provider_id,
    )
    if row.agent_id is not None:
        tx.emit(
            agent_stream(row.agent_id),
            "delivery",
            {
                "conversation_id": row.conversation_id,
                "message_id": row.id,
                "status": row.delivery_status,
                "error": None,
                "possible_duplicate": True,
            },
        )
    return True


def _move_status(tx: Tx, row: Any, status: StatusUpdate) -> bool:
    current, new = row.delivery_status, status.status
    if current in _TERMINAL or current == DeliveryStatus.FAILED:
        return False
    if new not in _TERMINAL and _STATUS_ORDER.get(new, 0) <= _STATUS_ORDER.get(current, 0):
        return False
    stored = DeliveryStatus.FAILED.value if new in _TERMINAL else new
    tx.execute(
        update(Message)
        .where(Message.id == row.id)
        .values(delivery_status=stored, error=status.error if new in _TERMINAL else None)
    )
    if row.agent_id is not None:
        tx.emit(
            agent_stream(row.agent_id),
            "delivery",
            {
                "conversation_id": row.conversation_id,
                "message_id": row.id,
                "status": stored,
                "error": status.error,
            },
        )
    return True


def quarantine(
    tx: Tx,
    inbox_id: int | None,
    source: str,
    reason: str,
    raw: bytes,
    data: dict[str, Any] | None = None,
    external_id: str | None = None,
) -> int:
    return int(
        tx.execute(
            insert(Quarantine)
            .values(
                inbox_id=inbox_id,
                source=source,
                reason=reason[:2000],
                raw=raw,
                data=data or {},
                external_id=external_id,
                created_at=tx.now,
            )
            .returning(Quarantine.id)
        ).scalar_one()
    )


def quarantine_reject(tx: Tx, inbox: InboxInfo, source: str, item: Reject) -> int | None:
    """Quarantine a rejected item once: an item with the same external_id already kept
    for this inbox (resolved or not) is not kept again, unless both have fingerprints and
    they differ. Returns the new row's id, or None for a repeat."""
    data: dict[str, Any] = {}
    if item.external_id is not None:
        data["external_id"] = item.external_id
        for row in tx.execute(
            select(Quarantine.id, Quarantine.data).where(
                Quarantine.inbox_id == inbox.id, Quarantine.external_id == item.external_id
            )
        ):
            theirs = (row.data or {}).get("fingerprint")
            if not (item.fingerprint and theirs and theirs != item.fingerprint):
                log.info(
                    "%s: %s is quarantined already (item %s)", inbox.slug, item.external_id, row.id
                )
                return None
    if item.fingerprint is not None:
        data["fingerprint"] = item.fingerprint
    if item.partial:
        data["partial"] = True
    return quarantine(tx, inbox.id, source, item.reason, item.raw, data, item.external_id)


def load_inbox(conn: Connection, slug: str) -> InboxInfo | None:
    row = conn.execute(select(Inbox).where(Inbox.slug == slug)).first()
    if row is None:
        return None
    return InboxInfo(
        row.id,
        row.slug,
        row.channel,
        row.provider,
        row.continuity,
        row.reopen_window_s,
        row.default_queue,
        row.enabled,
    )


@dataclass
class Pipeline:
    """Accepts parsed items for an inbox. Routing new conversations is the caller's next
    step, after the provider has been answered (``Runtime.after_ingest``)."""

    db: Database
    on_ingested: list[Callable[[str, IngestOutcome], None]] = field(default_factory=list)
    # Runs once after the ingests committed together (``Tx.at_batch_end``; SQLite, one
    # writer: routing and offering what the items created, in the same commit instead of
    # two more). Returns True when nothing is left for ``after_ingest``; a failure only
    # leaves the work to ``after_ingest`` and the sweeps, never loses a message.
    then: Callable[[Tx], bool] | None = None

    async def accept(
        self, inbox: InboxInfo, items: list[ParsedItem], source: str = "webhook"
    ) -> list[IngestOutcome]:
        """Persist every item of one delivery in one transaction, in order, each item in its
        own savepoint: a bad item is quarantined with its reason and the rest go on. Returns
        one outcome per message (statuses and rejects are applied, not reported)."""
        if not items:
            return []
        settled: list[bool] = []
        outcomes: list[IngestOutcome] = await self.db.write(
            _accept_batch, inbox, items, source, self.then, settled
        )
        if settled and settled[0]:
            outcomes = [replace(o, settled=True) for o in outcomes]
        if any(r.message_id is not None and not r.duplicate for r in outcomes):
            failpoint("after_ingest_commit")
        for outcome in outcomes:
            for callback in self.on_ingested:
                callback(inbox.slug, outcome)
        return outcomes


def _accept_batch(
    tx: Tx,
    inbox: InboxInfo,
    items: list[ParsedItem],
    source: str,
    then: Callable[[Tx], bool] | None = None,
    settled: list[bool] | None = None,
) -> list[IngestOutcome]:
    outcomes = _accept_items(tx, inbox, items, source)
    if then is not None and any(o.created or o.reopened or o.requeued for o in outcomes):
        tx.at_batch_end(then, settled if settled is not None else [])
    return outcomes


def _accept_items(
    tx: Tx, inbox: InboxInfo, items: list[ParsedItem], source: str
) -> list[IngestOutcome]:
    outcomes: list[IngestOutcome] = []
    for item in items:
        if isinstance(item, Reject):
            quarantine_reject(tx, inbox, source, item)
            continue
        try:
            with tx.savepoint():
                if isinstance(item, StatusUpdate):
                    if apply_status(tx, inbox, item) is None and item.unmatched is not None:
                        quarantine_reject(tx, inbox, source, item.unmatched)
                    continue
                outcomes.append(ingest_message(tx, inbox, item))
        except DuplicateMessage as dup:
            outcomes.append(IngestOutcome(dup.message_id, dup.conversation_id, duplicate=True))
        except IntegrityError:
            # Lost a race on the unique (inbox, external_id) key: the message is stored once.
            seen = (
                _find_message(tx.conn, inbox.id, item.external_id)
                if isinstance(item, InboundMessage)
                else None
            )
            if seen is None:
                raise
            outcomes.append(IngestOutcome(seen[0], seen[1], duplicate=True))
        except (OperationalError, InterfaceError, InternalError):
            raise  # the database, not the item: fail the delivery so the provider retries
        except DBAPIError as exc:
            if is_retryable(exc) or database_trouble(exc):
                # a deadlock or serialization failure, or the database itself (a connection
                # terminated, a shutdown, a full disk): the whole delivery is retried
                raise
            log.exception("ingest of an item for %s failed; quarantined", inbox.slug)
            quarantine(
                tx,
                inbox.id,
                source,
                f"ingest failed: {type(exc.orig).__name__}: {exc.orig}",
                repr(item).encode("utf-8", "replace"),
            )
            if isinstance(item, InboundMessage):
                outcomes.append(IngestOutcome(None, None, quarantined=True))
        except Exception as exc:
            if database_trouble(exc):
                raise  # the database, not the item (a lost connection): retried, not blamed
            # Never lose an accepted item: keep it raw with the reason for an admin.
            log.exception("ingest of an item for %s failed; quarantined", inbox.slug)
            quarantine(
                tx,
                inbox.id,
                source,
                f"ingest failed: {type(exc).__name__}: {exc}",
                repr(item).encode("utf-8", "replace"),
            )
            if isinstance(item, InboundMessage):
                outcomes.append(IngestOutcome(None, None, quarantined=True))
    return outcomes


def is_stored(conn: Connection, inbox_id: int, external_id: str) -> bool:
    """Whether the inbox already stored a message with this dedupe key."""
    return _find_message(conn, inbox_id, external_id) is not None


def _find_message(conn: Connection, inbox_id: int, external_id: str) -> tuple[int, int] | None:
    row = conn.execute(
        select(Message.id, Message.conversation_id).where(
            Message.inbox_id == inbox_id, Message.external_id == external_id
        )
    ).first()
    return (int(row.id), int(row.conversation_id)) if row else None
