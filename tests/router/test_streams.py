"""Stream events: per-stream sequence numbers are gapless in commit order, even under
concurrent writers, and a rolled-back write leaves no trace in any stream; events past the
retention are pruned (in batches, by the lease holder), and a resume from before them must
reload (``resync_required``)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.clock import FakeClock
from router import db as db_module
from router import retention
from router.db import StreamRecord, Tx
from router.hub import ResumeResult, Session
from router.leases import try_acquire
from router.models import EventStream, StreamEvent
from router.runtime import Runtime
from tests.channels.test_email import eventually
from tests.support import make_settings, started_runtime


async def test_sequences_are_gapless_under_concurrent_writes(runtime: Runtime) -> None:
    published: list[StreamRecord] = []
    original = runtime.db.on_records

    async def capture(records: list[StreamRecord]) -> None:
        published.extend(records)
        if original is not None:
            await original(records)  # type: ignore[misc]

    runtime.db.on_records = capture

    def write(tx: Tx, i: int) -> None:
        tx.emit(f"agent:{i % 3}", "ping", {"i": i})
        tx.emit("supervisors", "ping", {"i": i})
        if i % 5 == 0:
            tx.emit(f"agent:{i % 3}", "pong", {"i": i})

    await asyncio.gather(*(runtime.db.write(write, i) for i in range(120)))
    rows = await runtime.db.read(
        lambda c: c.execute(
            select(StreamEvent.stream, StreamEvent.seq).order_by(StreamEvent.id)
        ).all()
    )
    by_stream: dict[str, list[int]] = {}
    for stream, seq in rows:
        by_stream.setdefault(stream, []).append(seq)
    for stream, seqs in by_stream.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), stream
    counters = dict(
        await runtime.db.read(
            lambda c: c.execute(select(EventStream.stream, EventStream.last_seq)).all()
        )
    )
    assert counters == {s: len(v) for s, v in by_stream.items()}
    assert counters["supervisors"] == 120
    assert sorted((r.stream, r.seq) for r in published) == sorted(
        rows
    )  # each published once, after commit


async def test_a_failed_write_consumes_no_sequence_number(runtime: Runtime) -> None:
    def ok(tx: Tx) -> None:
        tx.emit("s", "a", {})

    def boom(tx: Tx) -> None:
        tx.emit("s", "b", {})
        raise RuntimeError("nope")

    await runtime.db.write(ok)
    with pytest.raises(RuntimeError):
        await runtime.db.write(boom)
    await runtime.db.write(ok)
    events = await runtime.db.stream_events("s", 0)
    assert [(e.seq, e.type) for e in events] == [(1, "a"), (2, "a")]


async def test_a_rolled_back_savepoint_drops_its_buffered_events(runtime: Runtime) -> None:
    def write(tx: Tx) -> Any:
        tx.emit("s", "kept", {})
        try:
            with tx.savepoint():
                tx.emit("s", "dropped", {})
                tx.emit("t", "dropped", {})
                raise ValueError
        except ValueError:
            pass
        tx.emit("s", "kept-too", {})

    await runtime.db.write(write)
    assert [(e.seq, e.type) for e in await runtime.db.stream_events("s", 0)] == [
        (1, "kept"),
        (2, "kept-too"),
    ]
    assert await runtime.db.stream_events("t", 0) == []


async def test_stream_events_after_a_sequence_number(runtime: Runtime) -> None:
    for i in range(5):
        await runtime.db.write(lambda tx, i=i: tx.emit("s", "e", {"i": i}))
    assert [e.payload["i"] for e in await runtime.db.stream_events("s", 2)] == [2, 3, 4]
    assert [e.payload["i"] for e in await runtime.db.stream_events("s", 2, limit=1)] == [2]


async def test_batch_end_work_runs_once_after_the_jobs_that_ask_for_it(runtime: Runtime) -> None:
    """``Tx.at_batch_end``: one run per function after the jobs committed together (SQLite's
    group commit), its result handed to every asking job, its events published."""
    runs: list[int] = []

    def tally(tx: Tx) -> int:
        runs.append(1)
        tx.emit("tally", "ran", {"n": len(runs)})
        return len(runs)

    def job(tx: Tx, done: list[int], twice: bool) -> None:
        tx.emit("jobs", "job", {})
        tx.at_batch_end(tally, done)
        if twice:
            tx.at_batch_end(tally, done)  # the same function: still one run

    single: list[int] = []
    await runtime.db.write(job, single, True)
    assert single == [1, 1] and len(runs) == 1
    dones: list[list[int]] = [[] for _ in range(20)]
    await asyncio.gather(*(runtime.db.write(job, d, False) for d in dones))
    assert all(len(d) == 1 for d in dones)
    assert 1 < len(runs) <= 21  # a run per batch of jobs: never more than one per job
    assert len(await runtime.db.stream_events("tally", 0)) == len(runs)
    assert len(await runtime.db.stream_events("jobs", 0)) == 21


async def test_failed_batch_end_work_leaves_the_jobs_committed(runtime: Runtime) -> None:
    def boom(tx: Tx) -> None:
        tx.emit("boom", "never", {})
        raise RuntimeError("batch-end failure")

    def job(tx: Tx, done: list[Any]) -> str:
        tx.emit("jobs", "job", {})
        tx.at_batch_end(boom, done)
        return "committed"

    done: list[Any] = []
    assert await runtime.db.write(job, done) == "committed"
    assert done == []  # the caller sees the work was not done
    assert len(await runtime.db.stream_events("jobs", 0)) == 1
    assert await runtime.db.stream_events("boom", 0) == []


async def test_each_batch_is_timed_and_a_slow_one_is_logged(
    tmp_path: Path,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite's writer (PostgreSQL has no batches) reports every committed batch (writes,
    seconds) to /metrics, and logs one that took longer than ``SLOW_BATCH_SECONDS``:
    everything queued behind it waited."""
    async with started_runtime(make_settings(tmp_path / "conf", sqlite_url)) as runtime:
        await _timed_batches(runtime, monkeypatch, caplog)


async def _timed_batches(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[int, float]] = []
    metric = runtime.db.on_batch
    assert metric is not None

    def capture(writes: int, seconds: float) -> None:
        seen.append((writes, seconds))
        metric(writes, seconds)

    runtime.db.on_batch = capture

    def total() -> float:
        value = runtime.metrics.registry.get_sample_value("omniroute_db_write_batch_seconds_sum")
        return float(value or 0.0)

    before = total()

    def slow(tx: Tx) -> None:
        time.sleep(0.5)
        tx.emit("slow", "e", {})

    monkeypatch.setattr(db_module, "SLOW_BATCH_SECONDS", 0.4)
    with caplog.at_level(logging.WARNING, logger="router.db"):
        await runtime.db.write(slow)
        await runtime.db.write(lambda tx: tx.emit("fast", "e", {}))
    assert [w for w, _ in seen] == [1, 1] and seen[0][1] >= 0.5 > 0.4 > seen[1][1]
    slow_lines = [r.getMessage() for r in caplog.records if "writer: a batch" in r.getMessage()]
    assert len(slow_lines) == 1 and "a batch of 1 writes took" in slow_lines[0]
    assert total() - before >= 0.5
    assert b"omniroute_db_write_batch_seconds_bucket" in runtime.metrics.render()


# -- retention (docs/agent-protocol.md: OMNIROUTE_STREAM_RETENTION_DAYS) -----------------------
async def emit(runtime: Runtime, stream: str, n: int) -> None:
    for i in range(n):
        await runtime.db.write(lambda tx, i=i: tx.emit(stream, "e", {"i": i}))


async def stored(runtime: Runtime) -> list[tuple[str, int]]:
    return [
        (r.stream, int(r.seq))
        for r in await runtime.db.read(
            lambda c: c.execute(
                select(StreamEvent.stream, StreamEvent.seq).order_by(StreamEvent.id)
            ).all()
        )
    ]


async def resume(runtime: Runtime, streams: dict[str, int | None]) -> ResumeResult:
    session = Session(runtime.db, runtime.bus, lambda frame: asyncio.sleep(0))
    try:
        return await session.open(streams, [])
    finally:
        await session.close()


async def test_stream_events_past_retention_are_pruned_in_batches_by_the_lease_holder(
    runtime: Runtime, clock: FakeClock
) -> None:
    start = clock.now()
    await emit(runtime, "agent:1", 5)
    await emit(runtime, "supervisors", 2)
    clock.advance(timedelta(days=3))
    await emit(runtime, "agent:1", 2)
    # seven days after the first events, to the second: nothing is old enough yet
    clock.set(start + timedelta(days=7))
    assert await runtime.prune_streams(batch=2) == 0
    clock.advance(1)
    # another process holds the retention lease: it prunes, this one does not
    assert await runtime.db.write(try_acquire, retention.LEASE, "other", 60.0)
    assert await runtime.prune_streams(batch=2) == 0
    assert len(await stored(runtime)) == 9
    clock.advance(61)  # the other process died: its lease expires
    # one batch is one transaction of at most ``batch`` rows, the oldest first
    horizon = clock.now() - timedelta(days=runtime.settings.stream_retention_days)
    assert await runtime.db.write(retention.prune_stream_events, horizon, 2) == 2
    assert (await stored(runtime))[:2] == [("agent:1", 3), ("agent:1", 4)]
    assert await runtime.prune_streams(batch=2) == 5  # three more batches
    assert await stored(runtime) == [("agent:1", 6), ("agent:1", 7)]
    assert await runtime.prune_streams(batch=2) == 0
    # sequences go on where they were
    await emit(runtime, "supervisors", 1)
    assert (await stored(runtime))[-1] == ("supervisors", 3)
    # a resume from before the horizon must reload; from the oldest kept, it replays
    old = await resume(runtime, {"agent:1": 4, "supervisors": 2})
    assert (old.resync, old.positions) == (["agent:1"], {"agent:1": 7, "supervisors": 3})
    assert [(f["stream"], f["seq"]) for f in old.replay] == [("supervisors", 3)]
    recent = await resume(runtime, {"agent:1": 5})
    assert recent.resync == [] and [f["seq"] for f in recent.replay] == [6, 7]


async def test_a_resume_across_a_pruned_hole_gets_resync_required(
    runtime: Runtime, clock: FakeClock
) -> None:
    """Pruning goes by the events' time; a process whose clock lagged wrote an event older
    than the ones around it, so retention can leave a hole in the middle of a stream (as
    can a prune between a resume's positions and its catch-up): the resume must not skip
    it silently."""
    start = clock.now()
    clock.set(start + timedelta(days=2))
    await emit(runtime, "agent:1", 1)
    clock.set(start)  # the lagging process
    await emit(runtime, "agent:1", 1)
    clock.set(start + timedelta(days=2))
    await emit(runtime, "agent:1", 1)
    clock.set(start + timedelta(days=8))
    assert await runtime.prune_streams() == 1
    assert await stored(runtime) == [("agent:1", 1), ("agent:1", 3)]
    across = await resume(runtime, {"agent:1": 0})
    assert (across.resync, across.replay, across.positions) == (["agent:1"], [], {"agent:1": 3})
    after = await resume(runtime, {"agent:1": 2})
    assert after.resync == [] and [f["seq"] for f in after.replay] == [3]


async def test_the_retention_worker_prunes_on_its_own(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    settings = make_settings(
        tmp_path / "conf", db_url, stream_prune_interval=0.05, stream_retention_days=1
    )
    async with started_runtime(settings, clock, workers=True) as runtime:
        await emit(runtime, "agent:1", 3)
        clock.advance(timedelta(days=1, seconds=1))
        await emit(runtime, "agent:1", 1)

        async def pruned() -> bool:
            return await stored(runtime) == [("agent:1", 4)]

        await eventually(pruned)
