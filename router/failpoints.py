"""Failpoints: kill the process at a named line so crash tests can say where they crash.

``OMNIROUTE_FAILPOINTS=after_ingest_commit,before_outbox_send@3`` SIGKILLs the process
the first time ``after_ingest_commit`` is reached, or the third time ``before_outbox_send``
is. SIGKILL, not an exception: nothing gets to clean up, as in a power cut or an OOM kill.

The named points are :data:`NAMES` (docs/delivery.md lists the same, a test checks both
that and that each is called somewhere). An unknown name in the spec is an error at start-up,
never a failpoint that silently never fires.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

__all__ = ["NAMES", "active", "configure", "failpoint", "parse"]

#: Every failpoint, where it is: the one list (docs/delivery.md, bench/crash.py use it).
NAMES: tuple[str, ...] = (
    "after_ingest_commit",  # router/pipeline.py: inbound messages committed, before the 2xx
    "after_route_commit",  # router/runtime.py: routing committed (PostgreSQL, or the sweep)
    "after_visitor_commit",  # router/ws_chat.py: a visitor's message committed, before the ack
    "before_outbox_send",  # router/outbox.py: the row is `sending`, the provider not yet called
    "after_provider_send",  # router/outbox.py: the provider took it, the result not committed
)

log = logging.getLogger(__name__)
_remaining: dict[str, int] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, int]:
    """``{name: count}`` from a spec like ``a,b@3``; ValueError naming an unknown failpoint
    (with the valid ones) or a bad count."""
    armed: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("@")
        name = name.strip()
        if name not in NAMES:
            raise ValueError(f"unknown failpoint {name!r} (valid: {', '.join(NAMES)})")
        if count and not count.strip().isdigit():
            raise ValueError(f"failpoint {part!r}: the count must be a whole number")
        armed[name] = int(count) if count else 1
        if armed[name] < 1:
            raise ValueError(f"failpoint {part!r}: the count must be at least 1")
    return armed


def configure(spec: str) -> None:
    """Arm failpoints from a spec like ``a,b@3`` (replaces the previous configuration);
    ValueError for an unknown name or a bad count (see :func:`parse`)."""
    armed = parse(spec)
    with _lock:
        _remaining.clear()
        _remaining.update(armed)


def active() -> dict[str, int]:
    with _lock:
        return dict(_remaining)


def failpoint(name: str) -> None:
    """Die here if ``name`` (one of :data:`NAMES`) is armed and its count has run down."""
    if not _remaining:
        return
    with _lock:
        if name not in _remaining:
            return
        _remaining[name] -= 1
        if _remaining[name] > 0:
            return
    log.critical("failpoint %s: killing process %d", name, os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
