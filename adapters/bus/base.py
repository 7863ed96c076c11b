"""The bus: wakes up listeners (sockets, workers) in any process when something committed.

It is not the source of truth: stream events live in the database, and a listener that
sees a gap in a stream's sequence numbers fetches the missing events from there. So the
bus may drop or delay a message without losing anything; ``on_reconnect`` callbacks let
listeners catch up after an outage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Bus", "Handler", "Subscription"]

Handler = Callable[[dict[str, Any]], None]


class Subscription(Protocol):
    def close(self) -> None: ...


class Bus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, message: dict[str, Any]) -> None:
        """Deliver ``message`` to every subscriber of ``topic`` in every process."""
        ...

    async def publish_many(self, items: list[tuple[str, dict[str, Any]]]) -> None: ...

    def subscribe(self, topic: str, handler: Handler) -> Subscription:
        """Call ``handler(message)`` (on the event loop, must not block) for each message."""
        ...

    async def ready(self, topic: str, timeout: float = 5.0) -> None:
        """Return once messages on ``topic`` published from now on will be delivered."""
        ...

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after the bus recovered from an outage (messages may be lost)."""
        ...

    @property
    def healthy(self) -> bool: ...
