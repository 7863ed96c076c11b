"""Stored due times of conversations: each a row in ``timers`` (one per conversation and
kind). The worker fires what is due by deleting the row (``DELETE ... RETURNING``), so each
fires once, whichever process gets there first, and a restart fires what fell due while it
was down. A handler re-checks the conversation before acting, so a stale timer does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, select

from router.db import Tx, prepared
from router.models import Timer, table
from routing_rules import Ruleset

__all__ = [
    "CLOSE",
    "OVERFLOW",
    "PREFERRED",
    "SLA_TIMERS",
    "WRAP_UP",
    "active_ruleset",
    "clear_timers",
    "current_ruleset",
    "due_timers",
    "replace_timers",
    "set_timer",
    "take_timer",
]

OVERFLOW = "overflow"
PREFERRED = "preferred"
WRAP_UP = "wrap_up"
CLOSE = "close"
FRT_WARNING, FRT_BREACH = "sla_first_response_warning", "sla_first_response_breach"
RES_WARNING, RES_BREACH = "sla_resolution_warning", "sla_resolution_breach"
SLA_TIMERS = (FRT_WARNING, FRT_BREACH, RES_WARNING, RES_BREACH)

_timers = table(Timer)
_NEW_TIMER = prepared(_timers.insert())
_CLEAR_ALL = prepared(delete(_timers).where(_timers.c.conversation_id == bindparam("cid")))
_CLEAR_KINDS = _CLEAR_ALL.where(_timers.c.kind.in_(bindparam("kinds", expanding=True)))


def active_ruleset(context: Mapping[str, Any]) -> Ruleset | None:
    """The active ruleset of this process, as the runtime provides it in the database's
    context (``Database.context``, handed to every transaction)."""
    provider = context.get("ruleset")
    return provider() if provider is not None else None


def current_ruleset(tx: Tx) -> Ruleset | None:
    return active_ruleset(tx.context)


# -- timers -----------------------------------------------------------------------------------
def set_timer(
    tx: Tx, conversation_id: int, kind: str, due: datetime, data: dict[str, Any] | None = None
) -> None:
    """Arm (or re-arm) the conversation's timer of this kind."""
    clear_timers(tx, conversation_id, kind)
    tx.append(
        _NEW_TIMER,
        {"conversation_id": conversation_id, "kind": kind, "due_at": due, "data": data or {}},
    )


def replace_timers(
    tx: Tx,
    conversation_id: int,
    kinds: tuple[str, ...],
    timers: list[tuple[str, datetime, dict[str, Any]]],
) -> None:
    """Clear the conversation's timers of ``kinds`` (none: nothing is cleared) and arm
    ``timers`` (kind, due, data)."""
    if kinds:
        clear_timers(tx, conversation_id, *kinds)
    if timers:
        tx.append(
            _NEW_TIMER,
            [
                {"conversation_id": conversation_id, "kind": k, "due_at": due, "data": data}
                for k, due, data in timers
            ],
        )


def clear_timers(tx: Tx, conversation_id: int, *kinds: str) -> None:
    """Clear the conversation's timers of ``kinds`` (all of them when none is named)."""
    if kinds:
        tx.execute(_CLEAR_KINDS, {"cid": conversation_id, "kinds": list(kinds)})
    else:
        tx.execute(_CLEAR_ALL, {"cid": conversation_id})


def due_timers(conn: Connection, now: datetime, limit: int = 500) -> list[int]:
    return [
        int(i)
        for i in conn.execute(
            select(_timers.c.id)
            .where(_timers.c.due_at <= now)
            .order_by(_timers.c.due_at)
            .limit(limit)
        ).scalars()
    ]


_TAKE_TIMER = (
    delete(_timers)
    .where(_timers.c.id == bindparam("tid"))
    .returning(_timers.c.conversation_id, _timers.c.kind, _timers.c.due_at, _timers.c.data)
)


def take_timer(tx: Tx, timer_id: int) -> Any:
    """Take a due timer (once: whoever deletes the row): ``(conversation_id, kind, due_at,
    data)``, or None when it fired elsewhere or was cleared."""
    return tx.execute(_TAKE_TIMER, {"tid": timer_id}).first()
