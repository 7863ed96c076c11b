"""Web chat: visitors on your site talk to agents through ``/ws/chat`` and ``/widget.js``.

The visitor's identity is an unguessable token (256 random bits) that the widget keeps;
the server only ever stores its SHA-256 (the identity address), so a database reader or an
agent cannot impersonate a visitor. Tokens carry the server's signature (a truncated
HMAC-SHA256 of the random part), so a token the server never minted is told apart without
a lookup and cannot pose as a returning visitor. A visitor's typed name and email are hints: stored,
shown as unverified, never used to link contacts or reveal history.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from channels.base import (
    Channel,
    ChannelContext,
    InboundMessage,
    InboxConfig,
    OutboundMessage,
    PermanentSendError,
    Sender,
    SendReceipt,
    UncertainPolicy,
)

__all__ = ["WebChatChannel", "WebChatConfig", "minted", "new_visitor_token", "visitor_address"]

# Signed tokens (64 characters) and, from before tokens were signed, plain random ones (43)
_TOKEN = re.compile(r"^(?:[A-Za-z0-9_-]{64}|[A-Za-z0-9_-]{43})$")
_NONCE, _TAG = 32, 16
_SIGNED_LENGTH = (_NONCE + _TAG) * 4 // 3
_CLIENT_ID = re.compile(r"^[A-Za-z0-9-]{8,64}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
_LANGUAGE = re.compile(r"^[a-z]{2}$")


class WebChatConfig(InboxConfig):
    channel: Literal["webchat"] = "webchat"
    max_message_chars: int = Field(2000, ge=1, le=20_000)
    connections_per_minute_per_ip: int = Field(30, ge=1)
    new_visitors_per_minute_per_ip: int = Field(10, ge=1)
    messages_per_minute_per_visitor: int = Field(30, ge=1)
    messages_per_minute_per_ip: int = Field(120, ge=1)
    title: str = Field("Chat with us", max_length=80)
    # a visitor who left before an agent joined and stays away this long abandoned the chat
    abandon_after: str = Field("5m", pattern=r"^\d+[smh]$")
    greeting: str = Field("Hi! How can we help?", max_length=500)
    # Identity (docs/identity.md): the site may pass its customer id signed with this
    # secret (hex HMAC-SHA256); visitors may prove an email or a phone number with a
    # one-time code sent through these inboxes.
    identity_secret: SecretStr | None = None
    identity_namespace: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    verify_email_inbox: str | None = None
    verify_sms_inbox: str | None = None


def _tag(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, b"webchat visitor token:" + nonce, hashlib.sha256).digest()[:_TAG]


def new_visitor_token(key: bytes) -> str:
    """A new visitor token: 256 random bits and their 128-bit HMAC under ``key``, base64url
    (64 characters)."""
    nonce = secrets.token_bytes(_NONCE)
    return base64.urlsafe_b64encode(nonce + _tag(key, nonce)).decode()


def minted(key: bytes, token: str) -> bool:
    """Whether ``token`` is one :func:`new_visitor_token` made with ``key`` (constant time)."""
    if len(token) != _SIGNED_LENGTH or not _TOKEN.match(token):
        return False
    raw = base64.urlsafe_b64decode(token)
    return hmac.compare_digest(raw[_NONCE:], _tag(key, raw[:_NONCE]))


def visitor_address(token: str) -> str | None:
    """The stored identity of a visitor token (its SHA-256), or None for a malformed token.
    Says nothing about who minted it (see :func:`minted`)."""
    if not _TOKEN.match(token):
        return None
    return "v_" + hashlib.sha256(token.encode()).hexdigest()[:40]


class WebChatChannel(Channel):
    provider = "omniroute"
    channel_id = "webchat"
    channel_ids = ("webchat",)
    config_model: ClassVar[type[InboxConfig]] = WebChatConfig
    attachments = False
    # A push is a committed event on the visitor's stream, at most once per message: after
    # a crash inside a send the core asks whether it happened, and pushes only if not.
    uncertain_policy = UncertainPolicy.CHECK

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        assert isinstance(config, WebChatConfig)
        self.web_config = config
        self.max_text_length = config.max_message_chars  # type: ignore[misc]
        units = {"s": 1, "m": 60, "h": 3600}
        self.abandon_after_seconds = (
            int(config.abandon_after[:-1]) * units[config.abandon_after[-1]]
        )

    def inbound(
        self,
        address: str,
        client_id: str,
        text: str,
        *,
        name: str | None = None,
        email: str | None = None,
        language: str | None = None,
    ) -> InboundMessage:
        """A visitor's message. Validate first with ``check_message``."""
        hints = {"email": email.strip().lower()} if email and _EMAIL.match(email.strip()) else {}
        return InboundMessage(
            external_id=f"{address}:{client_id}",
            sender=Sender(
                "webchat", address, True, (name or "").strip()[:100] or None, "visitor_token"
            ),
            text=text,
            language=language if language and _LANGUAGE.match(language) else None,
            hints=hints,
            data={"client_id": client_id},
        )

    def check_message(self, client_id: object, text: object) -> str | None:
        """Why a visitor frame is refused (None when it is fine)."""
        if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
            return "client_id must be a UUID"
        if not isinstance(text, str) or not text.strip():
            return "the message is empty"
        if len(text) > self.web_config.max_message_chars:
            return f"the message is longer than {self.web_config.max_message_chars} characters"
        return None

    async def send(self, message: OutboundMessage) -> SendReceipt:
        push: Callable[[OutboundMessage], Awaitable[SendReceipt]] | None = self.context.push
        if push is None:
            raise PermanentSendError("web chat delivery is not wired")
        return await push(message)

    async def find_sent(self, message: OutboundMessage, since: datetime) -> SendReceipt | None:
        pushed = self.context.pushed
        return await pushed(message) if pushed is not None else None
