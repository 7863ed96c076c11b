"""Conversations and messages over REST (the websocket offers the same commands live)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, select

from channels.base import PermanentSendError, TemporarySendError
from router import policy
from router.agents import agent_by_name
from router.api.deps import get_runtime, needs
from router.exceptions import Conflict, NotFound, Unavailable
from router.messaging import agent_write
from router.models import Agent, Conversation, Inbox, Message
from router.policy import Caller
from router.runtime import Runtime
from router.serialize import iso, message_payload
from router.timeline import contact_timeline, conversation_detail

router = APIRouter(tags=["conversations"])


def _agent_of(caller: Caller) -> int:
    """The caller's agent id (the rule required an agent profile)."""
    assert caller.agent_id is not None
    return caller.agent_id


def list_conversations(
    conn: Connection,
    filters: dict[str, Any],
    limit: int,
    before: int | None,
    visible: Any = None,
) -> dict[str, Any]:
    """A page of conversations; ``visible`` is the caller's condition (router.policy), part
    of the query, so paging and filters see only what the caller may read."""
    query = select(Conversation)
    if visible is not None:
        query = query.where(visible)
    for column in ("state", "queue", "channel", "contact_id"):
        if filters.get(column) is not None:
            query = query.where(getattr(Conversation, column) == filters[column])
    if filters.get("agent_id") is not None:
        query = query.where(Conversation.assigned_agent_id == filters["agent_id"])
    if before is not None:
        query = query.where(Conversation.id < before)
    rows = conn.execute(query.order_by(Conversation.id.desc()).limit(limit + 1)).all()
    items = [
        {
            "id": c.id,
            "channel": c.channel,
            "state": c.state,
            "queue": c.queue,
            "priority": c.priority,
            "tags": c.tags or [],
            "contact_id": c.contact_id,
            "agent_id": c.assigned_agent_id,
            "created_at": iso(c.created_at),
            "queued_at": iso(c.queued_at),
            "first_response_at": iso(c.first_response_at),
            "resolved_at": iso(c.resolved_at),
        }
        for c in rows[:limit]
    ]
    return {"items": items, "next_before": items[-1]["id"] if len(rows) > limit else None}


@router.get("/api/conversations", summary="Conversations, newest first, filtered")
async def get_conversations(
    state: str | None = None,
    queue: str | None = None,
    channel: str | None = None,
    agent_id: int | None = None,
    contact_id: int | None = None,
    limit: int = Query(50, ge=1, le=500),
    before: int | None = None,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.CONVERSATIONS)),
) -> dict[str, Any]:
    filters = {
        "state": state,
        "queue": queue,
        "channel": channel,
        "agent_id": agent_id,
        "contact_id": contact_id,
    }
    return await runtime.db.read(
        list_conversations, filters, limit, before, policy.visible_conversations(caller)
    )


@router.get(
    "/api/conversations/{conversation_id}",
    summary="A conversation with its contact's full cross-channel timeline",
)
async def get_conversation(
    conversation_id: int,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.READ_CONVERSATION)),
) -> dict[str, Any]:
    detail = await runtime.db.read(
        lambda c: conversation_detail(
            c, conversation_id, visible=policy.visible_conversations(caller)
        )
    )
    if detail is None:
        raise NotFound(f"no conversation {conversation_id}")
    return detail


class Template(BaseModel):
    """A pre-approved provider template (WhatsApp, outside the 24-hour window)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=512)
    language: str = Field(min_length=2, max_length=16)
    params: list[str] = Field(default_factory=list, max_length=100)


class Write(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=20_000)
    note: bool = False
    client_id: str | None = Field(None, max_length=64)
    identity_id: int | None = None
    inbox: str | None = Field(
        None, max_length=64
    )  # send through this inbox (default: where they wrote)
    template: Template | None = None
    attachments: list[dict[str, Any]] | None = Field(
        None,
        max_length=10,
        description="uploads from POST /api/uploads ({blob_key, filename, ...})",
    )


@router.post(
    "/api/conversations/{conversation_id}/messages",
    summary="Reply to the customer (or write an internal note)",
)
async def post_message(
    conversation_id: int,
    body: Write,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.WRITE_CONVERSATION)),
) -> dict[str, Any]:
    result = await runtime.db.write(
        agent_write,
        _agent_of(caller),
        conversation_id,
        body.text,
        note=body.note,
        client_id=body.client_id,
        identity_id=body.identity_id,
        inbox_id=runtime.inbox_id_of(body.inbox),
        supervisor=policy.may_work_unheld(caller),
        template=body.template.model_dump() if body.template else None,
        attachments=body.attachments,
    )
    runtime.outbox.wake()
    return result


@router.post("/api/conversations/{conversation_id}/resolve", summary="Resolve my conversation")
async def resolve(
    conversation_id: int,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.WORK_CONVERSATION)),
) -> dict[str, Any]:
    result = await runtime.assignment.resolve(_agent_of(caller), conversation_id)
    return {"resolved": True, "wrap_up_until": result["wrap_up_until"]}


@router.post(
    "/api/conversations/{conversation_id}/call-back",
    summary="Call the customer of my phone conversation back (my phone is rung in too)",
)
async def call_back(
    conversation_id: int,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.WORK_CONVERSATION)),
) -> dict[str, str]:
    try:
        return await runtime.calls.call_back(_agent_of(caller), conversation_id)
    except (TemporarySendError, PermanentSendError) as exc:
        raise Unavailable(f"the phone provider: {exc.reason}") from exc


class Monitor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, max_length=255, description="E.164 or sip:; default: mine")


@router.post(
    "/api/conversations/{conversation_id}/monitor",
    summary="Listen in on a call, muted (supervisors)",
)
async def monitor(
    conversation_id: int,
    body: Monitor,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.SUPERVISE_CONVERSATION)),
) -> dict[str, str]:
    to = body.to
    if to is None and caller.agent_id is not None:
        phone = await runtime.db.read(
            lambda c: c.execute(
                select(Agent.phone, Agent.sip).where(Agent.id == caller.agent_id)
            ).one()
        )
        to = phone.sip or phone.phone
    if not to:
        raise Conflict("say which phone to ring (to), or set one on your agent profile")
    try:
        return {"leg": await runtime.calls.monitor(conversation_id, to)}
    except (TemporarySendError, PermanentSendError) as exc:
        raise Unavailable(f"the phone provider: {exc.reason}") from exc


@router.post(
    "/api/conversations/{conversation_id}/end-wrap-up",
    summary="End the wrap-up of a conversation I resolved",
)
async def end_wrap_up(
    conversation_id: int,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.WORK_CONVERSATION)),
) -> dict[str, bool]:
    await runtime.assignment.end_wrap_up(_agent_of(caller), conversation_id)
    return {"ended": True}


class Escalation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


@router.post(
    "/api/conversations/{conversation_id}/escalate",
    summary="Escalate my conversation to its queue's escalate_to queue",
)
async def escalate(
    conversation_id: int,
    body: Escalation,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.WORK_CONVERSATION)),
) -> dict[str, str]:
    queue = await runtime.assignment.escalate(_agent_of(caller), conversation_id, body.reason)
    return {"queue": queue}


class Reroute(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(None, max_length=2000)


@router.post(
    "/api/conversations/{conversation_id}/send-to-routing",
    summary="Send my conversation back through the routing rules",
)
async def send_to_routing(
    conversation_id: int,
    body: Reroute,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.WORK_CONVERSATION)),
) -> dict[str, bool]:
    await runtime.assignment.send_to_routing(_agent_of(caller), conversation_id, body.note)
    return {"rerouted": True}


class Transfer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_queue: str | None = None
    to_agent: str | None = None
    note: str | None = Field(None, max_length=2000)


@router.post(
    "/api/conversations/{conversation_id}/transfer",
    summary="Transfer my conversation to a queue or a named agent",
)
async def transfer(
    conversation_id: int,
    body: Transfer,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.WORK_CONVERSATION)),
) -> dict[str, bool]:
    to_agent = None
    if body.to_agent is not None:
        to_agent = await runtime.db.read(agent_by_name, body.to_agent)
        if to_agent is None:
            raise NotFound(f'no agent "{body.to_agent}"')
    await runtime.assignment.transfer(
        _agent_of(caller),
        conversation_id,
        to_queue=body.to_queue,
        to_agent=to_agent,
        note=body.note,
    )
    return {"transferred": True}


class Assign(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: str = Field(description="the agent's user name")
    override: bool = Field(False, description="assign even past the agent's capacity (recorded)")


@router.post(
    "/api/conversations/{conversation_id}/assign",
    summary="Assign or reassign a conversation (supervisors)",
)
async def assign(
    conversation_id: int,
    body: Assign,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.SUPERVISE_CONVERSATION)),
) -> dict[str, bool]:
    agent_id = await runtime.db.read(agent_by_name, body.agent)
    if agent_id is None:
        raise NotFound(f'no agent "{body.agent}"')
    await runtime.assignment.assign(
        conversation_id, agent_id, by=caller.name, override=body.override
    )
    return {"assigned": True}


@router.get("/api/messages/{message_id}", summary="One message")
async def get_message(
    message_id: int,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.READ_MESSAGE)),
) -> dict[str, Any]:
    row = await runtime.db.read(
        lambda c: c.execute(
            select(Message, Inbox.channel)
            .join(Inbox, Inbox.id == Message.inbox_id)
            .where(Message.id == message_id)
        ).first()
    )
    if row is None:
        raise NotFound(f"no message {message_id}")
    return message_payload(row, row.channel)


@router.get(
    "/api/contacts/{contact_id}/timeline",
    summary="Every message of the contact across channels, oldest first, cursor-paginated",
    tags=["contacts"],
)
async def timeline(
    contact_id: int,
    limit: int = Query(100, ge=1, le=500),
    before: int | None = None,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.READ_CONTACT)),
) -> dict[str, Any]:
    visible = policy.visible_conversations(caller)
    return await runtime.db.read(
        lambda c: contact_timeline(c, contact_id, limit=limit, before=before, visible=visible)
    )
