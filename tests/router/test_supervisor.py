"""The supervisor dashboard in Chromium: a queue fills and drains live, a conversation is
reassigned, an agent's status changed, a conversation monitored, and the CSAT a visitor gave
with the widget's buttons appears; plus the supervisor socket's access rules."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets
from sqlalchemy import select

from router.auth import create_user, set_password
from router.models import Conversation
from router.types import AgentPresence
from tests.router.test_console import (
    ARTIFACTS,
    PASSWORD,
    Server,
    Watched,
    browser,  # noqa: F401
    serving,
    visitor_says,
)
from tests.router.test_live import make_agent
from tests.router.test_voice import eventually
from tests.support import (
    CHANNELS,
    client_for,
    fake_message,
    post_fake,
    ws_url,
)

pytest.importorskip("playwright")
from playwright.async_api import Browser

SURVEY_CHANNELS = (
    CHANNELS
    + """\
  web: {channel: webchat, provider: omniroute, default_queue: general, survey: csat,
        allowed_origins: ["https://shop.example"]}
"""
)


@pytest.fixture
async def server(tmp_path: Path, db_url: str) -> AsyncIterator[Server]:
    async with serving(tmp_path, db_url, SURVEY_CHANNELS) as served:
        await make_agent(served.runtime, "anna", capacity="webchat=3,sms=3,total=6")
        await served.runtime.db.write(lambda tx: create_user(tx, "sue", "supervisor"))
        await served.runtime.db.write(set_password, "sue", PASSWORD)
        yield served


async def test_a_supervisor_watches_queues_reassigns_and_sees_csat(
    server: Server,
    browser: Browser,  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    runtime = server.runtime
    directory = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    sup = Watched(
        await (await browser.new_context(viewport={"width": 1280, "height": 800})).new_page(),
        "supervisor",
        directory,
    )
    visitor = Watched(
        await (await browser.new_context(viewport={"width": 420, "height": 720})).new_page(),
        "visitor",
        directory,
    )
    page = sup.page
    await page.goto(server.base + "/console/login")
    await page.fill("#username", "sue")
    await page.fill("#password", PASSWORD)
    await page.click("#sign-in")
    await page.wait_for_url("**/console/supervisor")  # sue is no agent: straight to the dashboard
    await page.wait_for_selector("#queues tr[data-queue=general]")
    await sup.shot("empty")
    # the queue fills: three texts while nobody is online
    async with client_for(runtime) as client:
        for n in range(3):
            response = await post_fake(
                client, "sms", fake_message(f"s{n}", f"+491700000000{n}", f"help {n}")
            )
            assert response.status_code == 200
    await page.wait_for_function(
        "() => document.querySelector('#queues tr[data-queue=general] td.waiting').textContent === '3'",
        timeout=15_000,
    )
    await sup.shot("filled")
    # reassign the first conversation to anna from the dashboard
    await page.wait_for_selector("#open tr[data-conversation]")
    first = await page.get_attribute("#open tr[data-conversation]", "data-conversation")
    await page.select_option(f"#open tr[data-conversation='{first}'] select.reassign-to", "anna")
    await page.click(f"#open tr[data-conversation='{first}'] button.reassign")
    await page.wait_for_function(
        "() => document.querySelector('#queues tr[data-queue=general] td.waiting').textContent === '2'",
        timeout=15_000,
    )
    owner = await runtime.db.read(
        lambda c: c.execute(
            select(Conversation.assigned_agent_id).where(Conversation.id == int(str(first)))
        ).scalar_one()
    )
    assert owner is not None
    await sup.shot("reassigned")
    # monitor it, read-only
    await page.click(f"#open tr[data-conversation='{first}'] button.monitor")
    await page.wait_for_selector("#monitor li .text")
    assert (await page.inner_text("#monitor")).count("help") == 1
    # anna goes online from the dashboard: the rest is offered to her, the queue drains
    await page.select_option("#agents tr[data-agent=anna] select.presence", "online")
    await page.wait_for_function(
        "() => document.querySelector('#queues tr[data-queue=general] td.waiting').textContent === '0'",
        timeout=15_000,
    )
    await sup.shot("drained")
    # a web-chat visitor is helped by anna, then rates the help in the widget
    await visitor_says(visitor, server.base, "Can you help me?")
    # routed first (on PostgreSQL routing follows the visitor's acknowledged message)
    chat = await eventually(
        lambda: runtime.db.read(
            lambda c: c.execute(
                select(Conversation.id).where(
                    Conversation.channel == "webchat", Conversation.state != "new"
                )
            ).scalar_one_or_none()
        )
    )
    anna = int(owner)
    await runtime.assignment.assign(chat, anna, by="sue", override=True)
    await runtime.assignment.resolve(anna, chat)
    await visitor.page.wait_for_selector(".omr-score[data-score='4']", timeout=15_000)
    await visitor.shot("survey")
    await visitor.page.click(".omr-score[data-score='4']")
    await visitor.page.wait_for_function(
        "() => [...document.querySelectorAll('.omr-text')].some(e => e.textContent === 'Thank you for your feedback!')"
    )
    await page.wait_for_function(
        "() => document.getElementById('ratings').textContent.includes('csat 4')", timeout=15_000
    )
    await page.wait_for_function(
        "() => document.querySelectorAll('#csat-chart rect').length === 1", timeout=15_000
    )
    await sup.shot("csat")
    assert sup.errors == [] and visitor.errors == []
    await runtime.assignment.set_status(anna, AgentPresence.AWAY, "test")


async def test_the_supervisor_socket_needs_the_role(server: Server) -> None:
    runtime = server.runtime
    _, agent_token = await make_agent(runtime, "ben")
    sue_token = await runtime.db.write(lambda tx: create_user(tx, "sam", "supervisor")[1])
    for token, expected in (
        ("nope", "unauthorized"),
        (agent_token, "forbidden"),
        (None, "forbidden"),
    ):
        ws = await websockets.connect(ws_url(server.base, "/ws/supervisor"))
        await ws.send(json.dumps({"type": "hello", **({"token": token} if token else {})}))
        frame = json.loads(await ws.recv())
        assert (frame["type"], frame["code"]) == ("error", expected)
        await ws.close()
    ws = await websockets.connect(ws_url(server.base, "/ws/supervisor"))
    await ws.send(json.dumps({"type": "hello", "token": sue_token}))
    assert json.loads(await ws.recv())["type"] == "welcome"
    snapshot = json.loads(await ws.recv())
    assert snapshot["type"] == "snapshot"
    assert [q["name"] for q in snapshot["queues"]] == ["general"]
    assert {a["user"] for a in snapshot["agents"]} == {"anna", "ben"}
    async with client_for(runtime) as client:
        metrics = (await client.get("/metrics")).text
    assert 'omniroute_websockets{kind="supervisor"} 1.0' in metrics
    await ws.close()
