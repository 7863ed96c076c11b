"""Failpoints: kill the process at a named line so crash tests can say where they crash.

``OMNIROUTE_FAILPOINTS=after_ingest_commit,before_outbox_send@3`` SIGKILLs the process
the first time ``after_ingest_commit`` is reached, or the third time ``before_outbox_send``
is. SIGKILL, not an exception: nothing gets to clean up, as in a power cut or an OOM kill.

Named points: after_ingest_commit, after_route_commit, after_offer_commit,
before_outbox_send, after_provider_send, after_visitor_commit, after_accept_commit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

__all__ = ["active", "configure", "failpoint"]

log = logging.getLogger(__name__)
_remaining: dict[str, int] = {}
_lock = threading.Lock()


def configure(spec: str) -> None:
    """Arm failpoints from a spec like ``a,b@3`` (replaces the previous configuration)."""
    armed: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("@")
        armed[name] = int(count) if count else 1
        if armed[name] < 1:
            raise ValueError(f"failpoint {part!r}: the count must be at least 1")
    with _lock:
        _remaining.clear()
        _remaining.update(armed)


def active() -> dict[str, int]:
    with _lock:
        return dict(_remaining)


def failpoint(name: str) -> None:
    """Die here if ``name`` is armed and its count has run down."""
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


configure(os.environ.get("OMNIROUTE_FAILPOINTS", ""))
