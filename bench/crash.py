"""Fault run: `omniroute serve` SIGKILLed again and again while 5,000 messages flow in.

A quarter each of the messages come by signed Twilio SMS webhooks, signed Meta (Messenger)
webhooks, the signed webhooks of the built-in fake SMS provider, and web chat. Every sender
behaves like the real one: a provider retries a webhook until it gets a 200, the web-chat
widget reconnects and resends what the server has not acknowledged (same client id). Every
new conversation sends the rules' automatic welcome (to local fakes of Twilio and Meta, the
fake provider's send log, and the visitor's socket; Meta's inbox set to resend a send a
kill interrupted, as Meta cannot be asked whether it landed), and is offered to one of the agents,
who stay connected and reconnect after each kill.

The process is killed at random moments and, on some restarts, by a failpoint (after the
ingest commit, after routing, before or after a provider send, after a visitor message's
commit, at a random occurrence). At the end the server is restarted clean and the database
and the fakes are checked:

- every accepted message stored once, every conversation routed;
- offers consistent: an ``offered`` conversation has exactly one pending offer and a pending
  offer's conversation is ``offered``; each agent's load equals the offers and conversations
  it holds, and is within its capacity;
- every customer's welcome sent; an extra copy only for a send a kill interrupted (each
  reported, with the outbox rows the crash left uncertain).

Two more phases follow the kills, each on a server of its own:

- **slow provider**: agents accept every conversation and answer it three times, while
  Twilio hangs for several times the inbox's request timeout on a run of message creates
  (each still lands when its delay is over, as a slow Twilio does). Checked: the other
  inboxes' sends are not held (their delay from written to sent), every conversation's
  messages reach the provider in the order written, nothing is lost, and every extra copy
  a provider got is reported on its message.
- **database outage**: the same agents and traffic on a private PostgreSQL that is stopped
  for 25 s and started again, the server and its sockets left running. Checked: every
  acknowledged message stored once, every reply sent (none left `sending`), order kept,
  and no agent starved: all online with their sockets open, nothing left queued.

    python bench/crash.py              # 5,000 messages (a few minutes), then both phases
    python bench/crash.py --postgres   # the kill phase on PostgreSQL (routing after the ingest)
    python bench/crash.py --phase slow # one phase: kills, slow, outage
    python bench/crash.py --smoke      # 200 messages and a few kills, short phases; `make test`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import websockets  # noqa: E402
from common.agents import Work, working_agent  # noqa: E402
from common.providers import (  # noqa: E402
    ACCOUNT,
    OUR_NUMBER,
    PAGE_ID,
    PAGE_TOKEN,
    TOKEN,
    messenger_inbox,
    meta_apps,
    meta_signature,
    twilio_inbox,
)
from common.serving import UNLIMITED_WEBCHAT  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from channels.fake import read_sent_log  # noqa: E402
from router.failpoints import NAMES  # noqa: E402
from router.models import Agent, AgentLoad, Conversation, Message, Offer, Outbox  # noqa: E402

KINDS = ("twilio", "meta", "fake", "webchat")
FAILPOINTS = NAMES  # every failpoint the server has
RULES = """\
version: 1
queues:
  general: {offer_timeout: 1h}
templates:
  welcome: "Hi, thanks for writing. An agent will be with you soon."
default: {queue: general, reply: welcome}
"""


def channels(directory: Path, twilio: str, graph: str) -> str:
    from tests.support import FAKE_SECRET

    inboxes = {
        "tw": twilio_inbox(twilio),
        # Meta cannot be asked whether a send landed: resend, and count the copies
        "fb": messenger_inbox(graph, uncertain_policy="resend"),
        "sms": {
            "channel": "sms",
            "provider": "fake",
            "secret": FAKE_SECRET,
            "sent_log": str(directory / "sent.jsonl"),
            "uncertain_policy": "check",
        },
        "web": UNLIMITED_WEBCHAT,
    }
    return json.dumps({"version": 1, "meta_apps": meta_apps(), "inboxes": inboxes})


class Chaos:
    """The server, and what kills it: a random SIGKILL now and then, and on some restarts a
    failpoint that kills it from inside at a chosen occurrence."""

    def __init__(self, server: Any, rng: random.Random) -> None:
        self.server = server
        self.rng = rng
        self.random_kills = 0
        self.failpoint_kills: Counter[str] = Counter()
        self.failpoints_armed: Counter[str] = Counter()
        self.armed: str | None = None
        self.calm = False

    def restart(self) -> None:
        env = {}
        self.armed = None
        if not self.calm and self.rng.random() < 0.5:
            point = self.rng.choice(FAILPOINTS)
            self.armed = point
            self.failpoints_armed[point] += 1
            env["OMNIROUTE_FAILPOINTS"] = f"{point}@{self.rng.randint(1, 10)}"
        self.server.start(env, wait=False)
        with contextlib.suppress(Exception):
            self.server.wait_ready(60)

    async def run(self, every: tuple[float, float], done: asyncio.Event) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*every)
        while not done.is_set():
            await asyncio.sleep(0.05)
            proc = self.server.proc
            if proc is not None and proc.poll() is not None:
                if self.armed:  # its failpoint fired
                    self.failpoint_kills[self.armed] += 1
                await asyncio.to_thread(self.restart)
            elif time.monotonic() >= next_kill:
                self.server.kill()
                self.random_kills += 1
                await asyncio.to_thread(self.restart)
                next_kill = time.monotonic() + self.rng.uniform(*every)


async def post_until_ok(client: httpx.AsyncClient, path: str, body: bytes, headers: Any) -> int:
    """A provider's delivery: retried until it gets a 200. Returns the retries."""
    retries = 0
    while True:
        try:
            if (await client.post(path, content=body, headers=headers)).status_code == 200:
                return retries
        except httpx.HTTPError:
            pass
        retries += 1
        await asyncio.sleep(0.2)


async def visitor(base: str, text: str) -> int:
    """The widget: connect, send, and until acknowledged reconnect with the visitor token
    and resend with the same client id. Returns the resends."""
    client_id, token, resends = str(uuid.uuid4()), None, 0
    while True:
        try:
            async with websockets.connect(
                base.replace("http://", "ws://") + "/ws/chat?inbox=web",
                origin=base,  # type: ignore[arg-type]
                open_timeout=10,
                ping_interval=None,
            ) as ws:
                await ws.send(json.dumps({"type": "hello", **({"token": token} if token else {})}))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if frame.get("type") == "welcome":
                        token = frame.get("token", token)
                        break
                message = {"type": "message", "client_id": client_id, "text": text}
                await ws.send(json.dumps(message))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if frame.get("type") == "ack" and frame.get("client_id") == client_id:
                        return resends
        except (OSError, TimeoutError, websockets.WebSocketException):
            pass
        resends += 1
        await asyncio.sleep(0.2)


async def agent_loop(base: str, token: str, done: asyncio.Event) -> None:
    """An agent who stays signed in: reconnects after every kill, accepts nothing."""
    while not done.is_set():
        try:
            async with websockets.connect(
                base.replace("http://", "ws://") + "/ws/agent", open_timeout=10, ping_interval=None
            ) as ws:
                await ws.send(json.dumps({"type": "hello", "token": token}))
                async for _ in ws:
                    if done.is_set():
                        return
        except (OSError, TimeoutError, websockets.WebSocketException):
            pass
        await asyncio.sleep(0.3)


def deliveries(total: int, base: str) -> list[tuple[str, Any]]:
    from twilio.request_validator import RequestValidator

    from tests.fakes.meta import messenger_text
    from tests.support import signed

    validator = RequestValidator(TOKEN)
    out: list[tuple[str, Any]] = []
    for i in range(total):
        kind = KINDS[i % len(KINDS)]
        text = f"crash {i}"
        if kind == "twilio":
            params = {
                "MessageSid": f"SM{i:032d}",
                "AccountSid": ACCOUNT,
                "From": f"+1415{i:07d}",
                "To": OUR_NUMBER,
                "Body": text,
                "NumMedia": "0",
                "SmsStatus": "received",
                "ApiVersion": "2010-04-01",
            }
            path = "/webhooks/twilio/tw/sms"
            headers = {
                "x-twilio-signature": validator.compute_signature(base + path, params),
                "content-type": "application/x-www-form-urlencoded",
            }
            out.append((kind, (path, urlencode(params).encode(), headers)))
        elif kind == "meta":
            body = json.dumps(
                messenger_text(text, psid=f"25{i:015d}", page_id=PAGE_ID, mid=f"m_crash{i}")
            ).encode()
            headers = {
                "x-hub-signature-256": meta_signature(body),
                "content-type": "application/json",
            }
            out.append((kind, ("/webhooks/meta/main", body, headers)))
        elif kind == "fake":
            message = {"id": f"crash-{i}", "from": f"+49170{i:07d}", "kind": "phone", "text": text}
            body, headers = signed({"messages": [message]})
            out.append((kind, ("/webhooks/fake/sms", body, headers)))
        else:
            out.append((kind, text))
    return out


async def flow(server: Any, chaos: Chaos, tokens: list[str], total: int, every: Any) -> dict:
    base = server.url
    work = deliveries(total, base)
    done, chaos_done = asyncio.Event(), asyncio.Event()
    agents = [asyncio.create_task(agent_loop(base, t, done)) for t in tokens]
    killer = asyncio.create_task(chaos.run(every, chaos_done))
    slots = asyncio.Semaphore(24)
    retries: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=24)
    async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:

        async def one(kind: str, item: Any) -> None:
            async with slots:
                if kind == "webchat":
                    retries[kind] += await visitor(base, item)
                else:
                    retries[kind] += await post_until_ok(client, *item)

        started = time.monotonic()
        await asyncio.gather(*(one(kind, item) for kind, item in work))
        elapsed = time.monotonic() - started
    chaos_done.set()
    await killer
    chaos.calm = True
    if chaos.armed or server.proc is None or server.proc.poll() is not None:
        server.kill()  # a failpoint still armed: restart clean, to finish what was cut
        chaos.restart()
    await asyncio.sleep(2)
    done.set()
    for task in agents:
        task.cancel()
    return {"seconds": elapsed, "retries": retries}


async def settle(url: str, total: int, timeout: float) -> dict[str, Any]:
    """Check until everything the kills interrupted is finished (or ``timeout``)."""
    from router.db import Database

    db = Database(url)
    await db.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            state = await db.read(check, total)
            if state["settled"] or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.5)
    finally:
        await db.close()


def check(conn: Any, total: int) -> dict[str, Any]:
    """The end state, read in one transaction (a consistent snapshot)."""
    inbound = conn.execute(
        select(func.count(), func.count(func.distinct(Message.external_id))).where(
            Message.direction == "in"
        )
    ).one()
    states = dict(
        conn.execute(select(Conversation.state, func.count()).group_by(Conversation.state)).all()
    )
    unrouted = conn.execute(
        select(func.count()).where(Conversation.routing_decision_id.is_(None))
    ).scalar_one()
    pending = conn.execute(
        select(Offer.conversation_id, Offer.agent_id, Offer.channel).where(
            Offer.state.in_(("pending", "connecting"))
        )
    ).all()
    offered = set(
        conn.execute(select(Conversation.id).where(Conversation.state == "offered")).scalars()
    )
    held: Counter[tuple[int, str]] = Counter()
    for row in pending:
        held[(row.agent_id, row.channel)] += 1
        held[(row.agent_id, "total")] += 1
    for row in conn.execute(
        select(Conversation.assigned_agent_id, Conversation.channel).where(
            Conversation.state.in_(("assigned", "waiting_customer"))
        )
    ):
        held[(row.assigned_agent_id, row.channel)] += 1
        held[(row.assigned_agent_id, "total")] += 1
    loads = conn.execute(
        select(AgentLoad.agent_id, AgentLoad.channel, AgentLoad.used, AgentLoad.cap)
    ).all()
    outbox = dict(conn.execute(select(Outbox.state, func.count()).group_by(Outbox.state)).all())
    uncertain = conn.execute(
        select(func.coalesce(func.sum(Outbox.uncertain_resends), 0))
    ).scalar_one()
    per_conversation = Counter(row.conversation_id for row in pending)
    load_wrong = [
        (r.agent_id, r.channel, r.used, held[(r.agent_id, r.channel)])
        for r in loads
        if r.used != held[(r.agent_id, r.channel)]
    ]
    over = [(r.agent_id, r.channel) for r in loads if r.used > r.cap]
    offers_wrong = (
        sum(1 for n in per_conversation.values() if n > 1)
        + len(offered - set(per_conversation))
        + len(set(per_conversation) - offered)
    )
    sent = outbox.get("sent", 0)
    return {
        "stored": inbound[0],
        "distinct": inbound[1],
        "conversations": sum(states.values()),
        "new": states.get("new", 0),
        "unrouted": unrouted,
        "offers_wrong": offers_wrong,
        "load_wrong": load_wrong,
        "over_capacity": over,
        "outbox": outbox,
        "uncertain_resends": int(uncertain),
        "settled": inbound[0] == total
        and states.get("new", 0) == 0
        and sent == total
        and not load_wrong
        and offers_wrong == 0,
    }


def provider_copies(directory: Path, twilio: Any, graph: Any) -> dict[str, Counter[str]]:
    """How many welcomes each customer got, by provider."""
    return {
        "twilio": Counter(m["to"] for m in twilio.fake.messages),
        "meta": Counter(json.dumps(s["recipient"], sort_keys=True) for s in graph.graph.sent),
        "fake": Counter(str(e["message_id"]) for e in read_sent_log(str(directory / "sent.jsonl"))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument(
        "--phase", choices=("kills", "slow", "outage"), action="append", help="only these"
    )
    args = parser.parse_args(argv)
    phases = args.phase or ["kills", "slow", "outage"]
    status = 0
    if "kills" in phases:
        status |= kill_phase(args)
    if "slow" in phases:
        status |= slow_provider_phase(args)
    if "outage" in phases:
        status |= outage_phase(args)
    return status


def kill_phase(args: argparse.Namespace) -> int:
    from router.migrate import upgrade
    from tests import peers
    from tests.fakes.meta import FakeGraphServer
    from tests.fakes.twilio import FakeTwilioServer
    from tests.support import ServerProcess, make_settings, server_env

    # The fakes' servers log every request a killed omniroute left half-sent: expected here.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    total = 200 if args.smoke else args.messages
    every = (1.0, 2.5) if args.smoke else (2.0, 6.0)
    directory = Path(tempfile.mkdtemp(prefix="omniroute-crash-"))
    try:
        with (
            FakeTwilioServer() as twilio,
            FakeGraphServer(access_token=PAGE_TOKEN) as graph,
            contextlib.ExitStack() as stack,
        ):
            if args.postgres:
                from scaleout import database as pg_database

                url = stack.enter_context(pg_database())
            else:
                url = f"sqlite:///{directory / 'crash.db'}"
            upgrade(url)
            tokens = asyncio.run(_seed(url, args.agents))
            settings = make_settings(
                directory / "conf",
                url,
                rules=RULES,
                channels=channels(directory, twilio.url, graph.url),
            )
            server = ServerProcess(server_env(settings, peers.free_port()), directory / "log")
            chaos = Chaos(server, random.Random(args.seed))
            server.start()
            try:
                result = asyncio.run(flow(server, chaos, tokens, total, every))
                state = asyncio.run(settle(url, total, timeout=180))
                copies = provider_copies(directory, twilio, graph)
            finally:
                server.kill()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return report(total, chaos, result, state, copies, "PostgreSQL" if args.postgres else "SQLite")


async def _seed(url: str, agents: int) -> list[str]:
    from router.agents import create_agent, parse_capacity
    from router.auth import create_user
    from router.db import Database, Tx

    db = Database(url)
    await db.start()
    try:

        def add(tx: Tx) -> list[str]:
            tokens = []
            for i in range(agents):
                user_id, token = create_user(tx, f"crash{i}", "agent")
                capacity = parse_capacity("sms=1000,messenger=1000,webchat=1000,total=1000")
                create_agent(tx, user_id, f"Crash {i}", {}, capacity)
                tokens.append(token)
            return tokens

        return await db.write(add)
    finally:
        await db.close()


def report(total: int, chaos: Chaos, result: dict, state: dict, copies: dict, backend: str) -> int:
    expected_sends = {"twilio": 0, "meta": 0, "fake": 0}
    for i in range(total):
        if KINDS[i % 4] in expected_sends:
            expected_sends[KINDS[i % 4]] += 1
    extra = {kind: sum(n - 1 for n in c.values() if n > 1) for kind, c in copies.items()}
    missing = {kind: expected_sends[kind] - len(c) for kind, c in copies.items()}
    kills = chaos.random_kills + sum(chaos.failpoint_kills.values())
    print(
        f"crash run on {backend}: {total} messages (twilio, meta, fake SMS, web chat), "
        f"{result['seconds']:.0f} s"
    )
    print(
        f"kills: {kills} ({chaos.random_kills} random, failpoints: "
        f"{dict(chaos.failpoint_kills) or 'none fired'}; armed on restarts: "
        f"{dict(chaos.failpoints_armed)})"
    )
    print(f"sender retries/resends: {dict(result['retries'])}")
    rows = [
        ("messages stored", f"{state['stored']} of {total}", state["stored"] == total),
        ("distinct (no duplicate)", str(state["distinct"]), state["distinct"] == total),
        ("conversations", str(state["conversations"]), state["conversations"] == total),
        (
            "not routed",
            str(state["unrouted"] + state["new"]),
            state["unrouted"] + state["new"] == 0,
        ),
        ("offers inconsistent", str(state["offers_wrong"]), state["offers_wrong"] == 0),
        ("agent loads wrong", str(len(state["load_wrong"])), not state["load_wrong"]),
        ("over capacity", str(len(state["over_capacity"])), not state["over_capacity"]),
        ("welcomes missing", str(missing), not any(missing.values())),
        (
            "extra welcome copies",
            f"{extra} (sends a kill interrupted, resent: {state['uncertain_resends']})",
            sum(extra.values()) <= state["uncertain_resends"],
        ),
    ]
    for name, value, ok in rows:
        print(f"  {'ok ' if ok else 'BAD'} {name:<26}{value}")
    print(f"outbox: {state['outbox']}")
    return 0 if all(ok for _, _, ok in rows) else 1


# -- phase: a slow provider --------------------------------------------------------------------
REPLIES = 3


async def _seed_agents(url: str, agents: int, prefix: str) -> list[str]:
    from router.agents import create_agent, parse_capacity
    from router.auth import create_user
    from router.db import Database, Tx

    capacity = parse_capacity("sms=1000,webchat=1000,messenger=1000,total=1000")
    db = Database(url)
    await db.start()
    try:

        def add(tx: Tx) -> list[str]:
            tokens = []
            for i in range(agents):
                user_id, token = create_user(tx, f"{prefix}{i}", "agent")
                create_agent(tx, user_id, f"{prefix} {i}", {}, dict(capacity))
                tokens.append(token)
            return tokens

        return await db.write(add)
    finally:
        await db.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _end_state(url: str) -> dict[str, Any]:
    """The outbound messages (per recipient address, in the order written, with their outbox
    rows), what each visitor's stream carried, inbound counts, queues and presence."""
    from router.db import Database
    from router.models import Inbox, StreamEvent

    db = Database(url)
    await db.start()
    try:

        def load(conn: Any) -> dict[str, Any]:
            rows = conn.execute(
                select(
                    Message.id,
                    Message.text,
                    Message.data,
                    Inbox.slug,
                    Outbox.state,
                    Outbox.payload,
                    Outbox.created_at,
                    Outbox.sent_at,
                    Outbox.uncertain_resends,
                )
                .join(Outbox, Outbox.message_id == Message.id)
                .join(Inbox, Inbox.id == Outbox.inbox_id)
                .order_by(Message.id)
            ).all()
            streams: dict[str, list[str]] = {}
            for event in conn.execute(
                select(StreamEvent.stream, StreamEvent.payload)
                .where(StreamEvent.stream.like("visitor:%"), StreamEvent.type == "message")
                .order_by(StreamEvent.stream, StreamEvent.seq)
            ):
                if (event.payload or {}).get("direction") == "out":
                    address = event.stream.removeprefix("visitor:")
                    streams.setdefault(address, []).append(event.payload.get("text"))
            inbound = conn.execute(
                select(func.count(), func.count(func.distinct(Message.external_id))).where(
                    Message.direction == "in"
                )
            ).one()
            return {
                "rows": rows,
                "streams": streams,
                "stored": inbound[0],
                "distinct": inbound[1],
                "waiting": conn.execute(
                    select(func.count()).where(Conversation.state.in_(("new", "queued")))
                ).scalar_one(),
                "presence": Counter(conn.execute(select(Agent.presence)).scalars()),
            }

        return await db.read(load)
    finally:
        await db.close()


def _deliveries(
    state: dict[str, Any], *providers: list[tuple[str, str]]
) -> tuple[int, int, int, int]:
    """(recipients whose messages arrived out of the order written, messages that never
    arrived, extra copies providers got, copies the outbox reported as possible duplicates).
    ``providers``: (address, text) in the order each provider received them; visitors'
    streams are read from the database."""
    written: dict[str, list[str]] = {}
    for row in state["rows"]:
        address = (row.payload or {}).get("recipient", {}).get("address", "")
        written.setdefault(address, []).append(row.text)
    got: dict[str, list[str]] = {a: list(t) for a, t in state["streams"].items()}
    for received in providers:
        for address, text in received:
            got.setdefault(address, []).append(text)
    wrong = missing = extra = 0
    for address, texts in written.items():
        arrived = got.get(address, [])
        firsts: list[str] = []
        for text in arrived:
            if text in firsts:
                extra += 1
            else:
                firsts.append(text)
        # the welcome text is the same for everyone: compare by position within a recipient
        missing += sum(1 for t in set(texts) if arrived.count(t) < texts.count(t))
        if [t for t in firsts if t in texts] != _unique(texts):
            wrong += 1
    reported = sum(
        int(r.uncertain_resends or 0) + int(bool((r.data or {}).get("possible_duplicate")))
        for r in state["rows"]
    )
    return wrong, missing, extra, reported


def _unique(texts: list[str]) -> list[str]:
    out: list[str] = []
    for text in texts:
        if text not in out:
            out.append(text)
    return out


async def _sends_settled(base: str) -> bool:
    """True once this server's outbox has nothing queued or in flight (its /metrics)."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        try:
            text = (await client.get("/metrics")).text
        except httpx.HTTPError:
            return False
    for line in text.splitlines():
        if line.startswith("omniroute_outbox_backlog "):
            return float(line.split()[1]) == 0
    return False


async def _until_answered(base: str, work: Work, customers: int, replies: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        written = sum(len(v) for v in work.replies.values())
        if (
            len(work.accepted) >= customers
            and written >= customers * replies
            and await _sends_settled(base)
        ):
            return
        await asyncio.sleep(0.5)


def _print_checks(checks: list[tuple[str, Any, bool]]) -> int:
    for name, value, ok in checks:
        print(f"  {'ok ' if ok else 'BAD'} {name:<28}{value}")
    return 0 if all(ok for _, _, ok in checks) else 1


def slow_provider_phase(args: argparse.Namespace) -> int:
    from router.migrate import upgrade
    from tests import peers
    from tests.fakes.twilio import FakeTwilioServer
    from tests.support import FAKE_SECRET, ServerProcess, make_settings, server_env

    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    per_channel = 12 if args.smoke else 60
    hang, timeout = (3.0, 1.0) if args.smoke else (8.0, 2.0)
    directory = Path(tempfile.mkdtemp(prefix="omniroute-slow-"))
    try:
        with FakeTwilioServer() as twilio, contextlib.ExitStack() as stack:
            if args.postgres:
                from scaleout import database as pg_database

                url = stack.enter_context(pg_database())
            else:
                url = f"sqlite:///{directory / 'slow.db'}"
            upgrade(url)
            tokens = asyncio.run(_seed_agents(url, 4, "slow"))
            inboxes = {
                # look a create up twice the hang after it started (Twilio's default 60 s
                # would only make the phase longer)
                "tw": {
                    **twilio_inbox(twilio.url),
                    "request_timeout": timeout,
                    "check_delay": hang * 2,
                },
                "sms": {
                    "channel": "sms",
                    "provider": "fake",
                    "secret": FAKE_SECRET,
                    "sent_log": str(directory / "sent.jsonl"),
                },
                "web": UNLIMITED_WEBCHAT,
            }
            settings = make_settings(
                directory / "conf",
                url,
                rules=RULES,
                channels=json.dumps({"version": 1, "inboxes": inboxes}),
            )
            env = {
                **server_env(settings, peers.free_port()),
                # retries come round in seconds, not minutes: the phase measures holding,
                # not the backoff
                "OMNIROUTE_OUTBOX_BACKOFF_BASE": "0.2",
                "OMNIROUTE_OUTBOX_BACKOFF_MAX": "2",
            }
            server = ServerProcess(env, directory / "log")
            server.start()
            try:
                work = Work()
                started = time.monotonic()
                state = asyncio.run(
                    _slow_traffic(server.url, url, tokens, work, twilio, per_channel, hang)
                )
                elapsed = time.monotonic() - started
            finally:
                server.kill()
            with twilio.fake.lock:
                twilio_got = [(m["to"], m["body"]) for m in twilio.fake.messages]
            sms_got = [(e["to"], e["text"]) for e in read_sent_log(str(directory / "sent.jsonl"))]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    wrong, missing, extra, reported = _deliveries(state, twilio_got, sms_got)
    rows = state["rows"]
    others = [
        (r.sent_at - r.created_at).total_seconds() for r in rows if r.slug != "tw" and r.sent_at
    ]
    twilio_worst = max(
        ((r.sent_at - r.created_at).total_seconds() for r in rows if r.slug == "tw" and r.sent_at),
        default=0.0,
    )
    outbox = Counter(r.state for r in rows)
    print(
        f"slow provider: {per_channel * 3} customers (Twilio SMS, fake SMS, web chat), {REPLIES}"
        f" replies each; Twilio hangs {hang:.0f} s on {per_channel * 2} creates (timeout"
        f" {timeout:.0f} s) from the second third of customers on; {elapsed:.0f} s"
    )
    return _print_checks(
        [
            ("outbox", dict(outbox), set(outbox) == {"sent"}),
            ("messages never delivered", missing, missing == 0),
            ("recipients out of order", wrong, wrong == 0),
            ("extra provider copies", f"{extra} (reported: {reported})", extra <= reported),
            (
                "other inboxes' send delay",
                f"p50 {_percentile(others, 0.5) * 1000:.0f} ms, p99 "
                f"{_percentile(others, 0.99) * 1000:.0f} ms, max "
                f"{max(others, default=0) * 1000:.0f} ms (Twilio's worst {twilio_worst:.1f} s)",
                max(others, default=0) < hang / 2,
            ),
        ]
    )


async def _slow_traffic(
    base: str, url: str, tokens: list[str], work: Work, twilio: Any, per_channel: int, hang: float
) -> dict[str, Any]:
    from twilio.request_validator import RequestValidator

    from tests.support import signed

    done = asyncio.Event()
    agents = [asyncio.create_task(working_agent(base, t, work, REPLIES, done)) for t in tokens]
    validator = RequestValidator(TOKEN)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def twilio_sms(i: int) -> None:
            params = {
                "MessageSid": f"SM{i:032d}",
                "AccountSid": ACCOUNT,
                "From": f"+1415{i:07d}",
                "To": OUR_NUMBER,
                "Body": f"slow {i}",
                "NumMedia": "0",
                "SmsStatus": "received",
                "ApiVersion": "2010-04-01",
            }
            path = "/webhooks/twilio/tw/sms"
            headers = {
                "x-twilio-signature": validator.compute_signature(base + path, params),
                "content-type": "application/x-www-form-urlencoded",
            }
            await post_until_ok(client, path, urlencode(params).encode(), headers)

        async def fake_sms(i: int) -> None:
            message = {"id": f"slow-{i}", "from": f"+49170{i:07d}", "kind": "phone", "text": "hi"}
            body, headers = signed({"messages": [message]})
            await post_until_ok(client, "/webhooks/fake/sms", body, headers)

        async def wave(numbers: range) -> None:
            await asyncio.gather(
                *(twilio_sms(i) for i in numbers),
                *(fake_sms(i) for i in numbers),
                *(visitor(base, f"slow web {i}") for i in numbers),
            )

        third = max(1, per_channel // 3)
        await wave(range(third))
        # from here Twilio hangs on every create: each lands when its delay is over
        twilio.fake.hang_next(per_channel * 2, hang, resource="Messages")
        await wave(range(third, per_channel))
        await _until_answered(base, work, per_channel * 3, REPLIES)
    state = await _end_state(url)
    done.set()
    for task in agents:
        task.cancel()
    return state


# -- phase: the database goes away ------------------------------------------------------------
def outage_phase(args: argparse.Namespace) -> int:
    from router.migrate import upgrade
    from tests import peers
    from tests.support import FAKE_SECRET, ServerProcess, make_settings, server_env

    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    down = 6.0 if args.smoke else 25.0
    directory = Path(tempfile.mkdtemp(prefix="omniroute-outage-"))
    try:
        pg = peers.PrivatePostgres.start(directory / "pg")
        with pg:
            upgrade(pg.url)
            tokens = asyncio.run(_seed_agents(pg.url, 4, "outage"))
            inboxes = {
                "sms": {
                    "channel": "sms",
                    "provider": "fake",
                    "secret": FAKE_SECRET,
                    "sent_log": str(directory / "sent.jsonl"),
                },
                "web": UNLIMITED_WEBCHAT,
            }
            settings = make_settings(
                directory / "conf",
                pg.url,
                rules=RULES,
                channels=json.dumps({"version": 1, "inboxes": inboxes}),
            )
            # a short presence grace: an agent wrongly judged gone would go offline in the run
            env = {**server_env(settings, peers.free_port()), "OMNIROUTE_PRESENCE_GRACE": "3"}
            server = ServerProcess(env, directory / "log")
            server.start()
            try:
                work = Work()
                result = asyncio.run(
                    _outage_traffic(server.url, pg, tokens, work, down, args.smoke)
                )
                exited = server.proc is not None and server.proc.poll() is not None
            finally:
                server.kill()
            sms_got = [(e["to"], e["text"]) for e in read_sent_log(str(directory / "sent.jsonl"))]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    state, customers = result["state"], result["customers"]
    wrong, missing, extra, reported = _deliveries(state, sms_got)
    outbox = Counter(r.state for r in state["rows"])
    offline = sum(n for presence, n in state["presence"].items() if presence != "online")
    print(
        f"database outage: PostgreSQL stopped for {down:.0f} s while {customers} new customers"
        f" wrote (SMS webhooks retried until 200, web chat resent until acknowledged), 4 agents"
        f" answering twice; webhook retries {result['retries']}, agent reconnects"
        f" {work.reconnects}"
    )
    return _print_checks(
        [
            ("server stayed up", "yes" if not exited else "no", not exited),
            ("messages stored", f"{state['stored']} of {customers}", state["stored"] == customers),
            ("distinct (no duplicate)", state["distinct"], state["distinct"] == customers),
            ("outbox", dict(outbox), set(outbox) == {"sent"}),
            ("messages never delivered", missing, missing == 0),
            ("recipients out of order", wrong, wrong == 0),
            ("extra copies", f"{extra} (reported: {reported})", extra <= reported),
            ("agents not online", offline, offline == 0),
            ("customers left waiting", state["waiting"], state["waiting"] == 0),
        ]
    )


async def _outage_traffic(
    base: str, pg: Any, tokens: list[str], work: Work, down: float, smoke: bool
) -> dict[str, Any]:
    from tests.support import signed

    done = asyncio.Event()
    agents = [asyncio.create_task(working_agent(base, t, work, 2, done)) for t in tokens]
    retries = 0
    rate = 5 if smoke else 10  # new customers per second, half by SMS, half by web chat
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def customer(i: int) -> None:
            nonlocal retries
            if i % 2:
                retries += await visitor(base, f"outage web {i}")
                return
            message = {"id": f"out-{i}", "from": f"+49171{i:07d}", "kind": "phone", "text": "hi"}
            body, headers = signed({"messages": [message]})
            retries += await post_until_ok(client, "/webhooks/fake/sms", body, headers)

        traffic: list[asyncio.Task[None]] = []
        before, after = (3.0, 6.0) if smoke else (10.0, 20.0)
        started = time.monotonic()
        stopped = restarted = False
        while (elapsed := time.monotonic() - started) < before + down + after:
            if not stopped and elapsed >= before:
                await asyncio.to_thread(pg.stop)
                stopped = True
            if stopped and not restarted and elapsed >= before + down:
                await asyncio.to_thread(pg.restart)
                restarted = True
            traffic.append(asyncio.create_task(customer(len(traffic))))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*traffic)
        await _until_answered(base, work, len(traffic), 2)
    # read while the agents are still connected: presence is theirs, not a leaving's
    state = await _end_state(pg.url)
    done.set()
    for task in agents:
        task.cancel()
    return {"state": state, "customers": len(traffic), "retries": retries}


if __name__ == "__main__":
    sys.exit(main())
