"""How rows look on the wire (agent and visitor sockets, REST). Customer text is data:
clients render it as text, never as HTML."""

from __future__ import annotations

from typing import Any

__all__ = ["iso", "message_payload", "visitor_payload"]


def iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def message_payload(row: Any, channel: str | None = None) -> dict[str, Any]:
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
