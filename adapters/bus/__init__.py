"""Event bus adapters: in-process (default) and Redis pub/sub, behind one protocol."""

from __future__ import annotations

from adapters.bus.base import Bus, Handler, Subscription
from adapters.bus.memory import MemoryBus
from adapters.bus.redis import RedisBus

__all__ = ["Bus", "Handler", "MemoryBus", "RedisBus", "Subscription", "make_bus"]


def make_bus(redis_url: str | None, prefix: str = "omniroute:") -> Bus:
    return RedisBus(redis_url, prefix) if redis_url else MemoryBus()
