"""What the benchmarks share: start `omniroute serve` on a fresh SQLite database, start a
raw baseline server (the benchmark's own script with ``--baseline-server PORT``), wait for
either, stop them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "UNLIMITED_WEBCHAT",
    "free_port",
    "gc_paused",
    "paced",
    "serve_baseline",
    "serve_omniroute",
    "spawn_baseline",
    "stop",
    "stop_reading",
    "wait_http",
    "wait_port",
]

# A web-chat inbox whose rate limits a load generator on one address never reaches.
UNLIMITED_WEBCHAT = {
    "channel": "webchat",
    "provider": "omniroute",
    "connections_per_minute_per_ip": 10_000_000,
    "new_visitors_per_minute_per_ip": 10_000_000,
    "messages_per_minute_per_visitor": 10_000_000,
    "messages_per_minute_per_ip": 10_000_000,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(port)


def database(directory: Path, rules: str, channels: str | None = None) -> str:
    """A migrated SQLite database with the benchmark's rules (and channels) beside it."""
    from router.migrate import upgrade

    url = f"sqlite:///{directory / 'bench.db'}"
    (directory / "rules.yaml").write_text(rules)
    if channels is not None:
        (directory / "channels.yaml").write_text(channels)
    upgrade(url)
    return url


def serve_omniroute(
    directory: Path, url: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`omniroute serve` on ``url`` in its own process group; returns it and its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "OMNIROUTE_DATABASE_URL": url,
        "OMNIROUTE_RULES_PATH": str(directory / "rules.yaml"),
        "OMNIROUTE_SECRET_KEY": secrets.token_urlsafe(48),  # serve refuses weak keys
        "OMNIROUTE_PORT": str(port),
        "OMNIROUTE_PUBLIC_BASE_URL": base,
        "OMNIROUTE_DATA_DIR": str(directory),
        **(
            {"OMNIROUTE_CHANNELS_PATH": str(directory / "channels.yaml")}
            if (directory / "channels.yaml").exists()
            else {}
        ),
        **(extra_env or {}),
    }
    log = open(directory / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    wait_http(base + "/readyz", proc)
    return proc, base


def serve_baseline(app: Any, port: int) -> None:
    """Serve a benchmark's raw baseline app (what ``--baseline-server PORT`` runs)."""
    import uvicorn
    from pydantic import TypeAdapter

    from router.settings import websocket_options

    # the same websocket transport as `omniroute serve`, so the ratio compares the work
    # behind the sockets and not the framing; a benchmark that sets OMNIROUTE_WS_COMPRESSION
    # for both servers compares them with per-message deflate (read as omniroute reads it)
    compression = TypeAdapter(bool).validate_python(
        os.environ.get("OMNIROUTE_WS_COMPRESSION", "false")
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws_ping_interval=None,
        **websocket_options(compression=compression),
    )


def spawn_baseline(script: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, script, "--baseline-server", str(port)], cwd=ROOT, start_new_session=True
    )
    wait_port(port, proc)
    return proc, port


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC in the load generator during a timed run: it must not pause the
    measurement (done alike for the baselines and omniroute)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def paced(count: int, rate: float | None, start: Callable[[int], Awaitable[Any]]) -> None:
    """Run ``start(i)`` for each ``i < count``: all at once (``rate`` None), or ``rate`` a
    second on schedule; return when all have finished."""
    began = time.perf_counter()
    tasks = []
    for i in range(count):
        if rate is not None:
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(start(i)))
    await asyncio.gather(*tasks)


async def stop_reading(readers: Iterable[asyncio.Task[Any]], sockets: Iterable[Any]) -> None:
    """Stop every reader before any socket closes (a leaving agent's offers go to the
    agents still there: counting them would be a false duplicate), then close them."""
    for task in readers:
        task.cancel()
    for ws in sockets:
        await ws.close()
