"""How rows look on the wire (agent and visitor sockets, REST). Customer text is data:
clients render it as text, never as HTML."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["iso", "message_payload", "shared_frame_text", "visitor_payload"]

_last_frame: tuple[dict[str, Any], str] | None = None


def shared_frame_text(frame: dict[str, Any]) -> str:
    """The JSON text of a frame that many sockets send in turn (one supervisors' event goes
    to every supervisor's socket): the last frame's text is kept, so a fan-out encodes it
    once. The bus hands the same dict to every subscriber and nothing changes it after
    publishing, so the same object means the same text; the dict is held, so its id is not
    reused while it is the key. Event-loop use only."""
    global _last_frame
    last = _last_frame
    if last is not None and last[0] is frame:
        return last[1]
    text = json.dumps(frame, default=str)
    _last_frame = (frame, text)
    return text


def iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def message_payload(row: Any, channel: str) -> dict[str, Any]:
    """A message as agents see it. ``channel`` is the channel of the message's own inbox
    (``Message.inbox_id``), not its conversation's: one conversation may hold messages of
    several channels (a call answered by SMS)."""
    data = row.data or {}
    return {
        "id": row.id,
        "conversation_id": row.conversation_id,
        "channel": channel,
        "direction": row.direction,
        "author": row.author,
        "agent_id": row.agent_id,
        "text": row.text,
        "subject": row.subject,
        "attachments": [
            {
                "filename": a.get("filename"),
                "content_type": a.get("content_type"),
                "size": a.get("size"),
                "blob_key": a.get("blob_key"),
            }
            for a in (row.attachments or [])
        ],
        "delivery_status": row.delivery_status,
        "error": row.error,
        # the provider may hold more than one copy (a resend after an unclear attempt)
        "possible_duplicate": bool(data.get("possible_duplicate")),
        "is_auto": row.is_auto,
        "is_note": row.is_note,
        "client_id": data.get("client_id"),
        "created_at": iso(row.created_at),
    }


def visitor_payload(row: Any) -> dict[str, Any]:
    """What a web-chat visitor sees of a message: no internal fields."""
    return {
        "id": row.id,
        "direction": row.direction,
        "author": row.author,
        "text": row.text,
        "is_auto": row.is_auto,
        "client_id": (row.data or {}).get("client_id"),
        "created_at": iso(row.created_at),
        **({"survey": row.data["survey"]} if (row.data or {}).get("survey") else {}),
    }
