"""The core serves what the channel registry lists: a provider added to ``channels.CHANNELS``
is validated in channels.yaml, started and given its webhook route with no edit of the
core (docs/channels.md, "Adding a channel")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
from sqlalchemy import select

from adapters.clock import FakeClock
from channels import CHANNELS, WEBHOOK_APPS
from channels.base import CHANNEL_IDS
from channels.fake import FakeChannel, sign
from router.api.webhooks import routes
from router.models import Message
from tests.support import FAKE_SECRET, client_for, make_settings, started_runtime


class ToyChannel(FakeChannel):
    """A new provider, as a developer would add one (here it speaks the fake's wire format)."""

    provider = "toy"
    channel_ids: ClassVar[tuple[str, ...]] = ("sms",)
    webhook_summary = "The toy provider's signed webhook"


class ToyKindsChannel(ToyChannel):
    provider = "toykinds"
    webhook_kinds = frozenset({"inbound", "status"})


def test_every_provider_gets_its_routes_from_the_registry() -> None:
    paths = {
        (method, route.path): route.summary  # type: ignore[attr-defined]
        for route in routes().routes
        for method in route.methods  # type: ignore[attr-defined]
    }
    assert set(paths) == {
        ("POST", "/webhooks/fake/{inbox}"),
        ("POST", "/webhooks/twilio/{inbox}/{kind}"),
        ("GET", "/webhooks/meta/{app}"),
        ("POST", "/webhooks/meta/{app}"),
    }
    assert (
        "voice inboxes: hold, participant-status"
        in paths[("POST", "/webhooks/twilio/{inbox}/{kind}")]
    )
    toys = routes({"toy": {"sms": ToyChannel}, "toykinds": {"sms": ToyKindsChannel}}, {})
    assert {r.path for r in toys.routes} == {  # type: ignore[attr-defined]
        "/webhooks/toy/{inbox}",
        "/webhooks/toykinds/{inbox}/{kind}",
    }


def test_every_registered_channel_id_is_a_declared_one() -> None:
    for provider, classes in CHANNELS.items():
        for channel_id, cls in classes.items():
            assert channel_id in CHANNEL_IDS, (provider, channel_id)
            assert channel_id in cls.channel_ids, (provider, channel_id)
    assert set(WEBHOOK_APPS) <= set(CHANNELS)


async def test_a_provider_added_to_the_registry_is_served_without_touching_the_core(
    tmp_path: Path, db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CHANNELS, "toy", {"sms": ToyChannel})
    channels = json.dumps(
        {
            "version": 1,
            "inboxes": {"toy-sms": {"channel": "sms", "provider": "toy", "secret": FAKE_SECRET}},
        }
    )
    settings = make_settings(tmp_path / "conf", db_url, channels=channels)
    async with started_runtime(settings, clock) as runtime, client_for(runtime) as client:
        assert isinstance(runtime.channels["toy-sms"], ToyChannel)
        body = json.dumps({"messages": [{"id": "t1", "from": "+4917012345678", "text": "hi"}]})
        headers = {"x-fake-signature": sign(FAKE_SECRET, body.encode())}
        answered = await client.post("/webhooks/toy/toy-sms", content=body, headers=headers)
        assert answered.status_code == 200, answered.text
        forged = await client.post(
            "/webhooks/toy/toy-sms", content=body, headers={"x-fake-signature": "sha256=00"}
        )
        assert forged.status_code == 403
        # another provider's route does not reach it
        other = await client.post("/webhooks/fake/toy-sms", content=body, headers=headers)
        assert other.status_code == 404
        texts = await runtime.db.read(
            lambda c: c.execute(
                select(Message.text, Message.external_id).where(Message.direction == "in")
            ).all()
        )
        assert [tuple(t) for t in texts] == [("hi", "t1")]  # stored once, the forgery not
