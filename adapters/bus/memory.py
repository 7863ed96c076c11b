"""In-process bus: the default when one process serves everything (SQLite)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from adapters.bus.base import Handler

__all__ = ["MemoryBus"]

log = logging.getLogger(__name__)


class _Sub:
    def __init__(self, bus: MemoryBus, topic: str, handler: Handler) -> None:
        self.bus, self.topic, self.handler = bus, topic, handler

    def close(self) -> None:
        handlers = self.bus._subs.get(self.topic)
        if handlers and self.handler in handlers:
            handlers.remove(self.handler)
            if not handlers:
                del self.bus._subs[self.topic]


class MemoryBus:
    def __init__(self) -> None:
        self._subs: dict[str, list[Handler]] = defaultdict(list)
        self.published = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subs.clear()

    async def publish(self, topic: str, message: dict[str, Any]) -> None:
        self.published += 1
        for handler in list(self._subs.get(topic, ())):
            try:
                handler(message)
            except Exception:
                log.exception("bus handler for %s failed", topic)

    async def publish_many(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        for topic, message in items:
            await self.publish(topic, message)

    def subscribe(self, topic: str, handler: Handler) -> _Sub:
        self._subs[topic].append(handler)
        return _Sub(self, topic, handler)

    async def ready(self, topic: str, timeout: float = 5.0) -> None:
        return None

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        return None  # never disconnected

    @property
    def healthy(self) -> bool:
        return True
