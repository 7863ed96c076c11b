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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from channels.base import InboundMessage, ParsedItem, Reject, Sender, StatusUpdate
from router.db import Database, Tx, insert_ignore, is_retryable
from router.events import add_event, agent_stream
from router.failpoints import failpoint
from router.models import (
    Contact,
    ContactHint,
    ContactIdentity,
    Conversation,
    Inbox,
    Message,
    Quarantine,
)
from router.serialize import message_payload
from router.types import OPEN_STATES, Actor, ConversationState, DeliveryStatus, Direction, EventKind

__all__ = [
    "InboxInfo",
    "IngestOutcome",
    "Pipeline",
    "apply_status",
    "ingest_message",
    "quarantine",
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
    quarantined: bool = False
    contact_id: int | None = None
    agent_id: int | None = None


class DuplicateMessage(Exception):
    """Raised inside the transaction when a concurrent delivery stored the message first."""

    def __init__(self, message_id: int | None, conversation_id: int | None) -> None:
        super().__init__("duplicate")
        self.message_id = message_id
        self.conversation_id = conversation_id


def _lock_contact(tx: Tx, contact_id: int) -> None:
    """Serialize writers per contact. FOR NO KEY UPDATE, not FOR UPDATE: the latter would
    also block the KEY SHARE locks of foreign-key checks on rows referencing the contact,
    and deadlock with a transaction that updates one of its conversations twice."""
    if tx.dialect == "postgresql":
        tx.execute(
            select(Contact.id).where(Contact.id == contact_id).with_for_update(key_share=True)
        )


def resolve_contact(tx: Tx, sender: Sender, hints: dict[str, str] | None = None) -> tuple[int, int]:
    """The contact owning ``sender``'s identity, created if new. Returns ``(contact_id, identity_id)``.

    An identity belongs to exactly one contact; a new identity never joins an existing
    contact here (linking is only ever through verified proofs, in the identity module).
    """
    found = tx.execute(
        select(ContactIdentity.id, ContactIdentity.contact_id, ContactIdentity.verified).where(
            ContactIdentity.kind == sender.kind, ContactIdentity.address == sender.address
        )
    ).first()
    if found is not None:
        if sender.verified and not found.verified:
            tx.execute(
                update(ContactIdentity)
                .where(ContactIdentity.id == found.id)
                .values(verified=True, verified_by=sender.verified_by)
            )
        contact_id, identity_id = int(found.contact_id), int(found.id)
    else:
        values: dict[str, Any] = {
            "name": sender.name,
            "attributes": {},
            "vip": False,
            "created_at": tx.now,
            "updated_at": tx.now,
        }
        if sender.verified and sender.kind == "email":
            values["email"] = sender.address
        if sender.verified and sender.kind in ("phone", "whatsapp"):
            values["phone"] = sender.address if sender.kind == "phone" else None
        contact_id = int(
            tx.execute(insert(Contact).values(**values).returning(Contact.id)).scalar_one()
        )
        inserted = insert_ignore(
            tx.conn,
            ContactIdentity,
            {
                "contact_id": contact_id,
                "kind": sender.kind,
                "address": sender.address,
                "verified": sender.verified,
                "verified_by": sender.verified_by,
                "data": {},
                "created_at": tx.now,
            },
        )
        if not inserted:  # a concurrent transaction created this identity first: use theirs
            tx.execute(delete(Contact).where(Contact.id == contact_id))
            row = tx.execute(
                select(ContactIdentity.id, ContactIdentity.contact_id).where(
                    ContactIdentity.kind == sender.kind, ContactIdentity.address == sender.address
                )
            ).one()
            contact_id, identity_id = int(row.contact_id), int(row.id)
        else:
            identity_id = int(
                tx.execute(
                    select(ContactIdentity.id).where(
                        ContactIdentity.kind == sender.kind,
                        ContactIdentity.address == sender.address,
                    )
                ).scalar_one()
            )
    for kind, value in (hints or {}).items():
        exists = tx.execute(
            select(ContactHint.id).where(
                ContactHint.contact_id == contact_id,
                ContactHint.kind == kind,
                ContactHint.value == value,
            )
        ).first()
        if exists is None:
            tx.execute(
                insert(ContactHint).values(
                    contact_id=contact_id,
                    kind=kind,
                    value=value[:320],
                    source="channel",
                    created_at=tx.now,
                )
            )
    return contact_id, identity_id


def _scope(inbox: InboxInfo) -> Any:
    return Conversation.inbox_id == inbox.id if inbox.continuity == "per_channel" else True


def _pick_conversation(tx: Tx, inbox: InboxInfo, contact_id: int, auto: bool) -> tuple[Any, str]:
    """Choose the conversation a message belongs to: ``(row, how)`` with how in
    join | reopen | attach | new (row is the predecessor for new)."""
    open_row = tx.execute(
        select(Conversation)
        .where(
            Conversation.contact_id == contact_id,
            Conversation.state.in_([s.value for s in OPEN_STATES]),
            _scope(inbox),
        )
        .order_by(Conversation.id.desc())
        .limit(1)
    ).first()
    if open_row is not None:
        return open_row, "join"
    last = tx.execute(
        select(Conversation)
        .where(Conversation.contact_id == contact_id, _scope(inbox))
        .order_by(Conversation.id.desc())
        .limit(1)
    ).first()
    if last is None:
        return None, "new"
    if auto:  # an automatic message (out-of-office) is attached, never reopens anything
        return last, "attach"
    window = timedelta(seconds=inbox.reopen_window_s)
    if (
        last.state == S.RESOLVED
        and last.resolved_at is not None
        and tx.now - last.resolved_at <= window
    ):
        return last, "reopen"
    return last, "new"


def ingest_message(tx: Tx, inbox: InboxInfo, msg: InboundMessage) -> IngestOutcome:
    """Persist one inbound message and everything it changes, in the caller's transaction."""
    seen = tx.execute(
        select(Message.id, Message.conversation_id).where(
            Message.inbox_id == inbox.id, Message.external_id == msg.external_id
        )
    ).first()
    if seen is not None:
        return IngestOutcome(int(seen.id), int(seen.conversation_id), duplicate=True)

    contact_id, identity_id = resolve_contact(tx, msg.sender, msg.hints)
    _lock_contact(tx, contact_id)
    if tx.dialect == "postgresql":  # a concurrent delivery may have committed while we waited
        seen = tx.execute(
            select(Message.id, Message.conversation_id).where(
                Message.inbox_id == inbox.id, Message.external_id == msg.external_id
            )
        ).first()
        if seen is not None:
            raise DuplicateMessage(int(seen.id), int(seen.conversation_id))
    conversation, how = _pick_conversation(tx, inbox, contact_id, msg.auto)
    now = tx.now
    created = reopened = False
    if how == "new":
        language = (
            tx.execute(
                select(Contact.language).where(Contact.id == contact_id)
            ).scalar_one_or_none()
            or msg.language
        )
        conversation_id = int(
            tx.execute(
                insert(Conversation)
                .values(
                    contact_id=contact_id,
                    inbox_id=inbox.id,
                    channel=inbox.channel,
                    state=S.NEW.value,
                    priority=1,
                    required_skills={},
                    tags=[],
                    language=language,
                    subject=msg.subject,
                    previous_id=conversation.id if conversation is not None else None,
                    first_inbound_at=now,
                    last_inbound_at=now,
                    data={},
                    created_at=now,
                    updated_at=now,
                )
                .returning(Conversation.id)
            ).scalar_one()
        )
        add_event(
            tx,
            conversation_id,
            EventKind.CREATED,
            Actor.CUSTOMER,
            channel=inbox.channel,
            inbox=inbox.slug,
            previous=conversation.id if conversation is not None else None,
        )
        created = True
        agent_id = None
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
                    "reopen_message": msg.external_id,
                },
            )
            add_event(
                tx,
                conversation_id,
                EventKind.REOPENED,
                Actor.CUSTOMER,
                agent_id=conversation.assigned_agent_id,
            )
            reopened = True
            agent_id = None
        elif how == "join" and conversation.state == S.WAITING_CUSTOMER:
            changes["state"] = S.ASSIGNED.value  # the customer's turn is over
        if conversation.first_inbound_at is None:
            changes["first_inbound_at"] = now
        tx.execute(update(Conversation).where(Conversation.id == conversation_id).values(**changes))

    inserted = tx.execute(
        insert(Message)
        .values(
            conversation_id=conversation_id,
            inbox_id=inbox.id,
            direction=Direction.IN.value,
            external_id=msg.external_id,
            author=Actor.CUSTOMER.value,
            identity_id=identity_id,
            text=msg.text,
            subject=msg.subject,
            attachments=[_attachment(a) for a in msg.attachments],
            delivery_status=DeliveryStatus.RECEIVED.value,
            is_auto=msg.auto,
            provider_ts=msg.provider_ts,
            data={
                k: v
                for k, v in {"language": msg.language, "html": msg.html, **msg.data}.items()
                if v is not None
            },
            created_at=now,
        )
        .returning(Message.id)
    )
    message_id = int(inserted.scalar_one())
    add_event(
        tx,
        conversation_id,
        EventKind.MESSAGE_IN,
        Actor.CUSTOMER,
        message_id=message_id,
        channel=inbox.channel,
        auto=msg.auto,
    )
    if agent_id is not None:
        row = tx.execute(select(Message).where(Message.id == message_id)).one()
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


def apply_status(tx: Tx, inbox: InboxInfo, status: StatusUpdate) -> bool:
    """Move an outbound message's delivery status forward only (failed is terminal)."""
    row = tx.execute(
        select(
            Message.id, Message.delivery_status, Message.conversation_id, Message.agent_id
        ).where(
            Message.inbox_id == inbox.id,
            Message.direction == Direction.OUT.value,
            Message.external_id == status.provider_id,
        )
    ).first()
    if row is None:
        return False
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
                created_at=tx.now,
            )
            .returning(Quarantine.id)
        ).scalar_one()
    )


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

    async def accept(
        self, inbox: InboxInfo, items: list[ParsedItem], source: str = "webhook"
    ) -> list[IngestOutcome]:
        """Persist every item of one delivery in one transaction, in order, each item in its
        own savepoint: a bad item is quarantined with its reason and the rest go on. Returns
        one outcome per message (statuses and rejects are applied, not reported)."""
        if not items:
            return []
        outcomes: list[IngestOutcome] = await self.db.write(_accept_batch, inbox, items, source)
        if any(r.message_id is not None and not r.duplicate for r in outcomes):
            failpoint("after_ingest_commit")
        for outcome in outcomes:
            for callback in self.on_ingested:
                callback(inbox.slug, outcome)
        return outcomes


def _accept_batch(
    tx: Tx, inbox: InboxInfo, items: list[ParsedItem], source: str
) -> list[IngestOutcome]:
    outcomes: list[IngestOutcome] = []
    for item in items:
        if isinstance(item, Reject):
            quarantine(tx, inbox.id, source, item.reason, item.raw)
            continue
        try:
            with tx.savepoint():
                if isinstance(item, StatusUpdate):
                    apply_status(tx, inbox, item)
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
        except (OperationalError, InterfaceError):
            raise  # the database, not the item: fail the delivery so the provider retries
        except DBAPIError as exc:
            if is_retryable(exc):
                raise  # deadlock or serialization failure: the whole delivery is retried
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


def _find_message(conn: Connection, inbox_id: int, external_id: str) -> tuple[int, int] | None:
    row = conn.execute(
        select(Message.id, Message.conversation_id).where(
            Message.inbox_id == inbox_id, Message.external_id == external_id
        )
    ).first()
    return (int(row.id), int(row.conversation_id)) if row else None
