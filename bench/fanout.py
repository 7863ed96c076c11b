"""B3, fan-out: one supervisor event delivered to 100 and 1,000 sockets.

omniroute (`omniroute serve` on SQLite): N supervisor sockets on /ws/supervisor; an agent's
status change through the REST API (committed, then published on the supervisors' stream)
must reach every socket. The raw baseline in the same run is a bare Starlette app in its own
process that keeps the same number of websockets and sends one JSON frame to each when an
HTTP request asks it to. Both servers run at once, each with its N sockets, and the rounds
alternate between them, so the machine's drift in speed during the run (large on a shared
VM) moves both alike. Each round is timed from the request to the last socket receiving
the frame; the median of the rounds is reported with deliveries per second and the ratio
(target >= 0.5x the raw broadcast's deliveries per second). Every socket must receive every
event exactly once.

    python bench/fanout.py            # 100 and 1,000 sockets
    python bench/fanout.py --smoke    # 20 sockets; run by `make test`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import websockets  # noqa: E402
from common.serving import (  # noqa: E402
    database,
    serve_baseline,
    serve_omniroute,
    spawn_baseline,
    stop,
)
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.websockets import WebSocket, WebSocketDisconnect  # noqa: E402

RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"


def baseline_app() -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route, WebSocketRoute

    sockets: set[WebSocket] = set()

    async def feed(ws: WebSocket) -> None:
        await ws.accept()
        json.loads(await ws.receive_text())
        await ws.send_text(json.dumps({"type": "welcome"}))
        sockets.add(ws)
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            sockets.discard(ws)

    async def broadcast(request: Request) -> JSONResponse:
        body = await request.json()
        frame = json.dumps({"type": "agent_presence", **body})
        for ws in list(sockets):
            await ws.send_text(frame)
        return JSONResponse({"sent": len(sockets)})

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    return Starlette(
        routes=[
            WebSocketRoute("/ws/supervisor", feed),
            Route("/broadcast", broadcast, methods=["POST"]),
            Route("/readyz", ready),
        ]
    )


async def _seed(url: str) -> tuple[str, int]:
    from router.agents import create_agent, parse_capacity
    from router.auth import create_user
    from router.db import Database, Tx

    db = Database(url)
    await db.start()
    try:

        def add(tx: Tx) -> tuple[str, int]:
            _, token = create_user(tx, "boss", "supervisor")
            user_id, _ = create_user(tx, "agent0", "agent")
            agent_id = create_agent(tx, user_id, "Agent", {}, parse_capacity("webchat=1,total=1"))
            return token, agent_id

        return await db.write(add)
    finally:
        await db.close()


def start_omniroute(directory: Path) -> tuple[subprocess.Popen[bytes], str, str, int]:
    url = database(directory, RULES)
    token, agent_id = asyncio.run(_seed(url))
    # only the first snapshot: the rounds measure the event fan-out alone
    proc, base = serve_omniroute(directory, url, {"OMNIROUTE_SUPERVISOR_SNAPSHOT_INTERVAL": "3600"})
    return proc, base, token, agent_id


class Feeds:
    """``sockets`` feeds open on one server; ``round(n)`` triggers event ``n`` and returns the
    time until every socket has it; ``close()`` returns the missing or extra deliveries."""

    def __init__(self, base: str, sockets: int, trigger: Any, token: str | None) -> None:
        self.url = base.replace("http://", "ws://") + "/ws/supervisor"
        self.sockets = sockets
        self.trigger = trigger
        self.token = token
        self.got: list[list[Any]] = [[] for _ in range(sockets)]
        self.arrived = asyncio.Event()
        self.need = 0
        self.reached = 0  # sockets that have the current round's event
        self.opened: list[Any] = []
        self.readers: list[asyncio.Task[None]] = []
        self.rounds = 0

    async def _open_one(self) -> Any:
        ws = await websockets.connect(self.url, open_timeout=60, max_queue=None)
        await ws.send(
            json.dumps({"type": "hello", **({"token": self.token} if self.token else {})})
        )
        while json.loads(await ws.recv()).get("type") != "welcome":
            pass
        return ws

    async def _read(self, i: int, ws: Any) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame.get("type") == "agent_presence":
                self.got[i].append(frame.get("presence") or frame.get("status"))
                if len(self.got[i]) == self.need:
                    self.reached += 1
                    if self.reached == self.sockets:
                        self.arrived.set()

    async def open(self) -> None:
        for start in range(0, self.sockets, 100):  # in batches: no thundering herd
            batch = min(100, self.sockets - start)
            self.opened.extend(await asyncio.gather(*(self._open_one() for _ in range(batch))))
        self.readers = [asyncio.create_task(self._read(i, ws)) for i, ws in enumerate(self.opened)]

    async def round(self) -> float:
        self.rounds += 1
        n = self.rounds
        self.arrived.clear()
        self.need = n
        self.reached = sum(1 for g in self.got if len(g) >= n)  # normally 0
        started = time.perf_counter()
        await self.trigger(n)
        await asyncio.wait_for(self.arrived.wait(), 120)
        return time.perf_counter() - started

    async def close(self) -> int:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.opened), return_exceptions=True)
        return sum(abs(len(g) - self.rounds) for g in self.got)


async def interleaved(
    baseline: str, omniroute: str, token: str, agent_id: int, sockets: int, count: int
) -> dict[str, tuple[list[float], int]]:
    """Both servers' feeds open at once; the rounds alternate between them (which one goes
    first alternates too), so a machine that speeds up or slows down during the run moves
    both sides alike."""
    import httpx

    async with (
        httpx.AsyncClient(base_url=baseline, timeout=60) as raw_client,
        httpx.AsyncClient(
            base_url=omniroute, timeout=60, headers={"authorization": f"Bearer {token}"}
        ) as client,
    ):

        async def raw_trigger(n: int) -> None:
            await raw_client.post("/broadcast", json={"presence": "away" if n % 2 else "online"})

        async def trigger(n: int) -> None:
            status = "away" if n % 2 else "online"
            response = await client.post(f"/api/agents/{agent_id}/status", json={"status": status})
            response.raise_for_status()

        feeds = {
            "baseline": Feeds(baseline, sockets, raw_trigger, None),
            "omniroute": Feeds(omniroute, sockets, trigger, token),
        }
        times: dict[str, list[float]] = {name: [] for name in feeds}
        try:
            for feed in feeds.values():
                await feed.open()
            await asyncio.sleep(0.5)  # the first snapshots are in
            for n in range(count):
                order = list(feeds) if n % 2 == 0 else list(reversed(feeds))
                for name in order:
                    times[name].append(await feeds[name].round())
        finally:
            wrong = {name: await feed.close() for name, feed in feeds.items()}
        return {name: (times[name], wrong[name]) for name in feeds}


def measure(sizes: tuple[int, ...], count: int) -> dict[int, dict[str, tuple[list[float], int]]]:
    directory = Path(tempfile.mkdtemp(prefix="omniroute-b3-"))
    raw_proc, port = spawn_baseline(__file__)
    proc = None
    try:
        proc, base, token, agent_id = start_omniroute(directory)
        return {
            size: asyncio.run(
                interleaved(f"http://127.0.0.1:{port}", base, token, agent_id, size, count)
            )
            for size in sizes
        }
    finally:
        stop(raw_proc)
        stop(proc)
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server is not None:
        serve_baseline(baseline_app(), args.baseline_server)
        return 0
    sizes = (20,) if args.smoke else (100, 1000)
    count = 3 if args.smoke else args.rounds
    print(f"B3 fan-out of one supervisor event; {count} rounds each, alternating")
    print(f"{'sockets':>8}{'run':>11}{'median ms':>11}{'deliveries/s':>14}{'wrong':>7}")
    ok = True
    for size, runs in measure(sizes, count).items():
        figures = {}
        for name, (times, wrong) in runs.items():
            median = statistics.median(times)
            figures[name] = size / median
            ok = ok and wrong == 0
            print(f"{size:>8}{name:>11}{median * 1000:>11.1f}{size / median:>14.0f}{wrong:>7}")
        print(
            f"{'':>8} ratio: {figures['omniroute'] / figures['baseline']:.2f}x the raw broadcast (target >= 0.5x)"
        )
    if not ok:
        print("FAILED: an event was missed or delivered twice")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
