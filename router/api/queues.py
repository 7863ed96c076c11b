"""Queues: read-only (rules.yaml is their only source) plus live statistics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy import Connection, func, select

from router import policy
from router.api.deps import get_runtime, needs
from router.models import Conversation, Queue
from router.policy import Caller
from router.runtime import Runtime

router = APIRouter(prefix="/api/queues", tags=["queues"])


def queue_stats(conn: Connection, now: datetime) -> list[dict[str, Any]]:
    queues = conn.execute(select(Queue).where(Queue.active.is_(True)).order_by(Queue.name)).all()
    counts: dict[tuple[str, str], int] = {
        (r.queue, r.state): int(r.n)
        for r in conn.execute(
            select(Conversation.queue, Conversation.state, func.count().label("n"))
            .where(Conversation.state.in_(["queued", "offered", "assigned", "waiting_customer"]))
            .group_by(Conversation.queue, Conversation.state)
        )
    }
    oldest = dict(
        conn.execute(
            select(Conversation.queue, func.min(Conversation.queued_at))
            .where(Conversation.state == "queued")
            .group_by(Conversation.queue)
        ).all()
    )
    out = []
    for q in queues:
        first = oldest.get(q.name)
        out.append(
            {
                "name": q.name,
                "spec": q.spec,
                "ruleset": q.ruleset_version,
                "waiting": counts.get((q.name, "queued"), 0),
                "offered": counts.get((q.name, "offered"), 0),
                "assigned": counts.get((q.name, "assigned"), 0)
                + counts.get((q.name, "waiting_customer"), 0),
                "longest_wait_seconds": round((now - first).total_seconds(), 1)
                if first is not None
                else 0.0,
            }
        )
    return out


@router.get(
    "",
    summary="Queues from the active ruleset, with waiting, offered and assigned counts and the longest wait",
)
async def list_queues(
    runtime: Runtime = Depends(get_runtime), _: Caller = Depends(needs(policy.SELF))
) -> list[dict[str, Any]]:
    return await runtime.db.read(queue_stats, runtime.clock.now())
