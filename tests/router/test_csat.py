"""CSAT surveys: sent on the reply channel after resolving, answered with a bare score within
24 hours (stored, never reopening), a score after that reopens as usual, an opted-out number
is never surveyed, email links answer with one click on our page; the answer feeds the
reports and the ``history.last_csat`` routing fact."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from adapters.clock import FakeClock
from channels.fake import FakeChannel
from router.auth import create_user
from router.models import ContactIdentity, Conversation, ConversationEvent, Message
from router.outbox import set_opt_out
from router.runtime import Runtime
from tests.router.test_assignment_rules import agent
from tests.router.test_flow import at, write
from tests.router.test_kpis import accept, reply, resolve
from tests.router.test_pipeline import settle
from tests.support import (
    FAKE_SECRET,
    client_for,
    fake_message,
    make_settings,
    post_fake,
    started_runtime,
)

RULES = """\
version: 1
queues:
  general: {}
  recovery: {}
rules:
  - {id: unhappy, when: {history.last_csat: {lt: 3}}, then: {queue: recovery}}
default: {queue: general}
"""
CHANNELS = f"""\
version: 1
inboxes:
  sms: {{channel: sms, provider: fake, secret: "{FAKE_SECRET}", survey: csat, reopen_window: 3d}}
  mail: {{channel: email, provider: fake, secret: "{FAKE_SECRET}", survey: csat}}
"""


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture
async def rt(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    clock.set(utc(2026, 11, 25, 9, 0))
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        yield runtime, client


async def handled(
    runtime: Runtime, client: httpx.AsyncClient, clock: FakeClock, anna: int, sender: str
) -> int:
    """A conversation answered and resolved by anna; returns its id."""
    start = clock.now()
    cid = await write(runtime, client, "my order", sender=sender)
    await accept(runtime, clock, start + timedelta(seconds=10), anna, cid)
    await reply(runtime, clock, start + timedelta(seconds=40), anna, cid)
    await resolve(runtime, clock, start + timedelta(minutes=2), anna, cid)
    return cid


async def kinds(runtime: Runtime, cid: int) -> list[str]:
    return list(
        await runtime.db.read(
            lambda c: (
                c.execute(
                    select(ConversationEvent.kind)
                    .where(ConversationEvent.conversation_id == cid)
                    .order_by(ConversationEvent.id)
                )
                .scalars()
                .all()
            )
        )
    )


async def state(runtime: Runtime, cid: int) -> str:
    return str(
        await runtime.db.read(
            lambda c: c.execute(
                select(Conversation.state).where(Conversation.id == cid)
            ).scalar_one()
        )
    )


async def test_a_bare_score_within_a_day_is_the_answer_and_reopens_nothing(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna")
    cid = await handled(runtime, client, clock, anna, "+4917000000001")
    sms = runtime.channels["sms"]
    assert isinstance(sms, FakeChannel)
    await runtime.outbox.process_due()
    survey = [m for m in sms.sent if "1 (poor) to 5 (great)" in m.text]
    assert len(survey) == 1 and survey[0].is_auto
    await at(runtime, clock, clock.now() + timedelta(hours=23))
    await write(runtime, client, " 2 ", sender="+4917000000001")
    assert await state(runtime, cid) == "resolved"
    assert (await kinds(runtime, cid))[-3:] == ["survey_sent", "message_in", "csat"]
    (event,) = await runtime.db.read(
        lambda c: c.execute(select(ConversationEvent).where(ConversationEvent.kind == "csat")).all()
    )
    assert (event.data["score"], event.agent_id, event.queue) == (2, anna, "general")
    # a second score is an ordinary message: the survey is answered (it reopens)
    await write(runtime, client, "5", sender="+4917000000001")
    assert await state(runtime, cid) != "resolved"
    # reports: CSAT per agent; and the next conversation is routed on the low score
    sue = await runtime.db.write(lambda tx: create_user(tx, "sue", "supervisor")[1])
    report = (
        await client.get(
            "/api/reports/kpis",
            params={"by": "agent", "start": "2026-11-25T00:00:00Z", "end": "2026-11-28T00:00:00Z"},
            headers={"authorization": f"Bearer {sue}"},
        )
    ).json()
    (row,) = report["rows"]
    assert (
        row["agent"],
        row["csat"]["count"],
        row["csat"]["avg"],
        row["csat"]["satisfied_rate"],
    ) == (
        "anna",
        1,
        2.0,
        0.0,
    )
    later = await write(runtime, client, "another question", sender="+4917000000009")
    assert later != cid
    mail = await post_fake(
        client, "mail", fake_message("m1", "new@example.com", "hello", kind="email")
    )
    assert mail.status_code == 200
    await settle(runtime)
    queues = await runtime.db.read(
        lambda c: dict(c.execute(select(Conversation.id, Conversation.queue)).all())
    )
    assert queues[cid] == "recovery"  # reopened: routed again, now with history.last_csat 2


async def test_a_score_after_a_day_reopens_and_opted_out_numbers_are_not_surveyed(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna")
    late = await handled(runtime, client, clock, anna, "+4917000000001")
    await at(runtime, clock, clock.now() + timedelta(hours=25))
    await write(runtime, client, "5", sender="+4917000000001")
    assert await state(runtime, late) != "resolved"
    assert "csat" not in await kinds(runtime, late) and "reopened" in await kinds(runtime, late)
    # STOP on this number: no survey goes out, so a "5" later is an ordinary message
    await at(runtime, clock, clock.now() + timedelta(hours=1))
    await write(runtime, client, "hi", sender="+4917000000002")
    identity = await runtime.db.read(
        lambda c: c.execute(
            select(ContactIdentity.id).where(ContactIdentity.address == "+4917000000002")
        ).scalar_one()
    )
    await runtime.db.write(set_opt_out, identity, True, "keyword")
    quiet = await runtime.db.read(
        lambda c: c.execute(
            select(Message.conversation_id).where(Message.text == "hi")
        ).scalar_one()
    )
    start = clock.now()
    await accept(runtime, clock, start + timedelta(seconds=5), anna, quiet)
    await resolve(runtime, clock, start + timedelta(seconds=30), anna, quiet)
    assert "survey_sent" not in await kinds(runtime, quiet)
    surveys = await runtime.db.read(
        lambda c: c.execute(
            select(Message.id).where(Message.conversation_id == quiet, Message.direction == "out")
        ).all()
    )
    assert surveys == []
    await write(runtime, client, "5", sender="+4917000000002")
    assert "csat" not in await kinds(runtime, quiet)


async def test_email_surveys_answer_through_our_page(
    rt: tuple[Runtime, httpx.AsyncClient], clock: FakeClock
) -> None:
    runtime, client = rt
    anna = await agent(runtime, "anna", capacity="email=3,total=3")
    start = clock.now()
    response = await post_fake(
        client, "mail", fake_message("m1", "ann@example.com", "help", kind="email")
    )
    assert response.status_code == 200
    await settle(runtime)
    cid = await runtime.db.read(
        lambda c: c.execute(
            select(Message.conversation_id).where(Message.external_id == "m1")
        ).scalar_one()
    )
    await accept(runtime, clock, start + timedelta(seconds=5), anna, cid)
    await reply(runtime, clock, start + timedelta(seconds=20), anna, cid)
    await resolve(runtime, clock, start + timedelta(seconds=60), anna, cid)
    survey = await runtime.db.read(
        lambda c: c.execute(
            select(Message.text).where(Message.conversation_id == cid, Message.is_auto)
        ).scalar_one()
    )
    links = re.findall(r"(\d): http://testserver(/survey/\S+)", survey)
    assert [n for n, _ in links] == ["5", "4", "3", "2", "1"]
    path = dict(links)["4"]
    page = await client.get(path)
    assert page.status_code == 200 and "Send my rating: 4" in page.text
    assert "csat" not in await kinds(runtime, cid)  # following the link alone answers nothing
    done = await client.post(path)
    assert "Thank you for your feedback" in done.text
    again = await client.post(path)
    assert "already answered" in again.text
    forged = await client.post(path.replace(path.split("/")[3], "0" * 32))
    assert forged.status_code == 404
    scores = await runtime.db.read(
        lambda c: [
            e.data["score"]
            for e in c.execute(select(ConversationEvent).where(ConversationEvent.kind == "csat"))
        ]
    )
    assert scores == [4]
