"""Sockets close when their credential ends, in every process (docs/security.md,
"Revocation").

Each socket of a user (``/ws/agent``, ``/ws/supervisor``) is watched with the credential it
signed in with (router.credentials) and a way to close itself. The transaction that ends a
credential announces it after its commit: a bus notice on ``credentials`` carrying only the
user's id. Every process, the one that made the change too, then re-checks its sockets of
that user against the database (one read) and closes those whose credential no longer
holds, with close code 4401 and the reason as the close reason.

The bus may lose a notice (Redis down, a publisher cut off): each process also re-checks
all its sockets every ``OMNIROUTE_CREDENTIAL_CHECK_INTERVAL`` seconds, and at once after the
bus reconnected. Between a notice and the close a socket takes no command and receives no
frame (it waits for the check); while the bus is unhealthy every command is checked first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from adapters.bus import Bus, Subscription
from adapters.clock import Clock
from router.credentials import Credential, ended_credentials
from router.db import Database
from router.exceptions import Unavailable
from router.tasks import TaskGroup, periodic

__all__ = ["TOPIC", "SocketGuard", "Watch"]

log = logging.getLogger(__name__)
TOPIC = "credentials"
CLOSE_TIMEOUT = 10.0  # a close that cannot be sent (a client that stopped reading) is given up

Close = Callable[[str], Awaitable[None]]


class Watch:
    """One socket's credential, as the guard follows it."""

    __slots__ = ("_close", "_closing", "_guard", "credential", "ended", "suspect")

    def __init__(self, guard: SocketGuard, credential: Credential, close: Close) -> None:
        self._guard = guard
        self.credential = credential
        self._close = close
        self.ended: str | None = None  # why the credential ended (router.credentials)
        # Notices about this user not yet checked against the database. A new socket starts
        # unchecked: a notice sent between its hello and its registration here missed it.
        self.suspect = 1
        self._closing: asyncio.Task[Any] | None = None

    async def valid(self, *, strict: bool = False) -> bool:
        """False once the credential ended. With a notice not yet checked, the check is
        awaited first; ``strict`` (before a command) also checks first while the bus is
        unhealthy, since notices may be lost then. When the database cannot be read, a
        command is refused (Unavailable) and a frame to send waits."""
        while True:
            try:
                while self.ended is None and self.suspect:
                    await self._guard.check([self])
                if strict and self.ended is None and not self._guard.bus.healthy:
                    await self._guard.check([self])
                return self.ended is None
            except Exception:
                if strict:
                    raise Unavailable("cannot check your sign-in right now: try again") from None
                log.warning("cannot check a socket's credential; retrying", exc_info=True)
                await asyncio.sleep(1.0)

    def end(self, reason: str) -> None:
        """The credential ended: refuse everything from now on and close the socket."""
        if self.ended is not None:
            return
        self.ended = reason
        if self._guard.on_signed_out is not None:
            self._guard.on_signed_out(reason)
        self._closing = self._guard.tasks.spawn(self._run_close(reason), "signed-out close")

    async def _run_close(self, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._close(reason)
        except Exception:
            log.debug("closing a signed-out socket failed", exc_info=True)

    async def closed(self) -> None:
        """Once ended: wait until the close frame is out. A socket handler must not return
        before, or its socket drops without the code and reason."""
        if self._closing is not None:
            await asyncio.wait({self._closing})


class SocketGuard:
    """The sockets of one process, by user, and the checks that close them."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        clock: Clock,
        interval: float,
        on_signed_out: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.clock = clock
        self.interval = interval
        self.on_signed_out = on_signed_out  # counts each socket closed, with the reason
        self.watches: dict[int, set[Watch]] = {}
        self.tasks = TaskGroup()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = self.bus.subscribe(TOPIC, self._on_notice)
        await self.bus.ready(TOPIC)
        self.bus.on_reconnect(self._after_outage)

    async def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        await self.tasks.cancel()

    async def run(self) -> None:
        """The fallback for lost notices: every socket re-checked each interval."""
        await periodic(self.check_all, self.interval, "credential check", first_delay=self.interval)

    async def announce(self, user_id: int) -> None:
        """Tell every process (this one included) that a credential of ``user_id`` ended."""
        await self.bus.publish(TOPIC, {"user_id": user_id})

    @contextlib.contextmanager
    def watching(self, credential: Credential, close: Close) -> Iterator[Watch]:
        """Watch a socket for as long as the block runs; ``close(reason)`` closes it."""
        watch = Watch(self, credential, close)
        self.watches.setdefault(credential.user_id, set()).add(watch)
        try:
            yield watch
        finally:
            mine = self.watches.get(credential.user_id)
            if mine is not None:
                mine.discard(watch)
                if not mine:
                    del self.watches[credential.user_id]

    def _on_notice(self, message: dict[str, Any]) -> None:
        user_id = message.get("user_id")
        if not isinstance(user_id, int) or isinstance(user_id, bool):
            return
        watches = list(self.watches.get(user_id, ()))
        if not watches:
            return
        for watch in watches:
            watch.suspect += 1  # from now on the socket waits for the check
        self.tasks.spawn(self.check(watches), "credential notice")

    def _after_outage(self) -> None:
        self.tasks.spawn(self.check_all(), "credential check after a bus outage")

    async def check_all(self) -> None:
        await self.check([w for watches in self.watches.values() for w in watches])

    async def check(self, watches: list[Watch]) -> None:
        """Re-check ``watches`` against the database; close those whose credential ended."""
        live = [w for w in watches if w.ended is None]
        if not live:
            return
        seen = {w: w.suspect for w in live}
        problems = await self.db.read(
            ended_credentials, [w.credential for w in live], self.clock.now()
        )
        for watch in live:
            reason = problems.get(watch.credential)
            if reason is not None:
                watch.end(reason)
            elif watch.suspect == seen[watch]:
                watch.suspect = 0  # no newer notice arrived during the read
