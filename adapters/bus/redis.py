"""Redis pub/sub bus: one publishing client and one subscriber connection per process,
fanned out locally to every subscriber of a topic (a thousand sockets cost one Redis
subscription). Reconnects by itself with backoff; listeners are told to catch up from
the database after an outage, since pub/sub drops what it could not deliver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.bus.base import Handler

__all__ = ["RedisBus"]

log = logging.getLogger(__name__)


class _Sub:
    def __init__(self, bus: RedisBus, topic: str, handler: Handler) -> None:
        self.bus, self.topic, self.handler = bus, topic, handler

    def close(self) -> None:
        self.bus._unsubscribe(self.topic, self.handler)


class RedisBus:
    def __init__(self, url: str, prefix: str = "omniroute:") -> None:
        self.url = url
        self.prefix = prefix
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._subs: dict[str, list[Handler]] = defaultdict(list)
        self._pending: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._healthy = False
        self._closing = False
        self._active: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.published = 0

    @property
    def healthy(self) -> bool:
        return self._healthy

    def _new_client(self) -> aioredis.Redis:
        # Commands retry a connection error a few times on a fresh connection, so a publish
        # right after Redis came back does not fail on a stale pooled connection.
        return aioredis.from_url(
            self.url,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )

    async def start(self) -> None:
        self._client = self._new_client()
        self._reader = asyncio.create_task(self._run(), name="redis-bus")

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def publish(self, topic: str, message: dict[str, Any]) -> None:
        await self.publish_many([(topic, message)])

    async def publish_many(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        if not items or self._client is None:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for topic, message in items:
                    pipe.publish(self.prefix + topic, json.dumps(message, default=str))
                await pipe.execute()
            self.published += len(items)
        except (RedisError, OSError) as exc:
            # Not fatal: the events are in the database and listeners repair gaps from there.
            self._healthy = False
            log.warning(
                "redis publish failed (%s); listeners will catch up from the database",
                type(exc).__name__,
            )

    def subscribe(self, topic: str, handler: Handler) -> _Sub:
        first = topic not in self._subs
        self._subs[topic].append(handler)
        if first:
            self._pending.put_nowait(("subscribe", topic))
        return _Sub(self, topic, handler)

    def _unsubscribe(self, topic: str, handler: Handler) -> None:
        handlers = self._subs.get(topic)
        if handlers and handler in handlers:
            handlers.remove(handler)
            if not handlers:
                del self._subs[topic]
                self._pending.put_nowait(("unsubscribe", topic))

    async def ready(self, topic: str, timeout: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._active[topic].wait(), timeout)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnect_callbacks.append(callback)

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while not self._closing:
            try:
                assert self._client is not None
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(
                    self.prefix + "__bus__"
                )  # keeps the connection subscribed
                current = list(self._subs)
                if current:
                    await self._pubsub.subscribe(*(self.prefix + t for t in current))
                for topic in current:
                    self._active[topic].set()
                while not self._pending.empty():  # already covered by the full subscribe above
                    self._pending.get_nowait()
                self._healthy = True
                delay = 0.1
                if not first:
                    for callback in list(self._reconnect_callbacks):
                        with contextlib.suppress(Exception):
                            callback()
                first = False
                await self._pump()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ConnectionError) as exc:
                self._healthy = False
                for event in self._active.values():
                    event.clear()
                log.warning(
                    "redis bus disconnected (%s); reconnecting in %.1fs", type(exc).__name__, delay
                )
            with contextlib.suppress(Exception):
                if self._pubsub is not None:
                    await self._pubsub.aclose()
            self._pubsub = None
            # Start over with a new client: every pooled connection predates the outage.
            old, self._client = self._client, self._new_client()
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.aclose()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def _pump(self) -> None:
        while True:
            while not self._pending.empty():
                action, topic = self._pending.get_nowait()
                if action == "subscribe" and topic in self._subs:
                    await self._pubsub.subscribe(self.prefix + topic)
                    self._active[topic].set()
                elif action == "unsubscribe" and topic not in self._subs:
                    await self._pubsub.unsubscribe(self.prefix + topic)
                    self._active.pop(topic, None)
            message = await self._pubsub.get_message(timeout=0.05)
            if message is None or message.get("type") not in ("message", "pmessage"):
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            topic = channel[len(self.prefix) :]
            try:
                payload = json.loads(message["data"])
            except (ValueError, TypeError):
                continue
            for handler in list(self._subs.get(topic, ())):
                try:
                    handler(payload)
                except Exception:
                    log.exception("bus handler for %s failed", topic)
