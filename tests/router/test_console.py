"""The agent console in Debian's Chromium, driven by Playwright: sign-in, an offer from a
visitor typing in the widget, accept with the history, a canned reply the visitor sees,
resolve; a server restart while the agent types (the console reconnects, resumes and keeps
the draft); an XSS corpus shown as text. Screenshots of each step go to
``test-artifacts/console/``; the browser console must stay free of errors."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from channels.webchat import WebChatChannel
from router.auth import create_user, revoke_user, set_password
from router.models import ContactIdentity
from router.runtime import Runtime
from tests import peers
from tests.router.test_live import make_agent
from tests.support import (
    ROOT,
    WEB_CHANNELS,
    client_for,
    fake_message,
    free_port,
    live_server,
    make_settings,
    post_fake,
    started_runtime,
)

pytest.importorskip("playwright")
from playwright.async_api import Browser, Page

RULES = """\
version: 1
queues:
  general: {}
templates:
  welcome: "Hi {contact.name|there}, thanks for writing to us."
  refund: "Your refund is on its way."
default: {queue: general}
"""
PASSWORD = "correct horse battery staple"
ARTIFACTS = ROOT / "test-artifacts" / "console"


class Server:
    """The live server of a started runtime, on a fixed port so it can restart in place."""

    def __init__(self, runtime: Runtime, port: int) -> None:
        self.runtime, self.port = runtime, port
        self.base = f"http://127.0.0.1:{port}"
        self._serving: Any = None

    async def start(self) -> None:
        self._serving = live_server(self.runtime, self.port)
        await self._serving.__aenter__()

    async def stop(self) -> None:
        await self._serving.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, db_url: str, channels: str) -> AsyncIterator[Server]:
    """A runtime with its workers, served on a fixed port (the public origin of the pages)."""
    port = free_port()
    settings = make_settings(
        tmp_path / "conf",
        db_url,
        rules=RULES,
        channels=channels,
        public_base_url=f"http://127.0.0.1:{port}",
        worker_interval=0.2,
        outbox_interval=0.2,
    )
    async with started_runtime(settings, workers=True) as runtime:
        served = Server(runtime, port)
        await served.start()
        try:
            yield served
        finally:
            await served.stop()


@pytest.fixture
async def server(tmp_path: Path, db_url: str) -> AsyncIterator[Server]:
    async with serving(tmp_path, db_url, WEB_CHANNELS) as served:
        await make_agent(served.runtime, "anna", capacity="webchat=3,email=3,total=5")
        await served.runtime.db.write(set_password, "anna", PASSWORD)
        yield served


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    try:
        async with peers.launch_browser() as launched:
            yield launched
    except peers.PeerUnavailable as exc:
        peers.unavailable(exc)


class Watched:
    """A page with its console errors, page errors and dialogs recorded."""

    def __init__(self, page: Page, name: str, directory: Path) -> None:
        self.page, self.name, self.directory = page, name, directory
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.step = 0
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

        async def dismiss(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", dismiss)

    async def shot(self, what: str) -> None:
        self.step += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(
            path=str(self.directory / f"{self.step:02d}-{self.name}-{what}.png")
        )


async def open_pages(
    browser: Browser, request: pytest.FixtureRequest, viewport: dict[str, int] | None = None
) -> tuple[Watched, Watched]:
    directory = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    agent_context = await browser.new_context(viewport=viewport or {"width": 1280, "height": 800})
    visitor_context = await browser.new_context(viewport={"width": 420, "height": 720})
    agent = Watched(await agent_context.new_page(), "agent", directory)
    visitor = Watched(await visitor_context.new_page(), "visitor", directory)
    return agent, visitor


async def sign_in(agent: Watched, base: str) -> None:
    page = agent.page
    await page.goto(base + "/console")
    await page.wait_for_url("**/console/login")
    await page.fill("#username", "anna")
    await page.fill("#password", "wrong password!")
    await page.click("#sign-in")
    await page.wait_for_selector("#login-error:not([hidden])")
    assert "wrong user name or password" in await page.inner_text("#login-error")
    # the refused sign-in is the browser's only complaint so far (a 401, by design)
    assert all("401" in e for e in agent.errors), agent.errors
    agent.errors.clear()
    await page.fill("#password", PASSWORD)
    await page.click("#sign-in")
    await page.wait_for_url("**/console")
    await page.wait_for_function("() => document.getElementById('me').textContent.includes('anna')")
    await page.wait_for_selector("#banner[hidden]", state="attached")


async def visitor_says(visitor: Watched, base: str, text: str, name: str | None = None) -> None:
    page = visitor.page
    if page.url == "about:blank":
        await page.goto(base + "/demo")
        await page.click(".omr-open")
        if name is not None:
            await page.fill("input[name=omr-name]", name)
    await page.fill(".omr-input", text)
    await page.click(".omr-send")
    await page.wait_for_function(
        "t => [...document.querySelectorAll('.omr-visitor:not(.omr-pending) .omr-text')]"
        ".some(e => e.textContent === t)",
        arg=text,
    )


async def accept_first_offer(agent: Watched, expected: str) -> None:
    page = agent.page
    await page.wait_for_selector("#offers li.offer", timeout=20_000)
    await agent.shot("offer")
    await page.click("#offers li.offer .accept")
    await page.wait_for_function(
        "t => [...document.querySelectorAll('#timeline .text')].some(e => e.textContent === t)",
        arg=expected,
        timeout=15_000,
    )


async def test_sign_in_accept_reply_with_a_canned_response_and_resolve(
    server: Server, browser: Browser, request: pytest.FixtureRequest
) -> None:
    agent, visitor = await open_pages(browser, request)
    await sign_in(agent, server.base)
    await agent.shot("signed-in")
    [cookie] = [c for c in await agent.page.context.cookies() if c["name"] == "omniroute_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > 0
    csp = (await agent.page.request.get(server.base + "/console")).headers[
        "content-security-policy"
    ]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    await visitor_says(visitor, server.base, "Where is my parcel?", name="Vera")
    await visitor.shot("wrote")
    await accept_first_offer(agent, "Where is my parcel?")
    await agent.shot("accepted")
    page = agent.page
    assert "Vera" in await page.inner_text("#title")
    assert "webchat" in await page.inner_text("#identities")
    await page.wait_for_function("() => document.querySelectorAll('#canned button').length === 2")
    await page.fill("#canned-q", "welc")  # the search filters
    await page.wait_for_function("() => document.querySelectorAll('#canned button').length === 1")
    await page.click("#canned button[data-name=welcome]")
    assert await page.input_value("#reply") == "Hi Vera, thanks for writing to us."
    await agent.shot("canned")
    await page.keyboard.press("Control+Enter")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#timeline .msg.out .text')]"
        ".some(e => e.textContent.startsWith('Hi Vera'))"
    )
    assert await page.input_value("#reply") == ""
    await visitor.page.wait_for_function(
        "() => [...document.querySelectorAll('.omr-agent .omr-text')]"
        ".some(e => e.textContent === 'Hi Vera, thanks for writing to us.')",
        timeout=15_000,
    )
    await visitor.shot("reply-seen")
    await agent.shot("replied")
    await page.click("#resolve")
    await page.wait_for_selector("#conversations li", state="detached")
    await page.wait_for_selector("#empty:not([hidden])")
    await agent.shot("resolved")
    # a narrow phone screen still shows everything, one column
    await page.set_viewport_size({"width": 390, "height": 844})
    await agent.shot("phone-width")
    assert agent.errors == [] and visitor.errors == []
    assert agent.dialogs == [] and visitor.dialogs == []


async def test_a_server_restart_while_typing_loses_nothing(
    server: Server, browser: Browser, request: pytest.FixtureRequest
) -> None:
    agent, visitor = await open_pages(browser, request)
    await sign_in(agent, server.base)
    await visitor_says(visitor, server.base, "Hello, anyone there?")
    await accept_first_offer(agent, "Hello, anyone there?")
    page = agent.page
    await page.fill("#reply", "Let me check that for y")
    await agent.shot("typing")
    await server.stop()
    await page.wait_for_selector("#banner:not([hidden])", timeout=15_000)
    await agent.shot("offline")
    # what happens while the agent is away reaches them on resume
    runtime = server.runtime
    channel = runtime.channels["web"]
    assert isinstance(channel, WebChatChannel)
    address = await runtime.db.read(
        lambda c: c.execute(
            select(ContactIdentity.address).where(ContactIdentity.kind == "webchat")
        ).scalar_one()
    )
    outcomes = await runtime.ingest(
        "web", [channel.inbound(address, str(uuid.uuid4()), "Still there?")]
    )
    await runtime.after_ingest(outcomes)
    await server.start()
    await page.wait_for_selector("#banner[hidden]", state="attached", timeout=30_000)
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#timeline .text')].some(e => e.textContent === 'Still there?')",
        timeout=15_000,
    )
    assert await page.input_value("#reply") == "Let me check that for y"
    await agent.shot("reconnected")
    # the draft survives a reload too (kept per conversation in the browser)
    await page.reload()
    await page.wait_for_selector("#conversations li")
    await page.click("#conversations li")
    await page.wait_for_function(
        "() => document.getElementById('reply').value === 'Let me check that for y'"
    )
    await page.type("#reply", "ou.")
    await page.click("#send")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#timeline .msg.out .text')]"
        ".some(e => e.textContent === 'Let me check that for you.')"
    )
    await agent.shot("sent-after-reload")
    # the page's own errors only: the dropped connection itself is not one
    assert [
        e for e in agent.errors if "WebSocket" not in e and "ERR_CONNECTION_REFUSED" not in e
    ] == []


XSS = [
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=1">',
    '<svg onload="window.__xss=1"><circle r="9"/></svg>',
    '<a href="javascript:window.__xss=1">click me</a>',
    "{{constructor.constructor('window.__xss=1')()}}",
    "${window.__xss=1}",
    '<iframe src="javascript:window.__xss=1"></iframe>',
    '"><b onmouseover="window.__xss=1">x</b>',
]
INJECTED = (
    "script:not([src]), img, svg, iframe, b, [onerror], [onload], [onmouseover], "
    "a[href^='javascript:']"
)


async def test_customer_written_html_is_shown_as_text_and_runs_nothing(
    server: Server, browser: Browser, request: pytest.FixtureRequest
) -> None:
    agent, visitor = await open_pages(browser, request)
    await sign_in(agent, server.base)
    await visitor_says(visitor, server.base, XSS[0], name=XSS[1])
    for payload in XSS[1:]:
        await visitor_says(visitor, server.base, payload)
    async with client_for(server.runtime) as client:
        mail = fake_message(
            "x1",
            "mallory@example.com",
            XSS[3],
            kind="email",
            name=XSS[2],
            subject=XSS[0],
            attachments=[{"filename": XSS[1], "content_type": "text/html"}],
        )
        assert (await post_fake(client, "mail", mail)).status_code == 200
    page = agent.page
    await page.wait_for_function(
        "() => document.querySelectorAll('#offers li.offer').length === 2", timeout=20_000
    )
    await agent.shot("offers")
    offers_text = await page.inner_text("#offers")
    assert XSS[1] in offers_text and XSS[2] in offers_text  # names, as text
    for _ in range(2):
        await page.click("#offers li.offer .accept")
        await page.wait_for_timeout(500)
    await page.wait_for_function(
        "() => document.querySelectorAll('#conversations li').length === 2"
    )
    for index in range(2):
        await page.click(f"#conversations li >> nth={index}")
        await page.wait_for_function("() => document.querySelectorAll('#timeline .msg').length > 0")
        await page.wait_for_timeout(300)
        await agent.shot(f"conversation-{index}")
        text = await page.inner_text("#timeline")
        shown = [p for p in XSS if p in text]
        assert shown, text
        for area in ("#timeline", "#offers", "#conversations", "#title", "#identities", "#contact"):
            assert await page.locator(area).locator(INJECTED).count() == 0, area
        await page.hover("#timeline")
    timeline_text = await page.inner_text("#timeline")
    assert XSS[0] in timeline_text or XSS[3] in timeline_text
    await visitor.shot("widget")
    for watched in (agent, visitor):
        assert await watched.page.evaluate("window.__xss") is None
        assert watched.dialogs == []
        assert await watched.page.locator(".omr-messages").locator(INJECTED).count() == 0
    assert agent.errors == [] and visitor.errors == []


# The text of an element in the order the browser draws it: each character's box, left to
# right (lines top to bottom). Zero-width characters (the bidi controls) drop out.
VISUAL = """
(root) => {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const chars = [];
  for (let node; (node = walker.nextNode()); ) {
    for (let i = 0; i < node.data.length; i++) {
      const range = document.createRange();
      range.setStart(node, i); range.setEnd(node, i + 1);
      const box = range.getBoundingClientRect();
      if (box.width > 0) chars.push([box.left, box.top, node.data[i]]);
    }
  }
  chars.sort((a, b) => Math.abs(a[1] - b[1]) > 4 ? a[1] - b[1] : a[0] - b[0]);
  return chars.map((c) => c[2]).join("");
}
"""
RLO = "\u202e"


async def test_customer_names_and_file_names_are_bidi_isolated(
    server: Server, browser: Browser, request: pytest.FixtureRequest
) -> None:
    """A right-to-left override in a name stays inside the name (the rest of the line reads
    as it should), and one in a file name is shown, so ``invoice<RLO>gnp.exe`` is displayed
    ending in ``.exe``, not as ``invoiceexe.png``; in the console and the dashboard."""
    agent, _ = await open_pages(browser, request)
    await sign_in(agent, server.base)
    async with client_for(server.runtime) as client:
        mail = fake_message(
            "bidi-1",
            "mallory@example.com",
            "please pay the attached invoice",
            kind="email",
            name=f"{RLO}Mallory",
            subject=f"Invoice {RLO}fdp.exe",
            attachments=[{"filename": f"invoice{RLO}gnp.exe", "content_type": "image/png"}],
        )
        assert (await post_fake(client, "mail", mail)).status_code == 200
    page = agent.page
    await page.wait_for_selector("#offers li.offer", timeout=20_000)
    offer = page.locator("#offers li.offer strong")
    # the override stays inside the name: what follows it is drawn in its own order
    drawn = await offer.evaluate(VISUAL)
    assert drawn.endswith(" · Email · general"), drawn
    assert await offer.locator("bdi.name").text_content() == f"{RLO}Mallory"
    await page.click("#offers li.offer .accept")
    attachment = page.locator("#timeline a.attachment")
    await attachment.wait_for(timeout=15_000)
    await agent.shot("bidi")
    shown = await attachment.evaluate(VISUAL)
    assert shown.endswith(".exe"), shown  # not "invoiceexe.png"
    assert (
        shown == "Attachment: invoice[U+202E]gnp.exe" and RLO not in await attachment.inner_text()
    )
    assert await page.locator("#timeline .subject").get_attribute("dir") == "auto"
    assert await page.locator("#timeline .text").first.get_attribute("dir") == "auto"
    assert (await page.locator("#title").evaluate(VISUAL)).endswith(" · Email")
    assert agent.errors == []
    # the supervisor's dashboard monitors the same conversation: the same display rules
    await server.runtime.db.write(lambda tx: create_user(tx, "sue", "supervisor"))
    await server.runtime.db.write(set_password, "sue", PASSWORD)
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    sup = Watched(await context.new_page(), "supervisor", agent.directory)
    await sup.page.goto(server.base + "/console/login")
    await sup.page.fill("#username", "sue")
    await sup.page.fill("#password", PASSWORD)
    await sup.page.click("#sign-in")
    await sup.page.wait_for_selector("#open tr[data-conversation] button.monitor")
    await sup.page.click("#open tr[data-conversation] button.monitor")
    monitored = sup.page.locator("#monitor .attachment")
    await monitored.wait_for()
    assert (await monitored.evaluate(VISUAL)).endswith("invoice[U+202E]gnp.exe")
    await sup.shot("bidi")
    assert sup.errors == []


async def test_the_demo_works_when_opened_at_localhost(
    server: Server, browser: Browser, request: pytest.FixtureRequest
) -> None:
    """Configured as http://127.0.0.1:PORT (the demo's default), the console and the demo
    chat opened at http://localhost:PORT (the host of the README's curl) sign in, connect
    and talk to each other."""
    agent, visitor = await open_pages(browser, request)
    localhost = f"http://localhost:{server.port}"
    await sign_in(agent, localhost)  # signed in, and the agent socket is connected
    await visitor_says(visitor, localhost, "Hello from localhost")
    await accept_first_offer(agent, "Hello from localhost")
    await agent.shot("localhost")
    assert agent.errors == [] and visitor.errors == []


async def test_the_console_and_the_dashboard_say_why_they_were_signed_out(
    server: Server, browser: Browser, request: pytest.FixtureRequest
) -> None:
    """Anna's password changes while her console is open, and sue (a supervisor) is revoked
    while her dashboard is open: each page shows the reason, offers to sign in again, and
    does not reconnect with the dead session; the sign-in page repeats the reason."""
    runtime = server.runtime
    await runtime.db.write(lambda tx: create_user(tx, "sue", "supervisor"))
    await runtime.db.write(set_password, "sue", PASSWORD)
    agent, _ = await open_pages(browser, request)
    sue = Watched(
        await (await browser.new_context(viewport={"width": 1280, "height": 800})).new_page(),
        "supervisor",
        agent.directory,
    )
    sockets = {"agent": 0, "supervisor": 0}
    agent.page.on("websocket", lambda _ws: sockets.__setitem__("agent", sockets["agent"] + 1))
    sue.page.on(
        "websocket", lambda _ws: sockets.__setitem__("supervisor", sockets["supervisor"] + 1)
    )
    await sign_in(agent, server.base)
    page = sue.page
    await page.goto(server.base + "/console/login")
    await page.fill("#username", "sue")
    await page.fill("#password", PASSWORD)
    await page.click("#sign-in")
    await page.wait_for_url("**/console/supervisor")
    await page.wait_for_selector("#queues tr[data-queue=general]")
    assert sockets == {"agent": 1, "supervisor": 1}

    await runtime.db.write(set_password, "anna", "a brand new password")
    await runtime.db.write(revoke_user, "sue")
    for watched, reason in (
        (agent, "signed out: your password was changed"),
        (sue, "signed out: your access was revoked"),
    ):
        await watched.page.wait_for_function(
            "t => document.querySelector('#banner:not([hidden]) .signed-out-reason')"
            "?.textContent === t",
            arg=reason,
            timeout=15_000,
        )
        await watched.shot("signed-out")
    await agent.page.wait_for_timeout(3000)  # longer than the console's reconnect backoff
    assert sockets == {"agent": 1, "supervisor": 1}  # no reconnecting with a dead session
    await agent.page.click("#banner a")
    await agent.page.wait_for_url("**/console/login")
    assert await agent.page.inner_text("#login-notice") == "signed out: your password was changed"
    await agent.shot("login-again")
    assert agent.errors == [] and sue.errors == []
