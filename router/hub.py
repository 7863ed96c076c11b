"""Socket sessions: streams delivered in order, at least once, gaps repaired from the database.

A session subscribes to its streams on the bus *first*, waits until the subscription is
live, and only then catches up from the database from the client's ``last_seq``; events
that arrive twice (bus + catch-up) are dropped by sequence number. When a bus message
skips ahead (a lost or delayed notice), the missing events are read from the database
before delivering it. So the bus only ever wakes sockets up; the database is the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select

from adapters.bus import Bus, Subscription
from router.db import Database
from router.models import EventStream, StreamEvent

__all__ = ["ResumeResult", "Session", "StreamFollower", "stream_positions"]

log = logging.getLogger(__name__)


def stream_positions(conn: Connection, streams: list[str]) -> dict[str, tuple[int, int | None]]:
    """For each stream: (last_seq, oldest seq still stored or None)."""
    last = dict(
        conn.execute(
            select(EventStream.stream, EventStream.last_seq).where(EventStream.stream.in_(streams))
        ).all()
    )
    oldest = dict(
        conn.execute(
            select(StreamEvent.stream, func.min(StreamEvent.seq))
            .where(StreamEvent.stream.in_(streams))
            .group_by(StreamEvent.stream)
        ).all()
    )
    return {s: (int(last.get(s, 0)), int(oldest[s]) if s in oldest else None) for s in streams}


def _continues(replay: list[dict[str, Any]], start: int, last: int) -> bool:
    """Whether a catch-up from ``start`` is whole: every seq from ``start + 1`` on, at least
    up to ``last`` (the stream's position when the resume began)."""
    seqs = [int(frame["seq"]) for frame in replay]
    return seqs == list(range(start + 1, start + 1 + len(seqs))) and start + len(seqs) >= last


@dataclass
class ResumeResult:
    replay: list[dict[str, Any]] = field(default_factory=list)
    resync: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)


class StreamFollower:
    """Delivers one stream's events exactly in sequence: drops seen ones, fills gaps."""

    def __init__(self, db: Database, stream: str, last_seq: int) -> None:
        self.db = db
        self.stream = stream
        self.last_seq = last_seq
        self.repaired = 0

    async def accept(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        seq = int(frame["seq"])
        if seq <= self.last_seq:
            return []
        out: list[dict[str, Any]] = []
        if seq > self.last_seq + 1:
            missing = await self.db.stream_events(
                self.stream, self.last_seq, limit=seq - self.last_seq - 1
            )
            self.repaired += len(missing)
            out.extend(r.frame() for r in missing if r.seq < seq)
        out.append(frame)
        self.last_seq = seq
        return out

    async def catch_up(self) -> list[dict[str, Any]]:
        """Everything after ``last_seq`` that is stored now (used on resume and after an outage)."""
        out: list[dict[str, Any]] = []
        while True:
            batch = await self.db.stream_events(self.stream, self.last_seq, limit=500)
            if not batch:
                return out
            out.extend(r.frame() for r in batch)
            self.last_seq = batch[-1].seq


class Session:
    """One socket's view of its streams and ephemeral topics, feeding ``send``."""

    def __init__(
        self, db: Database, bus: Bus, send: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        self.db = db
        self.bus = bus
        self.send = send
        self.followers: dict[str, StreamFollower] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._subscriptions: list[Subscription] = []
        self._pump: asyncio.Task[None] | None = None
        self.overflowed = False

    def _enqueue(self, frame: dict[str, Any]) -> None:
        try:
            self._inbox.put_nowait(frame)
        except asyncio.QueueFull:
            # A client too slow to read: it will be told to resync (events are in the database).
            self.overflowed = True

    async def open(self, streams: dict[str, int | None], ephemeral: list[str]) -> ResumeResult:
        """Subscribe, then resume each stream from the client's ``last_seq`` (None: from now).
        Live delivery begins with ``start()``, after the caller has sent the replay."""
        for stream in streams:
            self._subscriptions.append(self.bus.subscribe(f"stream:{stream}", self._enqueue))
        for topic in ephemeral:
            self._subscriptions.append(self.bus.subscribe(topic, self._enqueue))
        for stream in streams:
            await self.bus.ready(f"stream:{stream}")
        positions = await self.db.read(stream_positions, list(streams))
        result = ResumeResult()
        for stream, given in streams.items():
            last, oldest = positions[stream]
            start = last
            if given is not None and 0 <= given <= last:
                if given < last and (oldest is None or oldest > given + 1):
                    result.resync.append(stream)  # pruned: the client must reload its state
                else:
                    start = given
            follower = StreamFollower(self.db, stream, start)
            self.followers[stream] = follower
            replay = await follower.catch_up()
            if not _continues(replay, start, last):
                # pruned between the positions and the catch-up (retention runs in another
                # transaction, maybe another process): what the client missed is gone
                result.resync.append(stream)
                replay = []
            result.replay.extend(replay)
            result.positions[stream] = follower.last_seq
        self.bus.on_reconnect(self._after_outage)
        return result

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run(), name="socket-pump")

    def _after_outage(self) -> None:
        for stream in self.followers:
            self._enqueue({"__catch_up__": stream})

    async def _run(self) -> None:
        while True:
            frame = await self._inbox.get()
            try:
                if "__catch_up__" in frame:
                    follower = self.followers.get(frame["__catch_up__"])
                    frames = await follower.catch_up() if follower else []
                elif "seq" in frame and frame.get("stream") in self.followers:
                    frames = await self.followers[frame["stream"]].accept(frame)
                else:
                    frames = [frame]  # ephemeral (typing)
                for out in frames:
                    await self.send(out)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("socket send failed; the session is closing", exc_info=True)
                return

    async def close(self) -> None:
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
