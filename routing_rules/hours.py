"""Business hours: weekly intervals in an IANA zone, with holidays, and business-time arithmetic.

Intervals are local wall time. A DST gap simply shortens the day (an interval starting
inside the gap starts when the clocks jump); in the autumn overlap an interval ending at an
ambiguous wall time ends at its later occurrence, so the wall clock's whole range is open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = ["DAYS", "Hours"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY = 86400
_MAX_DAYS_SCANNED = 3 * 366


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime: a time zone offset is required")
    return value


@dataclass(frozen=True)
class Hours:
    """Opening hours. ``weekly[d]`` holds ``(start_second, end_second)`` pairs for weekday ``d``."""

    name: str
    timezone: str
    weekly: dict[int, tuple[tuple[int, int], ...]]
    holidays: frozenset[date] = frozenset()
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", ZoneInfo(self.timezone))

    # -- the question rules ask -------------------------------------------------------
    def is_open(self, at: datetime) -> bool:
        local = _aware(at).astimezone(self._zone)
        if local.date() in self.holidays:
            return False
        second = local.hour * 3600 + local.minute * 60 + local.second
        return any(start <= second < end for start, end in self.weekly.get(local.weekday(), ()))

    # -- business-time arithmetic (SLAs) ----------------------------------------------
    def periods(
        self, start: datetime, end: datetime | None = None
    ) -> Iterator[tuple[datetime, datetime]]:
        """Open periods as UTC ``(from, to)`` pairs overlapping ``[start, end)``, in order."""
        start = _aware(start).astimezone(UTC)
        day = start.astimezone(self._zone).date() - timedelta(days=1)
        for _ in range(_MAX_DAYS_SCANNED):
            if end is not None and self._to_utc(day, 0, is_end=False) >= end:
                return
            if day not in self.holidays:
                for s, e in self.weekly.get(day.weekday(), ()):
                    a = self._to_utc(day, s, is_end=False)
                    b = self._to_utc(day, e, is_end=True)
                    a, b = max(a, start), b if end is None else min(b, end)
                    if a < b:
                        yield a, b
            day += timedelta(days=1)

    def business_seconds(self, start: datetime, end: datetime) -> float:
        """Open time between two instants, in seconds."""
        if end <= start:
            return 0.0
        return sum((b - a).total_seconds() for a, b in self.periods(start, _aware(end)))

    def add(self, start: datetime, duration: timedelta) -> datetime:
        """The instant when ``duration`` of open time has passed after ``start``."""
        remaining = duration.total_seconds()
        last = _aware(start)
        for a, b in self.periods(start):
            span = (b - a).total_seconds()
            if span >= remaining:
                return a + timedelta(seconds=remaining)
            remaining -= span
            last = b
        # Hours that are (almost) never open: count the rest as plain time.
        return last + timedelta(seconds=remaining)

    def next_open(self, at: datetime) -> datetime | None:
        for a, _b in self.periods(at):
            return a
        return None

    # -- wall time to UTC, handling DST gaps and overlaps --------------------------------
    def _to_utc(self, day: date, second: int, *, is_end: bool) -> datetime:
        if second >= _DAY:
            day, second = day + timedelta(days=1), second - _DAY
        naive = datetime.combine(day, time(second // 3600, second % 3600 // 60, second % 60))
        early = naive.replace(tzinfo=self._zone, fold=0).astimezone(UTC)
        late = naive.replace(tzinfo=self._zone, fold=1).astimezone(UTC)
        if early == late:
            return early
        if early.astimezone(self._zone).replace(tzinfo=None) == naive:
            # Ambiguous (autumn overlap): both instants exist.
            return max(early, late) if is_end else min(early, late)
        # Non-existent (spring gap): the first instant whose wall time is at or after it.
        lo, hi = int(min(early, late).timestamp()), int(max(early, late).timestamp())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, self._zone).replace(tzinfo=None) >= naive:
                hi = mid
            else:
                lo = mid
        return datetime.fromtimestamp(hi, UTC)
