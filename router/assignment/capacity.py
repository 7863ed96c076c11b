"""Capacity: per agent, per channel plus ``total``, as conditional updates on counters.

What counts (DESIGN.md): offered and assigned conversations, plus ``waiting_customer`` on
live channels (web chat and voice), where the customer is still there. Every claim is
``UPDATE agent_load SET used = used + 1 WHERE ... AND used < cap``, checked by rowcount,
for the channel and for ``total``: two processes can never push an agent past capacity.
Every change appends an AgentStatusEvent with the load after it.
"""

from __future__ import annotations

from sqlalchemy import bindparam, select, update

from router.agents import record_status
from router.db import Tx
from router.models import Agent, AgentLoad, table

__all__ = ["LIVE_CHANNELS", "claim", "holds_while_waiting", "release"]

#: Channels whose conversations keep holding capacity while waiting for the customer.
LIVE_CHANNELS = frozenset({"webchat", "voice"})


def holds_while_waiting(channel: str) -> bool:
    return channel in LIVE_CHANNELS


_load = table(AgentLoad)
_KEY = (_load.c.agent_id == bindparam("p_agent"), _load.c.channel == bindparam("p_channel"))
_TAKE = update(_load).where(*_KEY, _load.c.used < _load.c.cap).values(used=_load.c.used + 1)
_TAKE_FORCED = update(_load).where(*_KEY).values(used=_load.c.used + 1)
_GIVE = update(_load).where(*_KEY, _load.c.used > 0).values(used=_load.c.used - 1)


def _bump(tx: Tx, agent_id: int, channel: str, delta: int, *, force: bool = False) -> bool:
    statement = _GIVE if delta < 0 else (_TAKE_FORCED if force else _TAKE)
    return bool(tx.execute(statement, {"p_agent": agent_id, "p_channel": channel}).rowcount)


class _Full(Exception):
    """A counter was full: roll the savepoint back so neither counter moved."""


def claim(tx: Tx, agent_id: int, channel: str, reason: str, *, force: bool = False) -> bool:
    """Take one unit of ``channel`` and of ``total``; False (and nothing changed) if either is
    full. ``force`` is for a supervisor's explicit, recorded override."""
    try:
        with tx.savepoint():
            if not _bump(tx, agent_id, channel, +1, force=force) or not _bump(
                tx, agent_id, "total", +1, force=force
            ):
                raise _Full
    except _Full:
        return False
    record_status(tx, agent_id, None, reason)
    return True


def release(tx: Tx, agent_id: int, channel: str, reason: str) -> None:
    """Give back one unit of ``channel`` and ``total``; mark the agent idle when all is free."""
    _bump(tx, agent_id, channel, -1)
    _bump(tx, agent_id, "total", -1)
    total = tx.execute(
        select(AgentLoad.used).where(AgentLoad.agent_id == agent_id, AgentLoad.channel == "total")
    ).scalar_one_or_none()
    if total == 0:
        tx.execute(update(Agent).where(Agent.id == agent_id).values(idle_since=tx.now))
    record_status(tx, agent_id, None, reason)
