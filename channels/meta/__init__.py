"""Facebook Messenger and the WhatsApp Cloud API through Meta (``provider: meta``).

* :mod:`channels.meta.graph`: what both share: a Meta app's one webhook (signature,
  handshake, a delivery split into events and each handed to the inbox whose page id or
  phone number id it names: :class:`MetaApp`), Graph API calls and errors, safe media
  downloads, and :class:`MetaChannel`, the base of the two channels;
* :mod:`channels.meta.config`: the keys of a ``provider: meta`` inbox (:class:`MetaConfig`);
* :mod:`channels.meta.messenger`: :class:`MessengerChannel` (``channel: messenger``);
* :mod:`channels.meta.whatsapp`: :class:`WhatsAppChannel` (``channel: whatsapp``).

``MetaChannel(slug, config, context)`` makes the channel of ``config.channel``.
"""

from __future__ import annotations

from datetime import datetime

from channels.meta.config import MetaConfig, MetaTemplate
from channels.meta.graph import (
    OBJECTS,
    MetaApp,
    MetaAppConfig,
    MetaChannel,
    Unit,
    WindowState,
    entries,
    handshake,
    route,
    verify_signature,
)
from channels.meta.messenger import (
    MESSENGER_TEXT_MAX,
    MessengerChannel,
    WatermarkStatus,
    messenger_window,
)
from channels.meta.whatsapp import (
    WHATSAPP_TEXT_MAX,
    WhatsAppChannel,
    normalize_wa_id,
    whatsapp_window,
)

__all__ = [
    "MESSENGER_TEXT_MAX",
    "OBJECTS",
    "WHATSAPP_TEXT_MAX",
    "MessengerChannel",
    "MetaApp",
    "MetaAppConfig",
    "MetaChannel",
    "MetaConfig",
    "MetaTemplate",
    "Unit",
    "WatermarkStatus",
    "WhatsAppChannel",
    "WindowState",
    "entries",
    "handshake",
    "normalize_wa_id",
    "route",
    "verify_signature",
    "window_state",
]


def window_state(
    channel: str, last_inbound_at: datetime | None, now: datetime, human_agent_tag: bool
) -> WindowState:
    """What may be sent on ``channel`` to a customer whose last message arrived at
    ``last_inbound_at`` (:func:`messenger_window`, :func:`whatsapp_window`); other channels
    have no window (``open``)."""
    if channel == MessengerChannel.channel_id:
        return messenger_window(last_inbound_at, now, human_agent_tag)
    if channel == WhatsAppChannel.channel_id:
        return whatsapp_window(last_inbound_at, now)
    return "open"
