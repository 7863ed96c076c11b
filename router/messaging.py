"""What an agent writes: replies through the customer's channel, internal notes.

Both are idempotent per ``client_id``: a console that resends after a reconnect gets the
message it already created, never a second one."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select

from router.db import Tx
from router.exceptions import Conflict, InvalidInput, NotFound
from router.models import Conversation, Message
from router.outbox import enqueue_message
from router.types import Actor, ConversationState

__all__ = ["MAX_REPLY_CHARS", "agent_write"]

MAX_REPLY_CHARS = 20_000
_WRITABLE = (ConversationState.ASSIGNED.value, ConversationState.WAITING_CUSTOMER.value)


_BLOB_KEY = re.compile(r"^sha256:[0-9a-f]{64}$")


def _attachments(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Files uploaded with POST /api/uploads, named by their blob keys."""
    if not isinstance(items, list) or len(items) > 10:
        raise InvalidInput("attachments: at most 10 uploaded files")
    out = []
    for item in items:
        key = item.get("blob_key") if isinstance(item, dict) else None
        if not isinstance(key, str) or not _BLOB_KEY.match(key):
            raise InvalidInput("attachments: each needs the blob_key of an upload")
        out.append(
            {
                "blob_key": key,
                "filename": str(item.get("filename") or "attachment")[:200],
                "content_type": str(item.get("content_type") or "application/octet-stream")[:100],
                "size": int(item.get("size") or 0),
            }
        )
    return out


def agent_write(
    tx: Tx,
    agent_id: int,
    conversation_id: int,
    text: str,
    *,
    note: bool = False,
    client_id: str | None = None,
    identity_id: int | None = None,
    inbox_id: int | None = None,
    supervisor: bool = False,
    template: dict[str, Any] | None = None,
    attachments: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An agent's reply (or note). ``template`` sends a provider's pre-approved template
    (``{name, language, params}``: WhatsApp outside its 24-hour window); ``text`` is then
    the agent's preview of it."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("the text is empty")
    if len(text) > MAX_REPLY_CHARS:
        raise InvalidInput(f"the text is longer than {MAX_REPLY_CHARS} characters")
    conversation = tx.execute(
        select(Conversation.id, Conversation.state, Conversation.assigned_agent_id).where(
            Conversation.id == conversation_id
        )
    ).first()
    if conversation is None:
        raise NotFound(f"no conversation {conversation_id}")
    if (
        not note
        and not supervisor
        and (conversation.assigned_agent_id != agent_id or conversation.state not in _WRITABLE)
    ):
        raise Conflict("the conversation is not assigned to you")
    if client_id is not None:
        if len(client_id) > 64:
            raise InvalidInput("client_id is too long")
        for existing_id, data in tx.execute(
            select(Message.id, Message.data)
            .where(
                Message.conversation_id == conversation_id,
                Message.agent_id == agent_id,
                Message.direction == "out",
            )
            .order_by(Message.id.desc())
            .limit(200)
        ).all():
            if (data or {}).get("client_id") == client_id:
                return {"message_id": int(existing_id), "duplicate": True}
    message_id = enqueue_message(
        tx,
        conversation_id,
        text,
        author=Actor.AGENT,
        agent_id=agent_id,
        is_note=note,
        client_id=client_id,
        identity_id=identity_id,
        inbox_id=inbox_id,
        provider_template=template,
        attachments=_attachments(attachments) if attachments else None,
    )
    return {"message_id": message_id, "duplicate": False}
