"""End to end: web-chat messages in -> offered to agents on their sockets.

Each message comes from its own visitor (a new conversation), is persisted, routed by the
rules, offered to an agent, and the agent's socket receives the offer. Measured against a
raw baseline in the same run: a bare Starlette app that parses the same frames and pushes
them to the same agent sockets without persistence. Both servers run as separate processes;
this process is the load generator (visitors and agents over real websockets).

Reported: messages/s at full speed (the median of alternating rounds), p50/p99
ingest-to-agent latency at a fixed rate, lost and duplicated messages (must be 0), and the
ratios; then, omniroute alone, how long new visitors wait for their acknowledgement while
every agent, each holding many offers, drops at once.

Targets (SQLite, synchronous=FULL): full speed >= 0.25x the baseline's messages/s; at
200 messages/s p99 within 25x the baseline.

    python bench/e2e.py            # full run
    python bench/e2e.py --smoke    # seconds; run by `make test`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.serving import (  # noqa: E402
    database,
    gc_paused,
    paced,
    serve_baseline,
    serve_omniroute,
    spawn_baseline,
    stop,
    stop_reading,
)

RULES = """\
version: 1
queues:
  general: {offer_timeout: 1h}
rules:
  - {id: bench, when: {message.text: {starts_with: "bench"}}, then: {queue: general, tags: [bench]}}
default: {queue: general}
"""
CHANNELS = """\
version: 1
inboxes:
  web:
    channel: webchat
    provider: omniroute
    default_queue: general
    connections_per_minute_per_ip: 10000000
    new_visitors_per_minute_per_ip: 10000000
    messages_per_minute_per_visitor: 10000000
    messages_per_minute_per_ip: 10000000
"""


# -- the raw baseline server ------------------------------------------------------------------
def baseline_app() -> Any:
    """Parse the same frames, push to the same agent sockets; no persistence, no routing."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    agents: list[WebSocket] = []
    counter = {"next": 0, "offer": 0}

    async def agent(ws: WebSocket) -> None:
        await ws.accept()
        hello = json.loads(await ws.receive_text())
        assert hello["type"] == "hello"
        await ws.send_text(
            json.dumps(
                {"type": "welcome", "streams": {}, "state": {"offers": [], "conversations": []}}
            )
        )
        agents.append(ws)
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            agents.remove(ws)

    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        hello = json.loads(await ws.receive_text())
        assert hello["type"] == "hello"
        await ws.send_text(
            json.dumps({"type": "welcome", "token": uuid.uuid4().hex, "history": [], "last_seq": 0})
        )
        try:
            while True:
                frame = json.loads(await ws.receive_text())
                if (
                    frame.get("type") != "message"
                    or not isinstance(frame.get("text"), str)
                    or not isinstance(frame.get("client_id"), str)
                ):
                    await ws.send_text(json.dumps({"type": "error"}))
                    continue
                counter["offer"] += 1
                target = agents[counter["next"] % len(agents)]
                counter["next"] += 1
                await target.send_text(
                    json.dumps(
                        {
                            "type": "offer",
                            "offer_id": counter["offer"],
                            "conversation": {"preview": frame["text"][:280]},
                        }
                    )
                )
                await ws.send_text(
                    json.dumps(
                        {
                            "type": "ack",
                            "client_id": frame["client_id"],
                            "message_id": counter["offer"],
                        }
                    )
                )
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[WebSocketRoute("/ws/agent", agent), WebSocketRoute("/ws/chat", chat)])


# -- servers ----------------------------------------------------------------------------------
@dataclass
class Omniroute:
    agents: int
    directory: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="omniroute-bench-"))
    )
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    tokens: list[str] = field(default_factory=list)

    def start(self) -> str:
        url = database(self.directory, RULES, CHANNELS)
        self.tokens = asyncio.run(self._seed(url))
        self.proc, base = serve_omniroute(self.directory, url)
        self.port = int(base.rsplit(":", 1)[1])
        return base.replace("http://", "ws://")

    async def _seed(self, url: str) -> list[str]:
        from router.agents import create_agent, parse_capacity
        from router.auth import create_user
        from router.db import Database, Tx

        db = Database(url)
        await db.start()
        tokens = []
        try:
            for i in range(self.agents):

                def add(tx: Tx, i: int = i) -> str:
                    user_id, token = create_user(tx, f"bench{i}", "agent")
                    create_agent(
                        tx, user_id, f"Bench {i}", {}, parse_capacity("webchat=1000,total=1000")
                    )
                    return token

                tokens.append(await db.write(add))
        finally:
            await db.close()
        return tokens

    def stop(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Baseline:
    agents: int
    proc: subprocess.Popen[bytes] | None = None
    tokens: list[str] = field(default_factory=list)

    def start(self) -> str:
        self.tokens = [f"token-{i}" for i in range(self.agents)]
        self.proc, port = spawn_baseline(__file__)
        return f"ws://127.0.0.1:{port}"

    def stop(self) -> None:
        stop(self.proc)


# -- the load generator -----------------------------------------------------------------------
@dataclass
class Run:
    expected: int = 0
    sent: dict[str, float] = field(default_factory=dict)
    received: dict[str, list[float]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, text: str) -> None:
        now = time.perf_counter()
        if text.startswith("bench "):
            self.received.setdefault(text, []).append(now)
            if len(self.received) >= self.expected:
                self.done.set()


async def agent_reader(ws: Any, run: Run) -> None:
    async for raw in ws:
        frame = json.loads(raw)
        if frame.get("type") == "offer":
            run.record(frame["conversation"]["preview"])


async def open_agents(
    base: str, tokens: list[str], run: Run
) -> tuple[list[Any], list[asyncio.Task[None]]]:
    sockets, readers = [], []
    for token in tokens:
        ws = await websockets.connect(
            base + "/ws/agent", max_size=None, open_timeout=30, ping_interval=None
        )
        await ws.send(json.dumps({"type": "hello", "token": token}))
        while json.loads(await ws.recv()).get("type") != "welcome":
            pass
        sockets.append(ws)
        readers.append(asyncio.create_task(agent_reader(ws, run)))
    return sockets, readers


async def open_visitor(base: str) -> Any:
    """A visitor's socket on the ``web`` inbox, past its welcome."""
    ws = await websockets.connect(
        base + "/ws/chat?inbox=web",
        origin=base.replace("ws://", "http://"),
        open_timeout=60,
        ping_interval=None,
    )  # type: ignore[arg-type]
    await ws.send(json.dumps({"type": "hello"}))
    while json.loads(await ws.recv()).get("type") != "welcome":
        pass
    return ws


async def open_visitors(base: str, count: int) -> list[Any]:
    visitors: list[Any] = []
    for start in range(0, count, 100):
        batch = min(100, count - start)
        visitors.extend(await asyncio.gather(*(open_visitor(base) for _ in range(batch))))
    return visitors


async def drive(
    base: str, tokens: list[str], messages: int, rate: float | None, label: str
) -> dict[str, Any]:
    run = Run(expected=messages)
    agents, readers = await open_agents(base, tokens, run)
    visitors = await open_visitors(base, messages)

    async def send(i: int, ws: Any) -> None:
        text = f"bench {label}-{i}"
        run.sent[text] = time.perf_counter()
        await ws.send(json.dumps({"type": "message", "client_id": str(uuid.uuid4()), "text": text}))
        await ws.recv()  # the ack

    with gc_paused():
        started = time.perf_counter()
        await paced(len(visitors), rate, lambda i: send(i, visitors[i]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.done.wait(), 60)
        await asyncio.sleep(0.5)  # let late duplicates show up
    finished = max((max(t) for t in run.received.values()), default=time.perf_counter())
    await stop_reading(readers, [*agents, *visitors])
    latencies = sorted(
        (min(run.received[t]) - run.sent[t]) * 1000 for t in run.received if t in run.sent
    )
    lost = sum(1 for t in run.sent if t not in run.received)
    duplicated = sum(len(v) - 1 for v in run.received.values())
    return {
        "messages": messages,
        "per_second": len(run.received) / (finished - started) if run.received else 0.0,
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        if latencies
        else float("nan"),
        "lost": lost,
        "duplicated": duplicated,
    }


async def drop_all(base: str, tokens: list[str], messages: int) -> dict[str, Any]:
    """Every agent holds offers (``messages`` spread over them), then every agent's socket
    drops at once: how long do new visitors wait for their acknowledgement meanwhile? The
    writer withdraws all those offers in the same moment."""
    run = Run(expected=messages)
    agents, readers = await open_agents(base, tokens, run)
    visitors = await open_visitors(base, messages)
    await paced(messages, None, lambda i: _send_one(visitors[i], f"bench drop-{i}"))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.done.wait(), 60)
    probes = await open_visitors(base, 30)
    for task in readers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in agents))
    waits = []
    for i, ws in enumerate(probes):  # one every 50 ms for about 1.5 s
        started = time.perf_counter()
        await _send_one(ws, f"probe {i}")
        waits.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.05)
    await stop_reading([], [*visitors, *probes])
    return {
        "offers": len(run.received),
        "max_ms": max(waits),
        "median_ms": statistics.median(waits),
    }


async def _send_one(ws: Any, text: str) -> None:
    await ws.send(json.dumps({"type": "message", "client_id": str(uuid.uuid4()), "text": text}))
    while json.loads(await ws.recv()).get("type") != "ack":
        pass


def measure(server: Any, messages: int, rate: float | None, label: str) -> dict[str, Any]:
    base = server.start()
    try:
        return asyncio.run(drive(base, server.tokens, messages, rate, label))
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="full-speed rounds per server")
    parser.add_argument(
        "--ws-compression",
        action="store_true",
        help="both servers negotiate per-message deflate (omniroute's default is off)",
    )
    args = parser.parse_args(argv)
    if args.ws_compression:  # read by `omniroute serve` and by the baseline (inherited)
        os.environ["OMNIROUTE_WS_COMPRESSION"] = "true"
    if args.baseline_server:
        serve_baseline(baseline_app(), args.baseline_server)
        return 0
    agents = 2 if args.smoke else args.agents
    full = 60 if args.smoke else args.messages
    fixed_rate = 50.0 if args.smoke else 200.0
    fixed = 50 if args.smoke else int(fixed_rate * 10)
    rounds_wanted = 1 if args.smoke else args.rounds
    results: dict[tuple[str, str], dict[str, Any]] = {}
    # This VM's speed drifts by up to 2x within a minute: full speed alternates the two
    # servers over several rounds and takes the median ratio of the rounds.
    rounds: list[dict[str, dict[str, Any]]] = []
    for i in range(rounds_wanted):
        rounds.append(
            {
                "baseline": measure(Baseline(agents), full, None, f"baseline-full{i}"),
                "omniroute": measure(Omniroute(agents), full, None, f"omniroute-full{i}"),
            }
        )
    for name in ("baseline", "omniroute"):
        runs = [r[name] for r in rounds]
        middle = statistics.median(r["per_second"] for r in runs)
        results[(name, "full")] = {
            **min(runs, key=lambda r: abs(r["per_second"] - middle)),
            "lost": sum(r["lost"] for r in runs),
            "duplicated": sum(r["duplicated"] for r in runs),
            "messages": sum(r["messages"] for r in runs),
        }
    results[("baseline", "fixed")] = measure(Baseline(agents), fixed, fixed_rate, "baseline-fixed")
    results[("omniroute", "fixed")] = measure(
        Omniroute(agents), fixed, fixed_rate, "omniroute-fixed"
    )
    print(
        f"e2e web chat -> agent offers; {agents} agents; SQLite synchronous=FULL; "
        f"websocket compression: {'on' if args.ws_compression else 'off'} (both servers)"
    )
    print(f"{'run':<22}{'msgs':>7}{'msg/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'lost':>6}{'dup':>5}")
    for (name, kind), r in results.items():
        print(
            f"{name + ' ' + kind:<22}{r['messages']:>7}{r['per_second']:>10.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['lost']:>6}{r['duplicated']:>5}"
        )
    ratios = [r["omniroute"]["per_second"] / max(r["baseline"]["per_second"], 1e-9) for r in rounds]
    throughput = statistics.median(ratios)
    latency = results[("omniroute", "fixed")]["p99_ms"] / max(
        results[("baseline", "fixed")]["p99_ms"], 1e-9
    )
    clean = all(r["lost"] == 0 and r["duplicated"] == 0 for r in results.values())
    print(
        f"full-speed ratio: {throughput:.2f}x the baseline (target >= 0.25x); median of "
        f"{len(ratios)} alternating rounds: {', '.join(f'{r:.2f}x' for r in ratios)}"
    )
    print(f"p99 at {fixed_rate:.0f} msg/s: {latency:.1f}x the baseline (target <= 25x)")
    print(f"lost and duplicated: {'0 and 0' if clean else 'NOT ZERO'}")
    server = Omniroute(agents)
    base = server.start()
    try:
        drop = asyncio.run(drop_all(base, server.tokens, full))
    finally:
        server.stop()
    print(
        f"mass disconnect: {agents} agents holding {drop['offers']} offers drop at once; a new "
        f"visitor's acknowledgement meanwhile: slowest {drop['max_ms']:.0f} ms, "
        f"median {drop['median_ms']:.0f} ms"
    )
    if not clean:
        return 1
    if args.smoke:
        return 0
    return 0 if throughput >= 0.25 and latency <= 25 else 1


if __name__ == "__main__":
    sys.exit(main())
