"""Alembic environment: async on PostgreSQL, sync on SQLite (render_as_batch for SQLite).

Run through ``omniroute db upgrade`` (router/migrate.py), which passes the connection in
``config.attributes["connection"]``; plain ``alembic`` works too with ``sqlalchemy.url``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, pool
from sqlalchemy.ext.asyncio import create_async_engine

from router.models import metadata

config = context.config


def render_item(type_: str, obj: Any, autogen_context: Any) -> Any:
    # Render our UTC type as its stable implementation so migrations never import app code.
    if type_ == "type" and type(obj).__name__ == "UTCDateTime":
        return "sa.DateTime(timezone=True)"
    return False


def do_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    assert url, "set sqlalchemy.url or pass a connection"
    if url.startswith("postgresql"):

        async def run_async() -> None:
            engine = create_async_engine(url, poolclass=pool.NullPool)
            async with engine.connect() as conn:
                await conn.run_sync(do_run)
            await engine.dispose()

        asyncio.run(run_async())
    else:
        engine = create_engine(url, poolclass=pool.NullPool)
        with engine.connect() as conn:
            do_run(conn)


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_online()
