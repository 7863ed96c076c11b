"""Conversation events (the audit trail) and stream names (what sockets subscribe to)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert

from router.db import Tx, prepared
from router.models import ConversationEvent, table
from router.types import Actor, EventKind

__all__ = ["SUPERVISORS", "add_event", "agent_stream", "queue_stream", "visitor_stream"]

SUPERVISORS = "supervisors"
_INSERT = prepared(insert(table(ConversationEvent)))


def agent_stream(agent_id: int) -> str:
    return f"agent:{agent_id}"


def queue_stream(queue: str) -> str:
    return f"queue:{queue}"


def visitor_stream(visitor_id: int | str) -> str:
    return f"visitor:{visitor_id}"


def add_event(
    tx: Tx,
    conversation_id: int,
    kind: EventKind,
    actor: Actor = Actor.SYSTEM,
    *,
    agent_id: int | None = None,
    queue: str | None = None,
    **data: Any,
) -> None:
    """Append a ConversationEvent at the transaction's clock reading (never pruned)."""
    tx.append(
        _INSERT,
        {
            "conversation_id": conversation_id,
            "kind": kind.value,
            "at": tx.now,
            "actor": actor.value,
            "agent_id": agent_id,
            "queue": queue,
            "data": data,
        },
    )
