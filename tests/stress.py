"""A randomized load with agent bots on websockets, and the invariants checked afterwards.

Used by the stress test in the suite and, longer, by ``bench/stress.py``.

Bots connect to random servers, accept, reject or ignore offers (ignored ones expire), resolve
what they own, and now and then drop their socket and come back with ``resume``. Every frame
a bot receives on its stream is recorded. The invariants, read from the database afterwards:

- a conversation is never assigned to two agents at once (ConversationEvent history);
- no agent is ever over capacity (every AgentStatusEvent, not just the end state);
- every agent's stream, as its bot received it, is the stored stream: no gap, no duplicate,
  and every offer the database holds for the agent was seen by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import websockets
from sqlalchemy import Connection, select

from router.models import AgentStatusEvent, ConversationEvent, Offer, StreamEvent

__all__ = ["Bot", "check_invariants"]


@dataclass
class Bot:
    agent_id: int
    token: str
    servers: list[str]
    rng: random.Random
    accept: float = 0.7
    reject: float = 0.15
    seen: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq -> frame, on its own stream
    problems: list[str] = field(default_factory=list)
    accepted: int = 0
    resolved: int = 0
    last_seq: int | None = None

    @property
    def stream(self) -> str:
        return f"agent:{self.agent_id}"

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            base = self.rng.choice(self.servers).replace("http://", "ws://")
            try:
                await self._session(base, stop)
            except websockets.ConnectionClosed:
                pass  # a server went away: resume on the next session
            except (OSError, TimeoutError) as exc:
                if not stop.is_set():
                    self.problems.append(
                        f"{self.stream}: session failed: {type(exc).__name__}: {exc}"
                    )
            if not stop.is_set():
                await asyncio.sleep(self.rng.uniform(0.1, 0.8))  # away a moment, then resume

    async def _session(self, base: str, stop: asyncio.Event) -> None:
        async with websockets.connect(
            base + "/ws/agent", open_timeout=20, ping_interval=None
        ) as ws:
            hello: dict[str, Any] = {"type": "hello", "token": self.token}
            if self.last_seq is not None:
                hello["resume"] = {self.stream: self.last_seq}
            await ws.send(json.dumps(hello))
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if welcome.get("type") != "welcome":
                self.problems.append(f"no welcome: {welcome}")
                return
            if self.last_seq is None:
                self.last_seq = welcome["streams"][self.stream]
            owned = [
                c["conversation_id"]
                for c in welcome["state"]["conversations"]
                if c["state"] in ("assigned", "waiting_customer")
            ]
            pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
            counter = 0
            session_end = asyncio.get_running_loop().time() + self.rng.uniform(2.0, 8.0)

            async def command(kind: str, **fields: Any) -> dict[str, Any]:
                nonlocal counter
                counter += 1
                request = f"{kind}-{counter}"
                future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                pending[request] = future
                await ws.send(json.dumps({"type": kind, "id": request, **fields}))
                return await asyncio.wait_for(future, 20)

            async def resolve_later(conversation_id: int) -> None:
                await asyncio.sleep(self.rng.uniform(0.02, 0.3))
                with contextlib.suppress(Exception):
                    reply = await command("resolve", conversation_id=conversation_id)
                    if reply.get("type") == "ack":
                        self.resolved += 1

            async def decide(frame: dict[str, Any]) -> None:
                roll = self.rng.random()
                if roll < self.accept:
                    reply = await command("accept", offer_id=frame["offer_id"])
                    if reply.get("type") == "ack":
                        self.accepted += 1
                        await resolve_later(reply["result"]["conversation_id"])
                elif roll < self.accept + self.reject:
                    await command("reject", offer_id=frame["offer_id"], reason="stress")
                # else: ignored; it expires

            tasks = [asyncio.ensure_future(resolve_later(c)) for c in owned]
            try:
                while not stop.is_set() and asyncio.get_running_loop().time() < session_end:
                    try:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                    except TimeoutError:
                        continue
                    if frame.get("type") in ("ack", "error") and frame.get("id") in pending:
                        pending.pop(frame["id"]).set_result(frame)
                        continue
                    if frame.get("stream") == self.stream:
                        self._record(frame)
                        if frame["type"] == "offer":
                            tasks.append(asyncio.ensure_future(decide(frame)))
                        elif frame["type"] == "assigned" and "offer_id" not in frame:
                            tasks.append(
                                asyncio.ensure_future(
                                    resolve_later(frame["conversation"]["conversation_id"])
                                )
                            )
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task

    def _record(self, frame: dict[str, Any]) -> None:
        seq = int(frame["seq"])
        assert self.last_seq is not None
        if seq <= self.last_seq:
            self.problems.append(f"{self.stream}: seq {seq} delivered again (last {self.last_seq})")
            return
        if seq != self.last_seq + 1:
            self.problems.append(f"{self.stream}: gap from {self.last_seq} to {seq}")
        self.seen[seq] = frame
        self.last_seq = seq


def check_invariants(conn: Connection, bots: list[Bot]) -> list[str]:
    """Everything the stress run must not have broken (empty when all hold)."""
    problems: list[str] = []
    # 1. never assigned twice at the same time
    holder: dict[int, int | None] = {}
    for event in conn.execute(select(ConversationEvent).order_by(ConversationEvent.id)):
        if event.kind == "assigned":
            if holder.get(event.conversation_id) is not None:
                problems.append(
                    f"conversation {event.conversation_id} assigned to {event.agent_id} while held by {holder[event.conversation_id]}"
                )
            holder[event.conversation_id] = event.agent_id
        elif event.kind in ("unassigned", "resolved", "transferred", "closed", "escalated"):
            holder[event.conversation_id] = None
    # 2. never over capacity, at any point of the history
    for status in conn.execute(select(AgentStatusEvent).order_by(AgentStatusEvent.id)):
        for channel, (used, cap) in (status.load or {}).items():
            if used > cap or used < 0:
                problems.append(
                    f"agent {status.agent_id} {channel} at {used}/{cap} ({status.reason})"
                )
    # 3. every agent's stream as received is the stored stream, and it saw each of its offers
    stored: dict[str, dict[int, StreamEvent]] = defaultdict(dict)
    for row in conn.execute(select(StreamEvent).where(StreamEvent.stream.like("agent:%"))):
        stored[row.stream][row.seq] = row
    offers: dict[int, set[int]] = defaultdict(set)
    for offer in conn.execute(select(Offer.id, Offer.agent_id)):
        offers[offer.agent_id].add(offer.id)
    for bot in bots:
        problems.extend(bot.problems)
        if not bot.seen:
            continue
        first = min(bot.seen)
        expected = {
            seq: row
            for seq, row in stored[bot.stream].items()
            if first <= seq <= (bot.last_seq or 0)
        }
        if set(bot.seen) != set(expected):
            problems.append(
                f"{bot.stream}: received {len(bot.seen)} events, stored {len(expected)} in that range"
            )
        for seq, frame in bot.seen.items():
            row = expected.get(seq)
            if row is not None and (
                row.type != frame["type"] or row.payload.get("offer_id") != frame.get("offer_id")
            ):
                problems.append(
                    f"{bot.stream} seq {seq}: received {frame['type']}, stored {row.type}"
                )
        seen_offers = {f["offer_id"] for f in bot.seen.values() if f["type"] == "offer"}
        stored_offers = {
            r.payload["offer_id"] for r in stored[bot.stream].values() if r.type == "offer"
        }
        if (
            stored_offers != offers[bot.agent_id] & stored_offers
            or not seen_offers <= offers[bot.agent_id]
        ):
            problems.append(f"{bot.stream}: offers on the stream do not match the offers table")
        missed = {
            r.payload["offer_id"]
            for seq, r in stored[bot.stream].items()
            if r.type == "offer" and seq > first and seq <= (bot.last_seq or 0)
        } - seen_offers
        if missed:
            problems.append(f"{bot.stream}: never saw offers {sorted(missed)[:5]}")
    return problems
