"""One customer across channels, through the API on SQLite and PostgreSQL: unverified claims
kept apart from verified owners, merge (suggested matches for agents, any pair for
supervisors) and split, the reply channel, the ``history.*`` routing facts, the timeline of a
merged contact, export and erasure; a merge racing inbound messages on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from adapters.clock import FakeClock
from channels.base import InboundMessage, Sender
from channels.email import sender_proof
from channels.twilio_voice import TwilioVoiceChannel
from router.auth import create_user
from router.channels_config import load_channels
from router.db import Tx
from router.exceptions import InvalidInput
from router.messaging import agent_write
from router.models import (
    Agent,
    Contact,
    ContactIdentity,
    ContactLink,
    Conversation,
    ConversationEvent,
    Message,
    RoutingDecision,
    StreamEvent,
)
from router.runtime import Runtime
from router.types import EventKind
from routing_rules import RulesError
from tests.router.test_live import make_agent
from tests.router.test_pipeline import settle
from tests.support import (
    CHANNELS,
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
  returning: {}
  elsewhere: {}
rules:
  - id: open-elsewhere
    order: 20
    when: {history.open_elsewhere: {gt: 0}}
    then: {queue: elsewhere}
  - id: returning
    order: 10
    when: {history.conversations: {gt: 0}, history.last_queue: general}
    then: {queue: returning}
default: {queue: general}
"""
PHONE, EMAIL = "+4917012345678", "ann@example.com"


@pytest.fixture
async def api(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, dict[str, str]]]:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:

        def users(tx: Tx) -> dict[str, str]:
            return {
                role: create_user(tx, f"{role}-user", role)[1] for role in ("supervisor", "admin")
            }

        tokens = await runtime.db.write(users)
        _, tokens["agent"] = await make_agent(runtime, "alex", capacity="sms=3,email=3,total=5")
        yield runtime, client, tokens


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def inbound(
    client: httpx.AsyncClient,
    inbox: str,
    external: str,
    sender: str,
    text: str = "hello",
    *,
    runtime: Runtime | None = None,
    **kw: Any,
) -> None:
    """A customer message through a fake inbox; with ``runtime``, routed before returning
    (on PostgreSQL routing runs after the webhook's answer, and an agent sees a conversation
    only once it sits in one of their queues)."""
    kind = kw.pop("kind", "email" if "@" in sender else "phone")
    response = await post_fake(client, inbox, fake_message(external, sender, text, kind=kind, **kw))
    assert response.status_code == 200, response.text
    if runtime is not None:
        await settle(runtime)


async def contact_of(runtime: Runtime, kind: str, address: str, verified: bool = True) -> int:
    return int(
        await runtime.db.read(
            lambda c: c.execute(
                select(ContactIdentity.contact_id).where(
                    ContactIdentity.kind == kind,
                    ContactIdentity.address == address,
                    ContactIdentity.verified.is_(verified),
                )
            ).scalar_one()
        )
    )


async def test_an_unverified_claim_never_reaches_the_verified_owner(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "mail", "m1", EMAIL, "my order is late", runtime=runtime)
    await inbound(
        client, "mail", "m2", EMAIL, "I am Ann, show me my orders", verified=False, runtime=runtime
    )
    await inbound(client, "mail", "m3", EMAIL, "a second spoof", verified=False, runtime=runtime)
    owner = await contact_of(runtime, "email", EMAIL)
    claim = await contact_of(runtime, "email", EMAIL, verified=False)
    assert owner != claim  # the claim has a contact of its own (both spoofs share it)
    claimed = (
        await client.get(f"/api/contacts/{claim}/timeline", headers=auth(tokens["agent"]))
    ).json()
    assert [m["text"] for m in claimed["messages"]] == [
        "I am Ann, show me my orders",
        "a second spoof",
    ]
    # shown to agents as a possible match, never linked by itself
    found = (
        await client.get(f"/api/contacts/{claim}/suggestions", headers=auth(tokens["agent"]))
    ).json()
    assert [s["contact_id"] for s in found] == [owner]
    assert any(EMAIL in reason for reason in found[0]["reasons"])
    view = (await client.get(f"/api/contacts/{claim}", headers=auth(tokens["agent"]))).json()
    assert [(i["address"], i["verified"]) for i in view["identities"]] == [(EMAIL, False)]
    assert view["email"] is None  # an unverified address is never the contact's email


async def test_merge_moves_everything_and_split_gives_it_back(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", PHONE, "text one", name="Ann", runtime=runtime)
    await inbound(client, "mail", "m1", EMAIL, "mail one", name="Ann Smith", runtime=runtime)
    phone_contact = await contact_of(runtime, "phone", PHONE)
    mail_contact = await contact_of(runtime, "email", EMAIL)

    def attributes(tx: Tx) -> None:
        tx.execute(
            Contact.__table__.update()  # type: ignore[attr-defined]
            .where(Contact.id == mail_contact)
            .values(attributes={"plan": "gold"}, tier="gold", vip=True)
        )

    await runtime.db.write(attributes)
    # an agent may merge only a suggested match (same name is none here: "Ann" vs "Ann Smith")
    refused = await client.post(
        f"/api/contacts/{phone_contact}/merge",
        json={"from_contact": mail_contact},
        headers=auth(tokens["agent"]),
    )
    assert refused.status_code == 403, refused.text
    assert await contact_of(runtime, "email", EMAIL) == mail_contact
    merged = await client.post(
        f"/api/contacts/{phone_contact}/merge",
        json={"from_contact": mail_contact, "reason": "same customer, confirmed on the phone"},
        headers=auth(tokens["supervisor"]),
    )
    assert merged.status_code == 200, merged.text
    result = merged.json()
    assert result["conflicts"] == {"name": {"kept": "Ann", "dropped": "Ann Smith"}}
    view = (
        await client.get(f"/api/contacts/{phone_contact}", headers=auth(tokens["agent"]))
    ).json()
    assert sorted(i["address"] for i in view["identities"]) == sorted([PHONE, EMAIL])
    assert (view["tier"], view["vip"], view["attributes"]) == ("gold", True, {"plan": "gold"})
    gone = (await client.get(f"/api/contacts/{mail_contact}", headers=auth(tokens["agent"]))).json()
    assert gone["merged_into_id"] == phone_contact
    # one timeline, whichever id is asked for; the merge is an event of the moved conversation
    for asked in (phone_contact, mail_contact):
        timeline = (
            await client.get(f"/api/contacts/{asked}/timeline", headers=auth(tokens["agent"]))
        ).json()
        assert [m["text"] for m in timeline["messages"]] == ["text one", "mail one"]
        assert [e["kind"] for e in timeline["events"]].count("merged") == 1
    # new mail after the merge lands on the survivor
    await inbound(client, "mail", "m2", EMAIL, "mail two", runtime=runtime)
    assert await contact_of(runtime, "email", EMAIL) == phone_contact
    links = (
        await client.get(f"/api/contacts/{phone_contact}/links", headers=auth(tokens["agent"]))
    ).json()
    assert [(link["action"], link["reason"]) for link in links] == [
        ("merge", "same customer, confirmed on the phone")
    ]
    # split: the email identity and the conversation it started go back to a contact of their own
    email_identity = next(i["id"] for i in view["identities"] if i["address"] == EMAIL)
    denied = await client.post(
        f"/api/contacts/{phone_contact}/identities/{email_identity}/split",
        headers=auth(tokens["agent"]),
    )
    assert denied.status_code == 403
    split = await client.post(
        f"/api/contacts/{phone_contact}/identities/{email_identity}/split",
        json={"reason": "not the same person after all"},
        headers=auth(tokens["supervisor"]),
    )
    assert split.status_code == 200, split.text
    alone = split.json()["contact_id"]
    assert await contact_of(runtime, "email", EMAIL) == alone
    mail_timeline = (
        await client.get(f"/api/contacts/{alone}/timeline", headers=auth(tokens["agent"]))
    ).json()
    assert [m["text"] for m in mail_timeline["messages"]] == ["mail one", "mail two"]
    assert "split" in [e["kind"] for e in mail_timeline["events"]]
    phone_timeline = (
        await client.get(f"/api/contacts/{phone_contact}/timeline", headers=auth(tokens["agent"]))
    ).json()
    assert [m["text"] for m in phone_timeline["messages"]] == ["text one"]
    restored = (await client.get(f"/api/contacts/{alone}", headers=auth(tokens["agent"]))).json()
    assert restored["name"] == "Ann Smith"  # the merged contact's own fields come back
    # nothing lost or doubled on the way
    assert (
        await runtime.db.read(
            lambda c: c.execute(select(func.count()).select_from(Message)).scalar_one()
        )
        == 3
    )


async def test_an_agent_merges_a_suggested_match(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", PHONE, "hi", name="Ann Smith", runtime=runtime)
    await inbound(client, "mail", "m1", EMAIL, "hello", name="Ann Smith", runtime=runtime)
    phone_contact = await contact_of(runtime, "phone", PHONE)
    mail_contact = await contact_of(runtime, "email", EMAIL)
    found = (
        await client.get(
            f"/api/contacts/{phone_contact}/suggestions", headers=auth(tokens["agent"])
        )
    ).json()
    assert found == [
        {"contact_id": mail_contact, "name": "Ann Smith", "reasons": ["same name Ann Smith"]}
    ]
    merged = await client.post(
        f"/api/contacts/{phone_contact}/merge",
        json={"from_contact": mail_contact},
        headers=auth(tokens["agent"]),
    )
    assert merged.status_code == 200, merged.text
    again = await client.post(
        f"/api/contacts/{phone_contact}/merge",
        json={"from_contact": mail_contact},
        headers=auth(tokens["supervisor"]),
    )
    assert again.status_code == 409 and "merged into" in again.json()["message"]
    itself = await client.post(
        f"/api/contacts/{phone_contact}/merge",
        json={"from_contact": phone_contact},
        headers=auth(tokens["supervisor"]),
    )
    assert itself.status_code == 422


async def test_routing_sees_the_contacts_history_on_every_channel(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", PHONE, "first", runtime=runtime)
    await inbound(client, "mail", "m1", EMAIL, "by mail", runtime=runtime)
    await runtime.route_pending()
    phone_contact = await contact_of(runtime, "phone", PHONE)
    mail_contact = await contact_of(runtime, "email", EMAIL)
    response = await client.post(
        f"/api/contacts/{phone_contact}/merge",
        json={"from_contact": mail_contact},
        headers=auth(tokens["supervisor"]),
    )
    assert response.status_code == 200

    def resolve_mail(tx: Tx) -> None:  # resolved long ago: the next mail starts a new one
        tx.execute(
            Conversation.__table__.update()  # type: ignore[attr-defined]
            .where(Conversation.channel == "email")
            .values(state="resolved", resolved_at=tx.now - timedelta(hours=2))
        )

    await runtime.db.write(resolve_mail)
    await inbound(client, "mail", "m2", EMAIL, "by mail again", runtime=runtime)
    await runtime.route_pending()

    def decisions(c: Any) -> list[tuple[str, str, dict[str, Any]]]:
        return [
            (row.channel, row.decision["queue"], row.facts)
            for row in c.execute(
                select(Conversation.channel, RoutingDecision.decision, RoutingDecision.facts)
                .join(Conversation, Conversation.id == RoutingDecision.conversation_id)
                .order_by(RoutingDecision.id)
            )
        ]

    (
        (sms, sms_queue, sms_facts),
        (_, first_queue, _),
        (mail, mail_queue, mail_facts),
    ) = await runtime.db.read(decisions)
    assert (sms, sms_queue, sms_facts["history.conversations"]) == ("sms", "general", 0)
    assert "history.last_queue" not in sms_facts and first_queue == "general"
    # the second mail conversation is routed after the merge: it sees the SMS and the first
    # mail, and the SMS conversation still open on another channel
    assert (mail, mail_queue) == ("email", "elsewhere")
    assert mail_facts["history.conversations"] == 2
    assert mail_facts["history.open_elsewhere"] == 1
    assert mail_facts["history.last_queue"] == "general"


async def test_replies_go_to_verified_identities_through_a_channel_that_reaches_them(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", PHONE, "call me back", runtime=runtime)
    await inbound(
        client, "wa", "w1", "+4917099999999", "whatsapp hello", kind="whatsapp", runtime=runtime
    )
    await inbound(
        client, "mail", "m1", "other@example.com", "unverified", verified=False, runtime=runtime
    )
    phone_contact = await contact_of(runtime, "phone", PHONE)
    for kind, address, verified in (
        ("whatsapp", "+4917099999999", True),
        ("email", "other@example.com", False),
    ):
        other = await contact_of(runtime, kind, address, verified)
        response = await client.post(
            f"/api/contacts/{phone_contact}/merge",
            json={"from_contact": other},
            headers=auth(tokens["supervisor"]),
        )
        assert response.status_code == 200
    conversation_id = await runtime.db.read(
        lambda c: c.execute(
            select(Message.conversation_id).where(Message.external_id == "s1")
        ).scalar_one()
    )
    identities = {
        (i.kind, i.verified): i.id
        for i in await runtime.db.read(
            lambda c: c.execute(
                select(ContactIdentity).where(ContactIdentity.contact_id == phone_contact)
            ).all()
        )
    }

    agent_id = await runtime.db.read(lambda c: c.execute(select(Agent.id)).scalar_one())

    def write(tx: Tx, **kw: Any) -> dict[str, Any]:
        return agent_write(tx, agent_id, conversation_id, "hello", supervisor=True, **kw)

    # an unverified identity that did not write in this conversation: refused, clearly
    with pytest.raises(InvalidInput, match="verified"):
        await runtime.db.write(write, identity_id=identities[("email", False)])
    # an SMS inbox cannot reach a WhatsApp identity
    with pytest.raises(InvalidInput, match="cannot send to a whatsapp"):
        await runtime.db.write(
            write, identity_id=identities[("whatsapp", True)], inbox_id=runtime.inbox_id_of("sms")
        )
    sent = await runtime.db.write(write, identity_id=identities[("whatsapp", True)])
    default = await runtime.db.write(write)
    rows = await runtime.db.read(
        lambda c: {
            m.id: (m.inbox_id, m.identity_id)
            for m in c.execute(select(Message).where(Message.direction == "out"))
        }
    )
    assert rows[sent["message_id"]] == (runtime.inbox_id_of("wa"), identities[("whatsapp", True)])
    assert rows[default["message_id"]] == (runtime.inbox_id_of("sms"), identities[("phone", True)])
    unknown = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"text": "x", "inbox": "nope"},
        headers=auth(tokens["agent"]),
    )
    assert unknown.status_code == 422 and 'no inbox \\"nope\\"' in unknown.text


async def test_each_message_carries_its_own_inbox_channel(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    """One conversation holding an SMS, a WhatsApp message and a WhatsApp reply: the
    timeline, the message endpoint and the agent's stream label each with its own channel,
    not the conversation's (sms)."""
    runtime, client, tokens = api
    await inbound(client, "sms", "s1", PHONE, "by sms", runtime=runtime)
    await inbound(client, "wa", "w1", PHONE, "by whatsapp", kind="whatsapp", runtime=runtime)
    conversations = await runtime.db.read(
        lambda c: c.execute(select(Conversation.id, Conversation.channel)).all()
    )
    assert len(conversations) == 1 and conversations[0].channel == "sms"
    conversation_id = int(conversations[0].id)
    agent_id = await runtime.db.read(lambda c: c.execute(select(Agent.id)).scalar_one())
    await runtime.assignment.assign(conversation_id, agent_id, by="test", override=True)
    reply = await runtime.db.write(
        lambda tx: agent_write(
            tx,
            agent_id,
            conversation_id,
            "answered by whatsapp",
            inbox_id=runtime.inbox_id_of("wa"),
        )
    )
    contact = await contact_of(runtime, "phone", PHONE)
    timeline = (
        await client.get(f"/api/contacts/{contact}/timeline", headers=auth(tokens["admin"]))
    ).json()
    assert [(m["text"], m["channel"]) for m in timeline["messages"]] == [
        ("by sms", "sms"),
        ("by whatsapp", "whatsapp"),
        ("answered by whatsapp", "whatsapp"),
    ]
    one = await client.get(f"/api/messages/{reply['message_id']}", headers=auth(tokens["admin"]))
    assert one.json()["channel"] == "whatsapp"
    streamed = await runtime.db.read(
        lambda c: [
            e.payload["message"]["channel"]
            for e in c.execute(
                select(StreamEvent).where(
                    StreamEvent.stream == f"agent:{agent_id}", StreamEvent.type == "message"
                )
            )
        ]
    )
    assert streamed == ["whatsapp"]


async def test_export_and_erase_a_contact(
    api: tuple[Runtime, httpx.AsyncClient, dict[str, str]],
) -> None:
    runtime, client, tokens = api
    await inbound(
        client, "sms", "s1", PHONE, "my secret address is 1 Main St", name="Ann", runtime=runtime
    )
    contact = await contact_of(runtime, "phone", PHONE)
    assert (
        await client.get(f"/api/contacts/{contact}/export", headers=auth(tokens["agent"]))
    ).status_code == 403
    exported = (
        await client.get(f"/api/contacts/{contact}/export", headers=auth(tokens["admin"]))
    ).json()
    assert exported["contact"]["name"] == "Ann"
    assert [m["text"] for m in exported["messages"]] == ["my secret address is 1 Main St"]
    assert [i["address"] for i in exported["identities"]] == [PHONE]
    erased = await client.post(
        f"/api/contacts/{contact}/erase",
        json={"reason": "GDPR art. 17 request #42"},
        headers=auth(tokens["admin"]),
    )
    assert erased.status_code == 200, erased.text
    assert (erased.json()["messages_redacted"], erased.json()["identities_removed"]) == (1, 1)
    after = (
        await client.get(f"/api/contacts/{contact}/export", headers=auth(tokens["admin"]))
    ).json()
    assert after["contact"]["name"] is None and after["contact"]["erased_at"]
    assert after["identities"] == [] and [m["text"] for m in after["messages"]] == [""]
    assert [(link["action"], link["reason"]) for link in after["links"]] == [
        ("erase", "GDPR art. 17 request #42")
    ]
    texts = await runtime.db.read(lambda c: c.execute(select(Message.text)).scalars().all())
    assert "my secret address is 1 Main St" not in texts
    # the same number writing again is a new contact, with nothing of the old one
    await inbound(client, "sms", "s2", PHONE, "hello again", runtime=runtime)
    assert await contact_of(runtime, "phone", PHONE) != contact
    twice = await client.post(f"/api/contacts/{contact}/erase", headers=auth(tokens["admin"]))
    assert twice.status_code == 409


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_merge_racing_inbound_messages_loses_and_doubles_nothing(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings) as runtime:
        sms, mail = runtime.inboxes["sms"], runtime.inboxes["mail"]
        from router.pipeline import ingest_message

        def one(tx: Tx, inbox: Any, msg: InboundMessage) -> None:
            ingest_message(tx, inbox, msg)

        await runtime.db.write(one, sms, InboundMessage("p0", Sender("phone", PHONE, True)))
        await runtime.db.write(one, mail, InboundMessage("e0", Sender("email", EMAIL, True)))
        phone_contact = await contact_of(runtime, "phone", PHONE)
        mail_contact = await contact_of(runtime, "email", EMAIL)
        from router.identity import merge_contacts

        async def flow(inbox: Any, kind: str, address: str, prefix: str) -> None:
            for i in range(1, 41):
                msg = InboundMessage(f"{prefix}{i}", Sender(kind, address, True), text=str(i))
                await runtime.db.write(one, inbox, msg)

        async def merge() -> None:
            await asyncio.sleep(0.05)
            await runtime.db.write(
                lambda tx: merge_contacts(tx, mail_contact, phone_contact, actor="system")
            )

        await asyncio.gather(
            flow(sms, "phone", PHONE, "p"),
            flow(mail, "email", EMAIL, "e"),
            flow(sms, "phone", PHONE, "q"),
            merge(),
        )

        def state(c: Any) -> dict[str, Any]:
            return {
                "messages": c.execute(select(func.count()).select_from(Message)).scalar_one(),
                "distinct": c.execute(
                    select(func.count(func.distinct(Message.external_id)))
                ).scalar_one(),
                "contacts": sorted(set(c.execute(select(Conversation.contact_id)).scalars())),
                "identities": sorted(set(c.execute(select(ContactIdentity.contact_id)).scalars())),
                "merged": c.execute(
                    select(func.count())
                    .select_from(ConversationEvent)
                    .where(ConversationEvent.kind == EventKind.MERGED.value)
                ).scalar_one(),
                "links": c.execute(select(func.count()).select_from(ContactLink)).scalar_one(),
            }

        final = await runtime.db.read(state)
        assert final["messages"] == final["distinct"] == 122  # 2 first + 3 x 40
        assert final["contacts"] == final["identities"] == [phone_contact]
        assert final["links"] == 1 and final["merged"] >= 1


@pytest.mark.parametrize(
    ("auth", "sender", "proof"),
    [
        ({"trusted": True, "dmarc": "pass"}, "ann@example.com", "dmarc"),
        (
            {"trusted": True, "dkim": "pass", "dkim_domain": "example.com"},
            "ann@example.com",
            "dkim",
        ),
        (
            {"trusted": True, "dkim": "pass", "dkim_domain": "example.com"},
            "ann@mail.example.com",
            "dkim",
        ),
        # a signature by another domain (a mailing list, an ESP) proves nothing about the From
        ({"trusted": True, "dkim": "pass", "dkim_domain": "esp.example"}, "ann@example.com", None),
        ({"trusted": True, "dkim": "pass", "dkim_domain": "ample.com"}, "ann@example.com", None),
        ({"trusted": False, "dmarc": "pass"}, "ann@example.com", None),  # not our MX
        ({"trusted": True, "dmarc": "fail"}, "ann@example.com", None),
        ({"trusted": True, "dmarc": "none"}, "ann@example.com", None),
        (None, "ann@example.com", None),
    ],
)
def test_an_email_sender_is_proven_only_by_our_own_mx(
    auth: dict[str, Any] | None, sender: str, proof: str | None
) -> None:
    assert sender_proof(auth, sender) == proof


@pytest.mark.parametrize(
    ("form", "verified"),
    [
        ({"From": "+14155550123", "StirVerstat": "TN-Validation-Passed-A"}, True),
        ({"From": "+14155550123", "StirVerstat": "TN-Validation-Passed-B"}, False),
        ({"From": "+14155550123", "StirVerstat": "TN-Validation-Failed-A"}, False),
        ({"From": "+14155550123"}, False),
    ],
)
def test_caller_id_is_verified_only_with_full_attestation(
    form: dict[str, str], verified: bool
) -> None:
    caller = TwilioVoiceChannel.caller({**form, "CallSid": "CA1"})
    assert (caller.address, caller.verified) == ("+14155550123", verified)


def test_code_inboxes_must_be_inboxes_of_the_right_channel() -> None:
    channels = CHANNELS + (
        "  web: {channel: webchat, provider: omniroute, verify_email_inbox: sms,"
        " verify_sms_inbox: nowhere}\n"
    )
    with pytest.raises(RulesError) as error:
        load_channels(channels.encode(), "channels.yaml")
    text = str(error.value)
    assert 'inboxes.web.verify_email_inbox: "sms" is not an email inbox here' in text
    assert 'inboxes.web.verify_sms_inbox: "nowhere" is not an sms inbox here' in text
