"""Background workers end at shutdown, even when a cancellation was swallowed on the way
(Python 3.11's ``asyncio.wait_for`` loses one that arrives as its inner wait completes)."""

from __future__ import annotations

import asyncio

from router.tasks import TaskGroup, periodic


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    group = TaskGroup()
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # the lost cancellation: the worker goes on as if nothing happened
        await asyncio.sleep(3600)

    task = group.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    stopping = asyncio.ensure_future(group.cancel())
    done, _ = await asyncio.wait({stopping}, timeout=10)  # no help from outside: never cancels it
    assert done and swallowed.is_set() and task.cancelled()


async def test_a_woken_periodic_worker_stops_on_the_first_cancel() -> None:
    """Cancelled while its wake-up is being delivered, the worker still stops."""
    wake = asyncio.Event()
    steps = 0

    async def step() -> None:
        nonlocal steps
        steps += 1

    for _ in range(200):
        task = asyncio.ensure_future(periodic(step, 10.0, "w", wake=wake))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        wake.set()  # the wake-up and the cancellation arrive together
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done and task.cancelled()
    assert steps >= 200
