"""Admin routes: the active ruleset, quarantined input, uncertain sends."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import Connection, select, update

from channels.base import Reject
from router import policy
from router.api.deps import get_runtime, needs
from router.exceptions import Conflict, InvalidInput, NotFound
from router.models import Outbox, Quarantine
from router.outbox import resend
from router.policy import Caller
from router.runtime import Runtime
from router.serialize import iso

router = APIRouter(prefix="/api/admin", tags=["admin"])
admin = needs(policy.ADMIN)


@router.get(
    "/rules", summary="The active ruleset, each process's version and the last load's errors"
)
async def get_rules(
    runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> dict[str, Any]:
    return await runtime.rules.status()


@router.put(
    "/rules",
    summary="Validate and activate a ruleset (YAML body); 422 with located errors",
    openapi_extra={
        "requestBody": {
            "content": {"application/yaml": {"schema": {"type": "string"}}},
            "required": True,
        }
    },
)
async def put_rules(
    request: Request, runtime: Runtime = Depends(get_runtime), user: Caller = Depends(admin)
) -> dict[str, Any]:
    body = await request.body()
    ruleset = await runtime.rules.put(body, f"api:{user.name}")
    return {
        "version": ruleset.version,
        "rules": len(ruleset.rules),
        "queues": sorted(ruleset.queues),
    }


def _quarantine(conn: Connection, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(select(Quarantine).order_by(Quarantine.id.desc()).limit(limit)).all()
    return [
        {
            "id": q.id,
            "inbox_id": q.inbox_id,
            "source": q.source,
            "reason": q.reason,
            "external_id": q.external_id,
            "partial": bool((q.data or {}).get("partial")),
            "size": len(q.raw),
            "created_at": iso(q.created_at),
            "resolved_at": iso(q.resolved_at),
        }
        for q in rows
    ]


@router.get("/quarantine", summary="Inbound input that could not be handled, newest first")
async def list_quarantine(
    limit: int = 100, runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> list[dict[str, Any]]:
    return await runtime.db.read(_quarantine, min(max(limit, 1), 1000))


@router.get("/quarantine/{item_id}/raw", summary="Download a quarantined item's raw bytes")
async def quarantine_raw(
    item_id: int, runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> Response:
    raw = await runtime.db.read(
        lambda c: c.execute(
            select(Quarantine.raw).where(Quarantine.id == item_id)
        ).scalar_one_or_none()
    )
    if raw is None:
        raise NotFound(f"no quarantined item {item_id}")
    return Response(
        raw,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="quarantine-{item_id}.bin"'},
    )


@router.post(
    "/quarantine/{item_id}/reimport",
    summary="Parse a quarantined item again (after a fix) and import it; 422 if it still "
    "fails, 409 if only part of it was kept (the item stays in quarantine either way)",
)
async def quarantine_reimport(
    item_id: int, runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> dict[str, Any]:
    row = await runtime.db.read(
        lambda c: c.execute(select(Quarantine).where(Quarantine.id == item_id)).first()
    )
    if row is None:
        raise NotFound(f"no quarantined item {item_id}")
    if row.resolved_at is not None:
        raise Conflict(f"quarantined item {item_id} was already re-imported")
    if (row.data or {}).get("partial"):
        # e.g. the headers of a mail over the inbox's max_size_mb: importing them would
        # store an empty message and lose the body and attachments for good
        raise Conflict(
            f"quarantined item {item_id} holds only part of what arrived ({row.reason}); "
            "re-importing it would lose the rest, so it stays in quarantine. Fetch the "
            "original from the provider (for email: raise max_size_mb and copy the mail "
            "into the polled folder again)"
        )
    channel = runtime.channel_for_inbox_id(row.inbox_id) if row.inbox_id is not None else None
    items = (
        await channel.reimport(
            row.raw, row.external_id or (row.data or {}).get("external_id") or f"reimport/{item_id}"
        )
        if channel is not None
        else None
    )
    if items is None:
        raise InvalidInput("this item's inbox cannot re-import (or is gone)")
    still = [i.reason for i in items if isinstance(i, Reject)]
    if still:
        raise InvalidInput(f"still cannot be imported: {still[0]}")
    outcomes = await runtime.ingest(channel.slug, items, source="reimport")  # type: ignore[union-attr]
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Quarantine).where(Quarantine.id == item_id).values(resolved_at=tx.now)
        )
    )
    return {
        "reimported": True,
        "message_ids": [o.message_id for o in outcomes if o.message_id is not None],
    }


def _outbox_report(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(Outbox)
        .where((Outbox.uncertain_resends > 0) | Outbox.state.in_(["uncertain", "failed"]))
        .order_by(Outbox.id.desc())
        .limit(500)
    ).all()
    return [
        {
            "id": o.id,
            "message_id": o.message_id,
            "conversation_id": o.conversation_id,
            "state": o.state,
            "attempts": o.attempts,
            "uncertain_resends": o.uncertain_resends,
            "last_error": o.last_error,
            "provider_id": o.provider_id,
        }
        for o in rows
    ]


@router.get(
    "/outbox",
    summary="Sends that failed, are uncertain, or were resent after a crash (possible duplicates)",
)
async def outbox_report(
    runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> list[dict[str, Any]]:
    return await runtime.db.read(_outbox_report)


@router.post("/outbox/{outbox_id}/resend", summary="Send an uncertain or failed message again")
async def outbox_resend(
    outbox_id: int, runtime: Runtime = Depends(get_runtime), user: Caller = Depends(admin)
) -> dict[str, Any]:
    done = await runtime.db.write(resend, outbox_id, f"resend requested by {user.name}")
    if not done:
        raise NotFound(f"outbox {outbox_id} is not uncertain or failed")
    runtime.outbox.wake()
    return {"resent": True}
