"""KPIs against a hand-computed scenario, driven with an injected clock and exact to the
second: first response in business time, a reopen, a transfer, a wrap-up, an abandoned call;
per queue and per agent, as JSON and CSV."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from adapters.clock import FakeClock
from router import calls as voice
from router.auth import create_user
from router.messaging import agent_write
from router.models import Conversation, ConversationEvent, Message
from router.runtime import Runtime
from router.types import AgentPresence
from tests.channels.test_email import eventually
from tests.router.test_assignment_rules import agent
from tests.router.test_flow import at, pending_offer, write
from tests.router.test_pipeline import settle
from tests.support import (
    CHANNELS,
    FAKE_SECRET,
    WEB_CHANNELS,
    client_for,
    connect_visitor,
    live_server,
    make_settings,
    post_fake,
    started_runtime,
)

RULES = """\
version: 1
hours:
  office: {timezone: UTC, weekly: {mon-fri: ["09:00-17:00"]}}
queues:
  general: {sla: {first_response: 10m}}
  office: {hours: office, sla: {first_response: 1h}}
  support: {wrap_up: 1m}
  phone: {}
rules:
  - {id: office, when: {message.text: {starts_with: office}}, then: {queue: office}}
  - {id: support, when: {message.text: {starts_with: support}}, then: {queue: support}}
  - {id: phone, when: {channel: voice}, then: {queue: phone}}
default: {queue: general}
"""
PHONE_INBOX = f'  phone: {{channel: voice, provider: fake, secret: "{FAKE_SECRET}"}}\n'


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture
async def rt(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    clock.set(utc(2026, 11, 25, 9, 0))  # a Wednesday
    settings = make_settings(
        tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS + PHONE_INBOX
    )
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        yield runtime, client


async def accept(
    runtime: Runtime, clock: FakeClock, when: datetime, agent_id: int, cid: int
) -> None:
    await at(runtime, clock, when)
    offer = await pending_offer(runtime, cid)
    assert offer.agent_id == agent_id
    await runtime.assignment.accept(agent_id, offer.id)


async def reply(
    runtime: Runtime, clock: FakeClock, when: datetime, agent_id: int, cid: int
) -> None:
    await at(runtime, clock, when)
    await runtime.db.write(agent_write, agent_id, cid, "an answer")


async def resolve(
    runtime: Runtime, clock: FakeClock, when: datetime, agent_id: int, cid: int
) -> None:
    await at(runtime, clock, when)
    await runtime.assignment.resolve(agent_id, cid)


def row(report: dict[str, Any], key: str, by: str = "queue") -> dict[str, Any]:
    return next(r for r in report["rows"] if r[by] == key)


async def test_kpis_of_a_hand_computed_day(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna", capacity="sms=3,total=3")
    ben = await agent(runtime, "ben", capacity="sms=3,total=3", online=False)
    # A, general: first response 120 s, resolved at 300 s; anna handled 09:00:20-09:05
    a = await write(runtime, client, "hello A", sender="+4917000000001")
    await accept(runtime, clock, utc(2026, 11, 25, 9, 0, 20), anna, a)
    await reply(runtime, clock, utc(2026, 11, 25, 9, 2), anna, a)
    await resolve(runtime, clock, utc(2026, 11, 25, 9, 5), anna, a)
    # C, general, transferred to ben: anna 60 s, ben 150 s; ben answers at 180 s
    await at(runtime, clock, utc(2026, 11, 25, 10, 0))
    c = await write(runtime, client, "hello C", sender="+4917000000003")
    await accept(runtime, clock, utc(2026, 11, 25, 10, 0, 10), anna, c)
    await runtime.assignment.set_status(ben, AgentPresence.ONLINE, "test")
    await at(runtime, clock, utc(2026, 11, 25, 10, 1, 10))
    await runtime.assignment.transfer(anna, c, to_queue=None, to_agent=ben, note="for ben")
    await accept(runtime, clock, utc(2026, 11, 25, 10, 1, 30), ben, c)
    await reply(runtime, clock, utc(2026, 11, 25, 10, 3), ben, c)
    await resolve(runtime, clock, utc(2026, 11, 25, 10, 4), ben, c)
    await runtime.assignment.set_status(ben, AgentPresence.AWAY, "test")
    # D, a call nobody could take: abandoned after 150 s
    await at(runtime, clock, utc(2026, 11, 25, 11, 0))
    d = await call(runtime, client)
    await runtime.db.write(voice.start_call, d, "CA" + "1" * 32, "+4917000000004")
    await at(runtime, clock, utc(2026, 11, 25, 11, 2, 30))
    await runtime.db.write(voice.call_ended, d, "completed", "150")
    # E, support with a one-minute wrap-up: handled 12:00:20-12:04:00 (wrap-up included)
    await at(runtime, clock, utc(2026, 11, 25, 12, 0))
    e = await write(runtime, client, "support: my router", sender="+4917000000005")
    await accept(runtime, clock, utc(2026, 11, 25, 12, 0, 20), anna, e)
    await reply(runtime, clock, utc(2026, 11, 25, 12, 1), anna, e)
    await at(runtime, clock, utc(2026, 11, 25, 12, 2))  # the customer's turn again
    assert await write(runtime, client, "support: thanks", sender="+4917000000005") == e
    await resolve(runtime, clock, utc(2026, 11, 25, 12, 3), anna, e)
    await at(runtime, clock, utc(2026, 11, 25, 12, 4))  # the wrap-up ends
    # B, office hours 09-17 UTC: written after hours, answered next morning, then reopened
    await runtime.assignment.set_status(anna, AgentPresence.AWAY, "test")
    await at(runtime, clock, utc(2026, 11, 25, 17, 30))
    b = await write(runtime, client, "office question", sender="+4917000000002")
    await at(runtime, clock, utc(2026, 11, 26, 9, 5))
    await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
    await accept(runtime, clock, utc(2026, 11, 26, 9, 5, 10), anna, b)
    await reply(runtime, clock, utc(2026, 11, 26, 9, 10), anna, b)  # 600 s of office time
    await resolve(runtime, clock, utc(2026, 11, 26, 9, 20), anna, b)  # 1,200 s of office time
    await at(runtime, clock, utc(2026, 11, 26, 9, 40))
    assert await write(runtime, client, "office again", sender="+4917000000002") == b  # reopened
    await accept(runtime, clock, utc(2026, 11, 26, 9, 40, 20), anna, b)
    await reply(runtime, clock, utc(2026, 11, 26, 9, 45), anna, b)
    await resolve(runtime, clock, utc(2026, 11, 26, 9, 50), anna, b)

    sue = await runtime.db.write(lambda tx: create_user(tx, "sue", "supervisor")[1])
    headers = {"authorization": f"Bearer {sue}"}
    period = {"start": "2026-11-25T00:00:00Z", "end": "2026-11-27T00:00:00Z"}
    by_queue = (await client.get("/api/reports/kpis", params=period, headers=headers)).json()
    general, office = row(by_queue, "general"), row(by_queue, "office")
    support, phone = row(by_queue, "support"), row(by_queue, "phone")
    assert general["first_response_seconds"] == {
        "count": 2,
        "avg": 150.0,
        "median": 150.0,
        "max": 180.0,
    }
    assert general["resolution_seconds"] == {
        "count": 2,
        "avg": 270.0,
        "median": 270.0,
        "max": 300.0,
    }
    assert general["handle_seconds"]["total"] == 280 + 60 + 150
    assert general["handle_seconds"]["count"] == 3
    assert (general["resolved"], general["fcr_rate"], general["transfers"]) == (2, 0.5, 1)
    assert general["sla_first_response_attainment"] == 1.0
    # business time: 17:30 -> 09:10 next day is 600 s; 17:30 -> 09:20 is 1,200 s
    assert office["first_response_seconds"] == {
        "count": 2,
        "avg": 450.0,
        "median": 450.0,
        "max": 600.0,
    }
    assert office["resolution_seconds"] == {
        "count": 2,
        "avg": 900.0,
        "median": 900.0,
        "max": 1200.0,
    }
    assert office["handle_seconds"]["total"] == 890 + 580
    assert (office["resolved"], office["fcr_rate"]) == (1, 0.0)  # reopened: not FCR
    assert office["sla_first_response_attainment"] == 1.0
    assert support["handle_seconds"]["total"] == 220 and support["resolution_seconds"]["max"] == 180
    assert (support["fcr_rate"], support["first_response_seconds"]["avg"]) == (1.0, 60.0)
    assert (phone["abandoned"], phone["abandon_wait_seconds"]["max"]) == (1, 150.0)
    by_agent = (
        await client.get("/api/reports/kpis", params={**period, "by": "agent"}, headers=headers)
    ).json()
    anna_row, ben_row = row(by_agent, "anna", "agent"), row(by_agent, "ben", "agent")
    assert anna_row["first_response_seconds"]["count"] == 4  # A, E, and B twice
    assert anna_row["first_response_seconds"]["avg"] == (120 + 60 + 600 + 300) / 4
    assert anna_row["handle_seconds"]["total"] == 280 + 60 + 220 + 890 + 580
    assert (ben_row["first_response_seconds"]["avg"], ben_row["handle_seconds"]["total"]) == (
        180.0,
        150.0,
    )
    assert (anna_row["offers"], ben_row["offers"]) == (5, 1)
    # credited to the agent who resolved first: anna A, E (FCR) and B (reopened: not);
    # ben C (transferred to him: not FCR)
    assert (anna_row["resolved"], anna_row["fcr_rate"]) == (3, 0.6667)
    assert (ben_row["resolved"], ben_row["fcr_rate"]) == (1, 0.0)
    # only what happened in the period counts: Thursday alone holds B's measurements
    thursday = (
        await client.get(
            "/api/reports/kpis",
            params={"start": "2026-11-26T00:00:00Z", "end": "2026-11-27T00:00:00Z"},
            headers=headers,
        )
    ).json()
    assert [r["queue"] for r in thursday["rows"]] == ["office"]
    as_csv = await client.get(
        "/api/reports/kpis", params={**period, "format": "csv"}, headers=headers
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    lines = as_csv.text.splitlines()
    assert lines[0].startswith("queue,first_response_seconds.count,first_response_seconds.avg")
    assert [line.split(",")[0] for line in lines[1:]] == ["general", "office", "phone", "support"]
    fair = (await client.get("/api/reports/fairness", params=period, headers=headers)).json()
    assert {(r["agent"], r["offers"], r["capacity_total"]) for r in fair["rows"]} == {
        ("anna", 5, 3),
        ("ben", 1, 3),
    }
    metrics = (await client.get("/metrics")).text
    assert 'omniroute_queue_waiting{queue="phone"}' not in metrics  # the call was closed
    assert 'omniroute_agents{presence="online"} 1.0' in metrics
    assert 'omniroute_offers_total{outcome="accepted"} 6.0' in metrics
    # queued to taken: A 20 s, C 10 s and 20 s (ben), E 20 s, B 56,110 s (overnight) and 20 s
    assert "omniroute_assignment_latency_seconds_count 6.0" in metrics
    assert "omniroute_assignment_latency_seconds_sum 56200.0" in metrics
    agents_only = await client.get(
        "/api/reports/kpis", params=period, headers={"authorization": "Bearer nope"}
    )
    assert agents_only.status_code == 401
    bad = await client.get(
        "/api/reports/kpis",
        params={"start": "2026-11-27T00:00:00Z", "end": "2026-11-25T00:00:00Z"},
        headers=headers,
    )
    assert bad.status_code == 422 and "end must be after start" in bad.text


async def call(runtime: Runtime, client: httpx.AsyncClient) -> int:
    """A call arriving on the fake phone inbox (a conversation on the voice channel)."""
    response = await post_fake(
        client, "phone", {"id": "CA-d", "from": "+4917000000004", "text": "", "kind": "phone"}
    )
    assert response.status_code == 200, response.text
    await settle(runtime)
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(Message.conversation_id).where(Message.external_id == "CA-d")
            ).scalar_one()
        )
    )


async def test_a_visitor_who_leaves_before_an_agent_joins_abandons_the_chat(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    clock.set(utc(2026, 11, 25, 9, 0))
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=WEB_CHANNELS)
    async with started_runtime(settings, clock) as runtime, live_server(runtime) as base:
        visitor, hello = await connect_visitor(base)
        await visitor.send({"type": "message", "client_id": str(uuid.uuid4()), "text": "hi?"})
        await visitor.wait_for(lambda f: f["type"] == "ack")
        cid = await runtime.db.read(lambda c: c.execute(select(Conversation.id)).scalar_one())

        async def left() -> bool:
            data = await runtime.db.read(
                lambda c: c.execute(
                    select(Conversation.data).where(Conversation.id == cid)
                ).scalar_one()
            )
            return "visitor_left_at" in (data or {})

        # away for 2 minutes, then back: the clock restarts when they leave again
        clock.set(utc(2026, 11, 25, 9, 1))
        await visitor.close()
        await eventually(left)
        clock.set(utc(2026, 11, 25, 9, 3))
        again, _ = await connect_visitor(base, token=hello["token"])
        assert not await left()
        clock.set(utc(2026, 11, 25, 9, 4))
        await again.close()
        await eventually(left)
        clock.set(utc(2026, 11, 25, 9, 8, 59))
        assert await runtime.abandon_sweep() == []
        clock.set(utc(2026, 11, 25, 9, 9))  # five minutes away (the default abandon_after)
        assert await runtime.abandon_sweep() == [cid]
        state, events = await runtime.db.read(
            lambda c: (
                c.execute(select(Conversation.state).where(Conversation.id == cid)).scalar_one(),
                [
                    (e.kind, e.data)
                    for e in c.execute(
                        select(ConversationEvent).where(ConversationEvent.kind == "abandoned")
                    )
                ],
            )
        )
        assert state == "closed"
        assert [(k, d["wait_seconds"]) for k, d in events] == [("abandoned", 240.0)]
        assert await runtime.abandon_sweep() == []


async def test_a_queue_abandon_after_wins_over_the_inbox_one(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    """A chat routed to a queue with ``abandon_after: 2m`` is abandoned after two minutes,
    where the inbox's default would wait five; a queue without one keeps the inbox's."""
    clock.set(utc(2026, 11, 25, 9, 0))
    rules = RULES.replace("  phone: {}\n", "  phone: {}\n  quick: {abandon_after: 2m}\n").replace(
        "rules:\n",
        "rules:\n  - {id: quick, when: {message.text: {starts_with: quick}}, then: {queue: quick}}\n",
    )
    settings = make_settings(tmp_path / "conf", db_url, rules=rules, channels=WEB_CHANNELS)
    async with started_runtime(settings, clock) as runtime, live_server(runtime) as base:

        async def chat(text: str) -> int:
            visitor, _ = await connect_visitor(base)
            await visitor.send({"type": "message", "client_id": str(uuid.uuid4()), "text": text})
            await visitor.wait_for(lambda f: f["type"] == "ack")
            cid = await runtime.db.read(
                lambda c: c.execute(
                    select(Conversation.id).join(Message).where(Message.text == text)
                ).scalar_one()
            )
            await visitor.close()

            async def left() -> bool:
                data = await runtime.db.read(
                    lambda c: c.execute(
                        select(Conversation.data).where(Conversation.id == cid)
                    ).scalar_one()
                )
                return "visitor_left_at" in (data or {})

            await eventually(left)
            return int(cid)

        quick = await chat("quick question")
        slow = await chat("a question")
        queues = await runtime.db.read(
            lambda c: dict(c.execute(select(Conversation.id, Conversation.queue)).all())
        )
        assert queues == {quick: "quick", slow: "general"}
        clock.set(utc(2026, 11, 25, 9, 1, 59))
        assert await runtime.abandon_sweep() == []
        clock.set(utc(2026, 11, 25, 9, 2))  # the queue's two minutes
        assert await runtime.abandon_sweep() == [quick]
        clock.set(utc(2026, 11, 25, 9, 4, 59))
        assert await runtime.abandon_sweep() == []
        clock.set(utc(2026, 11, 25, 9, 5))  # the inbox's five minutes
        assert await runtime.abandon_sweep() == [slow]
