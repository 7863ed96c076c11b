"""Background tasks that are kept referenced (so they are never garbage-collected half-way),
logged when they fail, and cancelled together at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["TaskGroup", "periodic", "spawn"]

log = logging.getLogger(__name__)
_default: set[asyncio.Task[Any]] = set()


def _done(task: asyncio.Task[Any], bucket: set[asyncio.Task[Any]]) -> None:
    bucket.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


async def periodic(
    step: Callable[[], Awaitable[Any]],
    interval: float,
    name: str,
    *,
    wake: asyncio.Event | None = None,
    first_delay: float = 0.0,
) -> None:
    """Run ``step`` every ``interval`` seconds (sooner when ``wake`` is set), forever. A step
    that fails is logged and tried again at the next interval: a worker never dies of it."""
    if first_delay:
        await asyncio.sleep(first_delay)
    while True:
        if wake is not None:
            wake.clear()  # before the step, so a wake-up during the step is not lost
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; trying again in %.1fs", name, interval)
        if wake is None:
            await asyncio.sleep(interval)
        else:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the wake-up completes, and the worker would run on after a
            # shutdown cancelled it (seen as a rare hang in stop()).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()


def spawn(
    coro: Coroutine[Any, Any, Any],
    name: str | None = None,
    bucket: set[asyncio.Task[Any]] | None = None,
) -> asyncio.Task[Any]:
    bucket = _default if bucket is None else bucket
    task = asyncio.ensure_future(coro)
    if name:
        task.set_name(name)
    bucket.add(task)
    task.add_done_callback(lambda t: _done(t, bucket))
    return task


class TaskGroup:
    """Owns long-running workers and one-off background work of a runtime."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        return spawn(coro, name, self.tasks)

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until no task is left, including tasks spawned by tasks (nothing cancelled)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{len(self.tasks)} background tasks still running")
            await asyncio.wait(list(self.tasks), timeout=remaining)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for one-off work to finish (up to ``timeout``), then cancel what is left."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        await self.cancel()

    async def cancel(self) -> None:
        """Cancel every task and wait for each to end; a task that swallowed its
        cancellation (a library's race) is cancelled again until it ends."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if not task.done():
                    log.warning(
                        "task %s still running after cancel: cancelling again", task.get_name()
                    )
                    task.cancel()
            if not task.cancelled():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    task.result()
