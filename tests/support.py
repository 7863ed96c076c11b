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
        "OMNIROUTE_NEW_CONVERSATION_GRACE": "0",
    }
    if settings.channels_path is not None:
        env["OMNIROUTE_CHANNELS_PATH"] = str(settings.channels_path)
    if settings.redis_url:
        env["OMNIROUTE_REDIS_URL"] = settings.redis_url
    return env
