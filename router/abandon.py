"""Web-chat abandonment (docs/kpis.md): a visitor who leaves (their last socket closes)
before an agent took the conversation, and stays away for ``abandon_after``, abandoned it.
Coming back in time cancels that. The limit is the conversation's queue's ``abandon_after``
(rules.yaml) when that queue sets one, else the inbox's (channels.yaml, default ``5m``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from router.assignment.core import abandon
from router.db import Tx
from router.models import ContactIdentity, Conversation, Inbox, Message
from router.serialize import iso
from router.types import ConversationState as S

__all__ = [
    "abandon_gone_visitors",
    "abandon_limit",
    "gone_visitors",
    "visitor_back",
    "visitor_left",
    "waiting_chats",
]

_WAITING = (S.NEW.value, S.QUEUED.value, S.OFFERED.value)


def waiting_chats(conn: Connection | Tx, address: str) -> list[Any]:
    """The visitor's conversations still waiting for an agent (read before any write:
    most visitors who connect or leave have none)."""
    identity = (
        select(ContactIdentity.id, ContactIdentity.contact_id)
        .where(ContactIdentity.kind == "webchat", ContactIdentity.address == address)
        .subquery()
    )
    # By the identity's contact (indexed by contact and state), then only the conversations
    # this visitor wrote in (each one's messages by its index): never a scan of messages.
    wrote = (
        select(Message.id)
        .where(Message.conversation_id == Conversation.id, Message.identity_id == identity.c.id)
        .exists()
    )
    return list(
        conn.execute(
            select(Conversation.id, Conversation.data)
            .join(identity, identity.c.contact_id == Conversation.contact_id)
            .where(Conversation.state.in_(_WAITING), Conversation.channel == "webchat", wrote)
        ).all()
    )


def visitor_left(tx: Tx, address: str) -> int:
    """The visitor's socket closed: their waiting conversations note when."""
    rows = waiting_chats(tx, address)
    for row in rows:
        data = {**(row.data or {}), "visitor_left_at": iso(tx.now)}
        # lifecycle: a conversation write (its data only, never its state or owner)
        tx.execute(update(Conversation).where(Conversation.id == row.id).values(data=data))
    return len(rows)


def visitor_back(tx: Tx, address: str) -> None:
    for row in waiting_chats(tx, address):
        if "visitor_left_at" in (row.data or {}):
            data = {k: v for k, v in row.data.items() if k != "visitor_left_at"}
            # lifecycle: a conversation write (its data only, never its state or owner)
            tx.execute(update(Conversation).where(Conversation.id == row.id).values(data=data))


def abandon_limit(
    inbox_id: int, queue: str | None, after: Mapping[int, float], queues: Mapping[str, float]
) -> float | None:
    """Seconds a visitor may stay away: the queue's ``abandon_after`` when it sets one, else
    the inbox's; None for an inbox that is not a web chat."""
    if inbox_id not in after:
        return None
    if queue is not None and queue in queues:
        return queues[queue]
    return after[inbox_id]


def gone_visitors(
    conn: Connection | Tx,
    after: Mapping[int, float],
    now: datetime,
    queues: Mapping[str, float] | None = None,
) -> list[tuple[int, float]]:
    """``(conversation id, wait)`` of the web chats whose visitor has been away longer than
    ``abandon_after`` before an agent took them: ``queues`` holds the queues' setting
    (seconds, by queue name, only those that set one), ``after`` the inboxes' (seconds, by
    web-chat inbox id); a queue's wins over its inbox's."""
    due = []
    for row in conn.execute(
        select(
            Conversation.id,
            Conversation.inbox_id,
            Conversation.queue,
            Conversation.data,
            Conversation.created_at,
        )
        .join(Inbox, Inbox.id == Conversation.inbox_id)
        .where(
            Conversation.channel == "webchat",
            Conversation.state.in_(_WAITING),
            # only those whose visitor left (in SQL: waiting chats can be thousands)
            Conversation.data["visitor_left_at"].as_string().is_not(None),
        )
    ):
        left = (row.data or {}).get("visitor_left_at")
        limit = abandon_limit(int(row.inbox_id), row.queue, after, queues or {})
        if not left or limit is None:
            continue
        left_at = datetime.fromisoformat(left)
        if now - left_at >= timedelta(seconds=limit):
            due.append((int(row.id), max(0.0, (left_at - row.created_at).total_seconds())))
    return due


def abandon_gone_visitors(
    tx: Tx, after: Mapping[int, float], queues: Mapping[str, float] | None = None
) -> list[int]:
    """Close the web chats :func:`gone_visitors` finds (checked again in this transaction:
    a visitor may have come back since a read found them gone)."""
    return [
        conversation_id
        for conversation_id, waited in gone_visitors(tx, after, tx.now, queues)
        # lifecycle: abandon() closes the conversation (state written in assignment.core)
        if abandon(tx, conversation_id, waited, "the visitor left before an agent joined")
    ]
