"""Assignment: decisions per second and decision latency, against a raw claim loop.

For 50, 200, 1,000 and 5,000 agents (online, skills, capacity) and 10 to 1,000 waiting
conversations, on SQLite and PostgreSQL:

- decisions/s: the assignment engine offers every waiting conversation (eligibility, queue
  order, strategy, capacity claims by conditional update, offer rows, events, stream events);
- p99 ms: one conversation arrives while the agents are there; time until it is offered;
- raw: a bare claim loop on the same database, 8 workers (as many as the engine's offers in
  flight), one transaction per claim: ``UPDATE conversations ... WHERE id = (next queued)
  RETURNING`` and ``UPDATE agent_load ... WHERE used < cap RETURNING`` for the least loaded
  agent (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), until nothing is queued;
- batches below 500 waiting are repeated, interleaved with the baseline, so that each
  figure covers at least 500 decisions.

Targets: the cost per decision grows at most 2x from 200 to 5,000 agents, and on PostgreSQL
decisions/s are at least 0.3x the raw claim loop.

    python bench/assign.py                 # SQLite and PostgreSQL (127.0.0.1:5432)
    python bench/assign.py --smoke         # seconds: SQLite, small sizes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, select, text  # noqa: E402

from router.assignment.service import Assignment  # noqa: E402
from router.db import Database, Tx  # noqa: E402
from router.migrate import upgrade  # noqa: E402
from router.models import Agent, AgentLoad, AgentSkill, Contact, Conversation, Inbox, User  # noqa: E402
from router.types import CHANNEL_IDS  # noqa: E402
from routing_rules import load_ruleset  # noqa: E402

RULES = "version: 1\nqueues:\n  general: {offer_timeout: 1h}\n  billing: {skills: {billing: 3}, offer_timeout: 1h}\ndefault: {queue: general}\n"
QUEUES = load_ruleset(RULES, channels=CHANNEL_IDS).queues


def seed_agents(tx: Tx, count: int, rng: random.Random) -> None:
    now = datetime.now(UTC)
    users = [{"name": f"a{i}", "role": "agent", "created_at": now} for i in range(count)]
    tx.execute(insert(User), users)
    ids = {r.name: r.id for r in tx.execute(select(User.id, User.name))}
    agents = [
        {
            "user_id": ids[f"a{i}"],
            "display_name": f"A{i}",
            "presence": "online",
            "presence_changed_at": now,
            "idle_since": now - timedelta(seconds=rng.randint(0, 3600)),
            "exclusive_channels": [],
            "missed_offers": 0,
            "rr_position": 0,
            "created_at": now,
        }
        for i in range(count)
    ]
    tx.execute(insert(Agent), agents)
    agent_ids = [r.id for r in tx.execute(select(Agent.id))]
    tx.execute(
        insert(AgentLoad),
        [
            {"agent_id": a, "channel": c, "used": 0, "cap": 1000}
            for a in agent_ids
            for c in ("webchat", "total")
        ],
    )
    skills = [
        {"agent_id": a, "skill": "billing", "level": rng.randint(1, 9)}
        for a in agent_ids
        if rng.random() < 0.5
    ]
    if skills:
        tx.execute(insert(AgentSkill), skills)


def seed_waiting(tx: Tx, count: int, rng: random.Random) -> list[int]:
    now = datetime.now(UTC)
    inbox = tx.execute(select(Inbox.id).where(Inbox.slug == "bench")).scalar_one_or_none()
    if inbox is None:
        inbox = tx.execute(
            insert(Inbox)
            .values(
                slug="bench",
                channel="webchat",
                provider="bench",
                continuity="join_open",
                reopen_window_s=3600,
                settings={},
                enabled=True,
                updated_at=now,
            )
            .returning(Inbox.id)
        ).scalar_one()
    contacts = (
        tx.execute(
            insert(Contact).returning(Contact.id),
            [
                {"attributes": {}, "vip": False, "created_at": now, "updated_at": now}
                for _ in range(count)
            ],
        )
        .scalars()
        .all()
    )
    rows = []
    for i, contact in enumerate(contacts):
        billing = rng.random() < 0.3
        rows.append(
            {
                "contact_id": contact,
                "inbox_id": inbox,
                "channel": "webchat",
                "state": "queued",
                "queue": "billing" if billing else "general",
                "priority": rng.randint(0, 3),
                "required_skills": {"billing": 3} if billing else {},
                "tags": [],
                "data": {},
                "queued_at": now - timedelta(milliseconds=count - i),
                "created_at": now,
                "updated_at": now,
            }
        )
    return [
        int(i)
        for i in tx.execute(insert(Conversation).returning(Conversation.id), rows).scalars().all()
    ]


def reset_load(tx: Tx) -> None:
    tx.execute(text("DELETE FROM stream_events"))
    tx.execute(text("DELETE FROM event_streams"))
    tx.execute(text("DELETE FROM conversation_events"))
    tx.execute(text("DELETE FROM agent_status_events"))
    tx.execute(text("DELETE FROM offers"))
    tx.execute(text("UPDATE conversations SET state = 'closed'"))
    tx.execute(text("UPDATE agent_load SET used = 0"))


def raw_claim(tx: Tx) -> int | None:
    """One step of the bare claim loop a minimal router would run (no eligibility, events or
    offers): take the next queued conversation and the least loaded agent with room, each by
    a conditional ``UPDATE ... RETURNING`` (``SKIP LOCKED`` on PostgreSQL). None when nothing
    is left."""
    lock = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
    conversation = tx.execute(
        text(
            "UPDATE conversations SET state = 'offered' WHERE id = ("
            "SELECT id FROM conversations WHERE state = 'queued'"
            f" ORDER BY priority DESC, queued_at, id LIMIT 1{lock}"
            ") AND state = 'queued' RETURNING id"
        )
    ).scalar_one_or_none()
    if conversation is None:
        return None
    agent = tx.execute(
        text(
            "UPDATE agent_load SET used = used + 1 WHERE channel = 'webchat' AND agent_id = ("
            "SELECT agent_id FROM agent_load WHERE channel = 'webchat' AND used < cap"
            f" ORDER BY used, agent_id LIMIT 1{lock}"
            ") AND used < cap RETURNING agent_id"
        )
    ).scalar_one_or_none()
    if agent is None:
        raise RuntimeError("the bench seeds capacity for every waiting conversation")
    return int(conversation)


async def raw_loop(db: Database, workers: int) -> int:
    """``workers`` concurrent claim loops until no queued conversation is left."""

    async def worker() -> int:
        claimed = 0
        while await db.write(raw_claim) is not None:
            claimed += 1
        return claimed

    return sum(await asyncio.gather(*(worker() for _ in range(workers))))


async def measure(
    url: str, agents: int, waiting: list[int], latency_samples: int, rng: random.Random
) -> list[dict[str, Any]]:
    db = Database(url, pool_size=20, max_overflow=10)
    await db.start()
    results = []
    try:
        await db.write(seed_agents, agents, rng)
        if db.dialect == "postgresql":  # planner statistics, as autovacuum would have them
            await db.write(lambda tx: tx.execute(text("ANALYZE")))
        engine = Assignment(
            db, lambda: QUEUES, process_id="bench", presence_grace=60, dead_after=60
        )
        # Warm up both paths (statement caches, database pages) so the first size is not
        # measured cold.
        await db.write(seed_waiting, 200, rng)
        await engine.dispatch()
        await db.write(reset_load)
        await db.write(seed_waiting, 50, rng)
        await raw_loop(db, 8)
        for count in waiting:
            # small batches are repeated (interleaved with the baseline) to measure enough
            elapsed = raw_elapsed = 0.0
            for _ in range(max(1, 500 // count)):
                await db.write(reset_load)
                await db.write(seed_waiting, count, rng)
                if db.dialect == "postgresql":
                    await db.write(lambda tx: tx.execute(text("ANALYZE conversations")))
                started = time.perf_counter()
                offered = await engine.dispatch()
                elapsed += time.perf_counter() - started
                assert offered == count, f"offered {offered} of {count}"
                # the raw claim loop over the same number of conversations
                await db.write(reset_load)
                await db.write(seed_waiting, count, rng)
                started = time.perf_counter()
                claimed = await raw_loop(db, 8)
                raw_elapsed += time.perf_counter() - started
                assert claimed == count, f"claimed {claimed} of {count}"
            decisions = count * max(1, 500 // count)
            results.append(
                {
                    "agents": agents,
                    "waiting": count,
                    "per_s": decisions / elapsed,
                    "raw_per_s": decisions / raw_elapsed,
                }
            )
        # latency: one arrival at a time, offered at once
        await db.write(reset_load)
        samples = []
        for _ in range(latency_samples):
            await db.write(seed_waiting, 1, rng)
            started = time.perf_counter()
            assert await engine.dispatch() == 1
            samples.append((time.perf_counter() - started) * 1000)
        samples.sort()
        for r in results:
            r["p50_ms"] = statistics.median(samples)
            r["p99_ms"] = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    finally:
        await db.close()
    return results


def database(kind: str) -> tuple[str, Any]:
    if kind == "sqlite":
        directory = Path(tempfile.mkdtemp(prefix="omniroute-assign-"))
        url = f"sqlite:///{directory / 'bench.db'}"
        upgrade(url)
        return url, lambda: shutil.rmtree(directory, ignore_errors=True)
    import asyncpg

    base = os.environ.get("OMNIROUTE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"omniroute_bench_{uuid.uuid4().hex[:8]}"

    async def ddl(sql: str) -> None:
        conn = await asyncpg.connect(base.replace("+asyncpg", ""))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(ddl(f"CREATE DATABASE {name}"))
    url = base.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
    upgrade(url)
    return url, lambda: asyncio.run(ddl(f"DROP DATABASE {name} WITH (FORCE)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    backends = ["sqlite"] if args.smoke else args.backends.split(",")
    sizes = [50, 200] if args.smoke else [50, 200, 1000, 5000]
    waiting = [10] if args.smoke else [10, 100, 1000]
    samples = 20 if args.smoke else 200
    rng = random.Random(42)
    print(
        f"{'backend':<11}{'agents':>7}{'waiting':>8}{'dec/s':>9}{'raw/s':>9}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}"
    )
    verdicts = []
    for backend in backends:
        rows: list[dict[str, Any]] = []
        for agents in sizes:
            url, cleanup = database(backend)
            try:
                rows.extend(asyncio.run(measure(url, agents, waiting, samples, rng)))
            finally:
                cleanup()
        for r in rows:
            print(
                f"{backend:<11}{r['agents']:>7}{r['waiting']:>8}{r['per_s']:>9.0f}{r['raw_per_s']:>9.0f}{r['per_s'] / r['raw_per_s']:>6.2f}x"
                f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
            )
        by = {(r["agents"], r["waiting"]): r for r in rows}
        if (200, 100) in by and (5000, 100) in by:
            growth = by[(200, 100)]["per_s"] / by[(5000, 100)]["per_s"]
            verdicts.append(
                (
                    f"{backend}: cost per decision 200 -> 5,000 agents (100 waiting)",
                    growth,
                    growth <= 2.0,
                    "x (target <= 2x)",
                )
            )
        if backend == "postgresql":
            worst = min(r["per_s"] / r["raw_per_s"] for r in rows)
            verdicts.append(
                (
                    "postgresql: decisions/s vs the raw claim loop, worst case",
                    worst,
                    worst >= 0.3,
                    "x (target >= 0.3x)",
                )
            )
    for label, value, ok, unit in verdicts:
        print(f"{label}: {value:.2f}{unit} {'met' if ok else 'MISSED'}")
    return 0 if args.smoke or all(ok for *_, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
