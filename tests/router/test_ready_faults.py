"""/readyz follows the peers: a private PostgreSQL killed and restarted, its connections
terminated with pg_terminate_backend, a private Redis killed and restarted. The process is
not ready while one is down, becomes ready by itself, and loses nothing it acknowledged."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from router.migrate import upgrade
from router.models import Message
from tests import peers
from tests.support import client_for, fake_message, make_settings, post_fake, started_runtime


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.2)


async def test_ready_follows_postgres_and_redis_and_recovers_by_itself(tmp_path: Path) -> None:
    pg = peers.need(lambda: peers.PrivatePostgres.start(tmp_path / "pg"))
    redis = peers.need(lambda: peers.PrivateRedis.start(tmp_path / "redis"))
    with pg:
        try:
            await asyncio.to_thread(upgrade, pg.url)
            settings = make_settings(
                tmp_path / "conf", pg.url, redis_url=redis.url, db_pool_size=2, db_max_overflow=0
            )
            async with started_runtime(settings) as runtime, client_for(runtime) as client:

                async def ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                async def reasons() -> list[str]:
                    return list((await client.get("/readyz")).json()["reasons"])

                sent = 0

                async def deliver() -> None:
                    nonlocal sent
                    response = await post_fake(client, "sms", fake_message(f"m{sent}"))
                    assert response.status_code == 200, response.text
                    sent += 1

                assert await ready()
                await deliver()
                # PostgreSQL goes down: not ready; back: ready again, without a restart of ours
                # (stopped, not killed: this private cluster runs with synchronous_commit=off,
                # which a SIGKILL would turn into lost commits of its own)
                pg.stop()
                await until(lambda: _has(reasons(), "database unreachable"))
                pg.restart()
                await until(ready)
                await deliver()
                # every connection of ours terminated by the server: the next write succeeds
                admin = create_async_engine(pg.url)
                async with admin.connect() as conn:
                    await conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE pid <> pg_backend_pid() AND datname = current_database()"
                        )
                    )
                await admin.dispose()
                await deliver()
                # Redis dies: not ready (events still land in the database); back: ready
                redis.kill()
                await until(lambda: _has(reasons(), "bus unreachable"))
                await deliver()
                redis.restart()
                await until(ready)
                stored = await runtime.db.read(
                    lambda c: c.execute(select(func.count()).select_from(Message)).scalar_one()
                )
                assert stored == sent == 4
        finally:
            redis.close()


async def _has(reasons: Awaitable[list[str]], reason: str) -> bool:
    return reason in await reasons


async def test_a_connection_lost_mid_delivery_fails_the_delivery_and_quarantines_nothing(
    tmp_path: Path,
) -> None:
    """PostgreSQL stops under a delivery: its pooled connection is terminated in the middle
    of the ingest. That is the database's trouble, not the item's: the provider gets a 503
    and retries; nothing is quarantined (before, the item was quarantined as if it were bad,
    and the provider got its 200)."""
    from router.models import Quarantine

    pg = peers.need(lambda: peers.PrivatePostgres.start(tmp_path / "pg"))
    with pg:
        await asyncio.to_thread(upgrade, pg.url)
        settings = make_settings(tmp_path / "conf", pg.url)
        async with started_runtime(settings) as runtime, client_for(runtime) as client:
            assert (await post_fake(client, "sms", fake_message("m0"))).status_code == 200
            pg.stop()
            refused = await post_fake(client, "sms", fake_message("m1"))
            assert refused.status_code == 503, refused.text
            pg.restart()

            async def delivered() -> bool:
                return (await post_fake(client, "sms", fake_message("m1"))).status_code == 200

            await until(delivered)
            stored = await runtime.db.read(
                lambda c: (
                    c.execute(select(Message.external_id).order_by(Message.id)).scalars().all()
                )
            )
            quarantined = await runtime.db.read(
                lambda c: c.execute(select(func.count()).select_from(Quarantine)).scalar_one()
            )
        assert [s for s in stored if s.startswith("m")] == ["m0", "m1"]
        assert quarantined == 0
