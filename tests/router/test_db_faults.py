"""The database layer across a PostgreSQL restart: pooled connections the server dropped are
replaced, and a transaction that failed before its commit is retried on a fresh one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from router.db import Database, Tx
from router.migrate import upgrade
from router.models import EventStream
from tests import peers


def _add(tx: Tx, name: str) -> None:
    tx.execute(insert(EventStream).values(stream=name, last_seq=0))


@pytest.mark.asyncio
async def test_writes_and_reads_survive_a_postgres_restart(tmp_path: Path) -> None:
    server = peers.need(lambda: peers.PrivatePostgres.start(tmp_path))
    with server:
        await asyncio.to_thread(upgrade, server.url)
        db = Database(server.url, pool_size=2, max_overflow=0)
        await db.start()
        try:
            await db.write(_add, "before")
            assert await db.scalar(select(func.count()).select_from(EventStream)) == 1
            server.restart()  # every pooled connection is now dead
            await db.write(_add, "after")
            await db.write(_add, "again")
            names = await db.read(lambda c: sorted(c.execute(select(EventStream.stream)).scalars()))
            assert names == ["after", "again", "before"]  # each once: nothing doubled
        finally:
            await db.close()
