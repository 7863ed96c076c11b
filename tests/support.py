"""Helpers for tests of the server: settings, a migrated database on SQLite or PostgreSQL,
a started runtime with a fake clock, signed fake-channel webhooks, subprocess servers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from adapters.clock import FakeClock
from channels.fake import sign
from router.app import create_app
from router.migrate import upgrade
from router.runtime import Runtime
from router.settings import Settings, load_settings
from tests import peers

ROOT = Path(__file__).resolve().parents[1]
SECRET_KEY = "test-secret-key-0123456789abcdefghijklmnop"
FAKE_SECRET = "fake-inbox-secret"

RULES = """\
version: 1
attributes: {plan: string, ltv: number}
queues:
  general: {}
  billing: {skills: {billing: 3}}
  sales: {}
templates:
  welcome: "Hi {contact.name|there}, thanks for writing to us."
rules:
  - id: refund
    when: {message.text: {matches: "(?i)refund"}}
    then: {queue: billing, priority: high, tags: [refund]}
  - id: vip
    order: 10
    when: {contact.vip: true}
    then: {queue: billing, priority: urgent}
default: {queue: general, reply: welcome}
"""

CHANNELS = f"""\
version: 1
inboxes:
  sms: {{channel: sms, provider: fake, secret: "{FAKE_SECRET}", default_queue: general}}
  wa: {{channel: whatsapp, provider: fake, secret: "{FAKE_SECRET}"}}
  mail: {{channel: email, provider: fake, secret: "{FAKE_SECRET}", continuity: per_channel, reopen_window: 1h}}
"""


def write_config(
    directory: Path, rules: str = RULES, channels: str = CHANNELS
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rules_path, channels_path = directory / "rules.yaml", directory / "channels.yaml"
    rules_path.write_text(rules)
    channels_path.write_text(channels)
    return rules_path, channels_path


def make_settings(directory: Path, database_url: str, **overrides: Any) -> Settings:
    rules_path, channels_path = write_config(
        directory, overrides.pop("rules", RULES), overrides.pop("channels", CHANNELS)
    )
    values: dict[str, Any] = {
        "database_url": database_url,
        "rules_path": rules_path,
        "channels_path": channels_path,
        "secret_key": SECRET_KEY,
        "data_dir": directory / "data",
        "public_base_url": "http://testserver",
        "process_id": "test",
    }
    values.update(overrides)
    return load_settings(**values)


@contextlib.contextmanager
def database_url(backend: str, directory: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a fresh PostgreSQL database (dropped after)."""
    if backend == "sqlite":
        url = f"sqlite:///{directory / 'omniroute.db'}"
        upgrade(url)
        yield url
        return
    with peers.need(peers.pg_test_database) as url:
        upgrade(url)
        yield url


@contextlib.asynccontextmanager
async def started_runtime(
    settings: Settings, clock: FakeClock | None = None, *, workers: bool = False
) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings, clock=clock or FakeClock())
    await runtime.start(workers=workers)
    try:
        yield runtime
    finally:
        await runtime.stop()


def client_for(runtime: Runtime) -> httpx.AsyncClient:
    """An in-process HTTP client for a started runtime (no lifespan: the runtime is running)."""
    app = create_app(runtime.settings, runtime=runtime)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def fake_message(
    external_id: str, sender: str = "+4917012345678", text: str = "hello", **extra: Any
) -> dict[str, Any]:
    return {
        "id": external_id,
        "from": sender,
        "kind": extra.pop("kind", "phone"),
        "text": text,
        **extra,
    }


def signed(
    payload: dict[str, Any] | bytes, secret: str = FAKE_SECRET
) -> tuple[bytes, dict[str, str]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return body, {"x-fake-signature": sign(secret, body), "content-type": "application/json"}


async def post_fake(
    client: httpx.AsyncClient, inbox: str, *messages: dict[str, Any], **extra: Any
) -> httpx.Response:
    body, headers = signed({"messages": list(messages), **extra})
    return await client.post(f"/webhooks/fake/{inbox}", content=body, headers=headers)


# -- a real server in a subprocess (crash tests, two-process tests) ---------------------------
class ServerProcess:
    """``omniroute serve`` in a subprocess with the given settings; kill it, restart it."""

    def __init__(self, settings_env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **settings_env, "PYTHONUNBUFFERED": "1"}
        self.env.pop("PYTEST_CURRENT_TEST", None)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = int(settings_env["OMNIROUTE_PORT"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, extra_env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        env = {**self.env, **(extra_env or {})}
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the subprocess
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def server_env(settings: Settings, port: int) -> dict[str, str]:
    env = {
        "OMNIROUTE_DATABASE_URL": settings.database_url,
        "OMNIROUTE_RULES_PATH": str(settings.rules_path),
        "OMNIROUTE_SECRET_KEY": SECRET_KEY,
        "OMNIROUTE_DATA_DIR": str(settings.data_dir),
        "OMNIROUTE_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "OMNIROUTE_PORT": str(port),
        "OMNIROUTE_HOST": "127.0.0.1",
        "OMNIROUTE_WORKER_INTERVAL": "0.2",
        "OMNIROUTE_OUTBOX_INTERVAL": "0.2",
        "OMNIROUTE_HEARTBEAT_INTERVAL": "0.5",
    }
    if settings.channels_path is not None:
        env["OMNIROUTE_CHANNELS_PATH"] = str(settings.channels_path)
    if settings.redis_url:
        env["OMNIROUTE_REDIS_URL"] = settings.redis_url
    return env


# -- a real uvicorn server in this process, and websocket clients ------------------------------
import asyncio  # noqa: E402
import socket as _socket  # noqa: E402

import uvicorn  # noqa: E402
import websockets  # noqa: E402
from websockets.asyncio.client import ClientConnection  # noqa: E402


@contextlib.asynccontextmanager
async def live_server(runtime: Runtime, port: int = 0) -> AsyncIterator[str]:
    """Serve a started runtime over real sockets on ``port`` (0: a free one); yields the
    base URL."""
    app = create_app(runtime.settings, runtime=runtime)
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, _socket.IPPROTO_TCP)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        ws_ping_interval=None,
        **runtime.settings.server_options(),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def free_port() -> int:
    with _socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


class Client:
    """A websocket client that keeps frames it did not ask for, so tests can wait for them."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._used: set[int] = set()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        return frame  # type: ignore[no-any-return]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """The first frame (already received or new) matching ``predicate``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                if i not in self._used and predicate(frame):
                    self._used.add(i)  # each frame answers one wait
                    return frame
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                unused = [f for i, f in enumerate(self.frames) if i not in self._used]
                raise AssertionError(f"no matching frame; unused frames: {unused}")
            await self.recv(remaining)

    async def command(self, type_: str, **fields: Any) -> dict[str, Any]:
        request_id = f"r{len(self.frames)}-{type_}"
        await self.send({"type": type_, "id": request_id, **fields})
        reply = await self.wait_for(
            lambda f: f.get("id") == request_id and f.get("type") in ("ack", "error")
        )
        if reply["type"] == "error":
            raise CommandError(reply["code"], reply["message"])
        return reply["result"]  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.ws.close()


class CommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


async def connect_agent(
    base: str, token: str, resume: dict[str, int] | None = None
) -> tuple[Client, dict[str, Any]]:
    ws = await websockets.connect(ws_url(base, "/ws/agent"), open_timeout=10)
    client = Client(ws)
    await client.send({"type": "hello", "token": token, **({"resume": resume} if resume else {})})
    welcome = await client.wait_for(lambda f: f.get("type") == "welcome")
    return client, welcome


async def connect_visitor(
    base: str,
    inbox: str = "web",
    token: str | None = None,
    last_seq: int | None = None,
    origin: str | None = None,
    **hello: Any,
) -> tuple[Client, dict[str, Any]]:
    ws = await websockets.connect(
        ws_url(base, f"/ws/chat?inbox={inbox}"),
        origin=origin or "https://shop.example",
        open_timeout=10,
    )  # type: ignore[arg-type]
    client = Client(ws)
    frame: dict[str, Any] = {"type": "hello", **hello}
    if token:
        frame["token"] = token
    if last_seq is not None:
        frame["last_seq"] = last_seq
    await client.send(frame)
    welcome = await client.wait_for(lambda f: f.get("type") == "welcome")
    return client, welcome


WEB_CHANNELS = (
    CHANNELS
    + """\
  web: {channel: webchat, provider: omniroute, default_queue: general, allowed_origins: ["https://shop.example"],
        messages_per_minute_per_visitor: 600, messages_per_minute_per_ip: 6000}
"""
)

AGENT_RULES = RULES.replace(
    "default: {queue: general, reply: welcome}", "default: {queue: general}"
)
