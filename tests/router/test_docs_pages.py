"""The API docs pages (docs/security.md, "API docs pages"): ``/docs`` (Swagger UI) and
``/redoc`` (ReDoc) load only this server's assets under the console's Content-Security-
Policy, no CDN and no inline script, and render in Chromium with every request to another
host blocked."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from router.runtime import Runtime
from tests import peers
from tests.support import WEB_CHANNELS, client_for, live_server, make_settings, started_runtime

pytest.importorskip("playwright")
from playwright.async_api import Browser, Route

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


@pytest.fixture
async def runtime(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Runtime]:
    settings = make_settings(tmp_path / "conf", sqlite_url, channels=WEB_CHANNELS)
    async with started_runtime(settings) as rt:
        yield rt


async def test_the_docs_pages_reference_only_our_own_assets(runtime: Runtime) -> None:
    async with client_for(runtime) as client:
        for path, expected in (
            ("/docs", {"/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css"}),
            ("/redoc", {"/static/docs/redoc.standalone.js"}),
        ):
            response = await client.get(path)
            assert response.status_code == 200, path
            csp = response.headers["content-security-policy"]
            assert "script-src 'self';" in csp and "unsafe" not in csp and "http" not in csp
            html = response.text
            assert "<script>" not in html and "<style" not in html  # nothing inline
            assets = set(ASSET.findall(html))
            assert expected <= assets, (path, assets)
            for url in assets:
                assert url.startswith("/") and not url.startswith("//"), url  # same origin
                served = await client.get(url)
                assert served.status_code == 200, url
                assert served.headers["content-type"].split(";")[0] in (
                    "application/javascript",
                    "text/css",
                ), url
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "omniroute"
        assert (await client.get("/static/docs/../../pyproject.toml")).status_code == 404
        assert (await client.get("/static/docs/favicon.png")).status_code == 404  # listed only
        # FastAPI's own OAuth2 redirect page (an inline script) is not served
        assert (await client.get("/docs/oauth2-redirect")).status_code == 404


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    try:
        async with peers.launch_browser() as launched:
            yield launched
    except peers.PeerUnavailable as exc:
        peers.unavailable(exc)


VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__violations.push([e.violatedDirective, e.blockedURI]));
"""


async def _offline_page(browser: Browser, base: str) -> tuple[Any, list[str], list[str]]:
    """A page whose requests to anywhere but ``base`` are aborted (and recorded)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    left: list[str] = []

    async def only_here(route: Route) -> None:
        if route.request.url.startswith(base + "/"):
            await route.continue_()
        else:
            left.append(route.request.url)
            await route.abort()

    await context.route("**/*", only_here)
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.add_init_script(VIOLATIONS)
    return page, errors, left


async def test_swagger_ui_renders_the_operations_offline(
    runtime: Runtime, browser: Browser
) -> None:
    async with live_server(runtime) as base:
        page, errors, left = await _offline_page(browser, base)
        await page.goto(base + "/docs")
        await page.wait_for_function(
            "() => document.querySelectorAll('.opblock').length > 20", timeout=30_000
        )
        paths = await page.locator(".opblock-summary-path").all_inner_texts()
        assert "/api/me/password" in [p.replace("\u200b", "") for p in paths]
        assert left == []  # nothing even tried to leave this machine
        assert errors == [] and await page.evaluate("window.__violations") == []
        await page.context.close()


async def test_redoc_renders_the_operations_offline(runtime: Runtime, browser: Browser) -> None:
    async with live_server(runtime) as base:
        page, errors, left = await _offline_page(browser, base)
        await page.goto(base + "/redoc")
        await page.wait_for_function(
            "() => document.querySelectorAll('[data-section-id*=\"operation/\"]').length > 20",
            timeout=30_000,
        )
        assert "/api/me/password" in await page.inner_text("body")
        assert left == []
        # The policy blocks what the bundle would load from elsewhere or inject without the
        # nonce; nothing else is refused (docs/security.md, "API docs pages"): the Redocly
        # logo from its CDN, and the scrollbar library's stylesheet (native scrollbars used).
        refused = {tuple(v) for v in await page.evaluate("window.__violations")}
        assert refused <= {
            ("img-src", "https://cdn.redoc.ly/redoc/logo-mini.svg"),
            ("style-src-elem", "inline"),
        }, refused
        styles = await page.evaluate(
            "() => [...document.querySelectorAll('style')].filter(s => !s.nonce)"
            ".map(s => s.textContent.slice(0, 12))"
        )
        assert all(s.startswith(".ps{") or s == "" for s in styles), styles
        assert all("Content Security Policy" in e for e in errors), errors
        await page.context.close()
