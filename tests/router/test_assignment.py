"""Assignment with an injected clock: eligibility, capacity, order, offers and their ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.schema import CreateIndex, CreateTable

from adapters.clock import FakeClock
from router.agents import load_snapshot
from router.assignment.core import accept_offer
from router.exceptions import Conflict
from router.models import (
    Agent,
    AgentStatusEvent,
    Contact,
    Conversation,
    ConversationEvent,
    Offer,
    StreamEvent,
)
from router.runtime import Runtime
from router.types import AgentPresence
from tests.router.test_live import make_agent
from tests.router.test_pipeline import rows, settle
from tests.support import AGENT_RULES, client_for, make_settings, post_fake, started_runtime


@pytest.fixture
async def rt(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    settings = make_settings(tmp_path / "conf", db_url, rules=AGENT_RULES)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        yield runtime, client


async def online(
    runtime: Runtime,
    name: str,
    skills: str = "",
    capacity: str = "sms=1,total=1",
    idle_minutes: int = 0,
) -> int:
    agent_id, _ = await make_agent(runtime, name, skills, capacity)
    if idle_minutes:
        await runtime.db.write(
            lambda tx: tx.execute(
                update(Agent)
                .where(Agent.id == agent_id)
                .values(idle_since=tx.now - timedelta(minutes=idle_minutes))
            )
        )
    await runtime.assignment.set_status(agent_id, AgentPresence.ONLINE, "test")
    return agent_id


async def customer(runtime: Runtime, client: httpx.AsyncClient, n: int, text: str = "hello") -> int:
    await post_fake(client, "sms", {"id": f"m{n}", "from": f"+49170000{n:05d}", "text": text})
    await settle(runtime)
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(Conversation.id).order_by(Conversation.id.desc()).limit(1)
            ).scalar_one()
        )
    )


async def offers(runtime: Runtime, *where: Any) -> list[Any]:
    return await rows(runtime, Offer, *where)


async def test_longest_idle_agent_gets_the_offer(rt: tuple[Runtime, httpx.AsyncClient]) -> None:
    runtime, client = rt
    await online(runtime, "anna", idle_minutes=5)
    ben = await online(runtime, "ben", idle_minutes=30)
    conversation = await customer(runtime, client, 1)
    (offer,) = await offers(runtime)
    assert (offer.agent_id, offer.conversation_id, offer.state) == (ben, conversation, "pending")
    (state,) = await runtime.db.read(lambda c: c.execute(select(Conversation.state)).one())
    assert state == "offered"


async def test_required_skill_levels_are_respected(rt: tuple[Runtime, httpx.AsyncClient]) -> None:
    runtime, client = rt
    await online(runtime, "novice", "billing=2", idle_minutes=60)
    expert = await online(runtime, "expert", "billing=3")
    await customer(runtime, client, 1, "I need a refund")  # billing queue: billing >= 3
    (offer,) = await offers(runtime)
    assert offer.agent_id == expert


async def test_capacity_is_never_exceeded_and_freed_capacity_takes_the_next(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await online(runtime, "anna", capacity="sms=1,total=1")
    first = await customer(runtime, client, 1)
    second = await customer(runtime, client, 2)
    assert [(o.conversation_id, o.state) for o in await offers(runtime)] == [(first, "pending")]
    (offer,) = await offers(runtime)
    await runtime.assignment.accept(anna, offer.id)
    await runtime.assignment.resolve(anna, first)
    assert [(o.conversation_id, o.state) for o in await offers(runtime)] == [
        (first, "accepted"),
        (second, "pending"),
    ]
    history = await rows(runtime, AgentStatusEvent, AgentStatusEvent.agent_id == anna)
    assert all(e.load[c][0] <= e.load[c][1] for e in history for c in ("sms", "total"))
    assert max(e.load["total"][0] for e in history) == 1


async def test_priority_then_age(rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock) -> None:
    runtime, client = rt
    normal_old = await customer(runtime, client, 1)
    clock.advance(60)
    urgent_new = await customer(runtime, client, 2, "refund")  # high priority (billing)
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Conversation)
            .where(Conversation.id == urgent_new)
            .values(queue="general", required_skills={})
        )
    )
    anna = await online(runtime, "anna")
    (offer,) = await offers(runtime)
    assert offer.conversation_id == urgent_new and offer.agent_id == anna
    await runtime.assignment.reject(anna, offer.id, "busy")
    assert [(o.conversation_id, o.state) for o in await offers(runtime)] == [
        (urgent_new, "rejected"),
        (normal_old, "pending"),
    ]


async def test_accept_racing_expiry_has_one_winner(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna = await online(runtime, "anna", idle_minutes=10)
    ben = await online(runtime, "ben")
    conversation = await customer(runtime, client, 1)
    (offer,) = await offers(runtime)
    assert offer.agent_id == anna
    clock.advance(31)  # the general queue's offer_timeout is the default 30s
    with pytest.raises(Conflict, match="the offer is expired"):
        await runtime.db.write(accept_offer, anna, offer.id)
    await runtime.assignment.tick(sweep=False)
    states = [(o.agent_id, o.state) for o in await offers(runtime)]
    assert states == [
        (anna, "expired"),
        (ben, "pending"),
    ]  # the next offer skips the agent who missed it
    kinds = [
        e.kind
        for e in await rows(
            runtime, ConversationEvent, ConversationEvent.conversation_id == conversation
        )
    ]
    assert kinds[-3:] == ["offered", "offer_expired", "offered"]
    # A tick after a restart fires nothing twice: the expiry is a conditional update.
    await runtime.assignment.tick(sweep=False)
    assert len(await offers(runtime)) == 2


async def test_rejected_offers_go_elsewhere_unless_nobody_else_is_eligible(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await online(runtime, "anna", idle_minutes=10)
    ben = await online(runtime, "ben")
    await customer(runtime, client, 1)
    (first,) = await offers(runtime)
    await runtime.assignment.reject(anna, first.id, "not mine")
    second = (await offers(runtime))[-1]
    assert (second.agent_id, second.state) == (ben, "pending")
    await runtime.assignment.reject(ben, second.id, "nor mine")
    third = (await offers(runtime))[-1]
    assert (
        third.agent_id in (anna, ben) and third.state == "pending"
    )  # nobody else: back to one who declined


async def test_missing_offers_in_a_row_sets_the_agent_away(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna = await online(runtime, "anna")
    await customer(runtime, client, 1)
    for _ in range(3):
        clock.advance(31)
        await runtime.assignment.tick()
    (presence, missed) = await runtime.db.read(
        lambda c: c.execute(
            select(Agent.presence, Agent.missed_offers).where(Agent.id == anna)
        ).one()
    )
    assert (presence, missed) == ("away", 3)
    assert [o.state for o in await offers(runtime)] == ["expired", "expired", "expired"]
    events = await rows(
        runtime,
        AgentStatusEvent,
        AgentStatusEvent.agent_id == anna,
        AgentStatusEvent.presence == "away",
    )
    assert events[0].reason == "missed 3 offers in a row"


async def test_socket_loss_withdraws_offers_at_once_and_presence_waits_for_the_grace(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna, _ = await make_agent(runtime, "anna", capacity="sms=1,total=1")
    connection = await runtime.assignment.connect(anna)
    conversation = await customer(runtime, client, 1)
    await runtime.assignment.disconnect(anna, connection)
    assert [o.state for o in await offers(runtime)] == ["withdrawn"]
    (state,) = await runtime.db.read(
        lambda c: c.execute(select(Conversation.state).where(Conversation.id == conversation)).one()
    )
    assert state == "queued"
    clock.advance(30)
    await runtime.assignment.tick(sweep=False)
    assert (
        await runtime.db.read(
            lambda c: c.execute(select(Agent.presence).where(Agent.id == anna)).scalar_one()
        )
        == "online"
    )
    clock.advance(31)
    await runtime.assignment.tick(sweep=False)
    assert (
        await runtime.db.read(
            lambda c: c.execute(select(Agent.presence).where(Agent.id == anna)).scalar_one()
        )
        == "offline"
    )


async def test_a_socket_loss_withdraws_many_offers_in_bulk(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    """Every pending offer goes at once: capacity back to zero per channel and in total, one
    status event for the lot, the conversations queued (a reservation for the agent ends),
    and an event and a frame per offer."""
    runtime, client = rt
    anna, _ = await make_agent(runtime, "anna", capacity="sms=3,total=3")
    connection = await runtime.assignment.connect(anna)
    conversations = [await customer(runtime, client, n) for n in range(3)]
    assert len(await offers(runtime, Offer.state == "pending")) == 3
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Conversation)
            .where(Conversation.id == conversations[0])
            .values(preferred_agent_id=anna)
        )
    )
    await runtime.assignment.disconnect(anna, connection)
    assert [o.state for o in await offers(runtime)] == ["withdrawn"] * 3
    queued = await rows(runtime, Conversation)
    assert [(c.state, c.preferred_agent_id) for c in queued] == [("queued", None)] * 3
    loads = await runtime.db.read(lambda c: load_snapshot(c, anna))
    assert (loads["sms"], loads["total"]) == ([0, 3], [0, 3])
    status = await rows(runtime, AgentStatusEvent, AgentStatusEvent.reason == "offer_withdrawn")
    assert [s.load for s in status] == [{"sms": [0, 3], "total": [0, 3]}]
    events = await rows(runtime, ConversationEvent, ConversationEvent.kind == "offer_withdrawn")
    assert sorted(e.conversation_id for e in events) == conversations
    frames = await rows(runtime, StreamEvent, StreamEvent.type == "offer_withdrawn")
    assert sorted(f.payload["conversation_id"] for f in frames) == conversations


async def test_a_customer_reply_never_pushes_a_full_agent_over_capacity(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await online(runtime, "anna", capacity="sms=1,total=1")
    first = await customer(runtime, client, 1)
    (offer,) = await offers(runtime)
    await runtime.assignment.accept(anna, offer.id)
    from router.messaging import agent_write

    await runtime.db.write(
        agent_write, anna, first, "reply: over to you"
    )  # sms frees capacity while waiting
    second = await customer(runtime, client, 2)
    accepted = (await offers(runtime))[-1]
    assert accepted.conversation_id == second
    await runtime.assignment.accept(anna, accepted.id)
    await post_fake(
        client, "sms", {"id": "m1-again", "from": "+4917000000001", "text": "still there?"}
    )
    await settle(runtime)
    (state, agent_id, preferred) = await runtime.db.read(
        lambda c: c.execute(
            select(
                Conversation.state, Conversation.assigned_agent_id, Conversation.preferred_agent_id
            ).where(Conversation.id == first)
        ).one()
    )
    assert (state, agent_id, preferred) == (
        "queued",
        None,
        anna,
    )  # back in the queue, reserved for anna
    history = await rows(runtime, AgentStatusEvent, AgentStatusEvent.agent_id == anna)
    assert max(e.load["total"][0] for e in history) == 1


async def test_longest_idle_spreads_work_before_doubling_anyone_up(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    """An agent holding work is not idle: the next conversation goes to a free agent even
    when the busy one finished their previous work longer ago."""
    runtime, client = rt
    anna = await online(runtime, "anna", capacity="sms=3,total=3", idle_minutes=60)
    ben = await online(runtime, "ben", capacity="sms=3,total=3", idle_minutes=5)
    await customer(runtime, client, 1)
    await customer(runtime, client, 2)
    await customer(runtime, client, 3)
    assert [o.agent_id for o in await offers(runtime)] == [anna, ben, anna]


async def test_offers_that_fell_due_while_down_expire_once_after_a_restart(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path / "conf", db_url, rules=AGENT_RULES)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        anna = await online(runtime, "anna", idle_minutes=10)
        ben = await online(runtime, "ben")
        await customer(runtime, client, 1)
        (offer,) = await offers(runtime)
        assert (offer.agent_id, offer.state) == (anna, "pending")
    clock.advance(120)  # down past the 30s offer timeout
    async with started_runtime(settings, clock, workers=True) as runtime:
        for _ in range(200):  # the timer worker's first tick fires what fell due
            states = [(o.agent_id, o.state) for o in await offers(runtime)]
            if len(states) == 2:
                break
            await asyncio.sleep(0.05)
        assert states == [(anna, "expired"), (ben, "pending")]
        await runtime.assignment.tick()
        await runtime.assignment.tick()
        assert [(o.agent_id, o.state) for o in await offers(runtime)] == states
        expired = await rows(runtime, ConversationEvent, ConversationEvent.kind == "offer_expired")
        assert len(expired) == 1


async def test_each_offer_carries_its_own_conversation_summary(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await online(runtime, "anna", capacity="sms=5,total=5")
    await post_fake(client, "sms", {"id": "m0", "from": "+4917000000001", "text": "hello?"})
    await settle(runtime)  # offered now, with this message as its preview
    first = await customer(runtime, client, 1, "my parcel is late")
    second = await customer(runtime, client, 2, "wrong colour")  # message ids != conversation ids
    events = await rows(runtime, StreamEvent, StreamEvent.stream == f"agent:{anna}")
    summaries = {
        e.payload["conversation"]["conversation_id"]: e.payload["conversation"]
        for e in events
        if e.type == "offer"
    }
    assert summaries[first]["preview"] == "hello?"  # the latest inbound when it was offered
    assert summaries[second]["preview"] == "wrong colour"
    contacts = await rows(runtime, Contact)
    names = {c.id: c.name for c in contacts}
    for summary in summaries.values():
        assert summary["contact_name"] == names[summary["contact_id"]]
        assert summary["state"] == "offered" and summary["queue"] == "general"


def test_the_declined_lookup_walks_the_conversations_offers_only() -> None:
    """Which waiting conversations an agent declined is read through the offers' conversation
    index: a condition on the state let SQLite walk the state index instead, through every
    offer ever declined or expired (a read that grew with the history, once per dispatch)."""
    import sqlite3

    from sqlalchemy.dialects import sqlite

    from router.assignment.matcher import _OFFERS_OF
    from router.models import Base

    con = sqlite3.connect(":memory:")
    for table_ in Base.metadata.sorted_tables:
        con.execute(str(CreateTable(table_).compile(dialect=sqlite.dialect())))
        for index in table_.indexes:
            con.execute(str(CreateIndex(index).compile(dialect=sqlite.dialect())))
    sql = str(_OFFERS_OF.compile(dialect=sqlite.dialect()))
    plan = " / ".join(row[3] for row in con.execute("EXPLAIN QUERY PLAN " + sql, ["[1, 2]"]))
    assert "ix_offers_conversation" in plan and "ix_offers_due" not in plan, plan
