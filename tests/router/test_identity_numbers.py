"""One number, one customer (docs/identity.md): a number that writes by SMS (Twilio's signed
webhook) and by WhatsApp (Meta's signed webhook, the wa_id) is one contact with one
timeline, whichever comes first; contacts made apart before the rule are merged when the
number writes again, unless an admin split them; two first messages racing on PostgreSQL
still make one contact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import func, insert, select
from twilio.request_validator import RequestValidator

from adapters.clock import FakeClock
from router.auth import create_user
from router.db import Tx
from router.models import Contact, ContactIdentity, ContactLink, Conversation, Message
from router.runtime import Runtime
from tests.channels.test_twilio_sms import sms_params
from tests.fakes.meta import FakeGraphServer, meta_json_bytes, sign_meta, wa_text
from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilioServer
from tests.router.test_pipeline import settle
from tests.support import CHANNELS, client_for, make_settings, post_fake, started_runtime

TOKEN = "EAAG-test-wa-token"
SECRET = "app-secret-0123456789"
RULES = "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"

Both = tuple[Runtime, httpx.AsyncClient, FakeClock, str]


@pytest.fixture
async def both(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Both]:
    """A Twilio SMS inbox and a Meta WhatsApp inbox, each against its local fake."""
    with FakeTwilioServer() as twilio, FakeGraphServer(access_token=TOKEN) as graph:
        channels = {
            "version": 1,
            "meta_apps": {"main": {"app_secret": SECRET, "verify_token": "verify-me"}},
            "inboxes": {
                "tw": {
                    "channel": "sms",
                    "provider": "twilio",
                    "account_sid": DEFAULT_ACCOUNT_SID,
                    "auth_token": DEFAULT_AUTH_TOKEN,
                    "from_number": "+15550000000",
                    "api_base_url": twilio.url,
                },
                "wa": {
                    "channel": "whatsapp",
                    "provider": "meta",
                    "app": "main",
                    "phone_number_id": "106540352242922",
                    "access_token": TOKEN,
                    "api_base_url": graph.url,
                },
            },
        }
        settings = make_settings(
            tmp_path / "conf", db_url, rules=RULES, channels=json.dumps(channels)
        )
        async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
            _, admin = await runtime.db.write(create_user, "root", "admin")
            yield runtime, client, clock, str(admin)


async def sms(
    runtime: Runtime, client: httpx.AsyncClient, number: str, sid: str, text: str
) -> None:
    params = sms_params(text, "SM" + sid * 32, From=number)
    path = "/webhooks/twilio/tw/sms"
    url = runtime.settings.public_base_url.rstrip("/") + path
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-twilio-signature": RequestValidator(DEFAULT_AUTH_TOKEN).compute_signature(url, params),
    }
    response = await client.post(path, content=urlencode(params).encode(), headers=headers)
    assert response.status_code == 200


async def whatsapp(
    client: httpx.AsyncClient, clock: FakeClock, wa_id: str, wamid: str, text: str
) -> None:
    seconds = str(int(clock.now().timestamp()))
    body = meta_json_bytes(wa_text(text, wamid=wamid, timestamp=seconds, wa_id=wa_id))
    headers = {"content-type": "application/json", "x-hub-signature-256": sign_meta(SECRET, body)}
    response = await client.post("/webhooks/meta/main", content=body, headers=headers)
    assert response.status_code == 200


async def identities_of(runtime: Runtime, address: str) -> dict[str, int]:
    """kind -> contact of the verified identities holding ``address``."""
    found = await runtime.db.read(
        lambda c: c.execute(
            select(ContactIdentity.kind, ContactIdentity.contact_id).where(
                ContactIdentity.address == address, ContactIdentity.verified.is_(True)
            )
        ).all()
    )
    return {kind: int(contact) for kind, contact in found}


@pytest.mark.parametrize("sms_first", [True, False], ids=["sms-first", "whatsapp-first"])
async def test_one_number_writing_by_sms_and_whatsapp_is_one_contact(
    both: Both, sms_first: bool
) -> None:
    runtime, client, clock, admin = both
    number = "+16505551234"
    steps = [
        lambda: sms(runtime, client, number, "a", "my parcel is late (sms)"),
        lambda: whatsapp(client, clock, number.lstrip("+"), "wamid.one", "any news? (whatsapp)"),
    ]
    for step in steps if sms_first else steps[::-1]:
        await step()
        await settle(runtime)
    held = await identities_of(runtime, number)
    assert set(held) == {"phone", "whatsapp"}
    assert held["phone"] == held["whatsapp"]  # one contact
    contact = held["phone"]
    assert (
        await runtime.db.read(lambda c: c.execute(select(func.count(Contact.id))).scalar_one()) == 1
    )
    timeline = (
        await client.get(
            f"/api/contacts/{contact}/timeline", headers={"authorization": f"Bearer {admin}"}
        )
    ).json()
    texts = sorted(m["text"] for m in timeline["messages"])
    assert texts == ["any news? (whatsapp)", "my parcel is late (sms)"]
    # join_open: the second channel's message joined the open conversation
    assert (
        await runtime.db.read(lambda c: c.execute(select(func.count(Conversation.id))).scalar_one())
        == 1
    )
    links = (
        await client.get(
            f"/api/contacts/{contact}/links", headers={"authorization": f"Bearer {admin}"}
        )
    ).json()
    second = "whatsapp" if sms_first else "phone"
    assert [(link["action"], link["actor"]) for link in links] == [("link", "system")]
    assert links[0]["reason"].startswith(f"{second} {number}: the same number")
    view = (
        await client.get(f"/api/contacts/{contact}", headers={"authorization": f"Bearer {admin}"})
    ).json()
    assert view["phone"] == number


# -- through the fake channel (kinds chosen by the test) ---------------------------------
@pytest.fixture
async def fake_inboxes(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, str]]:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        _, admin = await runtime.db.write(create_user, "root", "admin")
        yield runtime, client, str(admin)


async def fake_in(
    client: httpx.AsyncClient, inbox: str, external: str, number: str, kind: str
) -> None:
    message = {"id": external, "from": number, "kind": kind, "text": f"{kind} {external}"}
    assert (await post_fake(client, inbox, message)).status_code == 200


async def test_contacts_made_apart_before_the_rule_are_merged_unless_split(
    fake_inboxes: tuple[Runtime, httpx.AsyncClient, str],
) -> None:
    runtime, client, admin = fake_inboxes
    number = "+4917055550000"
    await fake_in(client, "sms", "s1", number, "phone")
    await settle(runtime)
    phone_contact = (await identities_of(runtime, number))["phone"]

    def legacy_whatsapp_contact(tx: Tx) -> int:
        """What the old code made: the WhatsApp sender on a contact of its own."""
        contact = tx.execute(
            insert(Contact)
            .values(attributes={}, vip=False, created_at=tx.now, updated_at=tx.now)
            .returning(Contact.id)
        ).scalar_one()
        tx.execute(
            insert(ContactIdentity).values(
                contact_id=contact,
                kind="whatsapp",
                address=number,
                verified=True,
                verified_by="meta",
                data={},
                created_at=tx.now,
            )
        )
        return int(contact)

    apart = await runtime.db.write(legacy_whatsapp_contact)
    await fake_in(client, "wa", "w1", number, "whatsapp")
    await settle(runtime)
    held = await identities_of(runtime, number)
    assert held == {"phone": phone_contact, "whatsapp": phone_contact}  # the older survives
    merged_into = await runtime.db.read(
        lambda c: c.execute(select(Contact.merged_into_id).where(Contact.id == apart)).scalar_one()
    )
    assert merged_into == phone_contact
    (merge,) = await runtime.db.read(
        lambda c: c.execute(select(ContactLink).where(ContactLink.action == "merge")).all()
    )
    assert (merge.actor, merge.other_contact_id) == ("system", apart)
    # an admin decides they are two people after all: that decision stands
    whatsapp_identity = await runtime.db.read(
        lambda c: c.execute(
            select(ContactIdentity.id).where(ContactIdentity.kind == "whatsapp")
        ).scalar_one()
    )
    split = await client.post(
        f"/api/contacts/{phone_contact}/identities/{whatsapp_identity}/split",
        json={"reason": "a shared family phone"},
        headers={"authorization": f"Bearer {admin}"},
    )
    assert split.status_code == 200, split.text
    await fake_in(client, "wa", "w2", number, "whatsapp")
    await fake_in(client, "sms", "s2", number, "phone")
    await settle(runtime)
    held = await identities_of(runtime, number)
    assert held["phone"] == phone_contact and held["whatsapp"] != phone_contact
    messages = await runtime.db.read(
        lambda c: c.execute(
            select(Message.external_id, Conversation.contact_id).join(
                Conversation, Conversation.id == Message.conversation_id
            )
        ).all()
    )
    assert {m.external_id: m.contact_id for m in messages}["w2"] == held["whatsapp"]


async def test_an_unverified_caller_on_the_number_is_never_linked(
    fake_inboxes: tuple[Runtime, httpx.AsyncClient, str],
) -> None:
    runtime, client, _ = fake_inboxes
    number = "+4917055551111"
    await fake_in(client, "wa", "w1", number, "whatsapp")
    message = {"id": "s1", "from": number, "kind": "phone", "text": "spoofed", "verified": False}
    assert (await post_fake(client, "sms", message)).status_code == 200
    await settle(runtime)
    found = await runtime.db.read(
        lambda c: c.execute(
            select(ContactIdentity.kind, ContactIdentity.verified, ContactIdentity.contact_id)
        ).all()
    )
    contacts = {(kind, verified): contact for kind, verified, contact in found}
    assert contacts[("phone", False)] != contacts[("whatsapp", True)]


async def test_first_messages_by_sms_and_whatsapp_racing_make_one_contact(
    tmp_path: Path, pg_url: str
) -> None:
    settings = make_settings(tmp_path / "conf", pg_url, rules=RULES, channels=CHANNELS)
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        numbers = [f"+49170666{i:05d}" for i in range(12)]

        async def pair(number: str) -> Any:
            return await asyncio.gather(
                fake_in(client, "sms", f"s-{number}", number, "phone"),
                fake_in(client, "wa", f"w-{number}", number, "whatsapp"),
            )

        await asyncio.gather(*(pair(n) for n in numbers))
        await settle(runtime)
        for number in numbers:
            held = await identities_of(runtime, number)
            assert set(held) == {"phone", "whatsapp"} and len(set(held.values())) == 1, number
        contacts = await runtime.db.read(
            lambda c: c.execute(
                select(func.count(Contact.id)).where(Contact.merged_into_id.is_(None))
            ).scalar_one()
        )
        assert contacts == len(numbers)
