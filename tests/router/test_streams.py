"""Stream events: per-stream sequence numbers are gapless in commit order, even under
concurrent writers, and a rolled-back write leaves no trace in any stream."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from router import db as db_module
from router.db import StreamRecord, Tx
from router.models import EventStream, StreamEvent
from router.runtime import Runtime
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
