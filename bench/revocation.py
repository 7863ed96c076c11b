"""Revocation latency: how long a revoked agent's socket stays open (docs/security.md).

Each round an agent connects to `/ws/agent` with its token (and is online: a ping is
answered), then an admin revokes the agent through the REST API (`DELETE /api/users/NAME`);
timed from sending that request until the agent's socket has its close frame (code 4401).
Setups, each against real `omniroute serve` processes:

- SQLite, one process;
- PostgreSQL + Redis, two processes: the socket on process B, the revocation on process A
  (the notice crosses processes through Redis);
- the same two processes with the notice lost: the revocation is committed straight to the
  database with no bus (as `omniroute users revoke` without OMNIROUTE_REDIS_URL does), so
  only B's periodic re-check (OMNIROUTE_CREDENTIAL_CHECK_INTERVAL, 2 s) closes the socket;
  timed from the commit to the close.

Reported: median and max per setup against the target (2 s); every close must carry 4401.
There is no raw baseline to divide by: the figure is a latency bound, not a throughput.

    python bench/revocation.py            # 20 revocations per setup (5 for the lost notice)
    python bench/revocation.py --smoke    # 3 on SQLite; run by `make test`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import websockets  # noqa: E402
from common.serving import serve_omniroute, stop  # noqa: E402

PG = os.environ.get("OMNIROUTE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("OMNIROUTE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"
TARGET = 2.0


async def _seed(url: str, agents: int) -> tuple[str, list[tuple[str, str]]]:
    """An admin and ``agents`` agents; returns the admin's token and (name, token) pairs."""
    from router.agents import create_agent, parse_capacity
    from router.auth import create_user
    from router.db import Database, Tx

    db = Database(url)
    await db.start()
    try:

        def add(tx: Tx) -> tuple[str, list[tuple[str, str]]]:
            _, admin = create_user(tx, "root", "admin")
            made = []
            for i in range(agents):
                name = f"agent{i}"
                user_id, token = create_user(tx, name, "agent")
                create_agent(tx, user_id, name, {}, parse_capacity("webchat=2,total=2"))
                made.append((name, token))
            return admin, made

        return await db.write(add)
    finally:
        await db.close()


async def _socket(base: str, token: str) -> Any:
    ws = await websockets.connect(base.replace("http://", "ws://") + "/ws/agent")
    await ws.send(json.dumps({"type": "hello", "token": token}))
    while json.loads(await ws.recv()).get("type") != "welcome":
        pass
    await ws.send(json.dumps({"type": "ping", "id": "p"}))  # answered once online
    while json.loads(await ws.recv()).get("id") != "p":
        pass
    return ws


async def _until_closed(ws: Any) -> int:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 30)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006


async def _rounds(
    socket_base: str, api_base: str, admin: str, agents: list[tuple[str, str]]
) -> list[float]:
    seconds = []
    async with httpx.AsyncClient(base_url=api_base, timeout=30) as http:
        # not timed: the client's connection and the server's first authenticated request
        assert (
            await http.get("/api/users", headers={"authorization": f"Bearer {admin}"})
        ).is_success
        for name, token in agents:
            ws = await _socket(socket_base, token)
            started = time.perf_counter()
            request = asyncio.create_task(
                http.delete(f"/api/users/{name}", headers={"authorization": f"Bearer {admin}"})
            )
            code = await _until_closed(ws)
            seconds.append(time.perf_counter() - started)
            assert (await request).status_code == 200
            assert code == 4401, f"closed with {code}"
    return seconds


async def _lost_notice_rounds(
    socket_base: str, url: str, agents: list[tuple[str, str]]
) -> list[float]:
    """Revoked straight in the database, with no bus at all (as `omniroute users revoke`
    does without OMNIROUTE_REDIS_URL): timed from the commit."""
    from router.auth import revoke_user
    from router.db import Database

    db = Database(url)
    await db.start()
    seconds = []
    try:
        for name, token in agents:
            ws = await _socket(socket_base, token)
            closing = asyncio.create_task(_until_closed(ws))
            await db.write(revoke_user, name)
            committed = time.perf_counter()
            code = await closing
            seconds.append(time.perf_counter() - committed)
            assert code == 4401, f"closed with {code}"
    finally:
        await db.close()
    return seconds


def _serve(url: str, env: dict[str, str]) -> tuple[Any, str, Path]:
    directory = Path(tempfile.mkdtemp(prefix="omniroute-revocation-"))
    (directory / "rules.yaml").write_text(RULES)
    proc, base = serve_omniroute(directory, url, env)
    return proc, base, directory


@contextlib.contextmanager
def _served(url: str, envs: list[dict[str, str]]) -> Iterator[list[str]]:
    started = []
    try:
        for env in envs:
            started.append(_serve(url, env))
        yield [base for _, base, _ in started]
    finally:
        for proc, _, directory in started:
            stop(proc)
            shutil.rmtree(directory, ignore_errors=True)


def sqlite(rounds: int) -> list[float]:
    from router.migrate import upgrade

    directory = Path(tempfile.mkdtemp(prefix="omniroute-revocation-db-"))
    try:
        url = f"sqlite:///{directory / 'bench.db'}"
        upgrade(url)
        admin, agents = asyncio.run(_seed(url, rounds))
        with _served(url, [{}]) as [base]:
            return asyncio.run(_rounds(base, base, admin, agents))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _admin_sql(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def _pg_database() -> Iterator[str]:
    name = f"omniroute_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        yield PG.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def postgres(rounds: int, lost: int) -> tuple[list[float], list[float]]:
    from router.migrate import upgrade

    with _pg_database() as url:
        upgrade(url)
        admin, agents = asyncio.run(_seed(url, rounds + lost))
        prefix = f"bench{uuid.uuid4().hex[:8]}:"
        envs = [
            {
                "OMNIROUTE_REDIS_URL": REDIS,
                "OMNIROUTE_REDIS_PREFIX": prefix,
                "OMNIROUTE_PROCESS_ID": f"bench-{n}",
            }
            for n in ("a", "b")
        ]
        with _served(url, envs) as [base_a, base_b]:
            notice = asyncio.run(_rounds(base_b, base_a, admin, agents[:rounds]))
            fallback = (
                asyncio.run(_lost_notice_rounds(base_b, url, agents[rounds:])) if lost else []
            )
    return notice, fallback


def _unreachable() -> str | None:
    import redis

    try:
        asyncio.run(_admin_sql("SELECT 1"))
    except Exception:
        return "PostgreSQL"
    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except Exception:
        return "Redis"
    return None


def _row(label: str, seconds: list[float], bound: str = f"target {TARGET:.0f} s") -> str:
    verdict = "" if max(seconds) <= TARGET else "OVER "
    return (
        f"{label:<56}{len(seconds):>4}{statistics.median(seconds) * 1000:>10.0f}"
        f"{max(seconds) * 1000:>10.0f}   {verdict}{bound}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--lost", type=int, default=5, help="rounds with the notice lost")
    args = parser.parse_args(argv)
    rounds = 3 if args.smoke else args.rounds
    print(
        f"{'revocation: request -> close frame (4401)':<56}{'n':>4}{'median ms':>10}{'max ms':>10}"
    )
    print(_row("SQLite, one process", sqlite(rounds)))
    if args.smoke:
        return 0
    missing = _unreachable()
    if missing:
        print(f"PostgreSQL + Redis skipped: {missing} unreachable ({PG}, {REDIS})")
        return 1 if os.environ.get("OMNIROUTE_REQUIRE_PEERS") == "1" else 0
    notice, fallback = postgres(rounds, args.lost)
    print(_row("PostgreSQL + Redis, socket on B, revoked through A", notice))
    if fallback:
        print(
            _row(
                "same, notice lost (no bus): commit -> close",
                fallback,
                "bound: the 2 s re-check interval",
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
