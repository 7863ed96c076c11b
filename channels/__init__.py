"""Channel adapters: one module (or package) per vendor, both directions.

The explicit registry, the one place that names the vendor modules:

* ``CHANNELS``: provider name -> channel id -> class. channels.yaml names both
  (``channel: sms, provider: twilio``); the fake provider can play any channel. The core
  serves each provider's webhooks from it: ``POST /webhooks/{provider}/{inbox}``, or
  ``.../{inbox}/{kind}`` for classes with ``webhook_kinds``.
* ``WEBHOOK_APPS``: providers whose one webhook serves several inboxes (a Meta app), at
  ``/webhooks/{provider}/{app}``, with their section of channels.yaml (``meta_apps``).

The core imports the vendor modules only through this registry (an import-linter contract).
"""

from __future__ import annotations

from channels.base import Channel, WebhookApp
from channels.email import EmailChannel
from channels.fake import FakeChannel
from channels.meta import MessengerChannel, MetaApp, WhatsAppChannel
from channels.twilio_sms import TwilioSmsChannel
from channels.twilio_voice import TwilioVoiceChannel
from channels.webchat import WebChatChannel

__all__ = ["CHANNELS", "WEBHOOK_APPS", "Channel", "WebhookApp", "channel_class"]

CHANNELS: dict[str, dict[str, type[Channel]]] = {
    "fake": {c: FakeChannel for c in FakeChannel.channel_ids},
    "omniroute": {"webchat": WebChatChannel},
    "imap": {"email": EmailChannel},
    "twilio": {"sms": TwilioSmsChannel, "voice": TwilioVoiceChannel},
    "meta": {"messenger": MessengerChannel, "whatsapp": WhatsAppChannel},
}

WEBHOOK_APPS: dict[str, type[WebhookApp]] = {"meta": MetaApp}


def channel_class(channel: str, provider: str) -> type[Channel] | None:
    return CHANNELS.get(provider, {}).get(channel)
