"""The ingest pipeline through the fake channel, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from adapters.clock import FakeClock
from channels.base import InboundMessage, Reject, Sender, StatusUpdate
from router.models import (
    Contact,
    ContactIdentity,
    Conversation,
    ConversationEvent,
    Message,
    Outbox,
    Quarantine,
    RoutingDecision,
)
from router.runtime import Runtime
from tests.support import post_fake, signed


async def rows(runtime: Runtime, model: Any, *where: Any) -> list[Any]:
    return await runtime.db.read(
        lambda c: list(c.execute(select(model).where(*where).order_by(model.id)))
    )


async def count(runtime: Runtime, model: Any, *where: Any) -> int:
    return int(
        await runtime.db.read(
            lambda c: c.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
        )
    )


async def settle(runtime: Runtime) -> None:
    """Let background routing finish (it runs after the webhook's response)."""
    await runtime.background.idle(timeout=20)


async def test_message_is_persisted_routed_and_answered(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    response = await post_fake(
        client,
        "sms",
        {"id": "m1", "from": "+4917012345678", "text": "I want a REFUND", "name": "Ann"},
    )
    assert response.status_code == 200 and response.json() == {"ok": True}
    await settle(runtime)
    (conversation,) = await rows(runtime, Conversation)
    assert (conversation.state, conversation.queue, conversation.priority, conversation.tags) == (
        "queued",
        "billing",
        2,
        ["refund"],
    )
    assert conversation.required_skills == {"billing": 3}
    (decision,) = await rows(runtime, RoutingDecision)
    assert decision.ruleset_version == runtime.rules.ruleset.version
    assert (
        decision.decision["rule"] == "refund"
        and decision.facts["message.text"] == "I want a REFUND"
    )
    assert (
        decision.facts["channel"] == "sms"
        and decision.facts["inbox"] == "sms"
        and decision.facts["contact.name"] == "Ann"
    )
    kinds = [e.kind for e in await rows(runtime, ConversationEvent)]
    assert kinds == ["created", "message_in", "routed", "queued"]


async def test_duplicates_are_stored_once(runtime: Runtime, client: httpx.AsyncClient) -> None:
    message = {"id": "dup-1", "from": "+4917012345678", "text": "hello"}
    for _ in range(3):
        assert (await post_fake(client, "sms", message)).status_code == 200
    # the same delivery arriving concurrently, too
    await asyncio.gather(*(post_fake(client, "sms", {**message, "id": "dup-2"}) for _ in range(5)))
    await settle(runtime)
    assert await count(runtime, Message, Message.direction == "in") == 2
    assert await count(runtime, Conversation) == 1


async def test_same_identity_is_one_contact_and_one_open_conversation(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await asyncio.gather(
        *(
            post_fake(client, "sms", {"id": f"c{i}", "from": "+4917011111111", "text": f"msg {i}"})
            for i in range(10)
        )
    )
    await post_fake(
        client, "sms", {"id": "other", "from": "+4917022222222", "text": "someone else"}
    )
    await settle(runtime)
    assert await count(runtime, Contact) == 2
    conversations = await rows(runtime, Conversation)
    assert len(conversations) == 2
    first = next(c for c in conversations if c.contact_id == conversations[0].contact_id)
    assert (
        await count(
            runtime, Message, Message.conversation_id == first.id, Message.direction == "in"
        )
        == 10
    )


async def test_join_open_continues_across_inboxes_and_per_channel_does_not(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await post_fake(client, "sms", {"id": "s1", "from": "+4917033333333", "text": "by sms"})
    await post_fake(
        client, "wa", {"id": "w1", "from": "+4917033333333", "text": "by whatsapp"}
    )  # join_open: same conversation
    await post_fake(
        client, "mail", {"id": "e1", "from": "+4917033333333", "text": "by mail"}
    )  # per_channel: its own
    await settle(runtime)
    conversations = await rows(runtime, Conversation)
    assert len(conversations) == 2
    assert {c.channel for c in conversations} == {"sms", "email"}
    sms_conversation = next(c for c in conversations if c.channel == "sms")
    assert await count(runtime, Message, Message.conversation_id == sms_conversation.id) >= 2


async def test_unverified_identities_never_link(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await post_fake(client, "sms", {"id": "v1", "from": "+4917044444444", "text": "hi"})
    await post_fake(
        client,
        "mail",
        {
            "id": "u1",
            "from": "ann@example.com",
            "kind": "email",
            "verified": False,
            "text": "hi",
            "hints": {"phone": "+4917044444444"},
        },
    )
    await settle(runtime)
    identities = await rows(runtime, ContactIdentity)
    assert len({i.contact_id for i in identities}) == 2
    assert [(i.kind, i.verified) for i in identities] == [("phone", True), ("email", False)]


async def test_resolved_conversation_reopens_inside_the_window_and_is_routed_again(
    runtime: Runtime, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await post_fake(
        client, "mail", {"id": "r1", "from": "bob@example.com", "kind": "email", "text": "hello"}
    )
    await settle(runtime)
    (conversation,) = await rows(runtime, Conversation)
    await runtime.db.write(
        lambda tx: tx.execute(update(Conversation).values(state="resolved", resolved_at=tx.now))
    )
    clock.advance(timedelta(minutes=30))
    await post_fake(
        client,
        "mail",
        {"id": "r2", "from": "bob@example.com", "kind": "email", "text": "refund please"},
    )
    await settle(runtime)
    (reopened,) = await rows(runtime, Conversation)
    assert (
        reopened.id == conversation.id
        and reopened.state == "queued"
        and reopened.queue == "billing"
    )
    kinds = [
        e.kind
        for e in await rows(
            runtime, ConversationEvent, ConversationEvent.conversation_id == conversation.id
        )
    ]
    assert kinds[-4:] == ["reopened", "message_in", "routed", "queued"]
    decisions = await rows(runtime, RoutingDecision)
    assert [d.facts.get("conversation.reopened", False) for d in decisions] == [False, True]
    assert decisions[1].facts["message.text"] == "refund please"


async def test_after_the_reopen_window_a_new_conversation_links_to_the_old(
    runtime: Runtime, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await post_fake(
        client, "mail", {"id": "o1", "from": "cy@example.com", "kind": "email", "text": "hello"}
    )
    await settle(runtime)
    await runtime.db.write(
        lambda tx: tx.execute(update(Conversation).values(state="resolved", resolved_at=tx.now))
    )
    clock.advance(timedelta(hours=2))  # the mail inbox's reopen window is 1h
    await post_fake(
        client, "mail", {"id": "o2", "from": "cy@example.com", "kind": "email", "text": "again"}
    )
    await settle(runtime)
    old, new = await rows(runtime, Conversation)
    assert (old.state, new.state, new.previous_id) == ("resolved", "queued", old.id)


async def test_auto_reply_goes_out_once_per_conversation(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await post_fake(
        client, "sms", {"id": "a1", "from": "+4917055555555", "text": "hello", "name": "Dee"}
    )
    await settle(runtime)
    await post_fake(client, "sms", {"id": "a2", "from": "+4917055555555", "text": "anyone?"})
    await settle(runtime)
    (reply,) = await rows(runtime, Message, Message.direction == "out")
    assert (reply.text, reply.is_auto, reply.author) == (
        "Hi Dee, thanks for writing to us.",
        True,
        "system",
    )
    assert await count(runtime, Outbox) == 1
    await runtime.outbox.process_due()
    channel = runtime.channels["sms"]
    assert [m.text for m in channel.sent] == ["Hi Dee, thanks for writing to us."]  # type: ignore[attr-defined]
    (sent,) = await rows(runtime, Message, Message.direction == "out")
    assert sent.delivery_status == "sent" and sent.external_id.startswith("fake-sms-")


async def test_bad_signature_is_refused_and_nothing_is_stored(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    body, headers = signed(
        {"messages": [{"id": "x1", "from": "+4917066666666", "text": "hi"}]}, secret="wrong"
    )
    assert (
        await client.post("/webhooks/fake/sms", content=body, headers=headers)
    ).status_code == 403
    body, headers = signed({"messages": [{"id": "x1", "from": "+4917066666666", "text": "hi"}]})
    headers.pop("x-fake-signature")
    assert (
        await client.post("/webhooks/fake/sms", content=body, headers=headers)
    ).status_code == 403
    body, headers = signed({"messages": [{"id": "x1", "from": "+4917066666666", "text": "hi"}]})
    assert (
        await client.post("/webhooks/fake/sms", content=body + b" ", headers=headers)
    ).status_code == 403
    assert (
        await count(runtime, Message) == 0
        and await count(runtime, Contact) == 0
        and await count(runtime, Quarantine) == 0
    )
    assert (
        b'omniroute_webhook_rejected_total{provider="fake",reason="signature"} 3.0'
        in runtime.metrics.render()
    )


async def test_unknown_payload_is_ignored_and_a_bad_item_is_quarantined_while_the_rest_go_on(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    body, headers = signed({"type": "something_new", "data": [1, 2]})
    assert (
        await client.post("/webhooks/fake/sms", content=body, headers=headers)
    ).status_code == 200
    response = await post_fake(
        client,
        "sms",
        {"id": "g1", "from": "+4917077777777", "text": "good"},
        {"no": "id"},
        {"id": "g2", "from": "+4917077777777", "text": 5},
        {"id": "g3", "from": "+4917077777777", "text": "also good"},
    )
    assert response.status_code == 200
    await settle(runtime)
    assert [m.external_id for m in await rows(runtime, Message, Message.direction == "in")] == [
        "g1",
        "g3",
    ]
    reasons = [q.reason for q in await rows(runtime, Quarantine)]
    assert reasons == ["message without string id and from", "text is not a string"]


async def test_unknown_inbox_is_404(client: httpx.AsyncClient) -> None:
    body, headers = signed({"messages": []})
    assert (
        await client.post("/webhooks/fake/nope", content=body, headers=headers)
    ).status_code == 404


async def test_routing_that_fails_in_the_ingest_transaction_is_done_after_it(
    runtime: Runtime, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a new conversation is routed and offered in its ingest's commit (the
    webhook's answer finds it routed). If that part fails, the message is still stored and
    ``after_ingest`` routes it. PostgreSQL always routes after the ingest."""
    if runtime.db.dialect != "sqlite":
        assert runtime.pipeline.then is None
        return
    response = await post_fake(client, "sms", {"id": "f1", "from": "+4917000000001", "text": "hi"})
    assert response.status_code == 200
    (conversation,) = await rows(runtime, Conversation)
    assert conversation.state != "new" and conversation.routing_decision_id is not None

    def fail(tx: Any) -> bool:
        raise RuntimeError("routing broke")

    monkeypatch.setattr(runtime.pipeline, "then", fail)
    response = await post_fake(client, "sms", {"id": "f2", "from": "+4917000000002", "text": "hi"})
    assert response.status_code == 200
    await settle(runtime)
    assert await count(runtime, Message, Message.external_id == "f2") == 1
    assert await count(runtime, Conversation, Conversation.state == "new") == 0
    assert await count(runtime, RoutingDecision) == 2


async def test_reused_ids_rejects_and_reports_on_nothing_are_each_kept_once(
    runtime: Runtime,
) -> None:
    """An external_id seen again is a duplicate, unless both copies carry fingerprints that
    differ (a sender reusing an id): that one is kept under ``<id>#<fingerprint>``. A
    rejected item with a key is quarantined once; a status that names none of our messages
    keeps its ``unmatched`` item in quarantine (a bounce never vanishes)."""
    sender = Sender("email", "kim@example.net", verified=False)

    def message(fingerprint: str | None, text: str) -> InboundMessage:
        return InboundMessage("mid:a@x", sender, text, fingerprint=fingerprint)

    for item in (message("f1", "one"), message("f1", "one again"), message("f2", "two")):
        await runtime.ingest("mail", [item])
    await runtime.ingest("mail", [message("f2", "two again"), message(None, "no fingerprint")])
    stored = await rows(runtime, Message, Message.direction == "in")
    assert [(m.external_id, m.text) for m in stored] == [("mid:a@x", "one"), ("mid:a@x#f2", "two")]

    bounce = Reject("a bounce naming nothing of ours", b"raw bounce", "mid:bounce@x")
    for item in [
        Reject("cannot parse", b"raw 1", "mid:bad@x", "f1"),
        Reject("cannot parse", b"raw 1 again", "mid:bad@x", "f1"),
        Reject("cannot parse", b"raw 2", "mid:bad@x", "f2"),  # another mail, same id
        Reject("no key", b"raw"),
        Reject("no key", b"raw"),  # nothing to recognise it by: kept again
        StatusUpdate("<never-sent@x>", "failed", "bounced", unmatched=bounce),
        StatusUpdate("<never-sent@x>", "failed", "bounced", unmatched=bounce),
    ]:
        await runtime.ingest("mail", [item])
    kept = await rows(runtime, Quarantine)
    assert [(q.reason, q.raw, q.external_id) for q in kept] == [
        ("cannot parse", b"raw 1", "mid:bad@x"),
        ("cannot parse", b"raw 2", "mid:bad@x"),
        ("no key", b"raw", None),
        ("no key", b"raw", None),
        ("a bounce naming nothing of ours", b"raw bounce", "mid:bounce@x"),
    ]
