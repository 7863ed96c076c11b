"""The outbox state machine: retries with backoff, permanent failures, uncertain sends."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from adapters.clock import FakeClock
from channels.base import OutboundMessage, SendReceipt, TemporarySendError, UncertainPolicy
from channels.fake import FakeChannel
from router.models import Message, Outbox, Process
from router.runtime import Runtime
from router.serialize import message_payload
from tests.router.test_pipeline import rows, settle
from tests.support import post_fake


async def conversation_with_reply(
    runtime: Runtime, client: httpx.AsyncClient, sender: str = "+4917012340000"
) -> Any:
    """A routed conversation whose welcome auto-reply is queued in the outbox."""
    await post_fake(client, "sms", {"id": f"in-{sender}", "from": sender, "text": "hello"})
    await settle(runtime)
    (row,) = await rows(runtime, Outbox)
    return row


def fake(runtime: Runtime, slug: str = "sms") -> FakeChannel:
    channel = runtime.channels[slug]
    assert isinstance(channel, FakeChannel)
    return channel


async def test_temporary_failures_are_retried_with_backoff_until_sent(
    runtime: Runtime, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await conversation_with_reply(runtime, client)
    fake(runtime).failures_left = 2
    assert await runtime.outbox.process_due() == 1
    (row,) = await rows(runtime, Outbox)
    assert (row.state, row.attempts, row.last_error) == ("queued", 1, "fake temporary failure")
    assert await runtime.outbox.process_due() == 0  # not due yet: the backoff is in the future
    clock.advance(timedelta(minutes=10))
    await runtime.outbox.process_due()
    clock.advance(timedelta(minutes=10))
    await runtime.outbox.process_due()
    (row,) = await rows(runtime, Outbox)
    assert (row.state, row.attempts) == ("sent", 3)
    assert len(fake(runtime).sent) == 1


async def test_permanent_failure_marks_the_message_failed_with_the_reason(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await conversation_with_reply(runtime, client)
    fake(runtime).permanent_failure = "recipient blocked"
    await runtime.outbox.process_due()
    (row,) = await rows(runtime, Outbox)
    (message,) = await rows(runtime, Message, Message.direction == "out")
    assert (row.state, message.delivery_status, message.error) == (
        "failed",
        "failed",
        "recipient blocked",
    )


async def test_attempts_are_bounded(
    runtime: Runtime, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await conversation_with_reply(runtime, client)
    fake(runtime).failures_left = 1000
    for _ in range(runtime.settings.outbox_max_attempts + 2):
        await runtime.outbox.process_due()
        clock.advance(timedelta(hours=1))
    (row,) = await rows(runtime, Outbox)
    assert row.state == "failed" and row.attempts == runtime.settings.outbox_max_attempts
    assert row.last_error.startswith(f"gave up after {row.attempts} attempts")


async def crash_inside_send(runtime: Runtime, outbox_id: int) -> None:
    """As if a process (now dead) claimed the row and died inside the provider call."""

    def claim(tx: Any) -> None:
        tx.execute(
            update(Outbox)
            .where(Outbox.id == outbox_id)
            .values(state="sending", claimed_by="dead-process", claimed_at=tx.now, attempts=1)
        )
        tx.execute(update(Message).values(delivery_status="sending"))

    await runtime.db.write(claim)


@pytest.mark.parametrize(
    ("policy", "provider_has_it", "state", "delivery", "sent_again"),
    [
        (UncertainPolicy.RESEND, False, "sent", "sent", 1),
        (UncertainPolicy.CHECK, True, "sent", "sent", 0),
        (UncertainPolicy.CHECK, False, "sent", "sent", 1),
        (UncertainPolicy.ASK, False, "uncertain", "uncertain", 0),
    ],
)
async def test_uncertain_sends_follow_the_inbox_policy(
    runtime: Runtime,
    client: httpx.AsyncClient,
    policy: UncertainPolicy,
    provider_has_it: bool,
    state: str,
    delivery: str,
    sent_again: int,
) -> None:
    row = await conversation_with_reply(runtime, client)
    channel = fake(runtime)
    channel.uncertain_policy = policy  # type: ignore[misc]
    if provider_has_it:
        await channel.send(
            await _outbound(runtime, row.message_id)
        )  # the dead process's send did go out
    before = len(channel.sent)
    await crash_inside_send(runtime, row.id)
    assert await runtime.outbox.recover_uncertain() == 1
    await runtime.outbox.process_due()
    (after,) = await rows(runtime, Outbox)
    (message,) = await rows(runtime, Message, Message.direction == "out")
    assert (after.state, message.delivery_status, len(channel.sent) - before) == (
        state,
        delivery,
        sent_again,
    )
    assert after.uncertain_resends == sent_again  # every resend after a crash is counted (reported)
    if policy is UncertainPolicy.ASK:
        assert message.error == "may not have been sent; resend?"


@pytest.mark.parametrize("interruption", ["killed after marking", "provider check failed"])
async def test_a_recovery_cut_short_is_finished_by_the_next_one(
    runtime: Runtime,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    interruption: str,
) -> None:
    """A row marked uncertain whose policy was never applied (the recovering process was
    killed in between, or the provider could not be asked) is taken up again: it does not
    stay uncertain for good (bench/crash.py found 63 of 200 left so)."""
    row = await conversation_with_reply(runtime, client)
    channel = fake(runtime)
    channel.uncertain_policy = UncertainPolicy.CHECK  # type: ignore[misc]
    await crash_inside_send(runtime, row.id)
    if interruption == "killed after marking":
        from router.outbox import find_stale_sends

        assert await runtime.db.write(find_stale_sends, "me", 30.0) == [row.id]
    else:

        async def unreachable(*_: Any) -> Any:
            raise httpx.ConnectError("provider down")

        monkeypatch.setattr(channel, "find_sent", unreachable)
        assert await runtime.outbox.recover_uncertain() == 1
        monkeypatch.undo()
    (between,) = await rows(runtime, Outbox)
    assert between.state == "uncertain"
    assert await runtime.outbox.recover_uncertain() == 1  # the next worker step
    await runtime.outbox.process_due()
    (after,) = await rows(runtime, Outbox)
    assert (after.state, after.uncertain_resends, len(channel.sent)) == ("sent", 1, 1)
    assert await runtime.outbox.recover_uncertain() == 0  # nothing left waiting


async def _outbound(runtime: Runtime, message_id: int) -> Any:
    from router.outbox import _load_claimed

    outbox_id = await runtime.db.read(
        lambda c: c.execute(select(Outbox.id).where(Outbox.message_id == message_id)).scalar_one()
    )
    (job,) = await runtime.db.read(_load_claimed, [outbox_id], runtime.clock.now())
    return job.message


async def test_a_live_process_claim_is_not_taken_over(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    row = await conversation_with_reply(runtime, client)

    def other_live_process(tx: Any) -> None:
        tx.execute(
            Process.__table__.insert().values(
                id="alive", host="h", pid=1, started_at=tx.now, heartbeat_at=tx.now, last_error={}
            )
        )
        tx.execute(
            update(Outbox)
            .where(Outbox.id == row.id)
            .values(state="sending", claimed_by="alive", claimed_at=tx.now)
        )

    await runtime.db.write(other_live_process)
    assert await runtime.outbox.recover_uncertain() == 0
    (after,) = await rows(runtime, Outbox)
    assert after.state == "sending"


async def test_admin_can_resend_an_uncertain_message(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    from tests.router.test_api import admin_token

    row = await conversation_with_reply(runtime, client)
    fake(runtime).uncertain_policy = UncertainPolicy.ASK  # type: ignore[misc]
    await crash_inside_send(runtime, row.id)
    await runtime.outbox.recover_uncertain()
    token = await admin_token(runtime)
    report = (
        await client.get("/api/admin/outbox", headers={"authorization": f"Bearer {token}"})
    ).json()
    assert [(r["id"], r["state"]) for r in report] == [(row.id, "uncertain")]
    response = await client.post(
        f"/api/admin/outbox/{row.id}/resend", headers={"authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    await runtime.outbox.process_due()
    (after,) = await rows(runtime, Outbox)
    assert (after.state, after.uncertain_resends, len(fake(runtime).sent)) == ("sent", 1, 1)


async def test_a_sends_progress_is_kept_with_the_row_and_its_possible_duplicates_counted(
    runtime: Runtime,
    client: httpx.AsyncClient,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a channel's attempt leaves to resume from travels with the outbox row (any
    process may make the next attempt); a receipt's uncertain resends are counted on the
    row and flag the message."""
    await conversation_with_reply(runtime, client)
    channel = fake(runtime)
    seen: list[Any] = []

    async def send(message: OutboundMessage) -> SendReceipt:
        seen.append(message.progress)
        if len(seen) == 1:
            raise TemporarySendError("unclear", progress={"looked_up": False, "sids": []})
        return SendReceipt("p-1", uncertain_resends=1)

    monkeypatch.setattr(channel, "send", send)
    await runtime.outbox.process_due()
    (between,) = await rows(runtime, Outbox)
    assert between.payload["progress"] == {"looked_up": False, "sids": []}
    clock.advance(timedelta(minutes=10))
    await runtime.outbox.process_due()
    assert seen == [None, {"looked_up": False, "sids": []}]
    (after,) = await rows(runtime, Outbox)
    (message,) = await rows(runtime, Message, Message.direction == "out")
    assert (after.state, after.uncertain_resends) == ("sent", 1)
    assert message.data["possible_duplicate"] is True
    assert message_payload(message, channel.channel_id)["possible_duplicate"] is True


async def test_an_uncertain_send_whose_provider_cannot_be_asked_is_resent_in_the_end(
    runtime: Runtime, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Policy check, and the provider's look-up keeps failing: after a bounded number of
    recoveries the send is resent, counted as a possible duplicate, instead of staying
    uncertain for good (before, every recovery left it so)."""
    from router.outbox import CHECKS_BEFORE_RESEND

    row = await conversation_with_reply(runtime, client)
    channel = fake(runtime)
    channel.uncertain_policy = UncertainPolicy.CHECK  # type: ignore[misc]
    await crash_inside_send(runtime, row.id)

    async def unreachable(*_: Any) -> Any:
        raise httpx.ConnectError("provider down")

    monkeypatch.setattr(channel, "find_sent", unreachable)
    for _ in range(CHECKS_BEFORE_RESEND - 1):
        await runtime.outbox.recover_uncertain()
        (between,) = await rows(runtime, Outbox)
        assert between.state == "uncertain"
    await runtime.outbox.recover_uncertain()
    await runtime.outbox.process_due()
    (after,) = await rows(runtime, Outbox)
    assert (after.state, after.uncertain_resends, len(channel.sent)) == ("sent", 1, 1)
