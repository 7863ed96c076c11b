"""Revocation takes effect at once, everywhere (docs/security.md, "Revocation").

Revoking a user, rotating a token, changing a password and signing out close every socket
and console session that depended on the credential, in every process, with close code 4401
and the reason; the agent's offers are withdrawn and presence goes offline at once. On
SQLite (one process) and on PostgreSQL + Redis with two processes (the sockets on B, the
change made through A's API); the periodic re-check lands a revocation whose bus notice was
lost; while the bus is unhealthy, a command checks the credential first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy import select

from adapters.bus import MemoryBus
from adapters.clock import FakeClock
from router.agents import create_agent, parse_capacity
from router.auth import create_user, hash_token, rotate_token, set_password
from router.credentials import CLOSE_CODE, MESSAGES, Credential
from router.db import Tx
from router.exceptions import Unauthorized
from router.models import Agent, AgentConnection, Conversation, Message, Offer
from router.revocation import TOPIC
from router.runtime import Runtime
from router.settings import Settings
from tests import peers
from tests.support import (
    AGENT_RULES,
    ROOT,
    WEB_CHANNELS,
    Client,
    connect_visitor,
    database_url,
    free_port,
    live_server,
    make_settings,
    started_runtime,
    ws_url,
)

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "another good password"
# The sockets must be closed by the bus notice in these tests, not by the periodic check.
NO_POLL = 3600.0


# -- plumbing ---------------------------------------------------------------------------------
# Every client socket a test opens, closed before its server stops (a server waits for its
# open sockets: a failing test must not hang there).
OPENED: list[Client] = []


async def close_opened() -> None:
    while OPENED:
        with contextlib.suppress(Exception):
            await OPENED.pop().close()


def cid() -> str:
    return str(uuid.uuid4())


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def make_user(
    runtime: Runtime, name: str, role: str = "agent", *, agent: bool = True
) -> tuple[int | None, str]:
    """A user with a password, and an agent record unless ``agent`` is false; returns
    (agent id, API token)."""

    def add(tx: Tx) -> tuple[int | None, str]:
        user_id, token = create_user(tx, name, role)
        agent_id = (
            create_agent(tx, user_id, name.title(), {}, parse_capacity("webchat=2,total=2"))
            if agent
            else None
        )
        return agent_id, token

    made = await runtime.db.write(add)
    await runtime.db.write(set_password, name, PASSWORD)
    return made


async def sign_in(base: str, **login: str) -> str:
    """A console session (password or token); returns its cookie value."""
    async with httpx.AsyncClient(base_url=base) as client:
        response = await client.post("/console/login", json=login)
        assert response.status_code == 200, response.text
        return str(response.cookies["omniroute_session"])


def cookie_header(cookie: str) -> dict[str, str]:
    return {"cookie": f"omniroute_session={cookie}"}


async def connect(
    base: str, path: str, *, token: str | None = None, cookie: str | None = None
) -> tuple[Client, dict[str, Any]]:
    """A socket on ``path`` signed in with the API token or a console session's cookie."""
    if token is not None:
        ws = await websockets.connect(ws_url(base, path), open_timeout=10)
        hello: dict[str, Any] = {"type": "hello", "token": token}
    else:
        assert cookie is not None
        ws = await websockets.connect(
            ws_url(base, path),
            origin=base,  # type: ignore[arg-type]
            additional_headers=cookie_header(cookie),
            open_timeout=10,
        )
        hello = {"type": "hello"}
    client = Client(ws)
    OPENED.append(client)
    await client.send(hello)
    first = await client.wait_for(lambda f: f.get("type") in ("welcome", "error"))
    assert first["type"] == "welcome", first
    return client, first


async def closed(client: Client, timeout: float = 10.0) -> tuple[int, str]:
    """Read until the server closes the socket: its close code and reason."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"still open after {timeout}s; frames: {client.frames}")
            await client.recv(remaining)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None, "closed without a close frame"
        return exc.rcvd.code, exc.rcvd.reason
    except TimeoutError:
        raise AssertionError(f"still open after {timeout}s; frames: {client.frames}") from None


async def signed_out(client: Client, reason: str) -> None:
    """The socket was told why and closed with 4401 and the reason; it takes nothing more."""
    code, text = await closed(client)
    assert (code, text) == (CLOSE_CODE, MESSAGES[reason])
    told = [f for f in client.frames if f.get("type") == "signed_out"]
    assert told == [{"type": "signed_out", "reason": reason, "message": MESSAGES[reason]}]
    with pytest.raises(websockets.ConnectionClosed):
        await client.send({"type": "ping", "id": "after"})


async def refused(base: str, path: str, **credential: str) -> str:
    """A new socket with a credential that ended is refused; returns the error message."""
    if "token" in credential:
        ws = await websockets.connect(ws_url(base, path), open_timeout=10)
        await ws.send(json.dumps({"type": "hello", "token": credential["token"]}))
    else:
        ws = await websockets.connect(
            ws_url(base, path),
            origin=base,  # type: ignore[arg-type]
            additional_headers=cookie_header(credential["cookie"]),
            open_timeout=10,
        )
        await ws.send(json.dumps({"type": "hello"}))
    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
    await ws.close()
    assert frame["type"] == "error" and frame["code"] == "unauthorized", frame
    return str(frame["message"])


@dataclass
class Work:
    """An agent's accepted conversation and a pending offer (with their visitors)."""

    assigned: int
    offer_id: int
    visitors: list[Client] = field(default_factory=list)


async def give_work(agent: Client, base: str) -> Work:
    visitors = []
    for text in ("first customer", "second customer"):
        visitor, _ = await connect_visitor(base)
        OPENED.append(visitor)
        await visitor.send({"type": "message", "client_id": cid(), "text": text})
        visitors.append(visitor)
    first = await agent.wait_for(lambda f: f.get("type") == "offer", timeout=15)
    accepted = await agent.command("accept", offer_id=first["offer_id"])
    second = await agent.wait_for(lambda f: f.get("type") == "offer", timeout=15)
    return Work(int(accepted["conversation_id"]), int(second["offer_id"]), visitors)


def agent_row(runtime: Runtime, agent_id: int) -> Any:
    return runtime.db.read(
        lambda c: c.execute(
            select(Agent.presence, Agent.disconnected_at).where(Agent.id == agent_id)
        ).one()
    )


async def after_change(runtime: Runtime, agent_id: int, work: Work) -> dict[str, Any]:
    """What the database says about the agent once the change committed."""

    def read(c: Any) -> dict[str, Any]:
        return {
            "presence": c.execute(select(Agent.presence).where(Agent.id == agent_id)).scalar(),
            "sockets": c.execute(
                select(AgentConnection.id).where(AgentConnection.agent_id == agent_id)
            ).all(),
            "offer": c.execute(select(Offer.state).where(Offer.id == work.offer_id)).scalar(),
            "owner": c.execute(
                select(Conversation.assigned_agent_id).where(Conversation.id == work.assigned)
            ).scalar(),
        }

    return await runtime.db.read(read)


@dataclass
class Pair:
    """Process A (where changes are made) and process B (where the sockets are); one and
    the same process on SQLite."""

    a: Runtime
    url_a: str
    b: Runtime
    url_b: str
    admin: str


def settings_for(directory: Path, url: str, port: int, **overrides: Any) -> Settings:
    return make_settings(
        directory,
        url,
        channels=WEB_CHANNELS,
        rules=AGENT_RULES,
        public_base_url=f"http://127.0.0.1:{port}",
        worker_interval=0.2,
        outbox_interval=0.2,
        **overrides,
    )


@contextlib.asynccontextmanager
async def serving_pair(
    tmp_path: Path, setup: str, check_interval: float = NO_POLL
) -> AsyncIterator[Pair]:
    port_a, port_b = free_port(), free_port()
    if setup == "sqlite":
        with database_url("sqlite", tmp_path) as url:
            settings = settings_for(
                tmp_path / "conf", url, port_a, credential_check_interval=check_interval
            )
            async with (
                started_runtime(settings, workers=True) as a,
                live_server(a, port_a) as url_a,
            ):
                _, admin = await make_user(a, "root", "admin", agent=False)
                try:
                    yield Pair(a, url_a, a, url_a, admin)
                finally:
                    await close_opened()
        return
    redis_url = peers.need(peers.redis_test_url)
    # migrating and dropping the database run their own event loops: in a thread
    database = database_url("postgres", tmp_path)
    url = await asyncio.to_thread(database.__enter__)
    try:
        common = {
            "redis_url": redis_url,
            "redis_prefix": peers.unique_prefix(),
            "credential_check_interval": check_interval,
        }
        settings_a = settings_for(tmp_path / "conf", url, port_a, process_id="a", **common)
        settings_b = settings_for(tmp_path / "conf", url, port_b, process_id="b", **common)
        async with (
            started_runtime(settings_a, workers=True) as a,
            started_runtime(settings_b, workers=True) as b,
            live_server(a, port_a) as url_a,
            live_server(b, port_b) as url_b,
        ):
            _, admin = await make_user(a, "root", "admin", agent=False)
            try:
                yield Pair(a, url_a, b, url_b, admin)
            finally:
                await close_opened()
    finally:
        await asyncio.to_thread(database.__exit__, None, None, None)


# -- every change, every socket, one process and two ------------------------------------------
@pytest.mark.parametrize("setup", ["sqlite", "postgres+redis"])
@pytest.mark.parametrize("change", ["revoke", "rotate", "password", "sign_out"])
async def test_a_change_closes_the_sockets_that_depended_on_it_in_every_process(
    tmp_path: Path, setup: str, change: str
) -> None:
    """Anna is an agent and a supervisor: her agent socket and her dashboard socket are on
    process B, signed in with what ``change`` ends; the change is made through A's API."""
    async with serving_pair(tmp_path, setup) as p:
        agent_id, token = await make_user(p.a, "anna", "supervisor")
        assert agent_id is not None
        if change == "revoke":
            reason, session = "revoked", await sign_in(p.url_a, username="anna", password=PASSWORD)
            agent_via: dict[str, str] = {"token": token}
        elif change == "rotate":
            reason, session = "token_rotated", await sign_in(p.url_a, token=token)
            agent_via = {"token": token}
        elif change == "password":
            reason = "password_changed"
            session = await sign_in(p.url_a, username="anna", password=PASSWORD)
            agent_via = {"cookie": session}
        else:
            reason = "signed_out"
            session = await sign_in(p.url_a, username="anna", password=PASSWORD)
            agent_via = {"cookie": session}
        agent, _ = await connect(p.url_b, "/ws/agent", **agent_via)
        dashboard, _ = await connect(p.url_b, "/ws/supervisor", cookie=session)
        await dashboard.wait_for(lambda f: f.get("type") == "snapshot")
        work = await give_work(agent, p.url_a)

        async with httpx.AsyncClient(base_url=p.url_a) as http:
            if change == "revoke":
                done = await http.delete("/api/users/anna", headers=bearer(p.admin))
            elif change == "rotate":
                done = await http.post("/api/users/anna/rotate", headers=bearer(p.admin))
            elif change == "password":
                done = await http.post(
                    "/api/me/password",
                    json={"current": PASSWORD, "new": NEW_PASSWORD},
                    headers=bearer(token),
                )
            else:
                csrf = (await http.get("/console/session", headers=cookie_header(session))).json()
                done = await http.post(
                    "/console/logout",
                    headers={**cookie_header(session), "x-csrf-token": csrf["csrf"]},
                )
            assert done.status_code == 200, done.text

            await signed_out(agent, reason)
            await signed_out(dashboard, reason)
            state = await after_change(p.b, agent_id, work)
            assert state["presence"] == "offline" and state["sockets"] == []
            assert state["offer"] == "withdrawn"
            # revoking and signing out log the agent out; otherwise the work waits for them
            kept = change in ("rotate", "password")
            assert state["owner"] == (agent_id if kept else None)

            # the console session that depended on it is refused, by both processes
            for base in {p.url_a, p.url_b}:
                assert (
                    await http.get(base + "/api/me", headers=cookie_header(session))
                ).status_code == 401
            message = await refused(p.url_b, "/ws/supervisor", cookie=session)
            assert "not signed in" in message
            if change in ("revoke", "rotate"):
                assert await refused(p.url_b, "/ws/agent", token=token) == "invalid token"
        for visitor in work.visitors:
            await visitor.close()


# -- what does not depend on the credential stays ----------------------------------------------
async def test_rotation_ends_the_token_and_its_sessions_but_not_the_password_session(
    tmp_path: Path,
) -> None:
    async with serving_pair(tmp_path, "sqlite") as p:
        agent_id, token = await make_user(p.a, "anna")
        assert agent_id is not None
        by_token = await sign_in(p.url_a, token=token)
        by_password = await sign_in(p.url_a, username="anna", password=PASSWORD)
        token_socket, _ = await connect(p.url_a, "/ws/agent", token=token)
        token_session_socket, _ = await connect(p.url_a, "/ws/agent", cookie=by_token)
        password_socket, _ = await connect(p.url_a, "/ws/agent", cookie=by_password)
        work = await give_work(password_socket, p.url_a)

        new_token = await p.a.db.write(rotate_token, "anna")

        await signed_out(token_socket, "token_rotated")
        await signed_out(token_session_socket, "token_rotated")
        assert await password_socket.command("ping") == {}  # still signed in
        state = await after_change(p.a, agent_id, work)
        # the agent still has a valid socket: presence, offers and work stay
        assert (state["presence"], state["offer"], state["owner"]) == (
            "online",
            "pending",
            agent_id,
        )
        assert len(state["sockets"]) == 1
        async with httpx.AsyncClient(base_url=p.url_a) as http:
            assert (await http.get("/api/me", headers=cookie_header(by_token))).status_code == 401
            assert (
                await http.get("/api/me", headers=cookie_header(by_password))
            ).status_code == 200
        fresh, _ = await connect(p.url_a, "/ws/agent", token=new_token)
        await fresh.close()
        await password_socket.close()
        for visitor in work.visitors:
            await visitor.close()


async def test_a_password_change_ends_only_the_sessions_opened_with_a_password(
    tmp_path: Path,
) -> None:
    async with serving_pair(tmp_path, "sqlite") as p:
        _, token = await make_user(p.a, "anna")
        by_token = await sign_in(p.url_a, token=token)
        by_password = await sign_in(p.url_a, username="anna", password=PASSWORD)
        token_socket, _ = await connect(p.url_a, "/ws/agent", token=token)
        token_session_socket, _ = await connect(p.url_a, "/ws/agent", cookie=by_token)
        password_socket, _ = await connect(p.url_a, "/ws/agent", cookie=by_password)

        await p.a.db.write(set_password, "anna", NEW_PASSWORD)

        await signed_out(password_socket, "password_changed")
        assert await token_socket.command("ping") == {}
        assert await token_session_socket.command("ping") == {}
        async with httpx.AsyncClient(base_url=p.url_a) as http:
            assert (
                await http.get("/api/me", headers=cookie_header(by_password))
            ).status_code == 401
            assert (await http.get("/api/me", headers=cookie_header(by_token))).status_code == 200
        await token_socket.close()
        await token_session_socket.close()


async def test_signing_out_ends_that_session_only(tmp_path: Path) -> None:
    async with serving_pair(tmp_path, "sqlite") as p:
        agent_id, _ = await make_user(p.a, "anna")
        assert agent_id is not None
        first = await sign_in(p.url_a, username="anna", password=PASSWORD)
        second = await sign_in(p.url_a, username="anna", password=PASSWORD)
        leaving, _ = await connect(p.url_a, "/ws/agent", cookie=first)
        staying, _ = await connect(p.url_a, "/ws/agent", cookie=second)
        async with httpx.AsyncClient(base_url=p.url_a) as http:
            csrf = (await http.get("/console/session", headers=cookie_header(first))).json()
            out = await http.post(
                "/console/logout", headers={**cookie_header(first), "x-csrf-token": csrf["csrf"]}
            )
            assert out.status_code == 200
        await signed_out(leaving, "signed_out")
        assert await staying.command("ping") == {}
        presence, _ = await agent_row(p.a, agent_id)
        assert presence == "online"  # another browser of hers is still signed in
        await staying.close()


# -- lost notices, an unhealthy bus, expiry, races ------------------------------------------
class LossyBus(MemoryBus):
    """The in-process bus, losing every revocation notice (as Redis pub/sub does while it is
    down); ``unhealthy`` makes it say so."""

    def __init__(self, *, unhealthy: bool = False) -> None:
        super().__init__()
        self.unhealthy = unhealthy
        self.lost = 0

    async def publish(self, topic: str, message: dict[str, Any]) -> None:
        if topic == TOPIC:
            self.lost += 1
            return
        await super().publish(topic, message)

    @property
    def healthy(self) -> bool:
        return not self.unhealthy


@contextlib.asynccontextmanager
async def lossy_site(
    tmp_path: Path, bus: LossyBus, check_interval: float
) -> AsyncIterator[tuple[Runtime, str]]:
    port = free_port()
    with database_url("sqlite", tmp_path) as url:
        settings = settings_for(
            tmp_path / "conf", url, port, credential_check_interval=check_interval
        )
        runtime = Runtime(settings, clock=FakeClock(), bus=bus)
        await runtime.start(workers=True)
        try:
            async with live_server(runtime, port) as base:
                try:
                    yield runtime, base
                finally:
                    await close_opened()
        finally:
            await runtime.stop()


async def test_a_lost_notice_is_made_up_by_the_periodic_check(tmp_path: Path) -> None:
    bus = LossyBus()
    async with lossy_site(tmp_path, bus, check_interval=0.3) as (runtime, base):
        agent_id, token = await make_user(runtime, "anna")
        assert agent_id is not None
        agent, _ = await connect(base, "/ws/agent", token=token)
        _, admin = await make_user(runtime, "root", "admin", agent=False)
        before = bus.lost
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.delete("/api/users/anna", headers=bearer(admin))).status_code == 200
        assert bus.lost == before + 1  # nobody was told
        await signed_out(agent, "revoked")
        presence, _ = await agent_row(runtime, agent_id)
        assert presence == "offline"
        counted = runtime.metrics.registry.get_sample_value(
            "omniroute_sockets_signed_out_total", {"reason": "revoked"}
        )
        assert counted == 1.0


async def test_while_the_bus_is_unhealthy_a_command_checks_the_credential_first(
    tmp_path: Path,
) -> None:
    """No notice arrives and no periodic check runs: the reply after the revocation is still
    refused, because the bus says notices may be lost."""
    bus = LossyBus(unhealthy=True)
    async with lossy_site(tmp_path, bus, check_interval=NO_POLL) as (runtime, base):
        _, token = await make_user(runtime, "anna")
        agent, _ = await connect(base, "/ws/agent", token=token)
        work = await give_work(agent, base)
        await runtime.db.write(rotate_token, "anna")
        await agent.send(
            {"type": "reply", "id": "late", "conversation_id": work.assigned, "text": "too late"}
        )
        await signed_out(agent, "token_rotated")
        assert not [f for f in agent.frames if f.get("id") == "late"]
        texts = await runtime.db.read(
            lambda c: c.execute(select(Message.text).where(Message.direction == "out")).all()
        )
        assert ("too late",) not in [tuple(t) for t in texts]
        for visitor in work.visitors:
            await visitor.close()


async def test_a_socket_of_an_expired_session_is_closed_and_the_agent_goes_offline(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    port = free_port()
    with database_url("sqlite", tmp_path) as url:
        settings = settings_for(tmp_path / "conf", url, port, credential_check_interval=NO_POLL)
        async with (
            started_runtime(settings, clock) as runtime,
            live_server(runtime, port) as base,
            contextlib.AsyncExitStack() as stack,
        ):
            stack.push_async_callback(close_opened)
            agent_id, _ = await make_user(runtime, "anna")
            assert agent_id is not None
            session = await sign_in(base, username="anna", password=PASSWORD)
            agent, _ = await connect(base, "/ws/agent", cookie=session)
            assert await agent.command("ping") == {}  # commands are taken once online
            clock.advance(settings.session_hours * 3600 + 1)
            await runtime.guard.check_all()  # what the periodic check does
            await signed_out(agent, "session_expired")
            for _ in range(100):  # the socket's own bookkeeping, right after its close
                presence, gone_at = await agent_row(runtime, agent_id)
                if presence == "offline":
                    break
                await asyncio.sleep(0.1)
            assert presence == "offline" and gone_at is not None  # no 60 s grace


async def test_a_socket_whose_credential_ended_after_its_hello_does_not_go_online(
    tmp_path: Path,
) -> None:
    """The race between a hello and a rotation: taking presence re-checks the credential."""
    with database_url("sqlite", tmp_path) as url:
        settings = settings_for(tmp_path / "conf", url, free_port())
        async with started_runtime(settings) as runtime:
            agent_id, token = await make_user(runtime, "anna")
            assert agent_id is not None
            user_id = await runtime.db.read(
                lambda c: c.execute(select(Agent.user_id).where(Agent.id == agent_id)).scalar()
            )
            stale = Credential(int(user_id), token_hash=hash_token(token))
            await runtime.db.write(rotate_token, "anna")
            with pytest.raises(Unauthorized) as refused_:
                await runtime.assignment.connect(agent_id, stale)
            assert refused_.value.detail["reason"] == "token_rotated"
            presence, _ = await agent_row(runtime, agent_id)
            assert presence == "offline"


async def test_the_cli_revokes_without_redis_and_every_process_notices(tmp_path: Path) -> None:
    """PostgreSQL + Redis, two processes: ``omniroute users revoke`` run without
    OMNIROUTE_REDIS_URL publishes no notice; process B's periodic check closes the socket."""
    async with serving_pair(tmp_path, "postgres+redis", check_interval=0.5) as p:
        agent_id, token = await make_user(p.a, "anna")
        assert agent_id is not None
        agent, _ = await connect(p.url_b, "/ws/agent", token=token)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_REDIS")} | {
            "OMNIROUTE_DATABASE_URL": p.a.settings.database_url
        }
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "router.cli", "users", "revoke", "anna"],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        await signed_out(agent, "revoked")
        presence, _ = await agent_row(p.b, agent_id)
        assert presence == "offline"
