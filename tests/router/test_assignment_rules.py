"""Each eligibility rule, capacity rule and strategy (injected clock, SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from adapters.clock import FakeClock
from router.assignment.capacity import claim, release
from router.exceptions import CapacityExceeded
from router.models import Agent, AgentStatusEvent, Conversation, ConversationEvent, Offer
from router.runtime import Runtime
from router.types import AgentPresence
from tests.router.test_api import auth, token_for
from tests.router.test_live import make_agent
from tests.router.test_pipeline import rows, settle
from tests.support import CHANNELS, client_for, make_settings, post_fake, started_runtime

RULES = """\
version: 1
queues:
  general: {}
  billing: {skills: {billing: 3}}
  members: {members: [anna]}
  german: {language_required: true}
  busy: {strategy: least_busy}
  rr: {strategy: round_robin}
  expert: {strategy: most_skilled, skills: {billing: 1}}
  auto: {auto_accept: true}
rules:
  - {id: billing, when: {message.text: {starts_with: billing}}, then: {queue: billing}}
  - {id: members, when: {message.text: {starts_with: members}}, then: {queue: members}}
  - {id: german, when: {message.text: {starts_with: german}}, then: {queue: german}}
  - {id: busy, when: {message.text: {starts_with: busy}}, then: {queue: busy}}
  - {id: rr, when: {message.text: {starts_with: rr}}, then: {queue: rr}}
  - {id: expert, when: {message.text: {starts_with: expert}}, then: {queue: expert}}
  - {id: auto, when: {message.text: {starts_with: auto}}, then: {queue: auto}}
  - {id: rule-skill, when: {message.text: {starts_with: deutsch}}, then: {queue: general, skills: {lang_de: 2}}}
default: {queue: general}
"""


@pytest.fixture
async def rt(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        yield runtime, client


async def agent(
    runtime: Runtime,
    name: str,
    skills: str = "",
    capacity: str = "sms=3,total=3",
    idle: int = 0,
    online: bool = True,
) -> int:
    agent_id, _ = await make_agent(runtime, name, skills, capacity)
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Agent)
            .where(Agent.id == agent_id)
            .values(idle_since=tx.now - timedelta(minutes=idle))
        )
    )
    if online:
        await runtime.assignment.set_status(agent_id, AgentPresence.ONLINE, "test")
    return agent_id


_n = iter(range(10_000))


async def customer(
    runtime: Runtime, client: httpx.AsyncClient, text: str, *, language: str | None = None
) -> int:
    n = next(_n)
    message = {
        "id": f"m{n}",
        "from": f"+4917100{n:05d}",
        "text": text,
        **({"language": language} if language else {}),
    }
    await post_fake(client, "sms", message)
    await settle(runtime)
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(Conversation.id).order_by(Conversation.id.desc()).limit(1)
            ).scalar_one()
        )
    )


async def offered_to(runtime: Runtime, conversation_id: int) -> list[int]:
    return [
        o.agent_id for o in await rows(runtime, Offer, Offer.conversation_id == conversation_id)
    ]


async def test_members_are_the_only_eligible_agents_of_a_members_queue(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    await agent(runtime, "ben", idle=60)
    anna = await agent(runtime, "anna")
    assert await offered_to(runtime, await customer(runtime, client, "members only")) == [anna]


async def test_language_required_needs_the_language_skill(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    await agent(runtime, "ben", idle=60)
    katrin = await agent(runtime, "katrin", "lang_de=1")
    assert await offered_to(
        runtime, await customer(runtime, client, "german please", language="de")
    ) == [katrin]
    # language_required without a known language: anyone
    other = await customer(runtime, client, "german, language unknown")
    assert len(await offered_to(runtime, other)) == 1


async def test_skills_a_rule_adds_are_required_too(rt: tuple[Runtime, httpx.AsyncClient]) -> None:
    runtime, client = rt
    await agent(runtime, "ben", "lang_de=1", idle=60)  # below the rule's minimum of 2
    katrin = await agent(runtime, "katrin", "lang_de=2")
    conversation = await customer(runtime, client, "deutsch bitte")
    required = await runtime.db.read(
        lambda c: c.execute(
            select(Conversation.required_skills).where(Conversation.id == conversation)
        ).scalar_one()
    )
    assert required == {"lang_de": 2}
    assert await offered_to(runtime, conversation) == [katrin]


async def test_channel_capacity_and_total_are_both_limits(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna", capacity="sms=5,total=2")
    first, second, third = [await customer(runtime, client, f"hello {i}") for i in range(3)]
    assert (
        await offered_to(runtime, first),
        await offered_to(runtime, second),
        await offered_to(runtime, third),
    ) == ([anna], [anna], [])
    loads = await runtime.db.read(
        lambda c: [
            e.load
            for e in c.execute(select(AgentStatusEvent).where(AgentStatusEvent.agent_id == anna))
        ]
    )
    assert max(load["total"][0] for load in loads) == 2 and all(
        load["sms"][0] <= load["sms"][1] for load in loads
    )


async def test_exclusive_voice_takes_nothing_else_while_on_a_call(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna, _ = await make_agent(runtime, "anna", capacity="sms=3,voice=1,total=4")
    await runtime.db.write(
        lambda tx: tx.execute(
            update(Agent).where(Agent.id == anna).values(exclusive_channels=["voice"])
        )
    )
    await runtime.db.write(claim, anna, "voice", "on a call")
    await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
    conversation = await customer(runtime, client, "hello")
    assert await offered_to(runtime, conversation) == []
    await runtime.db.write(release, anna, "voice", "call ended")
    await runtime.assignment.dispatch()
    assert await offered_to(runtime, conversation) == [anna]


async def test_an_agent_coming_online_is_offered_waiting_work_at_once(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna", online=False)
    conversation = await customer(runtime, client, "hello")
    assert await offered_to(runtime, conversation) == []
    await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "back")
    assert await offered_to(runtime, conversation) == [anna]


async def test_a_ruleset_adding_a_member_offers_waiting_work(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    ben = await agent(runtime, "ben")
    conversation = await customer(
        runtime, client, "members only"
    )  # members: [anna]; anna does not exist
    assert await offered_to(runtime, conversation) == []
    await runtime.rules.put(
        RULES.replace("members: [anna]", "members: [anna, ben]").encode(), "api:test"
    )
    await runtime.background.idle()
    assert await offered_to(runtime, conversation) == [ben]


async def test_least_busy_prefers_the_lowest_occupancy(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna", capacity="sms=4,total=4", idle=60)
    ben = await agent(runtime, "ben", capacity="sms=10,total=10")
    await runtime.db.write(claim, anna, "sms", "busy")  # anna 1/4 = 0.25 occupied, ben 0/10
    conversation = await customer(runtime, client, "busy queue")
    assert await offered_to(runtime, conversation) == [ben]


async def test_round_robin_rotates_and_survives_a_restart(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        ids = [
            await agent(runtime, name, capacity="sms=10,total=10", idle=idle)
            for name, idle in (("a", 1), ("b", 2), ("c", 3))
        ]
        first = [
            (await offered_to(runtime, await customer(runtime, client, f"rr {i}")))[0]
            for i in range(3)
        ]
        assert sorted(first) == sorted(ids)  # each once, whatever their idle time
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        nxt = (await offered_to(runtime, await customer(runtime, client, "rr after restart")))[0]
        assert nxt == first[0]  # the rotation continues where it was


async def test_most_skilled_prefers_the_highest_level_then_the_longest_idle(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    await agent(runtime, "novice", "billing=2", idle=120)
    ace = await agent(runtime, "ace", "billing=9", idle=1)
    await agent(runtime, "also_ace_but_busier", "billing=9")
    assert await offered_to(runtime, await customer(runtime, client, "expert help")) == [ace]


async def test_auto_accept_assigns_directly(rt: tuple[Runtime, httpx.AsyncClient]) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna")
    conversation = await customer(runtime, client, "auto please")
    (state, owner) = await runtime.db.read(
        lambda c: c.execute(
            select(Conversation.state, Conversation.assigned_agent_id).where(
                Conversation.id == conversation
            )
        ).one()
    )
    assert (state, owner) == ("assigned", anna) and await offered_to(runtime, conversation) == []
    kinds = [
        e.kind
        for e in await rows(
            runtime, ConversationEvent, ConversationEvent.conversation_id == conversation
        )
    ]
    assert kinds[-1] == "assigned"


async def test_manual_assignment_respects_capacity_unless_overridden(
    rt: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna", capacity="sms=1,total=1")
    ben = await agent(runtime, "ben", capacity="sms=1,total=1", online=False)
    first = await customer(runtime, client, "one")
    second = await customer(runtime, client, "two")
    assert await offered_to(runtime, first) == [anna] and await offered_to(runtime, second) == []
    with pytest.raises(CapacityExceeded, match="anna has no free sms capacity"):
        await runtime.assignment.assign(second, anna, by="sue", override=False)
    supervisor = await token_for(runtime, "sue", "supervisor")
    refused = await client.post(
        f"/api/conversations/{second}/assign", headers=auth(supervisor), json={"agent": "anna"}
    )
    assert refused.status_code == 409 and refused.json()["error"] == "capacity"
    forced = await client.post(
        f"/api/conversations/{second}/assign",
        headers=auth(supervisor),
        json={"agent": "anna", "override": True},
    )
    assert forced.status_code == 200
    event = (
        await rows(
            runtime,
            ConversationEvent,
            ConversationEvent.conversation_id == second,
            ConversationEvent.kind == "assigned",
        )
    )[-1]
    assert (event.agent_id, event.actor, event.data["override"], event.data["by"]) == (
        anna,
        "supervisor",
        True,
        "sue",
    )
    # reassigning the offered one to ben withdraws anna's offer and frees her capacity
    await runtime.assignment.assign(first, ben, by="sue", override=False)
    assert [o.state for o in await rows(runtime, Offer, Offer.conversation_id == first)] == [
        "withdrawn"
    ]
    loads = await runtime.db.read(
        lambda c: c.execute(
            select(AgentStatusEvent.load)
            .where(AgentStatusEvent.agent_id == anna)
            .order_by(AgentStatusEvent.id.desc())
            .limit(1)
        ).scalar_one()
    )
    assert loads["total"] == [1, 1]  # only the overridden one left
