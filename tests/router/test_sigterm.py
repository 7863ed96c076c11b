"""SIGTERM to `omniroute serve`: every websocket gets the documented `reconnect` frame
before its close 1012 (docs/agent-protocol.md). Before, uvicorn closed the sockets itself
(a bare 1012, no frame) before the application's shutdown could say anything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import websockets

from router.agents import DEFAULT_CAPACITY, create_agent
from router.auth import create_user
from router.db import Database
from tests.support import (
    AGENT_RULES,
    WEB_CHANNELS,
    ServerProcess,
    free_port,
    make_settings,
    server_env,
    ws_url,
)


async def test_sigterm_sends_reconnect_before_closing_every_socket(
    tmp_path: Path, db_url: str
) -> None:
    port = free_port()
    settings = make_settings(
        tmp_path / "conf",
        db_url,
        channels=WEB_CHANNELS.replace(
            'allowed_origins: ["https://shop.example"]',
            f'allowed_origins: ["http://127.0.0.1:{port}"]',
        ),
        rules=AGENT_RULES,
    )
    db = Database(db_url)
    await db.start()
    try:
        _, token = await db.write(lambda tx: create_user(tx, "anna", "agent"))
        await db.write(lambda tx: create_agent(tx, 1, "Anna", {}, dict(DEFAULT_CAPACITY)))
    finally:
        await db.close()
    server = ServerProcess(server_env(settings, port), tmp_path / "server.log").start()
    try:
        base = server.url
        agent = await websockets.connect(ws_url(base, "/ws/agent"))
        await agent.send(json.dumps({"type": "hello", "token": token}))
        visitor = await websockets.connect(
            ws_url(base, "/ws/chat?inbox=web"), origin=f"http://127.0.0.1:{port}"
        )  # type: ignore[arg-type]
        await visitor.send(json.dumps({"type": "hello"}))
        for ws in (agent, visitor):
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert welcome["type"] == "welcome", welcome
        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGTERM)
        for ws in (agent, visitor):
            frames = []
            try:
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1012, closed
            assert {"type": "reconnect", "reason": "server shutting down"} in frames, frames
        # uvicorn re-raises the signal once it has stopped: a clean stop by SIGTERM
        assert server.wait_exit(30) in (0, -signal.SIGTERM), server.log()
    finally:
        server.kill()
