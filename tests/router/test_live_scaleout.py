"""Two processes on PostgreSQL + Redis; and a real server killed right after it committed a
visitor's message (before acknowledging it)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import websockets
from sqlalchemy import create_engine, func, select

from router.models import Message
from tests import peers
from tests.router.test_live import make_agent
from tests.support import (
    AGENT_RULES,
    FAKE_SECRET,
    WEB_CHANNELS,
    Client,
    ServerProcess,
    connect_agent,
    connect_visitor,
    fake_message,
    live_server,
    make_settings,
    server_env,
    signed,
    started_runtime,
    ws_url,
)


async def test_an_offer_decided_in_one_process_reaches_the_agent_on_the_other(
    tmp_path: Path, pg_url: str
) -> None:
    redis_url = peers.need(peers.redis_test_url)
    prefix = peers.unique_prefix()
    base_settings = make_settings(
        tmp_path / "conf",
        pg_url,
        channels=WEB_CHANNELS,
        rules=AGENT_RULES,
        redis_url=redis_url,
        redis_prefix=prefix,
        worker_interval=0.2,
        outbox_interval=0.2,
    )
    settings_b = base_settings.model_copy(update={"process_id": "b"})
    async with (
        started_runtime(base_settings, workers=True) as a,
        started_runtime(settings_b, workers=True) as b,
        live_server(a) as url_a,
        live_server(b) as url_b,
    ):
        _, token = await make_agent(a, "anna")
        agent, _ = await connect_agent(url_b, token)  # the agent is on process B
        visitor, _ = await connect_visitor(url_a)  # the customer on process A
        await visitor.send(
            {"type": "message", "client_id": str(uuid.uuid4()), "text": "hello from A"}
        )
        offer = await agent.wait_for(lambda f: f.get("type") == "offer", timeout=15)
        assert offer["conversation"]["preview"] == "hello from A"
        accepted = await agent.command("accept", offer_id=offer["offer_id"])
        await agent.command(
            "reply", conversation_id=accepted["conversation_id"], text="hello from B"
        )
        reply = await visitor.wait_for(
            lambda f: f.get("type") == "message" and f.get("stream"), timeout=15
        )
        assert reply["text"] == "hello from B"
        await agent.close()
        await visitor.close()


def test_killed_after_committing_a_visitor_message_loses_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    settings = make_settings(
        tmp_path / "conf", sqlite_url, channels=WEB_CHANNELS, rules=AGENT_RULES
    )
    port = peers.free_port()
    server = ServerProcess(server_env(settings, port), tmp_path / "server.log")
    client_id = str(uuid.uuid4())

    async def first_attempt() -> str:
        ws = await websockets.connect(
            ws_url(server.url, "/ws/chat?inbox=web"), origin="https://shop.example"
        )  # type: ignore[arg-type]
        client = Client(ws)
        await client.send({"type": "hello"})
        welcome = await client.wait_for(lambda f: f.get("type") == "welcome")
        await client.send({"type": "message", "client_id": client_id, "text": "did this survive?"})
        try:
            await client.recv(timeout=10)  # the ack never comes: the server dies first
            raise AssertionError("acknowledged by a server that should have died")
        except websockets.ConnectionClosed:
            pass
        return str(welcome["token"])

    async def after_restart(token: str) -> None:
        visitor, welcome = await connect_visitor(server.url, token=token)
        assert [m["text"] for m in welcome["history"]] == ["did this survive?"]
        await visitor.send(
            {"type": "message", "client_id": client_id, "text": "did this survive?"}
        )  # the widget's resend
        ack = await visitor.wait_for(lambda f: f["type"] == "ack")
        assert ack["duplicate"] is True
        async with started_agent_token(settings) as agent_token:
            agent, _ = await connect_agent(server.url, agent_token)
            offer = await agent.wait_for(lambda f: f.get("type") == "offer", timeout=20)
            accepted = await agent.command("accept", offer_id=offer["offer_id"])
            assert [m["text"] for m in accepted["timeline"]["messages"]] == ["did this survive?"]
            await agent.close()
        await visitor.close()

    server.start({"OMNIROUTE_FAILPOINTS": "after_visitor_commit"})
    try:
        token = asyncio.run(first_attempt())
        assert server.wait_exit() == -9
        server.start()
        asyncio.run(after_restart(token))
        engine = create_engine(sqlite_url)
        with engine.connect() as conn:
            assert (
                conn.execute(
                    select(func.count()).select_from(Message).where(Message.direction == "in")
                ).scalar_one()
                == 1
            )
        engine.dispose()
    finally:
        server.kill()


class started_agent_token:
    """Create an agent through the CLI (as an admin would) and yield its token."""

    def __init__(self, settings: object) -> None:
        self.settings = settings

    async def __aenter__(self) -> str:
        import os
        import subprocess
        import sys

        from tests.support import ROOT

        env = {**os.environ, "OMNIROUTE_DATABASE_URL": self.settings.database_url}  # type: ignore[attr-defined]
        done = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "router.cli",
                "agents",
                "add",
                "anna",
                "--capacity",
                "webchat=2,total=2",
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_the_same_webhook_to_two_processes_at_once_is_stored_once(
    tmp_path: Path, pg_url: str
) -> None:
    """A provider's retry can land on another process while the first delivery is still in
    flight: each of 30 messages is delivered to both processes at the same moment."""
    base_settings = make_settings(
        tmp_path / "conf", pg_url, channels=WEB_CHANNELS, rules=AGENT_RULES
    )
    settings_b = base_settings.model_copy(update={"process_id": "b"})
    async with (
        started_runtime(base_settings) as a,
        started_runtime(settings_b) as b,
        live_server(a) as url_a,
        live_server(b) as url_b,
        httpx.AsyncClient() as client,
    ):
        for i in range(30):
            body, headers = signed(
                {"messages": [fake_message(f"dup-{i}", f"+49170555{i:04d}")]}, FAKE_SECRET
            )
            first, second = await asyncio.gather(
                client.post(f"{url_a}/webhooks/fake/sms", content=body, headers=headers),
                client.post(f"{url_b}/webhooks/fake/sms", content=body, headers=headers),
            )
            assert (first.status_code, second.status_code) == (200, 200)
        stored, distinct = await a.db.read(
            lambda c: (
                c.execute(select(func.count()).select_from(Message)).scalar_one(),
                c.execute(select(func.count(func.distinct(Message.external_id)))).scalar_one(),
            )
        )
        assert stored == distinct == 30
