"""A fake channel for tests, benchmarks and demos: any channel id, signed JSON webhooks in,
sends recorded (in memory and optionally in a JSON-lines file that survives a crash).

Webhook ``POST /webhooks/fake/{inbox}`` with header ``X-Fake-Signature: sha256=<hex>``
(HMAC-SHA256 of the raw body with the inbox ``secret``) and a body like::

    {"messages": [{"id": "m1", "from": "+4917012345678", "kind": "phone", "text": "hi",
                   "verified": true, "name": "Ann", "language": "de"}],
     "statuses": [{"id": "fake-42", "status": "delivered"}]}

Anything else (another ``type``, no lists) is ignored, the way real providers' unknown
events must be.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from datetime import datetime
from typing import Any, ClassVar

from pydantic import SecretStr

from channels.base import (
    CHANNEL_IDS,
    Attachment,
    Channel,
    ChannelContext,
    InboundMessage,
    InboxConfig,
    OutboundMessage,
    ParsedItem,
    PermanentSendError,
    Reject,
    Sender,
    SendReceipt,
    StatusUpdate,
    TemporarySendError,
    UncertainPolicy,
    WebhookRequest,
    WebhookResponse,
)

__all__ = ["FakeChannel", "FakeConfig", "read_sent_log", "sign"]


class FakeConfig(InboxConfig):
    secret: SecretStr = SecretStr("fake-secret")
    sent_log: str | None = None  # a JSON-lines file of every send, fsynced
    fail_first: int = 0  # the first N sends fail temporarily
    max_text_length: int | None = None


def _append_synced(path: str, line: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")
        log.flush()
        os.fsync(log.fileno())


def read_sent_log(path: str) -> list[dict[str, Any]]:
    """Every send recorded in a fake inbox's ``sent_log`` (survives a crash of the sender)."""
    if not os.path.exists(path):
        return []
    entries = []
    with open(path, encoding="utf-8") as log:
        for line in log:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a kill mid-write: that send was never recorded
    return entries


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class FakeChannel(Channel):
    provider = "fake"
    channel_ids = CHANNEL_IDS
    config_model: ClassVar[type[InboxConfig]] = FakeConfig
    webhook = True
    webhook_summary = "The fake channel's signed JSON webhook (tests, demos, benchmarks)"
    attachments = True
    uncertain_policy = UncertainPolicy.CHECK

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        assert isinstance(config, FakeConfig)
        self.fake_config = config
        self.channel_id = config.channel  # type: ignore[misc]  # the fake plays any channel
        self.max_text_length = config.max_text_length  # type: ignore[misc]
        self.sent: list[OutboundMessage] = []
        self.failures_left = config.fail_first
        self.permanent_failure: str | None = None  # tests set this to fail every send
        self.send_delay = 0.0  # tests set this: each send takes this long (seconds)
        self.gate: asyncio.Event | None = None  # tests set this: sends wait until it is set
        self.calls = 0  # sends attempted (sent, failed or waiting at the gate)
        self._counter = 0

    def verify(self, request: WebhookRequest) -> bool:
        given = request.headers.get("x-fake-signature", "")
        expected = sign(self.fake_config.secret.get_secret_value(), request.body)
        return hmac.compare_digest(given.encode(), expected.encode())

    def parse(self, request: WebhookRequest) -> list[ParsedItem]:
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return [Reject("body is not JSON", request.body)]
        if not isinstance(body, dict) or body.get("type", "messages") != "messages":
            return []
        items: list[ParsedItem] = []
        for raw in body.get("messages") or []:
            items.append(self._message(raw))
        for raw in body.get("statuses") or []:
            if (
                isinstance(raw, dict)
                and isinstance(raw.get("id"), str)
                and isinstance(raw.get("status"), str)
            ):
                items.append(StatusUpdate(raw["id"], raw["status"], raw.get("error")))
            else:
                items.append(Reject("status without id or status", json.dumps(raw).encode()))
        return items

    def _message(self, raw: Any) -> ParsedItem:
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("id"), str)
            or not isinstance(raw.get("from"), str)
        ):
            return Reject("message without string id and from", json.dumps(raw).encode())
        text = raw.get("text", "")
        if not isinstance(text, str):
            return Reject("text is not a string", json.dumps(raw).encode())
        sent_at = raw.get("ts")
        return InboundMessage(
            external_id=raw["id"],
            sender=Sender(
                str(raw.get("kind", "phone")),
                raw["from"],
                bool(raw.get("verified", True)),
                raw.get("name"),
            ),
            text=text,
            subject=raw.get("subject"),
            language=raw.get("language"),
            provider_ts=datetime.fromisoformat(sent_at) if isinstance(sent_at, str) else None,
            auto=bool(raw.get("auto", False)),
            hints={k: v for k, v in (raw.get("hints") or {}).items() if isinstance(v, str)},
            attachments=[
                Attachment(str(a.get("filename", "file")), str(a.get("content_type", "")), 0)
                for a in raw.get("attachments") or []
                if isinstance(a, dict)
            ],
        )

    def ack(self, request: WebhookRequest) -> WebhookResponse:
        return WebhookResponse(200, b'{"ok":true}', "application/json")

    async def send(self, message: OutboundMessage) -> SendReceipt:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.send_delay:
            await asyncio.sleep(self.send_delay)
        if self.permanent_failure:
            raise PermanentSendError(self.permanent_failure, "fake")
        if self.failures_left > 0:
            self.failures_left -= 1
            raise TemporarySendError("fake temporary failure")
        self._counter += 1
        provider_id = f"fake-{self.slug}-{message.message_id}-{message.attempt}"
        self.sent.append(message)
        if self.fake_config.sent_log:
            line = json.dumps(
                {
                    "message_id": message.message_id,
                    "provider_id": provider_id,
                    "text": message.text,
                    "to": message.recipient.address,
                }
            )
            await asyncio.to_thread(_append_synced, self.fake_config.sent_log, line)
        return SendReceipt(provider_id)

    async def find_sent(self, message: OutboundMessage, since: datetime) -> SendReceipt | None:
        if self.fake_config.sent_log:
            for entry in await asyncio.to_thread(read_sent_log, self.fake_config.sent_log):
                if entry["message_id"] == message.message_id:
                    return SendReceipt(entry["provider_id"])
        for sent in self.sent:
            if sent.message_id == message.message_id:
                return SendReceipt(f"fake-{self.slug}-{sent.message_id}-{sent.attempt}")
        return None
