"""Stream-event retention (docs/agent-protocol.md): websocket stream events older than
``OMNIROUTE_STREAM_RETENTION_DAYS`` are deleted, by their time, in batches.

Stream events only let a socket resume where it left off; the conversation state and the
append-only ConversationEvents (never pruned) are the record. A client that resumes from
before the oldest event still stored gets ``resync_required`` (router/hub.py). With
several processes, only the holder of the ``stream-retention`` lease prunes.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, delete, select

from router.db import Tx
from router.models import StreamEvent

__all__ = ["LEASE", "PRUNE_BATCH", "due_stream_events", "prune_stream_events"]

LEASE = "stream-retention"
#: Rows deleted per transaction: each batch is its own short write, so a backlog of
#: millions never holds the writer (SQLite) or a lock (PostgreSQL) for long.
PRUNE_BATCH = 5000


def due_stream_events(conn: Connection | Tx, horizon: datetime) -> bool:
    """Whether any stream event is older than ``horizon`` (one index probe)."""
    return (
        conn.execute(select(StreamEvent.id).where(StreamEvent.at < horizon).limit(1)).first()
        is not None
    )


def prune_stream_events(tx: Tx, horizon: datetime, limit: int = PRUNE_BATCH) -> int:
    """Delete up to ``limit`` of the oldest stream events dated before ``horizon`` (by the
    ``at`` index); the number deleted. Streams' ``last_seq`` stays: sequences continue."""
    oldest = (
        select(StreamEvent.id).where(StreamEvent.at < horizon).order_by(StreamEvent.at).limit(limit)
    )
    return int(
        tx.execute(
            delete(StreamEvent)
            .where(StreamEvent.id.in_(oldest.scalar_subquery()))
            .execution_options(synchronize_session=False)
        ).rowcount
        or 0
    )
