"""A conversation's life around its queue, with an injected clock: overflow steps, after-hours
behaviour, SLAs in business time (midnight, DST, a holiday), warnings and breaches once each
across a restart, resolution paused while the customer has the turn, wrap-up, unassigning,
closing. (Transfers, escalation, sticky agents and reopening over the agent websocket are in
test_flow_live.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from adapters.clock import FakeClock
from router.messaging import agent_write
from router.models import AgentLoad, Conversation, ConversationEvent, Message, Offer, StreamEvent
from router.runtime import Runtime
from router.settings import Settings
from router.types import AgentPresence
from tests.router.test_api import auth
from tests.router.test_assignment_rules import agent
from tests.router.test_live import make_agent
from tests.router.test_pipeline import rows, settle
from tests.support import CHANNELS, client_for, make_settings, post_fake, started_runtime

RULES = """\
version: 1
hours:
  office:
    timezone: Europe/Berlin
    weekly: {mon-fri: ["08:00-18:00"]}
    holidays: ["2026-12-24"]
  daily:
    timezone: Europe/Berlin
    weekly: {mon-sun: ["08:00-18:00"]}
queues:
  general: {sla: {first_response: 10m, resolution: 1h}}
  billing:
    skills: {billing: 5}
    overflow:
      - {after: 2m, relax_skills: {billing: 2}}
      - {after: 4m, priority: urgent}
      - {after: 6m, add_queue: helpers}
      - {after: 8m, move_to: general}
  helpers: {members: [hanna]}
  office:
    hours: office
    sla: {first_response: 1h}
    after_hours: {reply: closed, overflow: [{after: 0s, move_to: night}]}
  night: {}
  daily: {hours: daily, sla: {first_response: 2h}}
  support: {wrap_up: 1m, unassign_after: 5m}
  vip: {sticky: {window: 7d, wait: 30s}}
templates:
  closed: "We are closed, {contact.name|friend}; we answer from 8:00."
rules:
  - {id: billing, when: {message.text: {starts_with: billing}}, then: {queue: billing}}
  - {id: office, when: {message.text: {starts_with: office}}, then: {queue: office}}
  - {id: daily, when: {message.text: {starts_with: daily}}, then: {queue: daily}}
  - {id: support, when: {message.text: {starts_with: support}}, then: {queue: support}}
  - {id: vip, when: {message.text: {starts_with: vip}}, then: {queue: vip, agent: anna}}
default: {queue: general}
"""

BERLIN_WINTER = timedelta(hours=1)  # CET is UTC+1


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def _settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)


@pytest.fixture
async def rt(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    async with (
        started_runtime(_settings(tmp_path, db_url), clock) as runtime,
        client_for(runtime) as client,
    ):
        yield runtime, client


_n = iter(range(100_000))


async def write(
    runtime: Runtime, client: httpx.AsyncClient, text: str, sender: str | None = None
) -> int:
    """A customer message over the fake SMS inbox; the id of its conversation."""
    n = next(_n)
    message = {"id": f"f{n}", "from": sender or f"+4917200{n:05d}", "text": text}
    response = await post_fake(client, "sms", message)
    assert response.status_code == 200, response.text
    await settle(runtime)
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(Message.conversation_id).where(Message.external_id == f"f{n}")
            ).scalar_one()
        )
    )


async def conversation(runtime: Runtime, cid: int) -> Any:
    return await runtime.db.read(
        lambda c: c.execute(select(Conversation).where(Conversation.id == cid)).one()
    )


async def trail(runtime: Runtime, cid: int, *skip: str) -> list[str]:
    """The conversation's event kinds in order (messages left out unless asked for)."""
    skip = skip or ("message_in", "message_out")
    events = await rows(runtime, ConversationEvent, ConversationEvent.conversation_id == cid)
    return [e.kind for e in events if e.kind not in skip]


async def events(runtime: Runtime, cid: int, kind: str) -> list[Any]:
    return await rows(
        runtime,
        ConversationEvent,
        ConversationEvent.conversation_id == cid,
        ConversationEvent.kind == kind,
    )


async def at(runtime: Runtime, clock: FakeClock, when: datetime) -> None:
    """Move the clock to ``when`` and let the timer worker run once."""
    clock.set(when)
    await runtime.assignment.tick()


async def pending_offer(runtime: Runtime, cid: int) -> Any:
    (offer,) = await rows(runtime, Offer, Offer.conversation_id == cid, Offer.state == "pending")
    return offer


# -- overflow -----------------------------------------------------------------------------------
async def test_each_overflow_step_kind_applies_at_its_time(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    bea = await agent(runtime, "bea", "billing=2", online=False)
    hanna = await agent(runtime, "hanna", online=False)
    cid = await write(runtime, client, "billing question")
    c = await conversation(runtime, cid)
    assert (c.queue, c.required_skills, c.priority) == ("billing", {"billing": 5}, 1)
    await at(runtime, clock, start + timedelta(minutes=1, seconds=59))
    assert (await conversation(runtime, cid)).required_skills == {"billing": 5}
    # 2m: relax_skills lowers the minimum (bea, billing=2, is eligible now but away)
    await at(runtime, clock, start + timedelta(minutes=2))
    assert (await conversation(runtime, cid)).required_skills == {"billing": 2}
    # 4m: priority is raised
    await at(runtime, clock, start + timedelta(minutes=4))
    assert (await conversation(runtime, cid)).priority == 3
    # 6m: helpers' member hanna becomes eligible, without a billing skill
    await at(runtime, clock, start + timedelta(minutes=6))
    c = await conversation(runtime, cid)
    assert (c.queue, c.data["extra_queues"]) == ("billing", ["helpers"])
    await runtime.assignment.set_status(hanna, AgentPresence.ONLINE, "test")
    assert (await pending_offer(runtime, cid)).agent_id == hanna
    await runtime.assignment.set_status(hanna, AgentPresence.AWAY, "test")  # offer withdrawn
    # 8m (counted from entering the queue, not from the offer): moved to general, with a note
    await at(runtime, clock, start + timedelta(minutes=8))
    c = await conversation(runtime, cid)
    assert (c.queue, c.required_skills, c.state, c.priority) == ("general", {}, "queued", 3)
    assert "extra_queues" not in c.data
    assert await trail(runtime, cid) == [
        "created",
        "routed",
        "queued",
        "overflow",
        "overflow",
        "overflow",
        "offered",
        "offer_withdrawn",
        "overflow",
        "moved",
        "note",
        "queued",
    ]
    steps = [(e.data["step"], e.data["action"]) for e in await events(runtime, cid, "overflow")]
    assert steps == [(0, "relax_skills"), (1, "priority"), (2, "add_queue"), (3, "move_to")]
    (moved,) = await events(runtime, cid, "moved")
    assert (moved.data["from_queue"], moved.queue) == ("billing", "general")
    (note,) = await rows(runtime, Message, Message.conversation_id == cid, Message.is_note)
    assert note.text == "Moved from billing to general (overflow step 4 of billing)."
    # each step fired once: more ticks change nothing
    await at(runtime, clock, start + timedelta(minutes=30))
    assert len(await events(runtime, cid, "overflow")) == 4
    await runtime.assignment.set_status(bea, AgentPresence.ONLINE, "test")
    assert (await pending_offer(runtime, cid)).agent_id == bea


async def test_an_overflow_step_does_not_apply_to_a_conversation_taken_meanwhile(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    await agent(runtime, "bea", "billing=5")
    cid = await write(runtime, client, "billing question")
    offer = await pending_offer(runtime, cid)
    await runtime.assignment.accept(offer.agent_id, offer.id)
    await at(runtime, clock, start + timedelta(minutes=9))
    c = await conversation(runtime, cid)
    assert (c.queue, c.required_skills, c.priority) == ("billing", {"billing": 5}, 1)
    assert await events(runtime, cid, "overflow") == []


# -- business hours -----------------------------------------------------------------------------
async def test_after_hours_the_reply_goes_once_and_the_after_hours_steps_apply(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    evening = utc(2026, 11, 25, 19, 30)  # Wednesday 20:30 in Berlin: closed
    clock.set(evening)
    cid = await write(runtime, client, "office: my order", sender="+491711111111")
    c = await conversation(runtime, cid)
    assert (c.queue, c.state) == ("office", "queued")  # nothing is dropped
    replies = await rows(runtime, Message, Message.conversation_id == cid, Message.is_auto)
    assert [(m.text, m.data["template"]) for m in replies] == [
        ("We are closed, friend; we answer from 8:00.", "closed")
    ]
    await runtime.assignment.tick()  # the 0s after-hours step: moved to night
    c = await conversation(runtime, cid)
    assert (c.queue, c.data["overflow_plan"]) == ("night", "overflow")
    # more messages from the customer: no second reply
    await write(runtime, client, "hello?", sender="+491711111111")
    await write(runtime, client, "anyone?", sender="+491711111111")
    assert len(await rows(runtime, Message, Message.conversation_id == cid, Message.is_auto)) == 1
    # during office hours the same queue neither replies nor moves anything
    clock.set(utc(2026, 11, 26, 9, 0))  # Thursday 10:00
    other = await write(runtime, client, "office: another", sender="+491722222222")
    await runtime.assignment.tick()
    c = await conversation(runtime, other)
    assert (c.queue, c.data["overflow_plan"]) == ("office", "overflow")
    assert await rows(runtime, Message, Message.conversation_id == other, Message.is_auto) == []


# -- SLAs -----------------------------------------------------------------------------------------
async def test_sla_counts_business_time_across_midnight_and_fires_once_across_a_restart(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    settings = _settings(tmp_path, db_url)
    clock.set(utc(2026, 11, 25, 16, 30))  # Wednesday 17:30 Berlin; office closes at 18:00
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        cid = await write(runtime, client, "office: invoice")
        c = await conversation(runtime, cid)
        # 30 minutes today, 30 tomorrow from 08:00: Thursday 08:30 Berlin
        assert c.sla_first_response_due_at == utc(2026, 11, 26, 7, 30)
        assert c.sla_due_at == c.sla_first_response_due_at
        # the 80% warning: 48 minutes of open time, Thursday 08:18
        await at(runtime, clock, utc(2026, 11, 26, 7, 17, 59))
        assert await events(runtime, cid, "sla_warning") == []
        await at(runtime, clock, utc(2026, 11, 26, 7, 18))
        (warning,) = await events(runtime, cid, "sla_warning")
        assert (warning.data["sla"], warning.queue) == ("first_response", "office")
        await runtime.assignment.tick()
    clock.set(utc(2026, 11, 26, 7, 45))  # down while the breach fell due
    async with started_runtime(settings, clock) as runtime:
        await runtime.assignment.tick()
        await runtime.assignment.tick()
        assert len(await events(runtime, cid, "sla_warning")) == 1
        (breach,) = await events(runtime, cid, "sla_breached")
        assert breach.at == utc(2026, 11, 26, 7, 45)
        assert breach.data["due_at"] == "2026-11-26T07:30:00+00:00"
        streamed = await rows(runtime, StreamEvent, StreamEvent.type == "sla")
        assert sorted((s.stream, s.payload["level"]) for s in streamed) == [
            ("queue:office", "breach"),
            ("queue:office", "warning"),
            ("supervisors", "breach"),
            ("supervisors", "warning"),
        ]
        assert await trail(runtime, cid) == [
            "created",
            "routed",
            "queued",
            "sla_warning",
            "sla_breached",
        ]


@pytest.mark.parametrize(
    ("written", "due"),
    [
        # Saturday 17:00 CET before the last Sunday of March: 1h on Saturday, 1h from 08:00
        # CEST on Sunday (UTC+2), so 07:00 UTC, not 08:00
        (utc(2026, 3, 28, 16, 0), utc(2026, 3, 29, 7, 0)),
        # Saturday 17:00 CEST before the last Sunday of October: Sunday 09:00 CET = 08:00 UTC
        (utc(2026, 10, 24, 15, 0), utc(2026, 10, 25, 8, 0)),
    ],
    ids=["march", "october"],
)
async def test_sla_due_time_across_a_daylight_saving_change(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock, written: datetime, due: datetime
) -> None:
    runtime, client = rt
    clock.set(written)
    cid = await write(runtime, client, "daily: hello")
    assert (await conversation(runtime, cid)).sla_first_response_due_at == due
    await at(runtime, clock, due - timedelta(seconds=1))
    assert await events(runtime, cid, "sla_breached") == []
    await at(runtime, clock, due)
    assert len(await events(runtime, cid, "sla_breached")) == 1


async def test_sla_skips_a_holiday(rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock) -> None:
    runtime, client = rt
    clock.set(utc(2026, 12, 23, 16, 30))  # Wednesday 17:30 CET; Thursday 24th is a holiday
    cid = await write(runtime, client, "office: gift")
    assert (await conversation(runtime, cid)).sla_first_response_due_at == utc(2026, 12, 25, 7, 30)


async def test_an_agent_answer_stops_the_first_response_clock(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    anna = await agent(runtime, "anna")
    cid = await write(runtime, client, "hello")
    offer = await pending_offer(runtime, cid)
    await runtime.assignment.accept(anna, offer.id)
    await at(runtime, clock, start + timedelta(minutes=7))
    await runtime.db.write(agent_write, anna, cid, "Hi, Anna here.")
    c = await conversation(runtime, cid)
    assert c.sla_first_response_due_at is None and "sla_awaiting_response" not in c.data
    await at(runtime, clock, start + timedelta(minutes=30))
    assert await events(runtime, cid, "sla_warning") == []
    assert await events(runtime, cid, "sla_breached") == []


async def test_resolution_time_pauses_while_the_customer_has_the_turn(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    anna = await agent(runtime, "anna")
    cid = await write(runtime, client, "hello", sender="+491733333333")
    assert (await conversation(runtime, cid)).sla_resolution_due_at == start + timedelta(hours=1)
    await runtime.assignment.accept(anna, (await pending_offer(runtime, cid)).id)
    clock.set(start + timedelta(minutes=5))
    await runtime.db.write(agent_write, anna, cid, "Which order?")  # waiting_customer
    c = await conversation(runtime, cid)
    assert (c.state, c.sla_resolution_due_at, c.sla_resolution_used_s) == (
        "waiting_customer",
        None,
        300.0,
    )
    await at(runtime, clock, start + timedelta(hours=3))  # the customer takes their time
    assert await events(runtime, cid, "sla_warning") == []
    assert await events(runtime, cid, "sla_breached") == []
    await write(runtime, client, "order 42", sender="+491733333333")
    resumed = start + timedelta(hours=3)
    c = await conversation(runtime, cid)
    assert (c.state, c.sla_resolution_due_at) == ("assigned", resumed + timedelta(minutes=55))
    # 80% of 60 minutes is 48: 43 more minutes
    await at(runtime, clock, resumed + timedelta(minutes=42, seconds=59))
    assert await events(runtime, cid, "sla_warning") == []
    await at(runtime, clock, resumed + timedelta(minutes=43))
    await at(runtime, clock, resumed + timedelta(minutes=55))
    assert [
        (e.kind, e.data["sla"], e.agent_id)
        for e in await rows(
            runtime,
            ConversationEvent,
            ConversationEvent.conversation_id == cid,
            ConversationEvent.kind.in_(["sla_warning", "sla_breached"]),
        )
    ] == [("sla_warning", "resolution", anna), ("sla_breached", "resolution", anna)]
    sent = await rows(runtime, StreamEvent, StreamEvent.type == "sla")
    assert sorted({s.stream for s in sent}) == [f"agent:{anna}", "queue:general", "supervisors"]


async def test_sla_due_time_orders_the_queue_within_a_priority(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    older = await write(runtime, client, "daily: written first")  # first response due in 2h
    clock.set(start + timedelta(minutes=1))
    sooner = await write(runtime, client, "general, written later")  # due in 10m
    assert (await conversation(runtime, sooner)).sla_due_at < (
        await conversation(runtime, older)
    ).sla_due_at
    anna = await agent(runtime, "anna", capacity="sms=1,total=1")
    assert (await pending_offer(runtime, sooner)).agent_id == anna
    assert await rows(runtime, Offer, Offer.conversation_id == older) == []


# -- preferred agents -----------------------------------------------------------------------------
async def test_a_rules_agent_is_offered_first_and_anyone_after_the_wait(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    anna = await agent(runtime, "anna")
    ben = await agent(runtime, "ben", idle=60)  # idle longest: first by the strategy
    first = await write(runtime, client, "vip: hello")
    assert (await pending_offer(runtime, first)).agent_id == anna
    # her offer ends (she goes away): the reservation ends with it
    await runtime.assignment.set_status(anna, AgentPresence.AWAY, "break")
    assert (await pending_offer(runtime, first)).agent_id == ben
    # written while she is away: it waits for her ...
    second = await write(runtime, client, "vip: me too")
    await at(runtime, clock, start + timedelta(seconds=29))
    assert await rows(runtime, Offer, Offer.conversation_id == second) == []
    # ... until the wait is over
    await at(runtime, clock, start + timedelta(seconds=30))
    assert (await pending_offer(runtime, second)).agent_id == ben
    assert (await trail(runtime, first))[:6] == [
        "created",
        "routed",
        "queued",
        "offered",
        "offer_withdrawn",
        "offered",
    ]
    assert await trail(runtime, second) == ["created", "routed", "queued", "offered"]


# -- wrap-up, unassign, close ----------------------------------------------------------------------
async def _load(runtime: Runtime, agent_id: int) -> int:
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(AgentLoad.used).where(
                    AgentLoad.agent_id == agent_id, AgentLoad.channel == "total"
                )
            ).scalar_one()
        )
    )


async def test_wrap_up_holds_capacity_until_its_time_or_until_ended(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    anna = await agent(runtime, "anna")
    first = await write(runtime, client, "support one")
    second = await write(runtime, client, "support two")
    for cid in (first, second):
        await runtime.assignment.accept(anna, (await pending_offer(runtime, cid)).id)
    assert await _load(runtime, anna) == 2
    resolved = await runtime.assignment.resolve(anna, first)
    assert resolved["wrap_up_until"] == (start + timedelta(minutes=1)).isoformat()
    assert await _load(runtime, anna) == 2  # held during wrap-up
    await at(runtime, clock, start + timedelta(seconds=59))
    assert await _load(runtime, anna) == 2
    await at(runtime, clock, start + timedelta(minutes=1))
    assert await _load(runtime, anna) == 1
    (ended,) = await events(runtime, first, "wrap_up_ended")
    assert (ended.actor, ended.data["early"]) == ("system", False)
    # ending it early
    await runtime.assignment.resolve(anna, second)
    assert await _load(runtime, anna) == 1
    await runtime.assignment.end_wrap_up(anna, second)
    assert await _load(runtime, anna) == 0
    await at(runtime, clock, start + timedelta(minutes=5))
    assert await _load(runtime, anna) == 0  # released once
    assert await trail(runtime, second) == [
        "created",
        "routed",
        "queued",
        "offered",
        "assigned",
        "resolved",
        "wrap_up_ended",
    ]


async def test_work_of_an_absent_agent_returns_to_the_head_of_its_queue(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    anna = await agent(runtime, "anna", idle=5)
    ben = await agent(runtime, "ben", capacity="sms=1,total=1")
    first = await write(runtime, client, "support first")
    await runtime.assignment.accept(anna, (await pending_offer(runtime, first)).id)
    connection = await runtime.assignment.connect(anna)
    await runtime.assignment.disconnect(anna, connection)  # the socket is gone from now
    await runtime.assignment.set_status(ben, AgentPresence.AWAY, "lunch")
    clock.set(start + timedelta(minutes=1))
    second = await write(runtime, client, "support second")  # waits: nobody is available
    await at(runtime, clock, start + timedelta(minutes=4, seconds=59))
    assert (await conversation(runtime, first)).assigned_agent_id == anna
    await at(runtime, clock, start + timedelta(minutes=5))
    c = await conversation(runtime, first)
    assert (c.state, c.assigned_agent_id) == ("queued", None)
    assert c.queued_at < (await conversation(runtime, second)).queued_at  # at the head
    await runtime.assignment.set_status(ben, AgentPresence.ONLINE, "back")
    assert (await pending_offer(runtime, first)).agent_id == ben
    assert await trail(runtime, first) == [
        "created",
        "routed",
        "queued",
        "offered",
        "assigned",
        "unassigned",
        "queued",
        "offered",
    ]
    (unassigned,) = await events(runtime, first, "unassigned")
    assert unassigned.data["reason"] == "agent absent for 300s"


async def test_a_resolved_conversation_closes_when_its_reopen_window_ends(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    start = clock.now()
    anna = await agent(runtime, "anna")
    cid = await write(runtime, client, "hello", sender="+491744444444")
    await runtime.assignment.accept(anna, (await pending_offer(runtime, cid)).id)
    await runtime.assignment.resolve(anna, cid)
    window = timedelta(days=7)  # the inbox default
    await at(runtime, clock, start + window - timedelta(seconds=1))
    assert (await conversation(runtime, cid)).state == "resolved"
    await at(runtime, clock, start + window)
    assert (await conversation(runtime, cid)).state == "closed"
    assert (await trail(runtime, cid))[-2:] == ["resolved", "closed"]
    # a message now starts a new conversation linked to the old one
    new = await write(runtime, client, "me again", sender="+491744444444")
    assert new != cid and (await conversation(runtime, new)).previous_id == cid


async def test_the_http_api_escalates_reroutes_and_ends_wrap_up(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna, token = await make_agent(runtime, "anna", "", "sms=3,total=3")
    await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
    cid = await write(runtime, client, "support: hi")
    await runtime.assignment.accept(anna, (await pending_offer(runtime, cid)).id)
    url = f"/api/conversations/{cid}"
    response = await client.post(f"{url}/escalate", json={"reason": ""}, headers=auth(token))
    assert response.status_code == 422
    response = await client.post(f"{url}/escalate", json={"reason": "hard"}, headers=auth(token))
    assert response.status_code == 422 and "escalate_to" in response.json()["message"]
    response = await client.post(f"{url}/resolve", headers=auth(token))
    until = (clock.now() + timedelta(minutes=1)).isoformat()
    assert response.json() == {"resolved": True, "wrap_up_until": until}
    response = await client.post(f"{url}/end-wrap-up", headers=auth(token))
    assert response.json() == {"ended": True}
    response = await client.post(f"{url}/end-wrap-up", headers=auth(token))
    assert response.status_code == 409
    other = await write(runtime, client, "hello")
    await runtime.assignment.accept(anna, (await pending_offer(runtime, other)).id)
    response = await client.post(
        f"/api/conversations/{other}/send-to-routing", json={"note": "?"}, headers=auth(token)
    )
    assert response.json() == {"rerouted": True}
    await settle(runtime)
    assert len(await events(runtime, other, "routed")) == 2
