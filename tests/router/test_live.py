"""The live path through real sockets: uvicorn on a free port, the ``websockets`` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import websockets
from sqlalchemy import func, select

from adapters.clock import FakeClock
from router.agents import create_agent, parse_capacity, parse_skills
from router.auth import create_user
from router.db import StreamRecord, Tx
from router.models import ContactHint, Conversation, EventStream, Message
from router.runtime import Runtime
from router.settings import WS_MAX_FRAME_BYTES
from tests.support import (
    AGENT_RULES,
    WEB_CHANNELS,
    CommandError,
    connect_agent,
    connect_visitor,
    live_server,
    make_settings,
    started_runtime,
    ws_url,
)


async def make_agent(
    runtime: Runtime, name: str, skills: str = "", capacity: str = "webchat=2,sms=2,total=3"
) -> tuple[int, str]:
    def add(tx: Tx) -> tuple[int, str]:
        user_id, token = create_user(tx, name, "agent")
        return create_agent(
            tx, user_id, name.title(), parse_skills(skills), parse_capacity(capacity)
        ), token

    return await runtime.db.write(add)


@pytest.fixture
async def live(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[tuple[Runtime, str]]:
    settings = make_settings(
        tmp_path / "conf",
        db_url,
        channels=WEB_CHANNELS,
        rules=AGENT_RULES,
        worker_interval=0.2,
        outbox_interval=0.2,
    )
    async with (
        started_runtime(settings, clock, workers=True) as runtime,
        live_server(runtime) as base,
    ):
        yield runtime, base


def cid() -> str:
    return str(uuid.uuid4())


async def test_visitor_to_agent_and_back(live: tuple[Runtime, str]) -> None:
    runtime, base = live
    _, token = await make_agent(runtime, "anna")
    agent, welcome = await connect_agent(base, token)
    assert welcome["state"] == {"offers": [], "conversations": []}
    visitor, hello = await connect_visitor(
        base, name="Vera", email="vera@example.com", language="de"
    )
    assert len(hello["token"]) == 64 and hello["history"] == []
    first = cid()
    await visitor.send(
        {"type": "message", "client_id": first, "text": "Hello, <b>is anyone there?</b>"}
    )
    ack = await visitor.wait_for(lambda f: f["type"] == "ack")
    assert ack == {
        "type": "ack",
        "client_id": first,
        "message_id": ack["message_id"],
        "duplicate": False,
    }
    offer = await agent.wait_for(lambda f: f.get("type") == "offer")
    assert (
        offer["stream"].startswith("agent:")
        and offer["conversation"]["preview"] == "Hello, <b>is anyone there?</b>"
    )
    accepted = await agent.command("accept", offer_id=offer["offer_id"])
    assert [m["text"] for m in accepted["timeline"]["messages"]] == [
        "Hello, <b>is anyone there?</b>"
    ]
    # typing both ways is ephemeral
    await visitor.send({"type": "typing"})
    assert (await agent.wait_for(lambda f: f.get("type") == "typing"))["from"] == "visitor"
    await agent.send({"type": "typing", "conversation_id": accepted["conversation_id"]})
    assert (await visitor.wait_for(lambda f: f.get("type") == "typing"))["from"] == "agent"
    reply = await agent.command(
        "reply",
        conversation_id=accepted["conversation_id"],
        text="Yes, Anna here.",
        client_id="c-1",
    )
    received = await visitor.wait_for(lambda f: f.get("type") == "message" and f.get("stream"))
    assert (received["text"], received["direction"], received["author"]) == (
        "Yes, Anna here.",
        "out",
        "agent",
    )
    assert "agent_id" not in received and "error" not in received  # visitors see no internal fields
    assert await agent.command(
        "reply",
        conversation_id=accepted["conversation_id"],
        text="Yes, Anna here.",
        client_id="c-1",
    ) == {"message_id": reply["message_id"], "duplicate": True}
    delivered = await agent.wait_for(
        lambda f: f.get("type") == "delivery" and f["message_id"] == reply["message_id"]
    )
    assert delivered["status"] == "sent"
    # the visitor answers; the agent sees it live; then resolves
    await visitor.send({"type": "message", "client_id": cid(), "text": "Thanks!"})
    live_message = await agent.wait_for(
        lambda f: f.get("type") == "message" and f["message"]["direction"] == "in"
    )
    assert live_message["message"]["text"] == "Thanks!"
    assert await agent.command("resolve", conversation_id=accepted["conversation_id"]) == {}
    hints = await runtime.db.read(
        lambda c: c.execute(select(ContactHint.kind, ContactHint.value)).all()
    )
    assert [tuple(h) for h in hints] == [("email", "vera@example.com")]
    language = await runtime.db.read(
        lambda c: c.execute(select(Conversation.language)).scalar_one()
    )
    assert language == "de"
    # the visitor reloads with their token: they see their own conversation only
    await visitor.close()
    again, welcome_again = await connect_visitor(base, token=hello["token"])
    assert [m["text"] for m in welcome_again["history"]] == [
        "Hello, <b>is anyone there?</b>",
        "Yes, Anna here.",
        "Thanks!",
    ]
    stranger, stranger_hello = await connect_visitor(base)
    assert stranger_hello["history"] == [] and stranger_hello["token"] != hello["token"]
    for client in (again, stranger, agent):
        await client.close()


async def test_agent_resumes_with_exactly_the_missed_events(live: tuple[Runtime, str]) -> None:
    runtime, base = live
    _, token = await make_agent(runtime, "anna")
    agent, _ = await connect_agent(base, token)
    visitor, _ = await connect_visitor(base)
    await visitor.send({"type": "message", "client_id": cid(), "text": "one"})
    offer = await agent.wait_for(lambda f: f.get("type") == "offer")
    await agent.command("accept", offer_id=offer["offer_id"])
    assigned = await agent.wait_for(lambda f: f.get("type") == "assigned")
    last = assigned["seq"]
    stream = assigned["stream"]
    await agent.close()
    for text in ("two", "three", "four"):
        await visitor.send({"type": "message", "client_id": cid(), "text": text})
        await visitor.wait_for(lambda f: f["type"] == "ack")
    agent, welcome = await connect_agent(base, token, resume={stream: last})
    assert (
        welcome["state"]["conversations"][0]["state"] == "assigned"
    )  # kept while the agent was away
    missed = [
        await agent.wait_for(lambda f: f.get("stream") == stream and f["type"] == "message")
        for _ in range(3)
    ]
    assert [f["seq"] for f in missed] == [last + 1, last + 2, last + 3]
    assert [f["message"]["text"] for f in missed] == ["two", "three", "four"]
    await visitor.send({"type": "message", "client_id": cid(), "text": "five"})
    live_frame = await agent.wait_for(
        lambda f: f.get("stream") == stream and f["type"] == "message"
    )
    assert (live_frame["seq"], live_frame["message"]["text"]) == (last + 4, "five")
    await asyncio.sleep(0.3)
    assert [
        f for f in agent.frames if f.get("stream") == stream and f["seq"] <= last
    ] == []  # nothing twice
    await agent.close()
    await visitor.close()


async def test_resume_from_before_retention_gets_resync_required(
    live: tuple[Runtime, str], clock: FakeClock
) -> None:
    runtime, base = live
    agent_id, token = await make_agent(runtime, "anna")
    for i in range(2):
        await runtime.db.write(lambda tx, i=i: tx.emit(f"agent:{agent_id}", "note", {"i": i}))
    clock.advance(timedelta(days=runtime.settings.stream_retention_days, seconds=1))
    await runtime.db.write(lambda tx: tx.emit(f"agent:{agent_id}", "note", {"i": 2}))
    assert await runtime.prune_streams() == 2  # the retention's work: seq 1 and 2
    agent, _ = await connect_agent(base, token, resume={f"agent:{agent_id}": 0})
    assert (await agent.wait_for(lambda f: f.get("type") == "resync_required")) == {
        "type": "resync_required",
        "stream": f"agent:{agent_id}",
    }
    await agent.close()


async def test_a_sequence_gap_on_the_bus_is_repaired_from_the_database(
    live: tuple[Runtime, str],
) -> None:
    runtime, base = live
    agent_id, token = await make_agent(runtime, "anna")
    agent, _ = await connect_agent(base, token)
    stream = f"agent:{agent_id}"
    original = runtime.db.on_records
    dropped: list[StreamRecord] = []

    async def lossy(records: list[StreamRecord]) -> None:
        kept = []
        for record in records:
            if record.type == "lost" and not dropped:
                dropped.append(record)  # the bus loses this one
            else:
                kept.append(record)
        assert original is not None
        await original(kept)  # type: ignore[misc]

    runtime.db.on_records = lossy
    await runtime.db.write(lambda tx: tx.emit(stream, "lost", {"n": 1}))
    await runtime.db.write(lambda tx: tx.emit(stream, "after", {"n": 2}))
    first = await agent.wait_for(
        lambda f: f.get("stream") == stream and f["type"] in ("lost", "after")
    )
    second = await agent.wait_for(
        lambda f: f.get("stream") == stream and f["type"] in ("lost", "after")
    )
    assert [(first["type"], first["n"]), (second["type"], second["n"])] == [
        ("lost", 1),
        ("after", 2),
    ]
    assert (
        dropped and dropped[0].seq == first["seq"]
    )  # the bus never carried it: repaired from the database
    seqs = [f["seq"] for f in agent.frames if f.get("stream") == stream]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # every event once, in order, no gap
    await agent.close()


async def test_bad_agent_input_gets_clear_errors(live: tuple[Runtime, str]) -> None:
    runtime, base = live
    _, token = await make_agent(runtime, "anna")
    for hello, message in [
        ({"type": "hello", "token": "wrong"}, "invalid token"),
        # no token: only the console's session cookie, from our own pages
        (
            {"type": "hello"},
            "the session cookie is accepted only from this site's own pages: "
            "open http://testserver/console/login",
        ),
        ({"type": "hello", "token": 5}, 'the first frame must be {"type": "hello", "token": ...}'),
        (
            {"type": "accept", "offer_id": 1},
            'the first frame must be {"type": "hello", "token": ...}',
        ),
    ]:
        ws = await websockets.connect(ws_url(base, "/ws/agent"))
        await ws.send(json.dumps(hello))
        error = json.loads(await ws.recv())
        assert (error["type"], error["message"]) == ("error", message)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    ws = await websockets.connect(ws_url(base, "/ws/agent"))
    await ws.send("not json")
    assert json.loads(await ws.recv())["message"] == "the first frame must be a JSON hello"
    agent, _ = await connect_agent(base, token)
    with pytest.raises(CommandError, match='invalid: unknown command "frobnicate"'):
        await agent.command("frobnicate")
    with pytest.raises(CommandError, match='invalid: "offer_id" must be an integer'):
        await agent.command("accept", offer_id="7")
    with pytest.raises(CommandError, match="not_found: no offer 999 for you"):
        await agent.command("accept", offer_id=999)
    visitor, _ = await connect_visitor(base)
    await visitor.send({"type": "message", "client_id": cid(), "text": "someone else's"})
    offer = await agent.wait_for(lambda f: f.get("type") == "offer")
    with pytest.raises(CommandError, match="conflict: the conversation is not assigned to you"):
        await agent.command(
            "reply",
            conversation_id=offer["conversation"]["conversation_id"],
            text="not accepted yet",
        )
    with pytest.raises(CommandError, match="invalid: the text is empty"):
        await agent.command(
            "note", conversation_id=offer["conversation"]["conversation_id"], text=""
        )
    await agent.ws.send("{broken")
    assert (await agent.wait_for(lambda f: f.get("type") == "error"))[
        "message"
    ] == "frames must be JSON objects"
    await agent.ws.send(
        json.dumps({"type": "note", "id": "big", "conversation_id": 1, "text": "x" * 70_000})
    )
    assert (await agent.wait_for(lambda f: f.get("type") == "error"))["code"] == "too_large"
    assert await agent.command("ping") == {}  # still usable after the errors
    await agent.close()


async def test_bad_visitor_input_and_limits(live: tuple[Runtime, str]) -> None:
    runtime, base = live
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect_visitor(base, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus):
        await connect_visitor(base, inbox="nope")
    visitor, _ = await connect_visitor(
        base, origin="https://SHOP.example"
    )  # listed in allowed_origins (any case)
    await visitor.send({"type": "message", "client_id": cid(), "text": "x" * 2001})
    assert (await visitor.wait_for(lambda f: f["type"] == "error"))[
        "message"
    ] == "the message is longer than 2000 characters"
    await visitor.send({"type": "message", "client_id": "not a uuid!", "text": "hi"})
    assert (await visitor.wait_for(lambda f: f["type"] == "error"))[
        "message"
    ] == "client_id must be a UUID"
    await visitor.send({"type": "message", "client_id": cid(), "text": "   "})
    assert (await visitor.wait_for(lambda f: f["type"] == "error"))[
        "message"
    ] == "the message is empty"
    await visitor.send({"type": "wat"})
    assert (await visitor.wait_for(lambda f: f["type"] == "error"))[
        "message"
    ] == 'unknown frame type "wat"'
    assert (
        await runtime.db.read(
            lambda c: c.execute(select(func.count()).select_from(Message)).scalar_one()
        )
        == 0
    )
    await visitor.close()


async def test_no_compression_by_default_and_giant_frames_close_the_socket(
    live: tuple[Runtime, str],
) -> None:
    runtime, base = live
    _, token = await make_agent(runtime, "anna")
    agent, _ = await connect_agent(base, token)
    visitor, _ = await connect_visitor(base)
    for client in (agent, visitor):
        # the websockets client offers per-message deflate; the server declines it
        assert client.ws.response is not None
        assert client.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    await visitor.send({"type": "message", "client_id": cid(), "text": "x" * WS_MAX_FRAME_BYTES})
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await visitor.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # not read whole
    stored = await runtime.db.read(
        lambda c: c.execute(select(func.count()).select_from(Message)).scalar_one()
    )
    assert stored == 0
    assert await agent.command("ping") == {}  # the agent's socket is unaffected
    await agent.close()


async def test_compression_is_negotiated_when_enabled(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(
        tmp_path / "conf", sqlite_url, channels=WEB_CHANNELS, rules=AGENT_RULES, ws_compression=True
    )
    async with started_runtime(settings) as runtime, live_server(runtime) as base:
        visitor, welcome = await connect_visitor(base)
        assert visitor.ws.response is not None
        assert "permessage-deflate" in visitor.ws.response.headers["Sec-WebSocket-Extensions"]
        await visitor.send({"type": "message", "client_id": cid(), "text": "compressed " * 50})
        ack = await visitor.wait_for(lambda f: f.get("type") == "ack")
        assert ack["message_id"] > 0 and len(welcome["token"]) == 64
        await visitor.close()


async def test_visitor_message_flood_is_closed_with_1008(tmp_path: Path, sqlite_url: str) -> None:
    channels = WEB_CHANNELS.replace(
        "messages_per_minute_per_visitor: 600", "messages_per_minute_per_visitor: 5"
    )
    settings = make_settings(tmp_path / "conf", sqlite_url, channels=channels, rules=AGENT_RULES)
    async with started_runtime(settings) as runtime, live_server(runtime) as base:
        visitor, _ = await connect_visitor(base)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(50):
                await visitor.send({"type": "message", "client_id": cid(), "text": "spam"})
                await visitor.recv()
        assert closed.value.rcvd is not None and (
            closed.value.rcvd.code,
            closed.value.rcvd.reason,
        ) == (1008, "rate limit: too many messages")
        stored = await runtime.db.read(
            lambda c: c.execute(select(func.count()).select_from(Message)).scalar_one()
        )
        assert stored == 5  # exactly the burst, acknowledged; nothing half-stored


async def test_new_visitor_flood_from_one_ip_is_limited(tmp_path: Path, sqlite_url: str) -> None:
    channels = WEB_CHANNELS.replace(
        "messages_per_minute_per_visitor: 600",
        "new_visitors_per_minute_per_ip: 3, messages_per_minute_per_visitor: 600",
    )
    settings = make_settings(tmp_path / "conf", sqlite_url, channels=channels, rules=AGENT_RULES)
    async with started_runtime(settings) as runtime, live_server(runtime) as base:
        visitors = [await connect_visitor(base) for _ in range(3)]
        ws = await websockets.connect(
            ws_url(base, "/ws/chat?inbox=web"), origin="https://shop.example"
        )  # type: ignore[arg-type]
        await ws.send(json.dumps({"type": "hello"}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert (
            closed.value.rcvd is not None
            and closed.value.rcvd.reason == "rate limit: too many new visitors"
        )
        # a returning visitor (with a token) is not a new visitor
        again, _ = await connect_visitor(base, token=visitors[0][1]["token"])
        for client, _ in visitors:
            await client.close()
        await again.close()
        assert runtime is not None


async def test_agents_dropped_at_random_under_load_resume_without_gap_or_duplicate(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    """Six agents; new customers keep writing; sockets are cut at random and reconnect with
    the last sequence numbers they saw. Every agent's stream arrives whole: no gap, no
    duplicate, up to the last event in the database."""
    channels = WEB_CHANNELS.replace(
        "messages_per_minute_per_ip: 6000}",
        "messages_per_minute_per_ip: 6000, new_visitors_per_minute_per_ip: 1000,"
        " connections_per_minute_per_ip: 1000}",
    )
    settings = make_settings(
        tmp_path / "conf", db_url, channels=channels, rules=AGENT_RULES, worker_interval=0.2
    )
    async with (
        started_runtime(settings, clock, workers=True) as runtime,
        live_server(runtime) as base,
    ):
        await _drop_at_random(runtime, base)


async def _drop_at_random(runtime: Runtime, base: str) -> None:
    rng = random.Random(20261126)
    agents = [
        await make_agent(runtime, f"drop{i}", capacity="webchat=100,total=100") for i in range(6)
    ]
    seqs: dict[str, list[int]] = {f"agent:{agent_id}": [] for agent_id, _ in agents}
    sockets: dict[int, Any] = {}

    async def connect(i: int) -> None:
        agent_id, token = agents[i]
        stream = f"agent:{agent_id}"
        resume = {stream: seqs[stream][-1]} if seqs[stream] else None
        client, welcome = await connect_agent(base, token, resume)
        if not seqs[stream]:
            seqs[stream].append(welcome["streams"][stream])  # the position we start from
        sockets[i] = client

    def collect(i: int) -> None:
        stream = f"agent:{agents[i][0]}"
        seqs[stream].extend(f["seq"] for f in sockets[i].frames if f.get("stream") == stream)
        sockets[i].frames.clear()

    async def drain(i: int) -> None:
        with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
            while True:
                await sockets[i].recv(0.05)

    for i in range(len(agents)):
        await connect(i)
    visitors = []
    for n in range(60):  # each a new customer: a new conversation, offered to an agent
        visitor, _ = await connect_visitor(base)
        visitors.append(visitor)
        await visitor.send({"type": "message", "client_id": cid(), "text": f"load {n}"})
        if n % 5 == 0:  # cut one agent's socket, keep going, and bring it back
            i = rng.randrange(len(agents))
            await drain(i)
            collect(i)
            await sockets[i].close()
            await asyncio.sleep(rng.uniform(0, 0.2))
            await connect(i)
        for i in rng.sample(range(len(agents)), 2):
            await drain(i)
    await asyncio.sleep(1.0)
    for i in range(len(agents)):
        await drain(i)
        collect(i)
    last = await runtime.db.read(
        lambda c: dict(c.execute(select(EventStream.stream, EventStream.last_seq)).all())
    )
    for stream, got in seqs.items():
        start, received = got[0], got[1:]
        assert received == list(range(start + 1, last[stream] + 1)), stream
    assert sum(len(got) - 1 for got in seqs.values()) >= 60  # offers and withdrawals flowed
    for client in [*sockets.values(), *visitors]:
        await client.close()
