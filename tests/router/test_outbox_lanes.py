"""The outbox under slow providers and outages: a hung send delays nothing but itself, the
messages of one conversation leave in the order they were written, and a send's outcome is
recorded even when the database was down as the provider answered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import httpx
from sqlalchemy import select, update

from adapters.clock import FakeClock
from channels.base import UncertainPolicy
from channels.fake import FakeChannel
from router.db import Tx
from router.migrate import upgrade
from router.models import Message, Outbox
from router.outbox import enqueue_message
from router.runtime import Runtime
from router.types import Actor
from tests import peers
from tests.router.test_pipeline import rows, settle
from tests.support import client_for, make_settings, post_fake, started_runtime


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.05)


def fake(runtime: Runtime, slug: str) -> FakeChannel:
    channel = runtime.channels[slug]
    assert isinstance(channel, FakeChannel)
    return channel


async def conversation(runtime: Runtime, client: httpx.AsyncClient, inbox: str, sender: str) -> int:
    """A routed conversation in ``inbox``; its welcome reply is queued in the outbox."""
    await post_fake(client, inbox, {"id": f"in-{inbox}-{sender}", "from": sender, "text": "hi"})
    await settle(runtime)
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(Message.conversation_id).where(Message.external_id == f"in-{inbox}-{sender}")
            ).scalar_one()
        )
    )


async def write(runtime: Runtime, conversation_id: int, text: str) -> int:
    def add(tx: Tx) -> int:
        message_id = enqueue_message(tx, conversation_id, text, author=Actor.SYSTEM)
        assert message_id is not None
        return message_id

    return int(await runtime.db.write(add))


async def outbox_states(runtime: Runtime) -> dict[int, str]:
    return {r.message_id: r.state for r in await rows(runtime, Outbox)}


async def test_a_hung_send_delays_nothing_but_itself(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    """One provider call hangs (Twilio's 10 s timeout, or longer): other inboxes' replies,
    written after it started, still go out at once (before, the worker waited for its whole
    batch of 64 claims, so every reply on every channel waited behind the hung call)."""
    sms, wa = fake(runtime, "sms"), fake(runtime, "wa")
    sms.gate = asyncio.Event()  # every SMS send hangs until the test lets it go
    sms_conversation = await conversation(runtime, client, "sms", "+4917000000001")
    wa_conversation = await conversation(runtime, client, "wa", "+4917000000002")
    worker = asyncio.ensure_future(runtime.outbox.run(0.05))
    try:
        await until(lambda: _true(sms.calls == 1 and len(wa.sent) == 1))  # both welcomes
        # written while the SMS hangs: a WhatsApp reply, and another SMS conversation's welcome
        later = await write(runtime, wa_conversation, "second WhatsApp reply")
        other_sms = await conversation(runtime, client, "sms", "+4917000000003")
        runtime.outbox.wake()
        await until(lambda: _true(any(m.message_id == later for m in wa.sent)))
        await until(lambda: _true(sms.calls == 2))  # the other SMS conversation is not held
        states = await outbox_states(runtime)
        assert states[later] == "sent"
        assert list(states.values()).count("sending") == 2  # the two hung SMS sends only
        sms.gate.set()
        await until(lambda: _all_sent(runtime))
        assert {m.conversation_id for m in sms.sent} == {sms_conversation, other_sms}
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def _true(value: bool) -> bool:
    return value


async def _all_sent(runtime: Runtime) -> bool:
    return set((await outbox_states(runtime)).values()) == {"sent"}


async def test_one_conversation_leaves_in_the_order_it_was_written(
    runtime: Runtime, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """After a provider outage the replies of one conversation reached Twilio as 1, 3, 5,
    welcome, 2, 4. A message goes only when every earlier one of its conversation is done,
    across retries; other conversations are not held."""
    sms = fake(runtime, "sms")
    first = await conversation(runtime, client, "sms", "+4917000000011")
    written = [await write(runtime, first, f"reply {n}") for n in range(1, 6)]
    other = await conversation(runtime, client, "sms", "+4917000000012")
    sms.failures_left = 3  # the provider is down for the first three calls
    for _ in range(20):
        await runtime.outbox.process_due()
        clock.advance(timedelta(minutes=15))
        if len(sms.sent) == 8:
            break
    order = [m.message_id for m in sms.sent if m.conversation_id == first]
    welcome = min(m.message_id for m in sms.sent if m.conversation_id == first)
    assert order == [welcome, *written]
    assert [m.conversation_id for m in sms.sent].count(other) == 1


async def test_a_failed_message_does_not_hold_the_conversation(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    sms = fake(runtime, "sms")
    first = await conversation(runtime, client, "sms", "+4917000000021")
    sms.permanent_failure = "blocked"
    await runtime.outbox.process_due()
    sms.permanent_failure = None
    later = await write(runtime, first, "after the failure")
    await runtime.outbox.process_due()
    states = await outbox_states(runtime)
    assert sorted(states.values()) == ["failed", "sent"] and states[later] == "sent"


async def test_a_row_of_this_process_left_in_sending_is_recovered(
    runtime: Runtime, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """A row this (living) process claimed but no longer sends (its task lost, its outcome
    never written) is taken up by recovery: before, only dead processes' rows were."""
    first = await conversation(runtime, client, "sms", "+4917000000031")
    del first
    fake(runtime, "sms").uncertain_policy = UncertainPolicy.RESEND  # type: ignore[misc]

    def claimed_by_me(tx: Tx) -> None:
        tx.execute(
            update(Outbox).values(
                state="sending", claimed_by=runtime.process_id, claimed_at=tx.now, attempts=1
            )
        )

    await runtime.db.write(claimed_by_me)
    assert await runtime.outbox.recover_uncertain() == 0  # young: it may still be in flight
    clock.advance(timedelta(seconds=runtime.outbox.dead_after + 1))
    assert await runtime.outbox.recover_uncertain() == 1
    await runtime.outbox.process_due()
    (row,) = await rows(runtime, Outbox)
    assert (row.state, row.uncertain_resends) == ("sent", 1)


async def test_an_outcome_is_recorded_after_the_database_comes_back(tmp_path: Path) -> None:
    """The database is down as the provider answers (here: a temporary failure, then a
    success): the worker keeps the outcome and writes it when PostgreSQL is back, so the
    reply is sent. Before, the row stayed ``sending`` for good (recovery only took dead
    processes' rows): 60 s after PostgreSQL returned, the reply was still unsent."""
    pg = peers.need(lambda: peers.PrivatePostgres.start(tmp_path / "pg"))
    with pg:
        await asyncio.to_thread(upgrade, pg.url)
        settings = make_settings(
            tmp_path / "conf", pg.url, db_pool_size=2, db_max_overflow=0, outbox_backoff_base=0.05
        )
        clock = FakeClock()
        async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
            runtime.outbox.record_retry = 0.05
            sms = fake(runtime, "sms")
            sms.gate = asyncio.Event()
            sms.failures_left = 1
            await conversation(runtime, client, "sms", "+4917000000041")
            worker = asyncio.ensure_future(runtime.outbox.run(0.05))
            try:
                await until(lambda: _true(sms.calls == 1))
                pg.stop()
                sms.gate.set()  # the provider answers "temporary failure" while PG is down
                await asyncio.sleep(1.0)
                pg.restart()

                async def sent() -> bool:
                    clock.advance(timedelta(seconds=5))  # the retry's backoff passes
                    return len(sms.sent) == 1

                await until(sent, timeout=60)
                await until(lambda: _all_sent(runtime), timeout=30)
                (message,) = await rows(runtime, Message, Message.direction == "out")
                assert message.delivery_status == "sent"
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)


async def test_a_web_chat_reply_resent_after_a_crash_reaches_the_visitor_once(
    tmp_path: Path, db_url: str
) -> None:
    """A web-chat reply whose push committed but whose sender died before recording it:
    recovery finds it on the visitor's stream and does not push it again (before, the
    visitor's stream carried it twice: two sequence numbers, one message id)."""
    from channels.webchat import WebChatChannel, new_visitor_token, visitor_address
    from router.events import visitor_stream
    from router.models import StreamEvent
    from router.outbox import _load_claimed
    from tests.support import WEB_CHANNELS

    settings = make_settings(tmp_path / "conf", db_url, channels=WEB_CHANNELS)
    async with started_runtime(settings) as runtime:
        web = runtime.channels["web"]
        assert isinstance(web, WebChatChannel)
        address = visitor_address(new_visitor_token(b"k" * 32))
        assert address is not None
        outcomes = await runtime.ingest("web", [web.inbound(address, str(uuid4()), "hello")])
        await runtime.after_ingest(outcomes)
        await settle(runtime)
        (row,) = await rows(runtime, Outbox)  # the welcome, to the visitor
        (job,) = await runtime.db.read(_load_claimed, [row.id], runtime.clock.now())
        await web.send(job.message)  # the dead process's push did land

        def died_inside_the_send(tx: Tx) -> None:
            tx.execute(
                update(Outbox)
                .where(Outbox.id == row.id)
                .values(state="sending", claimed_by="dead-process", claimed_at=tx.now)
            )

        await runtime.db.write(died_inside_the_send)
        assert await runtime.outbox.recover_uncertain() == 1
        await runtime.outbox.process_due()
        web.uncertain_policy = UncertainPolicy.RESEND  # type: ignore[misc]  # an admin's choice
        await runtime.db.write(died_inside_the_send)
        await runtime.outbox.recover_uncertain()
        await runtime.outbox.process_due()
        (after,) = await rows(runtime, Outbox)
        events = [
            e
            for e in await rows(runtime, StreamEvent, StreamEvent.stream == visitor_stream(address))
            if e.type == "message"
        ]
        assert after.state == "sent"
        assert len(events) == 1  # once, whatever the policy
