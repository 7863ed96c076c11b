"""One contract for every bus: in-process and Redis pub/sub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.bus import Bus, MemoryBus, RedisBus
from tests import peers


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        instance: Bus = MemoryBus()
    else:
        instance = RedisBus(peers.need(peers.redis_test_url), peers.unique_prefix())
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.01)


async def test_subscribers_receive_in_publish_order(bus: Bus) -> None:
    got_a: list[dict[str, Any]] = []
    got_b: list[dict[str, Any]] = []
    bus.subscribe("t", got_a.append)
    bus.subscribe("t", got_b.append)
    await bus.ready("t")
    await bus.publish_many([("t", {"n": i}) for i in range(50)])
    await until(lambda: len(got_a) == 50 and len(got_b) == 50)
    assert [m["n"] for m in got_a] == list(range(50)) == [m["n"] for m in got_b]


async def test_topics_are_isolated_and_unsubscribe_stops_delivery(bus: Bus) -> None:
    got: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    sub = bus.subscribe("a", got.append)
    bus.subscribe("b", other.append)
    await bus.ready("a")
    await bus.ready("b")
    await bus.publish("a", {"x": 1})
    await until(lambda: got == [{"x": 1}])
    sub.close()
    await asyncio.sleep(0.1)
    await bus.publish("a", {"x": 2})
    await bus.publish("b", {"y": 1})
    await until(lambda: other == [{"y": 1}])
    await asyncio.sleep(0.1)
    assert got == [{"x": 1}]


async def test_a_failing_handler_does_not_stop_the_others(bus: Bus) -> None:
    got: list[dict[str, Any]] = []

    def broken(_: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    bus.subscribe("t", broken)
    bus.subscribe("t", got.append)
    await bus.ready("t")
    await bus.publish("t", {"ok": True})
    await until(lambda: got == [{"ok": True}])
    assert bus.healthy


async def test_redis_bus_survives_a_redis_restart(tmp_path: Path) -> None:
    server = peers.need(lambda: peers.PrivateRedis.start(tmp_path))
    try:
        bus = RedisBus(server.url, "t:")
        reconnected: list[bool] = []
        bus.on_reconnect(lambda: reconnected.append(True))
        await bus.start()
        got: list[dict[str, Any]] = []
        bus.subscribe("t", got.append)
        await bus.ready("t")
        await bus.publish("t", {"n": 1})
        await until(lambda: got == [{"n": 1}])
        server.kill()
        await until(lambda: not bus.healthy, timeout=15)
        await bus.publish("t", {"n": "lost while down"})  # not raised: events are in the database
        server.restart()
        await until(lambda: bus.healthy and reconnected, timeout=20)
        await bus.ready("t")
        await bus.publish("t", {"n": 2})
        await until(lambda: got[-1] == {"n": 2}, timeout=10)
        await bus.close()
    finally:
        server.close()
