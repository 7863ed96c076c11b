"""An agent who works: stays signed in over the agent socket (reconnecting after any loss),
accepts every offer and answers each conversation with a few numbered replies, in order.
Shared by bench/crash.py's fault phases."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import websockets

__all__ = ["Work", "working_agent"]


@dataclass
class Work:
    """What the agents did: conversations accepted, replies acknowledged (with the time the
    server acknowledged each, monotonic), reconnects."""

    accepted: dict[int, float] = field(default_factory=dict)  # conversation -> when
    replies: dict[int, list[str]] = field(default_factory=dict)  # conversation -> texts, in order
    acked_at: dict[int, float] = field(default_factory=dict)  # message id -> when
    reconnects: int = 0
    offers: int = 0


class _Session:
    """One connection of an agent: commands with their answers, and the work it starts."""

    def __init__(self, ws: Any, work: Work, replies: int) -> None:
        self.ws, self.work, self.replies = ws, work, replies
        self.ids = itertools.count()
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def command(self, kind: str, **fields: Any) -> dict[str, Any]:
        request = f"c{next(self.ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[request] = future
        await self.ws.send(json.dumps({"type": kind, "id": request, **fields}))
        return await asyncio.wait_for(future, 60)

    async def write(self, conversation: int) -> None:
        """The numbered replies not yet acknowledged, in order; a refused one (the database
        is down) is tried again with the same client_id."""
        sent = self.work.replies.setdefault(conversation, [])
        for n in range(len(sent) + 1, self.replies + 1):
            text = f"reply {n} to {conversation}"
            while True:
                try:
                    result = await self.command(
                        "reply",
                        conversation_id=conversation,
                        text=text,
                        client_id=str(uuid.uuid5(uuid.NAMESPACE_URL, text)),
                    )
                    break
                except RuntimeError:
                    await asyncio.sleep(0.5)
            sent.append(text)
            self.work.acked_at[int(result["message_id"])] = time.monotonic()

    async def answer(self, offer_id: int) -> None:
        with contextlib.suppress(RuntimeError):
            accepted = await self.command("accept", offer_id=offer_id)
            conversation = int(accepted["conversation_id"])
            self.work.accepted.setdefault(conversation, time.monotonic())
            await self.write(conversation)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("ack", "error") and frame.get("id") in self.waiting:
            future = self.waiting.pop(frame["id"])
            if not future.done():
                if kind == "ack":
                    future.set_result(frame.get("result") or {})
                else:
                    future.set_exception(RuntimeError(frame.get("message")))
        elif kind == "offer":
            self.work.offers += 1
            self.spawn(self.answer(int(frame["offer_id"])))
        elif kind == "welcome":  # after a reconnect: finish what was cut short
            for held in frame.get("state", {}).get("conversations", []):
                conversation = int(held["conversation_id"])
                if len(self.work.replies.get(conversation, [])) < self.replies:
                    self.spawn(self.write(conversation))

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()


async def working_agent(
    base: str, token: str, work: Work, replies: int, done: asyncio.Event
) -> None:
    while not done.is_set():
        try:
            async with websockets.connect(
                base.replace("http://", "ws://") + "/ws/agent", open_timeout=10, ping_interval=None
            ) as ws:
                session = _Session(ws, work, replies)
                try:
                    await ws.send(json.dumps({"type": "hello", "token": token}))
                    async for raw in ws:
                        session.on_frame(json.loads(raw))
                        if done.is_set():
                            return
                finally:
                    session.close()
        except (OSError, TimeoutError, websockets.WebSocketException):
            pass
        work.reconnects += 1
        await asyncio.sleep(0.3)
