"""Agents see their teams' work, not everyone's (docs/security.md, "Authorization"): the
defects of issue 24, item 3, each shown through the public API only. (test_authz.py walks
every route and command against the whole matrix.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import websockets
from sqlalchemy import select

from adapters.clock import FakeClock
from router.agents import create_agent, parse_capacity
from router.auth import create_user
from router.db import Tx
from router.models import Conversation, Message
from router.runtime import Runtime
from tests.router.test_pipeline import settle
from tests.support import (
    CHANNELS,
    Client,
    connect_agent,
    live_server,
    make_settings,
    post_fake,
    started_runtime,
    ws_url,
)

RULES = """\
version: 1
attributes: {plan: string}
queues:
  billing: {members: [anna]}
  sales: {skills: {sales: 2}}
  general: {skills: {nobody: 1}}
teams:
  payments: {queues: [billing], supervisors: [sue]}
rules:
  - id: team1
    when: {inbox: sms}
    then: {queue: billing}
default: {queue: sales}
"""


class Team:
    def __init__(self, runtime: Runtime, client: httpx.AsyncClient, base: str) -> None:
        self.runtime, self.client, self.base = runtime, client, base
        self.tokens: dict[str, str] = {}
        self.ids: dict[str, int] = {}

    def auth(self, name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.tokens[name]}"}


async def _user(runtime: Runtime, name: str, role: str, skills: dict[str, int] | None) -> str:
    def add(tx: Tx) -> str:
        user_id, token = create_user(tx, name, role)
        if skills is not None:
            create_agent(tx, user_id, name.title(), skills, parse_capacity("sms=2,total=4"))
        return token

    token: str = await runtime.db.write(add)
    return token


async def _message(team: Team, inbox: str, sender: str, text: str) -> int:
    external = uuid.uuid4().hex
    response = await post_fake(
        team.client, inbox, {"id": external, "from": sender, "text": text, "name": "Cora"}
    )
    assert response.status_code == 200, response.text
    await settle(team.runtime)
    message: int = await team.runtime.db.read(
        lambda c: c.execute(select(Message.id).where(Message.external_id == external)).scalar_one()
    )
    return message


@pytest.fixture
async def team(tmp_path: Path, db_url: str) -> AsyncIterator[Team]:
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=CHANNELS)
    async with (
        started_runtime(settings, FakeClock()) as runtime,
        live_server(runtime) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        team = Team(runtime, client, base)
        team.tokens["anna"] = await _user(runtime, "anna", "agent", {})
        team.tokens["ben"] = await _user(runtime, "ben", "agent", {"sales": 3})
        team.tokens["sue"] = await _user(runtime, "sue", "supervisor", None)
        team.tokens["root"] = await _user(runtime, "root", "admin", None)
        # billing (anna's team): an SMS customer; sales (ben's): a WhatsApp customer
        team.ids["billing_message"] = await _message(team, "sms", "+4917012300001", "my bill")
        team.ids["sales_message"] = await _message(team, "wa", "+4917012300002", "my order")
        for name in ("billing", "sales"):
            row = await runtime.db.read(
                lambda c, n=name: c.execute(
                    select(Conversation.id, Conversation.contact_id).where(Conversation.queue == n)
                ).one()
            )
            team.ids[name], team.ids[f"{name}_contact"] = int(row.id), int(row.contact_id)
        yield team


async def test_an_agent_reads_and_writes_only_their_teams_conversations(team: Team) -> None:
    ben, billing = team.auth("ben"), team.ids["billing"]
    listed = (await team.client.get("/api/conversations", headers=ben)).json()["items"]
    assert [c["id"] for c in listed] == [team.ids["sales"]]
    contact = team.ids["billing_contact"]
    for path in (
        f"/api/conversations/{billing}",
        f"/api/conversations/{billing}/reply-options",
        f"/api/messages/{team.ids['billing_message']}",
        f"/api/contacts/{contact}",
        f"/api/contacts/{contact}/timeline",
    ):
        hidden = await team.client.get(path, headers=ben)
        assert hidden.status_code == 404, (path, hidden.text)
    # a hidden conversation is answered exactly like a missing one
    missing = await team.client.get("/api/conversations/999999", headers=ben)
    hidden = await team.client.get(f"/api/conversations/{billing}", headers=ben)
    assert hidden.json()["message"] == f"no conversation {billing}"
    assert missing.json()["message"] == "no conversation 999999"
    note = await team.client.post(
        f"/api/conversations/{billing}/messages",
        headers=ben,
        json={"text": "I was here", "note": True},
    )
    assert note.status_code == 404
    assert (
        await team.client.get(f"/api/contacts/{team.ids['sales_contact']}", headers=ben)
    ).status_code == 200
    # anna, a member of billing, reads it and may write a note (without holding it)
    anna = team.auth("anna")
    assert (await team.client.get(f"/api/conversations/{billing}", headers=anna)).status_code == 200
    written = await team.client.post(
        f"/api/conversations/{billing}/messages",
        headers=anna,
        json={"text": "checked the invoice", "note": True},
    )
    assert written.status_code == 200, written.text


async def test_the_agent_socket_refuses_other_teams_timelines_and_notes(team: Team) -> None:
    agent, _ = await connect_agent(team.base, team.tokens["ben"])
    try:
        for command, fields in (
            ("timeline", {}),
            ("note", {"text": "I was here"}),
            ("typing", {}),
        ):
            request_id = f"r-{command}"
            await agent.send(
                {
                    "type": command,
                    "id": request_id,
                    "conversation_id": team.ids["billing"],
                    **fields,
                }
            )
            reply = await agent.wait_for(lambda f, r=request_id: f.get("id") == r)
            assert (reply["type"], reply["code"]) == ("error", "not_found"), reply
        own = await agent.command("timeline", conversation_id=team.ids["sales"])
        assert [m["text"] for m in own["messages"]] == ["my order"]
    finally:
        await agent.close()


async def test_routing_fields_of_a_contact_need_a_supervisor(team: Team) -> None:
    contact = f"/api/contacts/{team.ids['billing_contact']}"
    for change in ({"vip": True}, {"tier": "gold"}, {"attributes": {"plan": "pro"}}):
        refused = await team.client.patch(contact, headers=team.auth("anna"), json=change)
        assert refused.status_code == 403, refused.text
        assert refused.json()["message"].endswith("changes routing: it needs a supervisor")
    renamed = await team.client.patch(contact, headers=team.auth("anna"), json={"name": "Cora B"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "Cora B"
    vip = await team.client.patch(contact, headers=team.auth("sue"), json={"vip": True})
    assert vip.status_code == 200 and vip.json()["vip"] is True


async def test_a_supervisor_with_teams_sees_their_queues_only(team: Team) -> None:
    sue = team.auth("sue")
    listed = (await team.client.get("/api/conversations", headers=sue)).json()["items"]
    assert [c["id"] for c in listed] == [team.ids["billing"]]
    hidden = await team.client.get(f"/api/conversations/{team.ids['sales']}", headers=sue)
    assert hidden.status_code == 404
    backlog = (await team.client.get("/api/reports/backlog", headers=sue)).json()["rows"]
    assert [row["queue"] for row in backlog] == ["billing"]
    agents = (await team.client.get("/api/agents", headers=sue)).json()
    assert [a["user"] for a in agents] == ["anna"]
    # the dashboard's socket too
    ws = await websockets.connect(ws_url(team.base, "/ws/supervisor"), open_timeout=10)
    dashboard = Client(ws)
    try:
        await dashboard.send({"type": "hello", "token": team.tokens["sue"]})
        snapshot = await dashboard.wait_for(lambda f: f.get("type") == "snapshot")
        assert [q["name"] for q in snapshot["queues"]] == ["billing"]
        assert [a["user"] for a in snapshot["agents"]] == ["anna"]
    finally:
        await dashboard.close()
    # without teams, every supervisor sees everything
    put = await team.client.put(
        "/api/admin/rules",
        headers={**team.auth("root"), "content-type": "application/yaml"},
        content=RULES.replace("teams:\n  payments: {queues: [billing], supervisors: [sue]}\n", ""),
    )
    assert put.status_code == 200, put.text
    listed = (await team.client.get("/api/conversations", headers=sue)).json()["items"]
    assert sorted(c["id"] for c in listed) == sorted([team.ids["billing"], team.ids["sales"]])
