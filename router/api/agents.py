"""Agents: who is online, their load, their state; admins edit skills and capacity."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, bindparam, select

from router import policy
from router.agents import parse_capacity, parse_skills, update_agent
from router.api.deps import get_runtime, needs
from router.exceptions import InvalidInput, NotFound
from router.models import Agent, AgentLoad, AgentSkill, User
from router.policy import Caller
from router.runtime import Runtime
from router.serialize import iso
from router.types import AgentPresence
from router.ws_agent import agent_state

router = APIRouter(prefix="/api/agents", tags=["agents"])


_AGENTS = (
    select(Agent, User.name.label("user_name"))
    .join(User, User.id == Agent.user_id)
    .order_by(Agent.id)
)
_ONE_AGENT = _AGENTS.where(Agent.id == bindparam("agent_id"))
_SKILLS_OF = select(AgentSkill).where(AgentSkill.agent_id.in_(bindparam("ids", expanding=True)))
_LOADS_OF = select(AgentLoad).where(AgentLoad.agent_id.in_(bindparam("ids", expanding=True)))


def agents_view(
    conn: Connection, agent_id: int | None = None, visible: Any = None
) -> list[dict[str, Any]]:
    """Every agent (``visible``: those the caller may see, router.policy), or one."""
    if agent_id is None:
        rows = conn.execute(_AGENTS if visible is None else _AGENTS.where(visible)).all()
    else:
        rows = conn.execute(_ONE_AGENT, {"agent_id": agent_id}).all()
    ids = [r.id for r in rows]
    skills: dict[int, dict[str, int]] = {}
    for s in conn.execute(_SKILLS_OF, {"ids": ids}):
        skills.setdefault(s.agent_id, {})[s.skill] = s.level
    load: dict[int, dict[str, dict[str, int]]] = {}
    for row in conn.execute(_LOADS_OF, {"ids": ids}):
        load.setdefault(row.agent_id, {})[row.channel] = {"used": row.used, "cap": row.cap}
    return [
        {
            "id": r.id,
            "user": r.user_name,
            "name": r.display_name,
            "presence": r.presence,
            "presence_changed_at": iso(r.presence_changed_at),
            "idle_since": iso(r.idle_since),
            "skills": skills.get(r.id, {}),
            "load": load.get(r.id, {}),
            "phone": r.phone,
            "sip": r.sip,
            "exclusive_channels": r.exclusive_channels or [],
            "missed_offers": r.missed_offers,
        }
        for r in rows
    ]


@router.get("", summary="Every agent with presence, skills and load per channel")
async def list_agents(
    runtime: Runtime = Depends(get_runtime), caller: Caller = Depends(needs(policy.AGENTS))
) -> list[dict[str, Any]]:
    visible = policy.visible_agents(caller, runtime.rules.active)
    return await runtime.db.read(lambda c: agents_view(c, visible=visible))


@router.get("/me/state", summary="My pending offers and my conversations")
async def my_state(
    runtime: Runtime = Depends(get_runtime), caller: Caller = Depends(needs(policy.OWN_WORK))
) -> dict[str, Any]:
    assert caller.agent_id is not None
    return await runtime.db.read(agent_state, caller.agent_id)


@router.get("/{agent_id}", summary="One agent")
async def get_agent(
    agent_id: int,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.SUPERVISE_AGENT)),
) -> dict[str, Any]:
    found = await runtime.db.read(agents_view, agent_id)
    if not found:
        raise NotFound(f"no agent {agent_id}")
    return found[0]


class StatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: AgentPresence


@router.post("/{agent_id}/status", summary="Set an agent's presence (supervisors)")
async def set_status(
    agent_id: int,
    change: StatusChange,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.SUPERVISE_AGENT)),
) -> dict[str, Any]:
    view = await runtime.assignment.set_status(
        agent_id,
        change.status,
        f"set by {caller.name}",
        then=lambda tx: agents_view(tx.conn, agent_id),
    )
    assert view is not None
    return view[0]


class AgentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    skills: str | dict[str, int] | None = None
    capacity: str | dict[str, int] | None = None
    phone: str | None = None
    sip: str | None = None
    exclusive_channels: list[str] | None = None


@router.patch("/{agent_id}", summary="Change skills, capacity, phone (admins)")
async def patch_agent(
    agent_id: int,
    patch: AgentPatch,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.ADMIN)),
) -> dict[str, Any]:
    skills = parse_skills(patch.skills) if patch.skills is not None else None
    capacity = parse_capacity(patch.capacity) if patch.capacity is not None else None
    if patch.phone is not None and patch.sip is not None:
        raise InvalidInput("give phone or sip, not both")
    await runtime.db.write(
        update_agent,
        agent_id,
        skills=skills,
        capacity=capacity,
        phone=patch.phone,
        sip=patch.sip,
        exclusive_channels=patch.exclusive_channels,
    )
    await runtime.assignment.dispatch()
    return (await runtime.db.read(agents_view, agent_id))[0]
