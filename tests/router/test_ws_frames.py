"""Hostile frames on every socket (docs/security.md, "Websocket frames"): a binary frame,
JSON nested too deep (deep enough to exhaust Python's recursion), text that cannot be
stored (a lone surrogate or a NUL written as a JSON escape) get an ``error`` frame and the
socket stays usable; a first frame like that is refused with an error and 1008. A visitor
message that cannot be stored is never acknowledged. Nothing is logged as a traceback."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from sqlalchemy import func, select

from adapters.clock import FakeClock
from router import pipeline
from router.auth import create_user
from router.models import Message, Quarantine
from router.runtime import Runtime
from tests.router.test_live import make_agent
from tests.support import (
    AGENT_RULES,
    WEB_CHANNELS,
    Client,
    connect_agent,
    connect_visitor,
    live_server,
    make_settings,
    started_runtime,
    ws_url,
)

DEEP = "[" * 30_000 + "]" * 30_000  # under the 64 KiB frame limit, far past recursion
NESTED = '{"type": "ping", "x": ' + "[" * 40 + "]" * 40 + "}"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of the server (uvicorn's "Exception in ASGI application" included:
    uvicorn's loggers do not propagate to the root, so caplog would not see them)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "router")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.fixture
async def live(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[tuple[Runtime, str]]:
    settings = make_settings(tmp_path / "conf", db_url, channels=WEB_CHANNELS, rules=AGENT_RULES)
    async with started_runtime(settings, clock) as runtime, live_server(runtime) as base:
        yield runtime, base


async def _error(client: Client) -> dict[str, Any]:
    return await client.wait_for(lambda f: f.get("type") == "error")


async def _hostile_frames(client: Client, message: str) -> None:
    """Send each hostile frame; each gets its error frame, in order, on an open socket."""
    await client.ws.send(b'{"type": "ping"}')
    assert (await _error(client))["code"] == "binary_frame"
    await client.ws.send(DEEP)
    assert (await _error(client))["code"] == "too_deep"
    await client.ws.send(NESTED)
    assert (await _error(client))["code"] == "too_deep"
    for escape in ("\\ud800", "\\udfff", "a\\u0000b"):
        await client.ws.send(message.replace("TEXT", escape))
        error = await _error(client)
        assert error["code"] == "invalid_text", error
        assert "surrogate" in error["message"]


async def test_the_agent_socket_answers_hostile_frames_and_stays_open(
    live: tuple[Runtime, str], errors_logged: list[logging.LogRecord]
) -> None:
    runtime, base = live
    _, token = await make_agent(runtime, "anna")
    agent, _ = await connect_agent(base, token)
    await _hostile_frames(
        agent, '{"type": "note", "id": "n1", "conversation_id": 1, "text": "TEXT"}'
    )
    # the refused command's id comes back, so a client can fail the right request
    assert agent.frames[-1]["id"] == "n1"
    assert await agent.command("ping") == {}
    await agent.close()
    assert errors_logged == []


async def test_the_visitor_socket_answers_hostile_frames_and_acks_nothing_unstorable(
    live: tuple[Runtime, str], errors_logged: list[logging.LogRecord]
) -> None:
    runtime, base = live
    visitor, _ = await connect_visitor(base)
    client_id = str(uuid.uuid4())
    await _hostile_frames(
        visitor, '{"type": "message", "client_id": "' + client_id + '", "text": "hi TEXT"}'
    )
    assert visitor.frames[-1]["client_id"] == client_id
    await visitor.send({"type": "ping"})
    await visitor.wait_for(lambda f: f.get("type") == "pong")
    assert not [f for f in visitor.frames if f.get("type") == "ack"]  # nothing was acknowledged

    def counts(conn: Any) -> tuple[int, int]:
        return (
            conn.execute(select(func.count()).select_from(Message)).scalar_one(),
            conn.execute(select(func.count()).select_from(Quarantine)).scalar_one(),
        )

    assert await runtime.db.read(counts) == (0, 0)  # refused before storing: nothing kept
    # the same socket still carries a good message, acknowledged with its id
    await visitor.send({"type": "message", "client_id": client_id, "text": "hi there"})
    ack = await visitor.wait_for(lambda f: f.get("type") == "ack")
    assert isinstance(ack["message_id"], int)
    await visitor.close()
    assert errors_logged == []


async def test_a_message_that_failed_to_store_is_not_acknowledged(
    live: tuple[Runtime, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes an item fail inside the ingest (here an injected fault), it is
    quarantined and the visitor gets ``not_stored``, never an ack without a message id."""
    runtime, base = live
    real = pipeline.ingest_message

    def failing(tx: Any, inbox: Any, msg: Any) -> Any:
        if msg.text == "this one breaks":
            raise ValueError("injected fault")
        return real(tx, inbox, msg)

    monkeypatch.setattr(pipeline, "ingest_message", failing)
    visitor, _ = await connect_visitor(base)
    broken = str(uuid.uuid4())
    await visitor.send({"type": "message", "client_id": broken, "text": "this one breaks"})
    error = await _error(visitor)
    assert (error["code"], error["client_id"]) == ("not_stored", broken)
    await visitor.send({"type": "message", "client_id": str(uuid.uuid4()), "text": "fine"})
    ack = await visitor.wait_for(lambda f: f.get("type") == "ack")
    assert isinstance(ack["message_id"], int)
    assert [f for f in visitor.frames if f.get("type") == "ack"] == [ack]
    reasons = await runtime.db.read(lambda c: c.execute(select(Quarantine.reason)).scalars().all())
    assert len(reasons) == 1 and "injected fault" in reasons[0]  # kept for an admin
    await visitor.close()


async def test_a_name_that_cannot_be_stored_is_refused_in_the_hello(
    live: tuple[Runtime, str], errors_logged: list[logging.LogRecord]
) -> None:
    """A lone surrogate in the hello's name would make every later message of the visitor
    unstorable: the hello is refused instead."""
    _, base = live
    ws = await websockets.connect(ws_url(base, "/ws/chat?inbox=web"), origin="https://shop.example")  # type: ignore[arg-type]
    await ws.send('{"type": "hello", "name": "Vera \\ud83d"}')
    frame = json.loads(await ws.recv())
    assert (frame["type"], frame["code"]) == ("error", "invalid_text")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert errors_logged == []


async def test_the_supervisor_socket_answers_hostile_frames_and_stays_open(
    live: tuple[Runtime, str], errors_logged: list[logging.LogRecord]
) -> None:
    runtime, base = live
    token = await runtime.db.write(lambda tx: create_user(tx, "sue", "supervisor")[1])
    ws = await websockets.connect(ws_url(base, "/ws/supervisor"))
    supervisor = Client(ws)
    await supervisor.send({"type": "hello", "token": token})
    await supervisor.wait_for(lambda f: f.get("type") == "welcome")
    await _hostile_frames(supervisor, '{"type": "ping", "note": "TEXT"}')
    await supervisor.send({"type": "frobnicate"})
    assert (await _error(supervisor))["message"] == 'unknown command "frobnicate"'
    await supervisor.send({"type": "ping"})
    await supervisor.wait_for(lambda f: f.get("type") == "pong")
    await supervisor.close()
    assert errors_logged == []


PATHS = ("/ws/agent", "/ws/chat?inbox=web", "/ws/supervisor")


@pytest.fixture
async def one_server(tmp_path: Path, sqlite_url: str) -> AsyncIterator[str]:
    """For what does not depend on the database: the frame layer of each socket."""
    settings = make_settings(tmp_path / "conf", sqlite_url, channels=WEB_CHANNELS)
    async with started_runtime(settings) as runtime, live_server(runtime) as base:
        yield base


async def test_a_hostile_first_frame_gets_an_error_and_1008(
    one_server: str, errors_logged: list[logging.LogRecord]
) -> None:
    for path in PATHS:
        for first in (b'{"type": "hello"}', DEEP, '{"type": "hello", "token": "\\udc00"}'):
            ws = await websockets.connect(ws_url(one_server, path), origin="https://shop.example")  # type: ignore[arg-type]
            await ws.send(first)
            frame = json.loads(await ws.recv())
            assert frame["type"] == "error", (path, frame)
            assert frame["code"] in ("binary_frame", "too_deep", "invalid_text"), (path, frame)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert errors_logged == []


async def test_a_text_frame_that_is_not_utf8_fails_the_connection_with_1007(
    one_server: str, errors_logged: list[logging.LogRecord]
) -> None:
    """RFC 6455 (8.1): invalid UTF-8 in a text frame fails the connection; the websocket
    layer does it before omniroute reads the frame, with the close code the RFC names, and
    logs one warning line, not a traceback."""
    for path in PATHS:
        ws = await websockets.connect(ws_url(one_server, path), origin="https://shop.example")  # type: ignore[arg-type]
        await ws.send(b'{"type": "hello", "name": "\xed\xa0\x80"}', text=True)  # a surrogate
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    assert errors_logged == []
