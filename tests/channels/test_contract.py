"""The channel contract, checked against every registered channel class: the registry names
what each class declares, configs are validated models that reject unknown keys, webhooks
are denied by default (unsigned, wrongly signed), the answers are well formed, and a send to
an identity of the wrong kind fails permanently without touching the network."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from channels import CHANNELS
from channels.base import (
    Channel,
    ChannelContext,
    InboxConfig,
    OutboundMessage,
    PermanentSendError,
    Sender,
    WebhookRequest,
    WebhookResponse,
)

SAMPLE_CONFIGS: dict[str, dict[str, Any]] = {
    "fake": {"secret": "s" * 32},
    "omniroute": {},
    "imap": {
        "address": "support@example.com",
        "imap": {"host": "127.0.0.1", "user": "u", "password": "p"},
        "smtp": {"host": "127.0.0.1", "user": "u", "password": "p"},
    },
    "twilio": {
        "account_sid": "AC" + "0" * 32,
        "auth_token": "t" * 32,
        "from_number": "+15550000000",
    },
    "meta": {"app": "main", "page_id": "106000000000001", "access_token": "t" * 20},
    "meta:whatsapp": {"app": "main", "phone_number_id": "106540352242922", "access_token": "t"},
    "twilio:voice": {
        "account_sid": "AC" + "0" * 32,
        "auth_token": "t" * 32,
        "number": "+15550000000",
    },
}


def sample(provider: str, channel_id: str) -> dict[str, Any]:
    """A valid config for a channel (by provider, or provider:channel where they differ)."""
    return SAMPLE_CONFIGS.get(f"{provider}:{channel_id}", SAMPLE_CONFIGS[provider])


WRONG_KIND = {"email": "phone", "sms": "email", "whatsapp": "email", "webchat": "email"}
CASES = [
    (provider, channel_id, cls)
    for provider, by_channel in sorted(CHANNELS.items())
    for channel_id, cls in sorted(by_channel.items())
]


def make(provider: str, channel_id: str, cls: type[Channel]) -> Channel:
    config = cls.config_model(channel=channel_id, provider=provider, **sample(provider, channel_id))
    context = ChannelContext(
        slug="contract",
        public_base_url="https://support.example.com",
        now=lambda: datetime(2026, 11, 25, tzinfo=UTC),
        secret=b"k" * 32,
    )
    return cls("contract", config, context)


@pytest.mark.parametrize(("provider", "channel_id", "cls"), CASES, ids=lambda v: str(v))
def test_the_registry_matches_what_each_class_declares(
    provider: str, channel_id: str, cls: type[Channel]
) -> None:
    assert issubclass(cls, Channel) and issubclass(cls.config_model, InboxConfig)
    assert cls.provider == provider
    assert channel_id in cls.channel_ids
    assert provider in SAMPLE_CONFIGS, f"add a sample config for the {provider} provider"


@pytest.mark.parametrize(("provider", "channel_id", "cls"), CASES, ids=lambda v: str(v))
def test_configs_reject_unknown_keys(provider: str, channel_id: str, cls: type[Channel]) -> None:
    with pytest.raises(ValidationError, match="surprise"):
        cls.config_model(
            channel=channel_id, provider=provider, surprise=1, **sample(provider, channel_id)
        )


@pytest.mark.parametrize(("provider", "channel_id", "cls"), CASES, ids=lambda v: str(v))
def test_webhooks_are_denied_by_default(provider: str, channel_id: str, cls: type[Channel]) -> None:
    channel = make(provider, channel_id, cls)
    body = b"MessageSid=SM1&Body=hi&From=%2B15551230000"
    form = {"MessageSid": "SM1", "Body": "hi", "From": "+15551230000"}
    unsigned = WebhookRequest("POST", "https://support.example.com/webhooks/x", {}, body, form=form)
    forged = WebhookRequest(
        "POST",
        "https://support.example.com/webhooks/x",
        {"x-twilio-signature": "AAAA", "x-fake-signature": "sha256=00", "x-hub-signature-256": "x"},
        body,
        form=form,
    )
    assert channel.verify(unsigned) is False
    assert channel.verify(forged) is False
    answer = channel.ack(unsigned)
    assert isinstance(answer, WebhookResponse) and 200 <= answer.status < 300


# the fake plays any channel and web chat pushes to its visitor: neither checks the kind
SENDERS = [c for c in CASES if c[1] in WRONG_KIND and c[0] not in ("fake", "omniroute")]


@pytest.mark.parametrize(("provider", "channel_id", "cls"), SENDERS, ids=lambda v: str(v))
async def test_a_send_to_the_wrong_kind_of_identity_fails_permanently(
    provider: str, channel_id: str, cls: type[Channel]
) -> None:
    channel = make(provider, channel_id, cls)
    message = OutboundMessage(
        message_id=1,
        conversation_id=1,
        recipient=Sender(WRONG_KIND[channel_id], "not-for-this-channel", True),
        text="hello",
    )
    with pytest.raises(PermanentSendError):
        await channel.send(message)
    await channel.stop()
