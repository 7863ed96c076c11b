"""Schema migrations (Alembic, in ``migrations/``), run by ``omniroute db upgrade``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import migrations
from router.models import metadata

__all__ = ["current_revision", "head_revision", "pending_diff", "upgrade"]

SCRIPT_LOCATION = str(Path(migrations.__file__).resolve().parent)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _run_with_connection(url: str, fn: Any) -> Any:
    """Run ``fn(sync_connection)`` on either backend (async engine on PostgreSQL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":

        async def run() -> Any:
            engine = create_async_engine(
                parsed.set(drivername="postgresql+asyncpg"), poolclass=pool.NullPool
            )
            try:
                async with engine.begin() as conn:
                    return await conn.run_sync(fn)
            finally:
                await engine.dispose()

        return asyncio.run(run())
    engine = create_engine(parsed.set(drivername="sqlite"), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            return fn(conn)
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` (blocking; call from a thread when a loop runs)."""
    if make_url(url).get_backend_name() == "sqlite":
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)

    def run(conn: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, revision)

    _run_with_connection(url, run)


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def pending_diff(url: str) -> list[Any]:
    """What autogenerate would still change: empty when the models and database agree."""

    def run(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "render_as_batch": conn.dialect.name == "sqlite"}
        )
        return list(compare_metadata(context, metadata))

    return _run_with_connection(url, run)
