"""Leases: a named job (watching rules.yaml, polling a mailbox) held by one process at a time.

A lease row has a holder and an expiry; a process renews its own lease or takes one that
has expired, by conditional update. A crashed holder loses it when it expires.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, update

from router.db import Tx, insert_ignore
from router.models import Lease

__all__ = ["release", "try_acquire"]


def try_acquire(tx: Tx, name: str, holder: str, ttl: float) -> bool:
    """Take or renew lease ``name`` for ``ttl`` seconds; False if another holder has it."""
    expires = tx.now + timedelta(seconds=ttl)
    taken = tx.execute(
        update(Lease)
        .where(Lease.name == name, (Lease.holder == holder) | (Lease.expires_at < tx.now))
        .values(holder=holder, expires_at=expires)
    ).rowcount
    if taken:
        return True
    return (
        insert_ignore(tx.conn, Lease, {"name": name, "holder": holder, "expires_at": expires}) == 1
    )


def release(tx: Tx, name: str, holder: str) -> None:
    tx.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))
