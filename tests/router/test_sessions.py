"""Console sessions without a browser: the cookie's flags, CSRF and Origin on changes, the
end of a session on sign-out, password change and revocation, and the agent websocket
taking the cookie only from our own origin."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import websockets

from router.auth import revoke_user, set_password
from router.runtime import Runtime
from tests.router.test_live import make_agent
from tests.support import (
    WEB_CHANNELS,
    client_for,
    free_port,
    live_server,
    make_settings,
    started_runtime,
    ws_url,
)

PASSWORD = "correct horse battery staple"


@pytest.fixture
async def site(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[Runtime, str]]:
    port = free_port()
    settings = make_settings(
        tmp_path / "conf", db_url, channels=WEB_CHANNELS, public_base_url=f"http://127.0.0.1:{port}"
    )
    async with started_runtime(settings) as runtime:
        await make_agent(runtime, "anna")
        await runtime.db.write(set_password, "anna", PASSWORD)
        async with live_server(runtime, port) as base:
            yield runtime, base


async def signed_in(base: str) -> tuple[httpx.AsyncClient, str]:
    client = httpx.AsyncClient(base_url=base)
    response = await client.post(
        "/console/login", json={"username": "anna", "password": PASSWORD}, headers={"origin": base}
    )
    assert response.status_code == 200, response.text
    session = (await client.get("/console/session")).json()
    return client, session["csrf"]


async def test_the_cookie_is_locked_down_and_changes_need_the_csrf_token(
    site: tuple[Runtime, str],
) -> None:
    _, base = site
    async with httpx.AsyncClient(base_url=base) as anonymous:
        assert (await anonymous.get("/console")).status_code == 303
        wrong = await anonymous.post(
            "/console/login", json={"username": "anna", "password": "nope"}
        )
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
        foreign = await anonymous.post(
            "/console/login",
            json={"username": "anna", "password": PASSWORD},
            headers={"origin": "https://evil.example"},
        )
        assert foreign.status_code == 403
        login = await anonymous.post(
            "/console/login", json={"username": "anna", "password": PASSWORD}
        )
        cookie = login.headers["set-cookie"]
        for flag in ("HttpOnly", "SameSite=strict", "Max-Age=43200", "Path=/"):
            assert flag.lower() in cookie.lower(), cookie
        assert "secure" not in cookie.lower()  # served over http here
    client, csrf = await signed_in(base)
    async with contextlib.aclosing(client):
        assert (await client.get("/console")).status_code == 200
        assert (await client.get("/api/me")).json()["name"] == "anna"
        no_token = await client.post(
            "/api/me/password", json={"current": PASSWORD, "new": "x" * 12}
        )
        assert no_token.status_code == 403 and "CSRF" in no_token.text
        bad_origin = await client.post(
            "/api/me/password",
            json={"current": PASSWORD, "new": "x" * 12},
            headers={"x-csrf-token": csrf, "origin": "https://evil.example"},
        )
        assert bad_origin.status_code == 403
        # a right token changes the password, and that ends every session, this one too
        changed = await client.post(
            "/api/me/password",
            json={"current": PASSWORD, "new": "another good password"},
            headers={"x-csrf-token": csrf, "origin": base},
        )
        assert changed.status_code == 200, changed.text
        assert (await client.get("/api/me")).status_code == 401
        assert (await client.get("/console")).status_code == 303


async def test_sign_out_and_revocation_end_sessions(site: tuple[Runtime, str]) -> None:
    runtime, base = site
    first, csrf = await signed_in(base)
    second, _ = await signed_in(base)
    async with contextlib.aclosing(first), contextlib.aclosing(second):
        out = await first.post("/console/logout", headers={"x-csrf-token": csrf})
        assert out.status_code == 200
        assert (await first.get("/api/me")).status_code == 401
        assert (await second.get("/api/me")).status_code == 200  # only that browser
        await runtime.db.write(revoke_user, "anna")
        assert (await second.get("/api/me")).status_code == 401


async def test_the_websocket_takes_the_cookie_only_from_our_origin(
    site: tuple[Runtime, str],
) -> None:
    _, base = site
    client, _ = await signed_in(base)
    async with contextlib.aclosing(client):
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    for origin, expected in (
        ("https://evil.example", "forbidden"),
        (None, "forbidden"),
        (base, "welcome"),
    ):
        ws = await websockets.connect(
            ws_url(base, "/ws/agent"),
            origin=origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": cookie},
        )
        await ws.send(json.dumps({"type": "hello"}))
        frame = json.loads(await ws.recv())
        assert (frame.get("code") if frame["type"] == "error" else frame["type"]) == expected, frame
        await ws.close()
    # without the cookie, our own origin is not enough
    ws = await websockets.connect(ws_url(base, "/ws/agent"), origin=base)  # type: ignore[arg-type]
    await ws.send(json.dumps({"type": "hello"}))
    assert json.loads(await ws.recv())["code"] == "unauthorized"
    await ws.close()


async def test_a_secure_cookie_over_https(tmp_path: Path, db_url: str) -> None:
    settings = make_settings(
        tmp_path / "conf", db_url, channels=WEB_CHANNELS, public_base_url="https://support.example"
    )
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        await make_agent(runtime, "anna")
        await runtime.db.write(set_password, "anna", PASSWORD)
        login = await client.post("/console/login", json={"username": "anna", "password": PASSWORD})
        assert "secure" in login.headers["set-cookie"].lower()
