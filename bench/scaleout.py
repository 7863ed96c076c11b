"""B1 (part): web chat end to end on PostgreSQL + Redis, one process against two.

The same load as bench/e2e.py (each message from a new visitor: persisted, routed, offered,
received on an agent's socket), at full speed, against `omniroute serve` on PostgreSQL with
the Redis bus: first one process, then two processes sharing the database and the bus with
the agents and the visitors split between them (the way a load balancer spreads sockets).
Reported: messages/s, p50/p99 ingest-to-agent latency, lost and duplicated (must be 0), and
the ratio of two processes to one (target >= 1.6x). Everything (load generator, servers,
PostgreSQL, Redis) shares this machine's cores, which caps what a second process can add.

    python bench/scaleout.py            # full run
    python bench/scaleout.py --smoke    # seconds; run by `make test`
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.serving import gc_paused, paced, serve_omniroute, stop, stop_reading  # noqa: E402
from e2e import CHANNELS, RULES, Omniroute, Run, open_agents, open_visitors  # noqa: E402

PG = os.environ.get("OMNIROUTE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("OMNIROUTE_BENCH_REDIS", "redis://127.0.0.1:6379/0")


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def database() -> Any:
    name = f"omniroute_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def start(
    processes: int, url: str, agents: int
) -> tuple[list[Any], list[str], list[str], list[Path]]:
    from router.migrate import upgrade

    upgrade(url)
    tokens = asyncio.run(Omniroute(agents)._seed(url))
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    procs, bases, directories = [], [], []
    for n in range(processes):
        directory = Path(tempfile.mkdtemp(prefix=f"omniroute-b1-{n}-"))
        (directory / "rules.yaml").write_text(RULES)
        (directory / "channels.yaml").write_text(CHANNELS)
        proc, base = serve_omniroute(
            directory,
            url,
            {
                "OMNIROUTE_REDIS_URL": REDIS,
                "OMNIROUTE_REDIS_PREFIX": prefix,
                "OMNIROUTE_PROCESS_ID": f"bench-{n}",
                "OMNIROUTE_DB_POOL_SIZE": "20",
            },
        )
        procs.append(proc)
        bases.append(base.replace("http://", "ws://"))
        directories.append(directory)
    return procs, bases, tokens, directories


async def drive(bases: list[str], tokens: list[str], messages: int, label: str) -> dict[str, Any]:
    run = Run(expected=messages)
    agents, readers, visitors = [], [], []
    for i, base in enumerate(bases):
        sockets, tasks = await open_agents(base, tokens[i :: len(bases)], run)
        agents.extend(sockets)
        readers.extend(tasks)
        visitors.extend(await open_visitors(base, messages // len(bases)))

    async def send(i: int, ws: Any) -> None:
        text = f"bench {label}-{i}"
        run.sent[text] = time.perf_counter()
        await ws.send(json.dumps({"type": "message", "client_id": str(uuid.uuid4()), "text": text}))
        await ws.recv()

    with gc_paused():
        started = time.perf_counter()
        await paced(len(visitors), None, lambda i: send(i, visitors[i]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.done.wait(), 120)
        await asyncio.sleep(0.5)
    finished = max((max(t) for t in run.received.values()), default=time.perf_counter())
    await stop_reading(readers, [*agents, *visitors])
    latencies = sorted((min(run.received[t]) - run.sent[t]) * 1000 for t in run.received)
    return {
        "messages": len(visitors),
        "per_second": len(run.received) / (finished - started) if run.received else 0.0,
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        if latencies
        else float("nan"),
        "lost": sum(1 for t in run.sent if t not in run.received),
        "duplicated": sum(len(v) - 1 for v in run.received.values()),
    }


def measure(processes: int, agents: int, messages: int) -> dict[str, Any]:
    with database() as url:
        procs, bases, tokens, directories = start(processes, url, agents)
        try:
            return asyncio.run(drive(bases, tokens, messages, f"p{processes}"))
        finally:
            for proc in procs:
                stop(proc)
            for directory in directories:
                shutil.rmtree(directory, ignore_errors=True)


def _unreachable() -> str | None:
    """The peer this benchmark needs that is not there (None when both answer)."""
    import redis

    try:
        asyncio.run(_admin("SELECT 1"))
    except Exception:
        return "PostgreSQL"
    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except Exception:
        return "Redis"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args(argv)
    missing = _unreachable()
    if missing:
        print(f"B1 scale-out skipped: {missing} unreachable ({PG}, {REDIS})")
        return 1 if os.environ.get("OMNIROUTE_REQUIRE_PEERS") == "1" else 0
    agents = 2 if args.smoke else args.agents
    messages = 40 if args.smoke else args.messages
    results = {n: measure(n, agents, messages) for n in (1, 2)}
    print(f"B1 web chat on PostgreSQL + Redis; {agents} agents; {messages} messages at full speed")
    print(
        f"{'processes':<12}{'msgs':>7}{'msg/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'lost':>6}{'dup':>5}"
    )
    for n, r in results.items():
        print(
            f"{n:<12}{r['messages']:>7}{r['per_second']:>10.0f}{r['p50_ms']:>9.1f}"
            f"{r['p99_ms']:>9.1f}{r['lost']:>6}{r['duplicated']:>5}"
        )
    ratio = results[2]["per_second"] / max(results[1]["per_second"], 1e-9)
    print(f"two processes: {ratio:.2f}x one (target >= 1.6x)")
    clean = all(r["lost"] == 0 and r["duplicated"] == 0 for r in results.values())
    print(f"lost and duplicated: {'0 and 0' if clean else 'NOT ZERO'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
