"""A web-chat message that meets a database outage: the visitor's socket gets an
`unavailable` error frame and stays open, the widget says so and sends the message again
until it is stored, once. Before, the socket was dropped with no frame."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser
from sqlalchemy import select

from adapters.clock import SystemClock
from router.migrate import upgrade
from router.models import Message
from router.runtime import Runtime
from tests import peers
from tests.support import (
    AGENT_RULES,
    WEB_CHANNELS,
    connect_visitor,
    free_port,
    live_server,
    make_settings,
)


@pytest.fixture
async def outage(tmp_path: Path) -> AsyncIterator[tuple[peers.PrivatePostgres, Runtime, str]]:
    pg = peers.need(lambda: peers.PrivatePostgres.start(tmp_path / "pg"))
    with pg:
        await asyncio.to_thread(upgrade, pg.url)
        port = free_port()
        settings = make_settings(
            tmp_path / "conf",
            pg.url,
            channels=WEB_CHANNELS.replace(
                'allowed_origins: ["https://shop.example"]',
                f'allowed_origins: ["https://shop.example", "http://127.0.0.1:{port}"]',
            ),
            rules=AGENT_RULES,
            public_base_url=f"http://127.0.0.1:{port}",
            db_pool_size=2,
            db_max_overflow=0,
        )
        runtime = Runtime(settings, clock=SystemClock())
        await runtime.start(workers=False)
        try:
            async with live_server(runtime, port) as base:
                yield pg, runtime, base
        finally:
            await runtime.stop()


async def stored(runtime: Runtime) -> list[str]:
    return list(
        await runtime.db.read(
            lambda c: (
                c.execute(select(Message.text).where(Message.direction == "in")).scalars().all()
            )
        )
    )


async def test_the_visitor_hears_the_storage_is_unavailable_and_the_socket_stays(
    outage: tuple[peers.PrivatePostgres, Runtime, str],
) -> None:
    pg, runtime, base = outage
    visitor, _ = await connect_visitor(base)
    pg.stop()
    client_id = str(uuid.uuid4())
    await visitor.send({"type": "message", "client_id": client_id, "text": "are you there?"})
    error = await visitor.wait_for(lambda f: f.get("type") == "error", timeout=60)
    assert (error["code"], error["client_id"], error["retry_after"]) == (
        "unavailable",
        client_id,
        5,
    )
    pg.restart()
    # the same socket: the client sends it again with the same client_id
    await visitor.send({"type": "message", "client_id": client_id, "text": "are you there?"})
    ack = await visitor.wait_for(lambda f: f.get("type") == "ack", timeout=60)
    assert ack["client_id"] == client_id and ack["message_id"]
    assert await stored(runtime) == ["are you there?"]
    await visitor.close()


async def test_the_widget_says_it_is_retrying_and_delivers_once_the_database_is_back(
    outage: tuple[peers.PrivatePostgres, Runtime, str],
) -> None:
    pg, runtime, base = outage
    try:
        async with peers.launch_browser() as browser_:
            browser: Browser = browser_
            page = await (await browser.new_context()).new_page()
            await page.goto(base + "/demo")
            await page.click(".omr-open")
            await page.wait_for_function(
                "() => !document.querySelector('.omr-status') || "
                "document.querySelector('.omr-status').hidden"
            )
            pg.stop()
            await page.fill(".omr-input", "hello during the outage")
            await page.click(".omr-send")
            await page.wait_for_selector(".omr-error:not([hidden])", timeout=60_000)
            assert "retrying" in (await page.inner_text(".omr-error"))
            assert await page.locator(".omr-visitor.omr-pending").count() == 1
            pg.restart()
            await page.wait_for_selector(
                ".omr-visitor:not(.omr-pending)", state="attached", timeout=60_000
            )
            assert await page.locator(".omr-error").is_hidden()
    except peers.PeerUnavailable as exc:
        peers.unavailable(exc)
    assert await stored(runtime) == ["hello during the outage"]
