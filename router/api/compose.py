"""What the console needs to write a reply: canned responses rendered for the conversation,
the identities and channels a reply can go to (with messaging window and opt-out), tags,
and attachments to download."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, select, update

from router import policy
from router.api.deps import get_runtime, needs
from router.db import Tx
from router.exceptions import Conflict, InvalidInput, NotFound
from router.models import ContactIdentity, Conversation, Message
from router.outbox import window_of
from router.policy import Caller
from router.routing import conversation_facts
from router.runtime import Runtime

router = APIRouter(tags=["conversations"])
_TAG = r"^[\w][\w .:/-]{0,63}$"


@router.get(
    "/api/conversations/{conversation_id}/canned",
    summary="Canned responses (rules.yaml templates) rendered for this conversation",
)
async def canned(
    conversation_id: int,
    q: str | None = Query(None, max_length=100, description="search in names and texts"),
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.READ_CONVERSATION)),
) -> list[dict[str, str]]:
    ruleset = runtime.rules.ruleset
    now = runtime.clock.now()

    def facts(conn: Connection) -> dict[str, Any]:
        if conn.execute(select(Conversation.id).where(Conversation.id == conversation_id)).first():
            return conversation_facts(conn, conversation_id, ruleset, now)
        raise NotFound(f"no conversation {conversation_id}")

    values = await runtime.db.read(facts)
    needle = (q or "").casefold().strip()
    out = []
    for name, template in sorted(ruleset.templates.items()):
        text = template.render(values)
        if needle and needle not in name.casefold() and needle not in text.casefold():
            continue
        out.append({"name": name, "text": text})
    return out


def _reply_options(
    conn: Connection,
    conversation_id: int,
    channels: dict[int, Any],
    slugs: dict[int, str],
    now: Any,
) -> dict[str, Any]:
    conversation = conn.execute(
        select(Conversation.contact_id).where(Conversation.id == conversation_id)
    ).first()
    if conversation is None:
        raise NotFound(f"no conversation {conversation_id}")
    last = conn.execute(
        select(Message.inbox_id, Message.identity_id)
        .where(
            Message.conversation_id == conversation_id,
            Message.direction == "in",
            Message.identity_id.is_not(None),
        )
        .order_by(Message.id.desc())
        .limit(1)
    ).first()
    options = []
    for identity in conn.execute(
        select(ContactIdentity)
        .where(ContactIdentity.contact_id == conversation.contact_id)
        .order_by(ContactIdentity.id)
    ):
        last_writer = last is not None and identity.id == last.identity_id
        inboxes = [
            {
                "inbox": slugs[inbox_id],
                "channel": channel.channel_id,
                "window": window_of(conn, channels, inbox_id, identity.id, now),
                "default": last is not None and last_writer and inbox_id == last.inbox_id,
            }
            for inbox_id, channel in sorted(channels.items())
            if inbox_id in slugs and channel.sends_to(identity.kind)
        ]
        options.append(
            {
                "identity_id": identity.id,
                "kind": identity.kind,
                "address": identity.address,
                "verified": identity.verified,
                "opted_out": bool((identity.data or {}).get("opted_out_at")),
                # replies go to verified identities, and to whoever wrote last
                "allowed": bool(identity.verified or last_writer),
                "inboxes": inboxes,
            }
        )
    return {
        "default_identity_id": last.identity_id if last is not None else None,
        "identities": options,
    }


@router.get(
    "/api/conversations/{conversation_id}/reply-options",
    summary="The identities and inboxes a reply can go to, with windows and opt-out",
)
async def reply_options(
    conversation_id: int,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.READ_CONVERSATION)),
) -> dict[str, Any]:
    channels = runtime.db.context.get("channels", {})
    slugs = {int(info.id): slug for slug, info in runtime.inboxes.items() if info.enabled}
    return await runtime.db.read(
        _reply_options, conversation_id, channels, slugs, runtime.clock.now()
    )


class Tags(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: list[str] = Field(max_length=50)


@router.put("/api/conversations/{conversation_id}/tags", summary="Set a conversation's tags")
async def put_tags(
    conversation_id: int,
    body: Tags,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.TAG_CONVERSATION)),
) -> dict[str, list[str]]:
    tags = list(dict.fromkeys(t.strip() for t in body.tags if t.strip()))
    for tag in tags:
        if not re.match(_TAG, tag):
            raise InvalidInput(f'invalid tag "{tag[:70]}" (letters, digits, space . : / - _)')

    def write(tx: Tx) -> list[str]:
        row = tx.execute(
            select(Conversation.assigned_agent_id, Conversation.state).where(
                Conversation.id == conversation_id
            )
        ).first()
        if row is None:
            raise NotFound(f"no conversation {conversation_id}")
        if not policy.may_work(caller, row.assigned_agent_id, row.state):
            raise Conflict("the conversation is not assigned to you")
        tx.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(tags=tags, updated_at=tx.now)
        )
        return tags

    return {"tags": await runtime.db.write(write)}


@router.get(
    "/api/messages/{message_id}/attachments/{index}",
    summary="Download an attachment (always as a file, never shown inline)",
)
async def attachment(
    message_id: int,
    index: int,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.READ_MESSAGE)),
) -> Response:
    attachments = await runtime.db.read(
        lambda c: c.execute(
            select(Message.attachments).where(Message.id == message_id)
        ).scalar_one_or_none()
    )
    if not attachments or not 0 <= index < len(attachments):
        raise NotFound("no such attachment")
    item = attachments[index]
    if not item.get("blob_key") or runtime.blobs is None:
        raise NotFound("this attachment was not kept (only its name is known)")
    data = await runtime.blobs.get(item["blob_key"])
    name = "".join(
        ch for ch in str(item.get("filename") or "attachment") if ch.isalnum() or ch in "._-"
    )
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{name[:100] or "attachment"}"',
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


@router.post(
    "/api/uploads", summary="Upload a file to attach to a reply (the reply names its blob_key)"
)
async def upload(
    file: UploadFile,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.SELF)),
) -> dict[str, Any]:
    if runtime.blobs is None:
        raise InvalidInput("this server keeps no attachments")
    limit = int(getattr(runtime.blobs, "max_size", 25 * 1024 * 1024))
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise InvalidInput(f"the file is larger than {limit // (1024 * 1024)} MB")
    if not data:
        raise InvalidInput("the file is empty")
    name = (file.filename or "attachment").replace("/", "_").replace("\\", "_")[:200]
    content_type = (file.content_type or "application/octet-stream")[:100]
    key = await runtime.blobs.put(data, content_type, name)
    return {"blob_key": key, "filename": name, "content_type": content_type, "size": len(data)}
