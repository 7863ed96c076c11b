"""Durations as admins write them: ``30s``, ``5m``, ``8h``, ``7d``."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["format_duration", "parse_duration"]

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, allow_zero: bool = False) -> timedelta:
    """Parse ``^\\d+[smhd]$``; raise ``ValueError`` with an admin-readable message."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f'invalid duration "{text}" (use a number and s, m, h or d, like 30s or 5m)'
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds == 0 and not allow_zero:
        raise ValueError(f'duration "{text}" must be greater than zero')
    if seconds > 3650 * 86400:
        raise ValueError(f'duration "{text}" is longer than ten years')
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
