"""/readyz says not ready while the database cannot write (a full disk), not only when it
cannot answer; what the provider was told is stored is stored, and ready comes back by
itself once there is room. Before, /readyz stayed 200 on a full disk: `SELECT 1` worked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import func, select

from adapters.clock import SystemClock
from router.migrate import upgrade
from router.models import Message
from router.runtime import Runtime
from tests import peers
from tests.support import client_for, fake_message, make_settings, post_fake


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.1)


async def test_a_full_disk_makes_the_process_not_ready_until_there_is_room(
    tmp_path: Path,
) -> None:
    with peers.need(lambda: peers.SmallDisk.mount(tmp_path / "disk")) as disk:
        url = f"sqlite:///{disk.path / 'omniroute.db'}"
        await asyncio.to_thread(upgrade, url)
        settings = make_settings(
            tmp_path / "conf", url, heartbeat_interval=0.3, worker_interval=0.2
        )
        runtime = Runtime(settings, clock=SystemClock())
        await runtime.start(workers=True)
        try:
            async with client_for(runtime) as client:

                async def readyz() -> tuple[int, list[str]]:
                    response = await client.get("/readyz")
                    return response.status_code, list(response.json()["reasons"])

                assert (await readyz())[0] == 200
                accepted = []
                for n in range(3):
                    response = await post_fake(client, "sms", fake_message(f"before-{n}"))
                    assert response.status_code == 200
                    accepted.append(f"before-{n}")

                disk.fill()
                refused = 0
                for n in range(20):  # enough to need new pages whatever the WAL had room for
                    text = "x" * 4000
                    response = await post_fake(client, "sms", fake_message(f"full-{n}", text=text))
                    if response.status_code == 200:
                        accepted.append(f"full-{n}")
                    else:
                        refused += 1  # not acknowledged: the provider retries
                assert refused > 0

                async def not_ready() -> bool:
                    status, reasons = await readyz()
                    return status == 503 and any(
                        r.startswith("database cannot write") for r in reasons
                    )

                await until(not_ready)

                disk.free()

                async def ready() -> bool:
                    return (await readyz())[0] == 200

                await until(ready)
                response = await post_fake(client, "sms", fake_message("after"))
                assert response.status_code == 200
                accepted.append("after")
                stored = await runtime.db.read(
                    lambda c: (
                        c.execute(select(Message.external_id).where(Message.direction == "in"))
                        .scalars()
                        .all()
                    )
                )
                assert sorted(stored) == sorted(accepted)  # every acknowledged message, once
                count = await runtime.db.read(
                    lambda c: c.execute(select(func.count()).select_from(Message)).scalar_one()
                )
                assert count >= len(accepted)
        finally:
            await runtime.stop()
