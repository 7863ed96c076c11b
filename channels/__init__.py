"""Channel adapters: one module per vendor, both directions.

``CHANNELS`` is the explicit registry: provider name -> channel id -> class. channels.yaml
names both (``channel: sms, provider: twilio``); the fake provider can play any channel.
"""

from __future__ import annotations

from channels.base import Channel
from channels.email import EmailChannel
from channels.fake import FakeChannel
from channels.meta import MessengerChannel, WhatsAppChannel
from channels.twilio_sms import TwilioSmsChannel
from channels.twilio_voice import TwilioVoiceChannel
from channels.webchat import WebChatChannel

__all__ = ["CHANNELS", "Channel", "channel_class"]

CHANNELS: dict[str, dict[str, type[Channel]]] = {
    "fake": {c: FakeChannel for c in FakeChannel.channel_ids},
    "omniroute": {"webchat": WebChatChannel},
    "imap": {"email": EmailChannel},
    "twilio": {"sms": TwilioSmsChannel, "voice": TwilioVoiceChannel},
    "meta": {"messenger": MessengerChannel, "whatsapp": WhatsAppChannel},
}


def channel_class(channel: str, provider: str) -> type[Channel] | None:
    return CHANNELS.get(provider, {}).get(channel)
