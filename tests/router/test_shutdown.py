"""A graceful stop (SIGTERM in ``serve``): agents are told to reconnect elsewhere (close
1012) and a send in flight finishes and is recorded as sent, not left uncertain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import websockets
from sqlalchemy import select

from adapters.clock import FakeClock
from channels.fake import FakeChannel
from router.db import Database
from router.models import Message, Outbox
from router.runtime import Runtime
from tests.channels.test_email import eventually
from tests.router.test_live import make_agent
from tests.router.test_pipeline import settle
from tests.support import (
    AGENT_RULES,
    WEB_CHANNELS,
    client_for,
    connect_agent,
    fake_message,
    live_server,
    make_settings,
    post_fake,
)


async def outbox_state(runtime: Runtime) -> str | None:
    return await runtime.db.read(lambda c: c.execute(select(Outbox.state)).scalar_one_or_none())


async def test_a_graceful_stop_finishes_sends_and_sends_agents_elsewhere(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(
        tmp_path / "conf",
        db_url,
        channels=WEB_CHANNELS,
        rules=AGENT_RULES,
        worker_interval=0.1,
        outbox_interval=0.05,
    )
    runtime = Runtime(settings, clock=FakeClock())
    await runtime.start(workers=True)
    try:
        async with live_server(runtime) as base:
            _, token = await make_agent(runtime, "anna")
            agent, _ = await connect_agent(base, token)
            async with client_for(runtime) as client:
                response = await post_fake(client, "sms", fake_message("s1", text="where is it?"))
                assert response.status_code == 200
            await settle(runtime)
            offer = await agent.wait_for(lambda f: f.get("type") == "offer")
            accepted = await agent.command("accept", offer_id=offer["offer_id"])
            sms = runtime.channels["sms"]
            assert isinstance(sms, FakeChannel)
            sms.send_delay = 1.5
            await agent.command(
                "reply", conversation_id=accepted["conversation_id"], text="on its way"
            )
            await eventually(lambda: _is(outbox_state(runtime), "sending"))
            await runtime.stop(drain=10)
            reconnect = await agent.wait_for(lambda f: f.get("type") == "reconnect")
            assert reconnect["reason"] == "server shutting down"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await agent.recv(5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    finally:
        await runtime.stop()
    assert [m.text for m in sms.sent] == ["on its way"]
    db = Database(settings.database_url)
    await db.start()
    try:
        state, delivery = await db.read(
            lambda c: (
                c.execute(select(Outbox.state)).scalar_one(),
                c.execute(
                    select(Message.delivery_status).where(Message.direction == "out")
                ).scalar_one(),
            )
        )
    finally:
        await db.close()
    assert (state, delivery) == ("sent", "sent")


async def _is(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_stop_is_idempotent(tmp_path: Path, db_url: str) -> None:
    runtime = Runtime(make_settings(tmp_path / "conf", db_url), clock=FakeClock())
    await runtime.start(workers=False)
    await runtime.stop(drain=1)
    await asyncio.wait_for(runtime.stop(), 5)
