"""Capacity: per agent, per channel plus ``total``, as conditional updates on counters.

What counts (DESIGN.md): offered and assigned conversations, plus ``waiting_customer`` on
live channels (web chat and voice), where the customer is still there. Every claim is
``UPDATE agent_load SET used = used + 1 WHERE ... AND used < cap``, checked by rowcount,
for the channel and for ``total``: two processes can never push an agent past capacity.
Every change appends an AgentStatusEvent with the load after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, case, update

from router.agents import record_status
from router.db import Tx, prepared
from router.models import Agent, AgentLoad, table

__all__ = [
    "LIVE_CHANNELS",
    "CapacityFull",
    "claim",
    "holds_while_waiting",
    "release",
    "release_many",
    "take",
]

#: Channels whose conversations keep holding capacity while waiting for the customer.
LIVE_CHANNELS = frozenset({"webchat", "voice"})


def holds_while_waiting(channel: str) -> bool:
    return channel in LIVE_CHANNELS


_load = table(AgentLoad)
_KEY = (_load.c.agent_id == bindparam("p_agent"), _load.c.channel == bindparam("p_channel"))
_AFTER = (_load.c.used, _load.c.cap)
_TAKE = prepared(
    update(_load)
    .where(*_KEY, _load.c.used < _load.c.cap)
    .values(used=_load.c.used + 1)
    .returning(*_AFTER)
)
_TAKE_FORCED = prepared(update(_load).where(*_KEY).values(used=_load.c.used + 1).returning(*_AFTER))
# n units back, never below zero
_GIVE = prepared(
    update(_load)
    .where(*_KEY, _load.c.used > 0)
    .values(used=case((_load.c.used > bindparam("n"), _load.c.used - bindparam("n")), else_=0))
    .returning(*_AFTER)
)


class CapacityFull(Exception):
    """A counter was full (or already empty): the caller rolls back what it did."""


def _bump(tx: Tx, agent_id: int, channel: str, statement: Any) -> list[int]:
    row = tx.execute(statement, {"p_agent": agent_id, "p_channel": channel}).first()
    if row is None:
        raise CapacityFull(channel)
    return [int(row.used), int(row.cap)]


def take(
    tx: Tx,
    agent_id: int,
    channel: str,
    reason: str,
    *,
    force: bool = False,
    presence: str | None = None,
) -> None:
    """Take one unit of ``channel`` and of ``total`` or raise :class:`CapacityFull`; the caller's
    transaction (or savepoint) undoes a half-done claim. ``force`` is a supervisor's explicit,
    recorded override."""
    statement = _TAKE_FORCED if force else _TAKE
    load = {
        channel: _bump(tx, agent_id, channel, statement),
        "total": _bump(tx, agent_id, "total", statement),
    }
    record_status(tx, agent_id, presence, reason, load=load)


def claim(
    tx: Tx,
    agent_id: int,
    channel: str,
    reason: str,
    *,
    force: bool = False,
    presence: str | None = None,
) -> bool:
    """Like :func:`take`, but False (and nothing changed) when full."""
    try:
        with tx.savepoint():
            take(tx, agent_id, channel, reason, force=force, presence=presence)
    except CapacityFull:
        return False
    return True


def release(tx: Tx, agent_id: int, channel: str, reason: str) -> None:
    """Give back one unit of ``channel`` and ``total`` (never below zero); the agent is idle
    from now on when nothing is left."""
    release_many(tx, agent_id, {channel: 1}, reason)


def release_many(tx: Tx, agent_id: int, units: Mapping[str, int], reason: str) -> None:
    """Give back ``units`` per channel, and their sum of ``total``, in one statement per
    counter and one status event however many units (an agent's offers withdrawn at once)."""
    load: dict[str, list[int]] = {}
    for key, n in (*units.items(), ("total", sum(units.values()))):
        row = tx.execute(_GIVE, {"p_agent": agent_id, "p_channel": key, "n": n}).first()
        if row is not None:
            load[key] = [int(row.used), int(row.cap)]
    if load.get("total", [1])[0] == 0:
        tx.execute(update(Agent).where(Agent.id == agent_id).values(idle_since=tx.now))
    record_status(tx, agent_id, None, reason, load=load or None)
