"""Handing work on, end to end over the agent websocket (a real server, an injected clock):
transfers to an agent and to a queue, escalation, sticky agents, reopening, sending back to
routing, logging out. Each asserts the conversation's ConversationEvent trail exactly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from adapters.clock import FakeClock
from router.models import Agent, Conversation, ConversationEvent, RoutingDecision
from router.runtime import Runtime
from tests.router.test_live import make_agent
from tests.router.test_pipeline import count, rows
from tests.support import (
    CHANNELS,
    Client,
    CommandError,
    connect_agent,
    live_server,
    make_settings,
    post_fake,
    started_runtime,
)

RULES = """\
version: 1
queues:
  general: {}
  billing: {skills: {billing: 1}, escalate_to: tier2}
  tier2: {members: [tom]}
  support: {sticky: {window: 30d, wait: 30s}}
rules:
  - {id: billing, when: {message.text: {starts_with: billing}}, then: {queue: billing}}
  - {id: support, when: {message.text: {starts_with: support}}, then: {queue: support}}
default: {queue: general}
"""


@pytest.fixture
async def live(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, str, httpx.AsyncClient]]:
    settings = make_settings(
        tmp_path / "conf",
        db_url,
        channels=CHANNELS,
        rules=RULES,
        worker_interval=0.1,
        outbox_interval=0.2,
        # The clock jumps by days here: a heartbeat due every 10 days keeps this process
        # from looking dead to itself (which would drop its agents' sockets).
        heartbeat_interval=864_000,
    )
    async with (
        started_runtime(settings, clock, workers=True) as runtime,
        live_server(runtime) as base,
        httpx.AsyncClient(base_url=base) as http,
    ):
        yield runtime, base, http


_n = iter(range(100_000))


async def customer(http: httpx.AsyncClient, text: str, sender: str = "+491755555555") -> None:
    response = await post_fake(http, "sms", {"id": f"l{next(_n)}", "from": sender, "text": text})
    assert response.status_code == 200, response.text


async def agent(runtime: Runtime, base: str, name: str, skills: str = "", idle: int = 0) -> Any:
    agent_id, token = await make_agent(runtime, name, skills, "sms=2,total=2")
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Agent)
            .where(Agent.id == agent_id)
            .values(idle_since=tx.now - timedelta(minutes=idle))
        )
    )
    client, _ = await connect_agent(base, token)
    client.agent_id = agent_id  # type: ignore[attr-defined]
    return client


def offer_of(cid: int | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda f: (
        f.get("type") == "offer" and (cid is None or f["conversation"]["conversation_id"] == cid)
    )


async def take(client: Client, cid: int | None = None) -> dict[str, Any]:
    """Wait for an offer and accept it."""
    offer = await client.wait_for(offer_of(cid))
    return await client.command("accept", offer_id=offer["offer_id"])


async def trail(runtime: Runtime, cid: int) -> list[tuple[str, Any]]:
    """(kind, agent) of each event, messages left out."""
    events = await rows(runtime, ConversationEvent, ConversationEvent.conversation_id == cid)
    return [(e.kind, e.agent_id) for e in events if e.kind not in ("message_in", "message_out")]


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.05)


async def test_transfer_to_an_agent_falls_back_to_the_queue_when_the_offer_expires(
    live: tuple[Runtime, str, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, base, http = live
    anna = await agent(runtime, base, "anna", idle=10)
    ben = await agent(runtime, base, "ben")
    await customer(http, "hello")
    cid = (await take(anna))["conversation_id"]
    await anna.command("transfer", conversation_id=cid, to_agent="ben", note="Knows the case")
    offer = await ben.wait_for(offer_of(cid))  # offered to ben only
    with pytest.raises(CommandError) as error:
        await anna.command("transfer", conversation_id=cid, to_agent="ben")
    assert error.value.code == "conflict"  # it is not anna's any more
    clock.advance(31)  # ben lets the offer expire: back to the queue's strategy
    await anna.wait_for(offer_of(cid))
    await ben.wait_for(
        lambda f: f.get("type") == "offer_withdrawn" and f["offer_id"] == offer["offer_id"]
    )
    a, b = anna.agent_id, ben.agent_id
    assert await trail(runtime, cid) == [
        ("created", None),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("assigned", a),
        ("transferred", a),
        ("note", a),
        ("queued", None),
        ("offered", b),
        ("offer_expired", b),
        ("offered", a),
    ]
    (transferred,) = await rows(runtime, ConversationEvent, ConversationEvent.kind == "transferred")
    assert (transferred.data["to_agent"], transferred.data["note"]) == (b, "Knows the case")


async def test_transfer_to_a_queue_takes_its_skills_and_the_note_travels(
    live: tuple[Runtime, str, httpx.AsyncClient],
) -> None:
    runtime, base, http = live
    anna = await agent(runtime, base, "anna", idle=10)
    bea = await agent(runtime, base, "bea", "billing=1")
    await customer(http, "my invoice is wrong")
    cid = (await take(anna))["conversation_id"]
    await anna.command(
        "transfer", conversation_id=cid, to_queue="billing", note="Invoice 42, see above"
    )
    accepted = await take(bea, cid)
    texts = [(m["text"], m["is_note"]) for m in accepted["timeline"]["messages"]]
    assert texts == [("my invoice is wrong", False), ("Invoice 42, see above", True)]
    c = await runtime.db.read(
        lambda conn: conn.execute(select(Conversation).where(Conversation.id == cid)).one()
    )
    assert (c.queue, c.required_skills, c.assigned_agent_id) == (
        "billing",
        {"billing": 1},
        bea.agent_id,
    )
    assert await count(runtime, RoutingDecision) == 1  # the rules were not evaluated again
    a, b = anna.agent_id, bea.agent_id
    assert await trail(runtime, cid) == [
        ("created", None),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("assigned", a),
        ("transferred", a),
        ("note", a),
        ("queued", None),
        ("offered", b),
        ("assigned", b),
    ]


async def test_escalation_goes_to_escalate_to_with_its_reason_and_is_counted(
    live: tuple[Runtime, str, httpx.AsyncClient],
) -> None:
    runtime, base, http = live
    bea = await agent(runtime, base, "bea", "billing=1")
    tom = await agent(runtime, base, "tom")
    await customer(http, "billing: refund of 5000 EUR")
    cid = (await take(bea))["conversation_id"]
    for bad, code in (({"reason": " "}, "invalid"), ({}, "invalid")):
        with pytest.raises(CommandError) as error:
            await bea.command("escalate", conversation_id=cid, **bad)
        assert error.value.code == code
    result = await bea.command("escalate", conversation_id=cid, reason="Over my refund limit")
    assert result == {"queue": "tier2"}
    accepted = await take(tom, cid)
    assert accepted["timeline"]["messages"][-1]["text"] == "Escalated: Over my refund limit"
    with pytest.raises(CommandError) as error:  # tier2 has no escalate_to
        await tom.command("escalate", conversation_id=cid, reason="even higher")
    assert error.value.code == "invalid" and "escalate_to" in error.value.message
    c = await runtime.db.read(
        lambda conn: conn.execute(select(Conversation).where(Conversation.id == cid)).one()
    )
    assert (c.queue, c.data["escalations"]) == ("tier2", 1)
    b, t = bea.agent_id, tom.agent_id
    assert await trail(runtime, cid) == [
        ("created", None),
        ("routed", None),
        ("queued", None),
        ("offered", b),
        ("assigned", b),
        ("escalated", b),
        ("note", b),
        ("queued", None),
        ("offered", t),
        ("assigned", t),
    ]
    (escalated,) = await rows(runtime, ConversationEvent, ConversationEvent.kind == "escalated")
    assert (escalated.data["reason"], escalated.data["count"], escalated.queue) == (
        "Over my refund limit",
        1,
        "tier2",
    )


async def test_a_returning_contact_is_offered_to_their_last_agent_first(
    live: tuple[Runtime, str, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, base, http = live
    anna = await agent(runtime, base, "anna", idle=10)
    ben = await agent(runtime, base, "ben", idle=5)
    await customer(http, "support: printer")
    first = (await take(anna))["conversation_id"]
    await anna.command("reply", conversation_id=first, text="Fixed.")
    await anna.command("resolve", conversation_id=first)
    clock.advance(timedelta(days=8))  # closed after the 7-day reopen window
    await eventually(
        lambda: count(
            runtime, Conversation, Conversation.id == first, Conversation.state == "closed"
        )
    )
    await customer(http, "support: printer again")
    offer = await anna.wait_for(offer_of())  # ben has been idle longer, anna is sticky
    second = offer["conversation"]["conversation_id"]
    assert second != first
    await anna.command("reject", offer_id=offer["offer_id"], reason="in a meeting")
    await take(ben, second)  # declining ends the reservation at once
    a, b = anna.agent_id, ben.agent_id
    assert await trail(runtime, second) == [
        ("created", None),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("offer_rejected", a),
        ("offered", b),
        ("assigned", b),
    ]


async def test_a_reopened_conversation_goes_through_the_rules_to_its_agent_first(
    live: tuple[Runtime, str, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, base, http = live
    anna = await agent(runtime, base, "anna", idle=30)
    await agent(runtime, base, "ben", idle=10)  # idle longer than anna once she has worked
    await customer(http, "hello", sender="+491766666666")
    cid = (await take(anna))["conversation_id"]
    await anna.command("reply", conversation_id=cid, text="Done.")
    await anna.command("resolve", conversation_id=cid)
    clock.advance(timedelta(hours=2))
    await customer(http, "it broke again", sender="+491766666666")
    assert (await take(anna, cid))["conversation_id"] == cid
    assert await count(runtime, RoutingDecision, RoutingDecision.conversation_id == cid) == 2
    a = anna.agent_id
    assert await trail(runtime, cid) == [
        ("created", None),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("assigned", a),
        ("first_response", a),
        ("resolved", a),
        ("reopened", a),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("assigned", a),
    ]


async def test_send_back_to_routing_evaluates_the_rules_again(
    live: tuple[Runtime, str, httpx.AsyncClient],
) -> None:
    runtime, base, http = live
    anna = await agent(runtime, base, "anna", idle=10)
    ben = await agent(runtime, base, "ben")
    await customer(http, "hello")
    cid = (await take(anna))["conversation_id"]
    await anna.command("send_to_routing", conversation_id=cid, note="Not mine")
    await anna.wait_for(
        lambda f: f.get("type") == "conversation_updated" and f.get("rerouted") is True
    )
    # anna is free again and idle longest: she is offered it again, as the strategy says
    offer = await anna.wait_for(offer_of(cid))
    await anna.command("reject", offer_id=offer["offer_id"])
    await take(ben, cid)
    assert await count(runtime, RoutingDecision, RoutingDecision.conversation_id == cid) == 2
    a, b = anna.agent_id, ben.agent_id
    assert await trail(runtime, cid) == [
        ("created", None),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("assigned", a),
        ("unassigned", a),
        ("note", a),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("offer_rejected", a),
        ("offered", b),
        ("assigned", b),
    ]


async def test_logging_out_returns_assigned_work_to_its_queue(
    live: tuple[Runtime, str, httpx.AsyncClient],
) -> None:
    runtime, base, http = live
    anna = await agent(runtime, base, "anna", idle=10)
    await customer(http, "hello")
    cid = (await take(anna))["conversation_id"]
    ben = await agent(runtime, base, "ben")
    await anna.send({"type": "logout", "id": "bye"})
    await take(ben, cid)
    a, b = anna.agent_id, ben.agent_id
    assert await trail(runtime, cid) == [
        ("created", None),
        ("routed", None),
        ("queued", None),
        ("offered", a),
        ("assigned", a),
        ("unassigned", a),
        ("queued", None),
        ("offered", b),
        ("assigned", b),
    ]
