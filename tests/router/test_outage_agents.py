"""Connected agents are not starved by a database outage: a living process re-asserts its
open agent sockets after the database comes back, whoever judged it dead meanwhile.

Before: a 25 s PostgreSQL outage made every agent of the affected process `offline` 60 s
later (its late heartbeat made it look dead, its agent connections were deleted and never
written again), with the sockets open and /readyz at 200: no offers, work stuck queued."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from adapters.clock import SystemClock
from router.assignment.service import _presence_timeouts
from router.db import Tx
from router.migrate import upgrade
from router.models import Agent, AgentConnection, Process
from router.runtime import Runtime
from tests import peers
from tests.router.test_live import make_agent
from tests.support import (
    AGENT_RULES,
    WEB_CHANNELS,
    connect_agent,
    connect_visitor,
    live_server,
    make_settings,
)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.1)


async def presence(runtime: Runtime, agent_id: int) -> str:
    return str(
        await runtime.db.read(
            lambda c: c.execute(select(Agent.presence).where(Agent.id == agent_id)).scalar_one()
        )
    )


async def connections(runtime: Runtime, agent_id: int) -> int:
    return len(
        await runtime.db.read(
            lambda c: c.execute(
                select(AgentConnection.id).where(AgentConnection.agent_id == agent_id)
            ).all()
        )
    )


async def test_agents_stay_online_and_get_work_after_a_database_outage(tmp_path: Path) -> None:
    pg = peers.need(lambda: peers.PrivatePostgres.start(tmp_path / "pg"))
    with pg:
        await asyncio.to_thread(upgrade, pg.url)
        settings = make_settings(
            tmp_path / "conf",
            pg.url,
            channels=WEB_CHANNELS,
            rules=AGENT_RULES,
            worker_interval=0.2,
            outbox_interval=0.2,
            heartbeat_interval=0.3,  # judged dead after 0.9 s without a heartbeat
            presence_grace=1.0,  # and offline 1 s after that
            db_pool_size=2,
            db_max_overflow=0,
        )
        runtime = Runtime(settings, clock=SystemClock())
        await runtime.start(workers=True)
        try:
            async with live_server(runtime) as base:
                agent_id, token = await make_agent(runtime, "anna")
                agent, _ = await connect_agent(base, token)
                await until(lambda: _is(presence(runtime, agent_id), "online"))

                pg.stop()
                await asyncio.sleep(3.0)  # several heartbeats missed: "dead" by its heartbeat
                pg.restart()
                # Another process, back first, judges this one dead by its old heartbeat and
                # its grace passes: its connection is deleted and the agent set offline.
                judged = await runtime.db.write(_judged_dead_by_another_process, runtime.process_id)
                assert judged == ("offline", 0)
                # The process is alive and the socket open: it says so again, by itself.
                await until(lambda: _is(presence(runtime, agent_id), "online"))
                assert await connections(runtime, agent_id) == 1
                await asyncio.sleep(1.5)  # past the grace: it stays online
                assert await presence(runtime, agent_id) == "online"

                # and work reaches the agent
                visitor, _ = await connect_visitor(base)
                await visitor.send(
                    {
                        "type": "message",
                        "client_id": str(uuid.uuid4()),
                        "text": "hello after the outage",
                    }
                )
                offer = await agent.wait_for(lambda f: f.get("type") == "offer", timeout=30)
                assert offer["conversation"]["preview"] == "hello after the outage"
                await visitor.close()
                await agent.close()
        finally:
            await runtime.stop()


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


def _judged_dead_by_another_process(tx: Tx, process_id: str) -> tuple[str, int]:
    """What another process's timer sweep does when this one's heartbeat is old: its
    sockets are orphans (deleted, grace starts), and once the grace passed, offline."""
    old = tx.now - timedelta(minutes=5)
    tx.execute(update(Process).where(Process.id == process_id).values(heartbeat_at=old))
    _presence_timeouts(tx, 1.0, tx.now - timedelta(seconds=1), "another-process")
    tx.execute(update(Agent).values(disconnected_at=old))
    _presence_timeouts(tx, 1.0, tx.now - timedelta(seconds=1), "another-process")
    return (
        tx.execute(select(Agent.presence)).scalar_one(),
        len(tx.execute(select(AgentConnection.id)).all()),
    )
