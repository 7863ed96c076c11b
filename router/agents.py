"""Agents: skills with levels, capacity per channel plus ``total``, phone or SIP, presence.

Queue membership is not here: it comes only from ``members:`` in rules.yaml.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from router.db import Tx, prepared
from router.exceptions import Conflict, InvalidInput, NotFound
from router.models import Agent, AgentLoad, AgentSkill, AgentStatusEvent, User, table
from router.types import CAPACITY_KEYS, CHANNEL_IDS

__all__ = [
    "DEFAULT_CAPACITY",
    "create_agent",
    "load_snapshot",
    "parse_capacity",
    "parse_skills",
    "record_status",
    "update_agent",
]

DEFAULT_CAPACITY = {
    "webchat": 3,
    "email": 5,
    "sms": 3,
    "messenger": 3,
    "whatsapp": 3,
    "voice": 1,
    "total": 6,
}
_SKILL = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_PHONE = re.compile(r"^\+[1-9]\d{6,14}$")


def _numbered(
    spec: str | dict[str, Any], what: str, low: int, high: int, example: int
) -> list[tuple[str, int]]:
    """``a=1,b=2`` (or a mapping) -> ``[("a", 1), ("b", 2)]``, each number within range."""
    if isinstance(spec, dict):
        pairs = [(str(k), v) for k, v in spec.items()]
    else:
        pairs = [
            (name.strip(), raw.strip())
            for name, _, raw in (p.partition("=") for p in spec.split(",") if p.strip())
        ]
    out = []
    for name, raw in pairs:
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise InvalidInput(
                f'{what} "{name}" needs a number {low}-{high}, like {name}={example}'
            ) from None
        if not low <= number <= high:
            raise InvalidInput(f'{what} "{name}" must be between {low} and {high}, got {number}')
        out.append((name, number))
    return out


def parse_skills(spec: str | dict[str, Any]) -> dict[str, int]:
    """``billing=5,lang_de=3`` (or a mapping) -> ``{"billing": 5, "lang_de": 3}``; levels 1-10."""
    out: dict[str, int] = {}
    for name, level in _numbered(spec, "skill", 1, 10, 5):
        if not _SKILL.match(name):
            raise InvalidInput(
                f'invalid skill "{name}" (lowercase letters, digits, _; languages are lang_<code>)'
            )
        out[name] = level
    return out


def parse_capacity(spec: str | dict[str, Any]) -> dict[str, int]:
    """``webchat=3,email=5,total=6`` -> a full capacity map (unlisted channels: 0; total: the sum)."""
    given: dict[str, int] = {}
    for key, number in _numbered(spec, "capacity", 0, 1000, 3):
        if key not in CAPACITY_KEYS:
            raise InvalidInput(f'unknown capacity key "{key}" (one of {", ".join(CAPACITY_KEYS)})')
        given[key] = number
    capacity = {c: given.get(c, 0) for c in CHANNEL_IDS}
    capacity["total"] = given.get("total", sum(capacity.values()))
    return capacity


def _validate_contact_points(phone: str | None, sip: str | None, exclusive: list[str]) -> None:
    if phone is not None and not _PHONE.match(phone):
        raise InvalidInput(f'phone "{phone}" must be E.164, like +4930123456')
    if sip is not None and not sip.startswith("sip:"):
        raise InvalidInput(f'SIP address "{sip}" must start with sip:')
    for channel in exclusive:
        if channel not in CHANNEL_IDS:
            raise InvalidInput(f'unknown channel "{channel}" in exclusive channels')


def create_agent(
    tx: Tx,
    user_id: int,
    display_name: str,
    skills: dict[str, int],
    capacity: dict[str, int],
    *,
    phone: str | None = None,
    sip: str | None = None,
    exclusive_channels: list[str] | None = None,
) -> int:
    exclusive = list(exclusive_channels or [])
    _validate_contact_points(phone, sip, exclusive)
    if tx.execute(select(Agent.id).where(Agent.user_id == user_id)).first():
        raise Conflict("this user is already an agent")
    agent_id = int(
        tx.execute(
            insert(Agent)
            .values(
                user_id=user_id,
                display_name=display_name,
                presence="offline",
                presence_changed_at=tx.now,
                idle_since=tx.now,
                phone=phone,
                sip=sip,
                exclusive_channels=exclusive,
                missed_offers=0,
                rr_position=0,
                created_at=tx.now,
            )
            .returning(Agent.id)
        ).scalar_one()
    )
    if skills:
        tx.execute(
            insert(AgentSkill),
            [{"agent_id": agent_id, "skill": s, "level": lvl} for s, lvl in skills.items()],
        )
    tx.execute(
        insert(AgentLoad),
        [
            {"agent_id": agent_id, "channel": c, "used": 0, "cap": capacity.get(c, 0)}
            for c in CAPACITY_KEYS
        ],
    )
    record_status(tx, agent_id, "offline", "created")
    return agent_id


def update_agent(
    tx: Tx,
    agent_id: int,
    *,
    skills: dict[str, int] | None = None,
    capacity: dict[str, int] | None = None,
    phone: str | None = None,
    sip: str | None = None,
    exclusive_channels: list[str] | None = None,
) -> None:
    if not tx.execute(select(Agent.id).where(Agent.id == agent_id)).first():
        raise NotFound(f"no agent {agent_id}")
    _validate_contact_points(phone, sip, exclusive_channels or [])
    values: dict[str, Any] = {}
    if phone is not None:
        values["phone"] = phone
    if sip is not None:
        values["sip"] = sip
    if exclusive_channels is not None:
        values["exclusive_channels"] = exclusive_channels
    if values:
        tx.execute(update(Agent).where(Agent.id == agent_id).values(**values))
    if skills is not None:
        tx.execute(delete(AgentSkill).where(AgentSkill.agent_id == agent_id))
        if skills:
            tx.execute(
                insert(AgentSkill),
                [{"agent_id": agent_id, "skill": s, "level": lvl} for s, lvl in skills.items()],
            )
    if capacity is not None:
        for channel in CAPACITY_KEYS:
            tx.execute(
                update(AgentLoad)
                .where(AgentLoad.agent_id == agent_id, AgentLoad.channel == channel)
                .values(cap=capacity.get(channel, 0))
            )
        record_status(tx, agent_id, None, "capacity_changed")


_SNAPSHOT = select(AgentLoad.channel, AgentLoad.used, AgentLoad.cap).where(
    AgentLoad.agent_id == bindparam("agent")
)
_PRESENCE = prepared(select(Agent.presence).where(Agent.id == bindparam("agent")))
_STATUS = prepared(insert(table(AgentStatusEvent)))


def load_snapshot(conn: Connection, agent_id: int) -> dict[str, list[int]]:
    return {r.channel: [r.used, r.cap] for r in conn.execute(_SNAPSHOT, {"agent": agent_id})}


def record_status(
    tx: Tx,
    agent_id: int,
    presence: str | None,
    reason: str,
    *,
    load: dict[str, list[int]] | None = None,
) -> None:
    """Append an AgentStatusEvent: presence and capacity ``[used, cap]`` after a change (the
    channels that changed when ``load`` is given, else every channel)."""
    if presence is None:
        presence = tx.execute(_PRESENCE, {"agent": agent_id}).scalar_one()
    snapshot = load if load is not None else load_snapshot(tx.conn, agent_id)
    tx.append(
        _STATUS,
        {
            "agent_id": agent_id,
            "at": tx.now,
            "presence": presence,
            "load": snapshot,
            "reason": reason,
        },
    )


def agent_by_name(conn: Connection, name: str) -> int | None:
    return conn.execute(
        select(Agent.id).join(User, User.id == Agent.user_id).where(User.name == name)
    ).scalar_one_or_none()
