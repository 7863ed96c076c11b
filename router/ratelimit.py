"""Token buckets keyed by IP or visitor (per process; bounded memory)."""

from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["RateLimiter"]


class RateLimiter:
    """Allow ``capacity`` events at once, refilling at ``capacity / per_seconds`` per second."""

    def __init__(self, capacity: float, per_seconds: float, max_keys: int = 100_000) -> None:
        self.capacity = float(capacity)
        self.rate = float(capacity) / per_seconds
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, updated = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` has a token again (0 when it has one now)."""
        if key not in self._buckets:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, updated = self._buckets[key]
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
