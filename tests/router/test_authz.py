"""Authorization (docs/security.md, "Authorization"): the whole route table and both socket
command tables, walked with every kind of caller, against a declared matrix.

Two teams: ``billing`` (agent anna, supervisor sue) and ``sales`` (agent ben, supervisor
sam), configured with ``teams:`` in rules.yaml; then the same walk for sam and the admin
after a ruleset without ``teams:`` is activated (every supervisor sees everything). The
callers, in the matrix's column order:

- ``A``  anna, agent, member of billing (holds the team-1 conversation)
- ``B``  ben, agent, member of sales (holds the team-2 conversation)
- ``S``  sue, supervisor of billing, with an agent profile, teams configured
- ``S*`` sam, supervisor (with an agent profile), teams not configured
- ``AD`` root, admin, no agent profile
- ``V``  a web-chat visitor, with their visitor token
- ``N``  no credentials

Each cell is ``ok`` (the policy let the call through: any answer but the policy's refusals),
``401``, ``403`` or ``404`` (the policy's refusals, recognised by their messages: a hidden
object is answered exactly like a missing one), or an exact status for routes that do not
take staff credentials at all (the same for every caller).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import iter_route_contexts
from sqlalchemy import insert, select, update

from adapters.clock import FakeClock
from router import policy, ws_agent, ws_supervisor
from router.agents import create_agent, parse_capacity
from router.api.deps import needs, rule_of
from router.app import create_app
from router.auth import authenticate_token, create_user
from router.credentials import WITH_TOKEN
from router.csat import link_signature
from router.db import Tx
from router.models import Conversation, Message, Offer, Outbox, Quarantine
from router.runtime import Runtime
from router.sessions import COOKIE, CSRF_HEADER
from tests.router.test_pipeline import settle
from tests.support import (
    WEB_CHANNELS,
    Client,
    connect_visitor,
    live_server,
    make_settings,
    post_fake,
    started_runtime,
    ws_url,
)

TEAMS = """\
teams:
  payments: {queues: [billing], supervisors: [sue]}
  shop: {queues: [sales], supervisors: [sam]}
"""
RULES = """\
version: 1
attributes: {plan: string}
queues:
  billing: {members: [anna]}
  sales: {members: [ben]}
  general: {skills: {nobody: 1}}
{teams}rules:
  - id: team1
    when: {inbox: {in: [web, sms]}}
    then: {queue: billing}
  - id: team2
    when: {inbox: wa}
    then: {queue: sales}
default: {queue: general}
"""
# each team's conversations of one customer stay apart (WhatsApp does not join the SMS one)
CHANNELS = WEB_CHANNELS.replace(
    '  wa: {channel: whatsapp, provider: fake, secret: "fake-inbox-secret"}',
    '  wa: {channel: whatsapp, provider: fake, secret: "fake-inbox-secret", continuity: per_channel}',
)
assert CHANNELS != WEB_CHANNELS
RULES_TEAMS = RULES.replace("{teams}", TEAMS)
RULES_NO_TEAMS = RULES.replace("{teams}", "")

PRINCIPALS = ("A", "B", "S", "S*", "AD", "V", "N")
USERS = {"A": "anna", "B": "ben", "S": "sue", "S*": "sam", "AD": "root"}
WS_PRINCIPALS = ("A", "B", "S", "S*")  # who can open /ws/agent (an agent profile)
SUP_PRINCIPALS = ("S", "S*", "AD")  # who can open /ws/supervisor

# -- the declared matrix: (method, path, variant, rule) -> "A B S S* AD V N" -----------------
# variant: t1 = team-1 (billing) objects, t2 = team-2 (sales) objects, - = none; a suffix
# after ":" picks another body (PATCH a contact's name, or its vip flag).
READ_1, READ_2 = "ok 404 ok ok ok 401 401", "404 ok 404 ok ok 401 401"
AGENT_1, AGENT_2 = "ok 404 ok ok 403 401 401", "404 ok 404 ok 403 401 401"
SUP_1, SUP_2 = "403 403 ok ok ok 401 401", "403 403 404 ok ok 401 401"
STAFF = "ok ok ok ok ok 401 401"
OWN = "ok ok ok ok 403 401 401"
SUP = "403 403 ok ok ok 401 401"
ADMIN = "403 403 403 403 ok 401 401"


def same(code: int) -> str:
    return " ".join([str(code)] * len(PRINCIPALS))


C = "/api/conversations/{conversation_id}"
K = "/api/contacts/{contact_id}"
MATRIX: list[tuple[str, str, str, str, str]] = [
    # public, signed or visitor-gated: staff credentials change nothing
    ("GET", "/openapi.json", "-", "public", same(200)),
    ("GET", "/docs", "-", "public", same(200)),
    ("GET", "/redoc", "-", "public", same(200)),
    ("GET", "/healthz", "-", "public", same(200)),
    ("GET", "/readyz", "-", "public", same(200)),
    ("GET", "/metrics", "-", "public", same(200)),
    ("GET", "/widget.js", "-", "public", same(200)),
    ("GET", "/widget.css", "-", "public", same(200)),
    ("GET", "/static/{name}", "-", "public", same(200)),
    ("GET", "/static/docs/{name}", "-", "public", same(200)),
    ("GET", "/favicon.ico", "-", "public", same(204)),
    ("GET", "/demo", "-", "public", same(200)),
    ("GET", "/demo/agent", "-", "public", same(200)),
    ("GET", "/console/login", "-", "public", same(200)),
    ("POST", "/console/login", "-", "sign-in", same(401)),
    ("POST", "/webhooks/fake/{inbox}", "-", "webhook", same(403)),
    ("POST", "/webhooks/twilio/{inbox}/{kind}", "-", "webhook", same(404)),
    ("GET", "/webhooks/meta/{app}", "-", "webhook", same(404)),
    ("POST", "/webhooks/meta/{app}", "-", "webhook", same(404)),
    ("GET", "/survey/{conversation_id}/{signature}/{score}", "t1", "survey-link", same(200)),
    ("POST", "/survey/{conversation_id}/{signature}/{score}", "t1", "survey-link", same(200)),
    # console pages: the session cookie (staff have one; the visitor and N do not)
    ("GET", "/console/session", "-", "session", "200 200 200 200 200 401 401"),
    ("GET", "/console", "-", "console-page", "200 200 200 200 200 303 303"),
    ("GET", "/console/supervisor", "-", "dashboard-page", "403 403 200 200 200 303 303"),
    # the signed-in user
    ("GET", "/api/me", "-", "self", STAFF),
    ("GET", "/api/queues", "-", "self", STAFF),
    ("POST", "/api/uploads", "-", "self", STAFF),
    ("GET", "/api/agents/me/state", "-", "own-work", OWN),
    # conversations
    ("GET", "/api/conversations", "-", "conversations", STAFF),
    ("GET", C, "t1", "read-conversation", READ_1),
    ("GET", C, "t2", "read-conversation", READ_2),
    ("GET", C + "/canned", "t1", "read-conversation", READ_1),
    ("GET", C + "/canned", "t2", "read-conversation", READ_2),
    ("GET", C + "/reply-options", "t1", "read-conversation", READ_1),
    ("GET", C + "/reply-options", "t2", "read-conversation", READ_2),
    ("GET", "/api/messages/{message_id}", "t1", "read-message", READ_1),
    ("GET", "/api/messages/{message_id}", "t2", "read-message", READ_2),
    ("GET", "/api/messages/{message_id}/attachments/{index}", "t1", "read-message", READ_1),
    ("GET", "/api/messages/{message_id}/attachments/{index}", "t2", "read-message", READ_2),
    ("PUT", C + "/tags", "t1", "tag-conversation", READ_1),
    ("PUT", C + "/tags", "t2", "tag-conversation", READ_2),
    ("POST", C + "/messages", "t1:note", "write-conversation", AGENT_1),
    ("POST", C + "/messages", "t2:note", "write-conversation", AGENT_2),
    ("POST", C + "/messages", "t1:reply", "write-conversation", AGENT_1),
    ("POST", C + "/messages", "t2:reply", "write-conversation", AGENT_2),
    ("POST", C + "/escalate", "t1", "work-conversation", AGENT_1),
    ("POST", C + "/escalate", "t2", "work-conversation", AGENT_2),
    ("POST", C + "/call-back", "t1", "work-conversation", AGENT_1),
    ("POST", C + "/call-back", "t2", "work-conversation", AGENT_2),
    ("POST", C + "/end-wrap-up", "t1", "work-conversation", AGENT_1),
    ("POST", C + "/end-wrap-up", "t2", "work-conversation", AGENT_2),
    ("POST", C + "/send-to-routing", "t1", "work-conversation", AGENT_1),
    ("POST", C + "/send-to-routing", "t2", "work-conversation", AGENT_2),
    ("POST", C + "/transfer", "t1", "work-conversation", AGENT_1),
    ("POST", C + "/transfer", "t2", "work-conversation", AGENT_2),
    ("POST", C + "/resolve", "t1", "work-conversation", AGENT_1),
    ("POST", C + "/resolve", "t2", "work-conversation", AGENT_2),
    ("POST", C + "/monitor", "t1", "supervise-conversation", SUP_1),
    ("POST", C + "/monitor", "t2", "supervise-conversation", SUP_2),
    ("POST", C + "/assign", "t1", "supervise-conversation", SUP_1),
    ("POST", C + "/assign", "t2", "supervise-conversation", SUP_2),
    # contacts
    ("GET", K, "t1", "read-contact", READ_1),
    ("GET", K, "t2", "read-contact", READ_2),
    ("GET", K + "/timeline", "t1", "read-contact", READ_1),
    ("GET", K + "/timeline", "t2", "read-contact", READ_2),
    ("GET", K + "/suggestions", "t1", "read-contact", READ_1),
    ("GET", K + "/suggestions", "t2", "read-contact", READ_2),
    ("GET", K + "/links", "t1", "read-contact", READ_1),
    ("GET", K + "/links", "t2", "read-contact", READ_2),
    ("PATCH", K, "t1:name", "edit-contact", READ_1),
    ("PATCH", K, "t2:name", "edit-contact", READ_2),
    ("PATCH", K, "t1:vip", "edit-contact", "403 404 ok ok ok 401 401"),
    ("PATCH", K, "t2:vip", "edit-contact", "404 403 404 ok ok 401 401"),
    ("POST", K + "/merge", "t1", "merge-contacts", READ_1),
    ("POST", K + "/merge", "t2", "merge-contacts", READ_2),
    ("POST", K + "/identities/{identity_id}/split", "t1", "split-contact", SUP_1),
    ("POST", K + "/identities/{identity_id}/split", "t2", "split-contact", SUP_2),
    ("GET", K + "/export", "t1", "contact-data", ADMIN),
    ("GET", K + "/export", "t2", "contact-data", ADMIN),
    # agents, queues, reports
    ("GET", "/api/agents", "-", "agents", SUP),
    ("GET", "/api/agents/{agent_id}", "t1", "supervise-agent", SUP_1),
    ("GET", "/api/agents/{agent_id}", "t2", "supervise-agent", SUP_2),
    ("POST", "/api/agents/{agent_id}/status", "t1", "supervise-agent", SUP_1),
    ("POST", "/api/agents/{agent_id}/status", "t2", "supervise-agent", SUP_2),
    ("PATCH", "/api/agents/{agent_id}", "t1", "admin", ADMIN),
    ("GET", "/api/reports/kpis", "-", "reports", SUP),
    ("GET", "/api/reports/backlog", "-", "reports", SUP),
    ("GET", "/api/reports/fairness", "-", "reports", SUP),
    # admins
    ("GET", "/api/admin/rules", "-", "admin", ADMIN),
    ("PUT", "/api/admin/rules", "-", "admin", ADMIN),
    ("GET", "/api/admin/quarantine", "-", "admin", ADMIN),
    ("GET", "/api/admin/quarantine/{item_id}/raw", "-", "admin", ADMIN),
    ("POST", "/api/admin/quarantine/{item_id}/reimport", "-", "admin", ADMIN),
    ("GET", "/api/admin/outbox", "-", "admin", ADMIN),
    ("POST", "/api/admin/outbox/{outbox_id}/resend", "-", "admin", ADMIN),
    ("GET", "/api/users", "-", "admin", ADMIN),
    ("POST", "/api/users", "-", "admin", ADMIN),
    ("POST", "/api/users/{name}/rotate", "-", "admin", ADMIN),
    ("DELETE", "/api/users/{name}", "-", "admin", ADMIN),
    # last: what ends sessions or erases
    ("POST", K + "/erase", "t1", "contact-data", ADMIN),
    ("POST", K + "/erase", "t2", "contact-data", ADMIN),
    ("POST", "/api/me/password", "-", "self", STAFF),
    ("POST", "/console/logout", "-", "session", same(200)),
    # sockets: opening them (the hello)
    ("WS", "/ws/agent", "-", "agent-socket", "ok ok ok ok 403 401 401"),
    ("WS", "/ws/supervisor", "-", "supervisor-socket", "403 403 ok ok ok 401 401"),
    # a staff token is no visitor token: refused (token_rejected), and a new chat begins
    ("WS", "/ws/chat", "-", "visitor", " ".join(["token_rejected"] * 5 + ["ok", "ok"])),
]

# /ws/agent commands, by the callers who can open it: "A B S S*"
W_1, W_2 = "ok 404 ok ok", "404 ok 404 ok"
AGENT_COMMANDS: list[tuple[str, str, str, str]] = [
    ("ping", "-", "self", "ok ok ok ok"),
    ("state", "-", "own-work", "ok ok ok ok"),
    ("set_status", "-", "own-work", "ok ok ok ok"),
    ("timeline", "t1", "read-conversation", W_1),
    ("timeline", "t2", "read-conversation", W_2),
    ("typing", "t1", "work-conversation", W_1),
    ("typing", "t2", "work-conversation", W_2),
    ("note", "t1", "write-conversation", W_1),
    ("note", "t2", "write-conversation", W_2),
    ("reply", "t1", "write-conversation", W_1),
    ("reply", "t2", "write-conversation", W_2),
    ("resend", "t1", "resend-message", W_1),
    ("resend", "t2", "resend-message", W_2),
    ("reject", "t1", "own-offer", "ok 404 404 404"),  # anna's second offer
    ("reject", "t2", "own-offer", "404 ok 404 404"),
    ("accept", "t1", "own-offer", "ok 404 404 404"),
    ("accept", "t2", "own-offer", "404 ok 404 404"),
    ("escalate", "t1", "work-conversation", W_1),
    ("escalate", "t2", "work-conversation", W_2),
    ("end_wrap_up", "t1", "work-conversation", W_1),
    ("end_wrap_up", "t2", "work-conversation", W_2),
    ("transfer", "t1", "work-conversation", W_1),
    ("transfer", "t2", "work-conversation", W_2),
    ("send_to_routing", "t1", "work-conversation", W_1),
    ("send_to_routing", "t2", "work-conversation", W_2),
    ("resolve", "t1", "work-conversation", W_1),
    ("resolve", "t2", "work-conversation", W_2),
    ("merge_contacts", "t1", "merge-contacts", W_1),
    ("merge_contacts", "t2", "merge-contacts", W_2),
    ("logout", "-", "own-work", "ok ok ok ok"),
]
# /ws/supervisor commands: "S S* AD"
SUPERVISOR_COMMANDS: list[tuple[str, str, str, str]] = [("ping", "-", "dashboard", "ok ok ok")]


# -- the world: two teams, their conversations, contacts, messages and attachments -----------
@dataclass
class World:
    runtime: Runtime
    client: httpx.AsyncClient
    base: str
    app: FastAPI
    tokens: dict[str, str] = field(default_factory=dict)  # principal -> bearer token
    sessions: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (cookie, csrf)
    agents: dict[str, int] = field(default_factory=dict)  # user name -> agent id
    ids: dict[str, int] = field(default_factory=dict)  # named objects
    offers: dict[str, int] = field(default_factory=dict)  # t1/t2 -> a pending offer


async def _staff(runtime: Runtime, name: str, role: str, agent: bool) -> tuple[str, int | None]:
    def add(tx: Tx) -> tuple[str, int | None]:
        user_id, token = create_user(tx, name, role)
        agent_id = (
            create_agent(
                tx,
                user_id,
                name.title(),
                {},
                parse_capacity("webchat=3,sms=3,whatsapp=3,email=3,total=9"),
            )
            if agent
            else None
        )
        return token, agent_id

    result: tuple[str, int | None] = await runtime.db.write(add)
    return result


async def _inbound(world: World, inbox: str, sender: str, name: str, text: str = "hi") -> int:
    """A customer message through a fake inbox; the id of its conversation."""
    external = uuid.uuid4().hex
    response = await post_fake(
        world.client,
        inbox,
        {"id": external, "from": sender, "kind": "phone", "text": text, "name": name},
    )
    assert response.status_code == 200, response.text
    await settle(world.runtime)
    conversation: int = await world.runtime.db.read(
        lambda c: c.execute(
            select(Message.conversation_id).where(Message.external_id == external)
        ).scalar_one()
    )
    return conversation


async def _contact(world: World, conversation_id: int) -> int:
    contact: int = await world.runtime.db.read(
        lambda c: c.execute(
            select(Conversation.contact_id).where(Conversation.id == conversation_id)
        ).scalar_one()
    )
    return contact


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def _build(world: World) -> None:
    rt, ids = world.runtime, world.ids
    for principal, (name, role, agent) in {
        "A": ("anna", "agent", True),
        "B": ("ben", "agent", True),
        "S": ("sue", "supervisor", True),
        "S*": ("sam", "supervisor", True),
        "AD": ("root", "admin", False),
    }.items():
        token, agent_id = await _staff(rt, name, role, agent)
        world.tokens[principal] = token
        if agent_id is not None:
            world.agents[name] = agent_id
        found = await rt.db.read(authenticate_token, token)
        signed = await world.app.state.sessions.sign_in(found, WITH_TOKEN)
        world.sessions[principal] = (signed.token, world.app.state.sessions.csrf(signed.token))
    for victim in ("victim1", "victim2"):
        await rt.db.write(create_user, victim, "agent")

    # team 1: a web-chat visitor (their token is the V column), held by anna
    visitor, welcome = await connect_visitor(world.base, name="Vera")
    world.tokens["V"] = welcome["token"]
    await visitor.send({"type": "message", "client_id": uuid.uuid4().hex, "text": "hello"})
    await visitor.wait_for(lambda f: f.get("type") == "ack")
    await visitor.close()
    await settle(rt)
    ids["conv1"] = await rt.db.read(
        lambda c: (
            c.execute(select(Conversation.id).where(Conversation.channel == "webchat"))
            .scalars()
            .one()
        )
    )
    # team 2: a WhatsApp customer, held by ben
    ids["conv2"] = await _inbound(world, "wa", "+4917099000002", "Walt")
    for team, conversation, agent in (("t1", "conv1", "A"), ("t2", "conv2", "B")):
        await rt.assignment.assign(
            ids[conversation], world.agents[USERS[agent]], by="setup", override=True
        )
        token = world.tokens[agent]
        upload = await world.client.post(
            "/api/uploads",
            headers=_auth(token),
            files={"file": ("order.txt", f"order of {team}".encode(), "text/plain")},
        )
        assert upload.status_code == 200, upload.text
        note = await world.client.post(
            f"/api/conversations/{ids[conversation]}/messages",
            headers=_auth(token),
            json={"text": f"note {team}", "note": True, "attachments": [upload.json()]},
        )
        assert note.status_code == 200, note.text
        ids[f"note_{team}"] = note.json()["message_id"]
        reply = await world.client.post(
            f"/api/conversations/{ids[conversation]}/messages",
            headers=_auth(token),
            json={"text": f"reply {team}"},
        )
        assert reply.status_code == 200, reply.text
        ids[f"reply_{team}"] = reply.json()["message_id"]
        ids[f"contact_{team}"] = await _contact(world, ids[conversation])
    # more work in each team: waiting, merge pairs (same name: a suggested match), erasure
    for team, inbox, prefix in (("t1", "sms", "+49170111"), ("t2", "wa", "+49170999")):
        ids[f"waiting_{team}"] = await _inbound(world, inbox, prefix + "00003", f"Carl {team}")
        for n, pair in enumerate(("merge", "wsmerge")):
            name = f"Mira {pair} {team}"
            first = await _inbound(world, inbox, prefix + f"0001{n}", name)
            second = await _inbound(world, inbox, prefix + f"0002{n}", name)
            ids[f"{pair}_into_{team}"] = await _contact(world, first)
            ids[f"{pair}_from_{team}"] = await _contact(world, second)
        ids[f"erase_{team}"] = await _contact(
            world, await _inbound(world, inbox, prefix + "00009", f"Erin {team}")
        )
    # an offer ben got for a billing conversation, and one ben held before: ben sees both
    ids["offered_to_b"] = await _inbound(world, "sms", "+4917011100005", "Olga")
    ids["held_by_b"] = await _inbound(world, "sms", "+4917011100006", "Hank")
    await rt.assignment.assign(ids["held_by_b"], world.agents["ben"], by="setup", override=True)
    await rt.assignment.assign(ids["held_by_b"], world.agents["anna"], by="setup", override=True)

    def offered(tx: Tx) -> None:
        tx.execute(
            insert(Offer).values(
                conversation_id=ids["offered_to_b"],
                agent_id=world.agents["ben"],
                channel="sms",
                state="rejected",
                created_at=tx.now,
                expires_at=tx.now + timedelta(seconds=30),
                decided_at=tx.now,
                reason="busy",
            )
        )

    await rt.db.write(offered)
    # nobody's team: the default queue
    ids["general"] = await _inbound(world, "mail", "gus@example.com", "Gus")
    # one customer in both teams (the same verified phone over SMS and WhatsApp)
    ids["both_t1"] = await _inbound(world, "sms", "+4917055500001", "Xena", "about my bill")
    ids["both_t2"] = await _inbound(world, "wa", "+4917055500001", "Xena", "about my order")

    # admin fixtures: a failed send, a quarantined item
    def admin_fixtures(tx: Tx) -> None:
        tx.execute(
            update(Outbox).where(Outbox.message_id == ids["reply_t1"]).values(state="failed")
        )
        ids["quarantine"] = tx.execute(
            insert(Quarantine)
            .values(source="webhook", reason="test", raw=b"{}", data={}, created_at=tx.now)
            .returning(Quarantine.id)
        ).scalar_one()
        ids["outbox"] = tx.execute(
            select(Outbox.id).where(Outbox.message_id == ids["reply_t1"])
        ).scalar_one()

    await rt.db.write(admin_fixtures)
    ids["split_identity_t1"] = await _identity_of(world, ids["merge_from_t1"])
    ids["split_identity_t2"] = await _identity_of(world, ids["merge_from_t2"])


async def _identity_of(world: World, contact_id: int) -> int:
    from router.models import ContactIdentity

    identity: int = await world.runtime.db.read(
        lambda c: c.execute(
            select(ContactIdentity.id).where(ContactIdentity.contact_id == contact_id)
        ).scalar_one()
    )
    return identity


@pytest.fixture
async def world(tmp_path: Path, db_url: str) -> AsyncIterator[World]:
    settings = make_settings(tmp_path / "conf", db_url, channels=CHANNELS, rules=RULES_TEAMS)
    async with started_runtime(settings, FakeClock(), workers=False) as runtime:
        app = create_app(runtime.settings, runtime=runtime)
        async with (
            live_server(runtime) as base,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            ) as client,
        ):
            world = World(runtime, client, base, app)
            await _build(world)
            yield world


# -- one call, and what the policy made of it ------------------------------------------------
def _params(world: World, method: str, path: str, variant: str) -> dict[str, Any]:
    ids, team = world.ids, variant.split(":")[0]
    conversation = {"t1": ids.get("conv1"), "t2": ids.get("conv2")}.get(team)
    values: dict[str, Any] = {
        "conversation_id": conversation,
        "message_id": ids.get(f"note_{team}"),
        "index": 0,
        "contact_id": ids.get(f"contact_{team}"),
        "agent_id": world.agents.get({"t1": "anna", "t2": "ben"}.get(team, "")),
        "item_id": ids["quarantine"],
        "outbox_id": ids["outbox"],
        "name": {"DELETE": "victim2", "POST": "victim1"}.get(method, "console.css"),
        "inbox": "sms",
        "kind": "sms",
        "app": "nowhere",
        "score": 9,
        "signature": link_signature(world.runtime.channel_secret, conversation or 0),
    }
    if path.startswith("/static/docs/"):
        values["name"] = "swagger-ui.css"
    if path.endswith(("/merge", "/split")):
        values["contact_id"] = ids[f"merge_into_{team}"]
        values["identity_id"] = ids.get(f"split_identity_{team}")
    if path.endswith("/erase"):
        values["contact_id"] = ids[f"erase_{team}"]
    return values


def _body(world: World, method: str, path: str, variant: str) -> dict[str, Any]:
    team, _, flavour = variant.partition(":")
    agent = {"t1": "anna", "t2": "ben"}.get(team)
    queue = {"t1": "billing", "t2": "sales"}.get(team)
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/console/login"): {"json": {"username": "nobody", "password": "wrong-password"}},
        ("POST", "/webhooks/fake/{inbox}"): {"json": {"messages": []}},
        ("POST", "/api/uploads"): {"files": {"file": ("a.txt", b"attachment", "text/plain")}},
        ("PUT", C + "/tags"): {"json": {"tags": ["checked"]}},
        ("POST", C + "/messages"): {
            "json": {"text": f"{flavour} by caller", "note": flavour == "note"}
        },
        ("POST", C + "/escalate"): {"json": {"reason": "needs a specialist"}},
        ("POST", C + "/send-to-routing"): {"json": {}},
        ("POST", C + "/transfer"): {"json": {"to_queue": queue}},
        ("POST", C + "/monitor"): {"json": {"to": "+4930901820"}},
        ("POST", C + "/assign"): {"json": {"agent": agent, "override": True}},
        ("PATCH", K): {"json": {"vip": True} if flavour == "vip" else {"name": "Renamed"}},
        ("POST", K + "/merge"): {
            "json": {"from_contact": world.ids.get(f"merge_from_{team}"), "reason": "same"}
        },
        ("POST", K + "/identities/{identity_id}/split"): {"json": {"reason": "not the same"}},
        ("POST", K + "/erase"): {"json": {"reason": "asked for it"}},
        ("POST", "/api/agents/{agent_id}/status"): {"json": {"status": "away"}},
        ("PATCH", "/api/agents/{agent_id}"): {"json": {"capacity": "webchat=3,total=9"}},
        ("PUT", "/api/admin/rules"): {
            "content": RULES_NO_TEAMS.encode(),
            "headers": {"content-type": "application/yaml"},
        },
        ("POST", "/api/users"): {"json": {"name": "newcomer", "role": "agent"}},
        ("POST", "/api/me/password"): {"json": {"new": "a long enough password"}},
    }
    body: dict[str, Any] = bodies.get((method, path), {})
    return body


_REFUSED_403 = ("this needs ", "changing ")


def _outcome(status: int, message: str, rule: policy.Rule, object_id: Any) -> str:
    """What the policy decided, from the answer: its refusals have their own messages."""
    if status == 401:
        return "401"
    if status == 403 and message.startswith(_REFUSED_403):
        return "403"
    hidden = rule.target is not None and message in (
        f"no {rule.target.value} {object_id}",
        f"no offer {object_id} for you",
    )
    if status == 404 and hidden:
        return "404"
    if status >= 500 and status != 503:  # 503: a provider not configured here (monitor)
        return f"{status}"
    return "ok"  # through the policy (the domain may still refuse: "not assigned to you")


def _matches(expected: str, status: int, outcome: str, exact: bool) -> bool:
    """Staff routes and socket commands: the policy's decision; the others (public, signed,
    visitor and console-page routes): the exact status, the same whoever calls."""
    return status == int(expected) if exact else outcome == expected


async def _call(
    world: World, principal: str, method: str, path: str, variant: str
) -> tuple[int, str]:
    params = _params(world, method, path, variant)
    url = path.format(**params)
    request = _body(world, method, path, variant)
    headers: dict[str, str] = dict(request.pop("headers", {}))
    if principal in world.tokens:
        headers.update(_auth(world.tokens[principal]))
    if principal in world.sessions:
        cookie, csrf = world.sessions[principal]
        headers.update({"cookie": f"{COOKIE}={cookie}", CSRF_HEADER: csrf})
    response = await world.client.request(method, url, headers=headers, **request)
    try:
        message = str(response.json().get("message", ""))
    except (ValueError, AttributeError):
        message = ""
    return response.status_code, message


def _object_id(world: World, method: str, path: str, variant: str, rule: policy.Rule) -> Any:
    if rule.target is None:
        return None
    return _params(world, method, path, variant).get(rule.target.field)


@dataclass
class Tally:
    cells: int = 0
    violations: list[str] = field(default_factory=list)
    through: int = 0  # cells the policy let through ...
    done: int = 0  # ... of which the call succeeded (the rest: the domain refused)

    def check(
        self, where: str, expected: str, status: int, outcome: str, exact: bool = False
    ) -> None:
        self.cells += 1
        if outcome == "ok" and not exact:
            self.through += 1
            self.done += status < 400
        if not _matches(expected, status, outcome, exact):
            self.violations.append(f"{where}: expected {expected}, got {status} ({outcome})")


async def _walk_rest(world: World, principals: tuple[str, ...], tally: Tally) -> None:
    for principal in principals:
        for method, path, variant, rule_name, row in MATRIX:
            if method == "WS":
                continue
            expected = row.split()[PRINCIPALS.index(principal)]
            rule = policy.RULES[rule_name]
            status, message = await _call(world, principal, method, path, variant)
            object_id = _object_id(world, method, path, variant, rule)
            tally.check(
                f"{method} {path} [{variant}] as {principal}",
                expected,
                status,
                _outcome(status, message, rule, object_id),
                exact=rule.gate is not policy.Gate.STAFF,
            )


# -- sockets ------------------------------------------------------------------------------
async def _hello(world: World, path: str, principal: str) -> tuple[Client | None, str]:
    """Open a socket as ``principal``: the welcome, or the refusal's status. Staff sockets are
    opened from our own origin (so that no credentials is 401, not a foreign page's 403)."""
    chat = path == "/ws/chat"
    ws = await websockets.connect(
        ws_url(world.base, "/ws/chat?inbox=web" if chat else path),
        origin="https://shop.example" if chat else "http://testserver",  # type: ignore[arg-type]
        open_timeout=10,
    )
    client = Client(ws)
    hello: dict[str, Any] = {"type": "hello"}
    if principal in world.tokens:
        hello["token"] = world.tokens[principal]
    await client.send(hello)
    frame = await client.wait_for(lambda f: f.get("type") in ("welcome", "error"))
    if frame["type"] == "welcome":
        return client, "ok"
    await client.close()
    return None, {"unauthorized": "401", "forbidden": "403"}.get(frame["code"], frame["code"])


def _command_fields(world: World, command: str, variant: str) -> dict[str, Any]:
    ids, team = world.ids, variant
    conversation = {"t1": ids["conv1"], "t2": ids["conv2"]}.get(team)
    fields: dict[str, Any] = {
        "timeline": {"conversation_id": conversation},
        "typing": {"conversation_id": conversation},
        "note": {"conversation_id": conversation, "text": "a note over the socket"},
        "reply": {"conversation_id": conversation, "text": "a reply over the socket"},
        "resend": {"message_id": ids.get(f"reply_{team}")},
        "accept": {"offer_id": world.offers.get(team)},
        "reject": {"offer_id": world.offers.get(f"{team}-other")},
        "escalate": {"conversation_id": conversation, "reason": "needs a specialist"},
        "end_wrap_up": {"conversation_id": conversation},
        "transfer": {
            "conversation_id": conversation,
            "to_queue": {"t1": "billing", "t2": "sales"}.get(team),
        },
        "send_to_routing": {"conversation_id": conversation},
        "resolve": {"conversation_id": conversation},
        "merge_contacts": {
            "contact_id": ids.get(f"wsmerge_into_{team}"),
            "from_contact_id": ids.get(f"wsmerge_from_{team}"),
        },
        "set_status": {"status": "online"},
    }
    return fields.get(command, {})


async def _command(client: Client, command: str, fields: dict[str, Any]) -> tuple[str, str]:
    """Send a command; its answer as (code, message): ``ack`` or the error's code. ``typing``
    has no answer when it succeeds: a ``ping`` after it shows there was no error."""
    request_id = f"{command}-{uuid.uuid4().hex[:8]}"
    await client.send({"type": command, "id": request_id, **fields})
    if command == "typing":
        ping = f"ping-{request_id}"
        await client.send({"type": "ping", "id": ping})
        frame = await client.wait_for(
            lambda f: f.get("id") in (request_id, ping) and f.get("type") in ("ack", "error")
        )
    else:
        frame = await client.wait_for(
            lambda f: f.get("id") == request_id and f.get("type") in ("ack", "error")
        )
    if frame["type"] == "ack":
        return "ack", ""
    return str(frame["code"]), str(frame["message"])


_WS_STATUS = {"ack": 200, "unauthorized": 401, "forbidden": 403, "not_found": 404}


async def _walk_commands(
    world: World, clients: dict[str, Client], principals: tuple[str, ...], tally: Tally
) -> None:
    for principal in principals:
        client = clients[principal]
        for command, variant, rule_name, row in AGENT_COMMANDS:
            expected = row.split()[WS_PRINCIPALS.index(principal)]
            rule = policy.RULES[rule_name]
            fields = _command_fields(world, command, variant)
            object_id = fields.get(rule.target.field) if rule.target is not None else None
            code, message = await _command(client, command, fields)
            status = _WS_STATUS.get(code, 409)
            outcome = _outcome(status, message, rule, object_id)
            tally.check(
                f"/ws/agent {command} [{variant}] as {principal}", expected, status, outcome
            )


async def _offers(client: Client, n: int) -> list[int]:
    frames = [await client.wait_for(lambda f: f.get("type") == "offer") for _ in range(n)]
    return [int(f["offer_id"]) for f in frames]


async def _visible(world: World, principal: str) -> set[int]:
    page = await world.client.get(
        "/api/conversations?limit=500", headers=_auth(world.tokens[principal])
    )
    assert page.status_code == 200, page.text
    return {int(item["id"]) for item in page.json()["items"]}


async def _by_queue(world: World) -> dict[str | None, set[int]]:
    rows = await world.runtime.db.read(
        lambda c: c.execute(select(Conversation.id, Conversation.queue)).all()
    )
    out: dict[str | None, set[int]] = {}
    for row in rows:
        out.setdefault(row.queue, set()).add(int(row.id))
    return out


async def _check_visibility(world: World, teams: bool) -> None:
    """The policy's SQL condition in a list: exactly what each caller may read."""
    queues = await _by_queue(world)
    everything = set().union(*queues.values())
    ben_extra = {world.ids["offered_to_b"], world.ids["held_by_b"]}
    assert await _visible(world, "A") == queues["billing"]
    assert await _visible(world, "B") == queues["sales"] | ben_extra
    assert ben_extra <= queues["billing"]
    assert await _visible(world, "AD") == everything
    if teams:
        assert await _visible(world, "S") == queues["billing"]
        assert await _visible(world, "S*") == queues["sales"]  # sam supervises shop
    else:
        assert await _visible(world, "S") == everything
        assert await _visible(world, "S*") == everything


async def _check_timeline(world: World) -> None:
    """One customer in both teams: each team's agent sees their own conversation of them."""
    contact = await _contact(world, world.ids["both_t1"])
    assert contact == await _contact(world, world.ids["both_t2"])
    for principal, text in (("A", "about my bill"), ("B", "about my order")):
        timeline = await world.client.get(
            f"/api/contacts/{contact}/timeline", headers=_auth(world.tokens[principal])
        )
        assert [m["text"] for m in timeline.json()["messages"]] == [text]
    both = await world.client.get(
        f"/api/contacts/{contact}/timeline", headers=_auth(world.tokens["AD"])
    )
    assert [m["text"] for m in both.json()["messages"]] == ["about my bill", "about my order"]


async def _ping_dashboard(world: World, principal: str, tally: Tally) -> None:
    client, outcome = await _hello(world, "/ws/supervisor", principal)
    assert client is not None, outcome
    await _dashboard_commands(client, principal, tally)
    await client.close()


async def _dashboard_commands(client: Client, principal: str, tally: Tally) -> None:
    for command, _variant, _rule, row in SUPERVISOR_COMMANDS:
        expected = row.split()[SUP_PRINCIPALS.index(principal)]
        await client.send({"type": command})
        frame = await client.wait_for(lambda f: f.get("type") in ("pong", "error"))
        outcome = "ok" if frame["type"] == "pong" else str(frame["code"])
        tally.check(f"/ws/supervisor {command} as {principal}", expected, 200, outcome)


async def _check_dashboard(world: World, teams: bool, tally: Tally) -> None:
    """The supervisor socket: a scoped supervisor's snapshot and events are their teams'."""
    principal = "S" if teams else "S*"
    client, outcome = await _hello(world, "/ws/supervisor", principal)
    assert client is not None, outcome
    snapshot = await client.wait_for(lambda f: f.get("type") == "snapshot")
    queues = {q["name"] for q in snapshot["queues"]}
    agents = {a["user"] for a in snapshot["agents"]}
    if teams:
        assert (queues, agents) == ({"billing"}, {"anna", "sue"})
    else:
        assert queues == {"billing", "sales", "general"} and {"anna", "ben"} <= agents
    # presence changes of ben (sales) then anna (billing): sue gets anna's only
    for name in ("ben", "anna"):
        changed = await world.client.post(
            f"/api/agents/{world.agents[name]}/status",
            headers=_auth(world.tokens["AD"]),
            json={"status": "away"},
        )
        assert changed.status_code == 200, changed.text
    anna = await client.wait_for(
        lambda f: f.get("type") == "agent_presence" and f["agent_id"] == world.agents["anna"]
    )
    ben_frames = [
        f
        for f in client.frames
        if f.get("type") == "agent_presence" and f["agent_id"] == world.agents["ben"]
    ]
    assert anna["stream"] == "supervisors"
    assert len(ben_frames) == (0 if teams else 1)
    await _dashboard_commands(client, principal, tally)
    await client.close()


async def test_the_authorization_matrix(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    tally = Tally()
    await _check_visibility(world, teams=True)
    await _check_timeline(world)
    await _check_dashboard(world, True, tally)

    # teams configured: anyone but sam and the admin
    await _walk_rest(world, ("N", "V", "B", "A", "S"), tally)
    hellos = [(m, p, v, r, row) for m, p, v, r, row in MATRIX if m == "WS"]
    clients: dict[str, Client] = {}
    for _, path, _, _, row in hellos:
        for principal in PRINCIPALS:
            if principal == "S*":
                continue  # sam opens his sockets below, without teams
            client, outcome = await _hello(world, path, principal)
            expected = row.split()[PRINCIPALS.index(principal)]
            tally.check(f"WS {path} as {principal}", expected, 0, outcome)
            if path == "/ws/agent" and client is not None:
                clients[principal] = client
            elif client is not None:
                await client.close()
    # going online offers anna and ben the waiting work of their queues
    world.offers["t1"], world.offers["t1-other"] = await _offers(clients["A"], 2)
    world.offers["t2"], world.offers["t2-other"] = await _offers(clients["B"], 2)

    def refail(tx: Tx) -> None:  # resend needs a failed send
        tx.execute(update(Outbox).values(state="failed"))

    await world.runtime.db.write(refail)
    await _walk_commands(world, clients, ("B", "A", "S"), tally)  # agents merge before sue

    # without teams: every supervisor sees everything; then the admin (who erases last)
    await world.runtime.db.write(refail)
    ruleset = await world.runtime.rules.put(RULES_NO_TEAMS.encode(), "test")
    assert not ruleset.teams
    await _check_visibility(world, teams=False)
    await _check_dashboard(world, False, tally)
    await _ping_dashboard(world, "AD", tally)
    await _walk_rest(world, ("S*", "AD"), tally)
    for _, path, _, _, row in hellos:
        client, outcome = await _hello(world, path, "S*")
        tally.check(f"WS {path} as S*", row.split()[PRINCIPALS.index("S*")], 0, outcome)
        if path == "/ws/agent" and client is not None:
            clients["S*"] = client
        elif client is not None:
            await client.close()
    await _walk_commands(world, clients, ("S*",), tally)
    for client in clients.values():
        await client.close()

    routes = sum(1 for m, *_ in MATRIX if m != "WS")
    hello_rows = sum(1 for m, *_ in MATRIX if m == "WS")
    with capsys.disabled():
        print(
            f"\nauthorization matrix: {tally.cells} cells = {routes} route rows x "
            f"{len(PRINCIPALS)} callers ({routes * len(PRINCIPALS)}) + {hello_rows} socket "
            f"hellos x {len(PRINCIPALS)} + {len(AGENT_COMMANDS)} /ws/agent command rows x "
            f"{len(WS_PRINCIPALS)} + {len(SUPERVISOR_COMMANDS)} /ws/supervisor command x "
            f"{len(SUP_PRINCIPALS)}; let through {tally.through} (succeeded {tally.done}, "
            f"the rest refused by the domain); violations: {len(tally.violations)}"
        )
    assert not tally.violations, "\n".join(tally.violations)


# -- the route table and the command tables are complete -----------------------------------
def _routes(app: FastAPI) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for route in iter_route_contexts(app.routes):
        methods = sorted(set(getattr(route, "methods", None) or {"WS"}) - {"HEAD"})
        for method in methods:
            out[(method, route.path)] = route
    return out


def _app(tmp_path: Path) -> FastAPI:
    settings = make_settings(tmp_path / "conf", f"sqlite:///{tmp_path / 'unused.db'}")
    return create_app(settings)


def test_every_route_and_command_declares_a_rule_and_is_in_the_matrix(tmp_path: Path) -> None:
    routes = _routes(_app(tmp_path))
    undeclared = sorted(f"{m} {p}" for (m, p), route in routes.items() if rule_of(route) is None)
    assert undeclared == []
    declared = {(m, p): r for m, p, _, r, _ in MATRIX}
    assert set(declared) == set(routes), (
        f"not in the matrix: {sorted(set(routes) - set(declared))}; "
        f"not in the app: {sorted(set(declared) - set(routes))}"
    )
    for key, rule_name in declared.items():
        rule = rule_of(routes[key])
        assert rule is not None and rule.name == rule_name, f"{key}: {rule} != {rule_name}"
    # every socket command has a rule, and the matrix covers them all
    assert {c for c, *_ in AGENT_COMMANDS} == set(ws_agent.COMMANDS)
    for command, _, rule_name, _ in AGENT_COMMANDS:
        assert ws_agent.COMMANDS[command][0].name == rule_name
    assert {c for c, *_ in SUPERVISOR_COMMANDS} == set(ws_supervisor.COMMANDS)
    for command, _, rule_name, _ in SUPERVISOR_COMMANDS:
        assert ws_supervisor.COMMANDS[command].name == rule_name
    # each matrix row has a cell for every caller
    for *_, row in MATRIX:
        assert len(row.split()) == len(PRINCIPALS)
    for *_, row in AGENT_COMMANDS:
        assert len(row.split()) == len(WS_PRINCIPALS)


def test_a_route_without_a_rule_is_caught(tmp_path: Path) -> None:
    """The walk above fails for a route added without a rule (or with two)."""
    app = _app(tmp_path)
    extra = APIRouter()

    @extra.get("/api/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    @extra.get("/api/confused")
    async def confused(
        _a: Any = Depends(needs(policy.SELF)), _b: Any = Depends(needs(policy.ADMIN))
    ) -> dict[str, str]:
        return {}

    app.include_router(extra)
    routes = _routes(app)
    assert rule_of(routes[("GET", "/api/forgotten")]) is None
    assert rule_of(routes[("GET", "/api/confused")]) is None
    assert rule_of(routes[("GET", "/api/me")]) is policy.SELF


def test_every_rule_is_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    missing = [name for name in policy.RULES if f"`{name}`" not in text]
    assert missing == []
