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
    connect_visitor,
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


async def test_password_changes_are_limited_per_account(site: tuple[Runtime, str]) -> None:
    """Five attempts per account in 15 minutes, right or wrong: a stolen session cannot
    try current passwords one after another. The sixth gets 429 with Retry-After, even
    with the right password; another account is not affected."""
    runtime, base = site
    await make_agent(runtime, "ben")
    await runtime.db.write(set_password, "ben", PASSWORD)
    client, csrf = await signed_in(base)
    async with contextlib.aclosing(client):
        headers = {"x-csrf-token": csrf, "origin": base}
        for n in range(5):
            wrong = await client.post(
                "/api/me/password",
                json={"current": f"guess number {n}", "new": "another good password"},
                headers=headers,
            )
            assert wrong.status_code == 403, wrong.text
        limited = await client.post(
            "/api/me/password",
            json={"current": PASSWORD, "new": "another good password"},
            headers=headers,
        )
        assert limited.status_code == 429, limited.text
        assert limited.json()["error"] == "rate_limited"
        assert 0 < int(limited.headers["retry-after"]) <= 15 * 60
        assert "password" in limited.json()["message"]
    # the password did not change, and ben may still change his
    ben = httpx.AsyncClient(base_url=base)
    async with contextlib.aclosing(ben):
        login = await ben.post(
            "/console/login",
            json={"username": "ben", "password": PASSWORD},
            headers={"origin": base},
        )
        assert login.status_code == 200
        ben_csrf = (await ben.get("/console/session")).json()["csrf"]
        changed = await ben.post(
            "/api/me/password",
            json={"current": PASSWORD, "new": "bens new password"},
            headers={"x-csrf-token": ben_csrf, "origin": base},
        )
        assert changed.status_code == 200, changed.text
    again, _ = await signed_in(base)  # anna's password is still the old one
    await again.aclose()


async def test_the_console_signs_in_at_the_loopback_aliases_of_its_own_origin(
    site: tuple[Runtime, str],
) -> None:
    """Configured as http://127.0.0.1:PORT (the demo's default), the console opened at
    http://localhost:PORT (the host of the README's curl) signs in and opens its socket."""
    _, base = site
    port = base.rsplit(":", 1)[1]
    for alias in (f"http://localhost:{port}", f"http://[::1]:{port}"):
        client = httpx.AsyncClient(base_url=base)
        async with contextlib.aclosing(client):
            login = await client.post(
                "/console/login",
                json={"username": "anna", "password": PASSWORD},
                headers={"origin": alias},
            )
            assert login.status_code == 200, login.text
            cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        ws = await websockets.connect(
            ws_url(base, "/ws/agent"),
            origin=alias,  # type: ignore[arg-type]
            additional_headers={"Cookie": cookie},
        )
        await ws.send(json.dumps({"type": "hello"}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.close()
        # the demo page's chat widget, opened there, may connect too
        visitor, _ = await connect_visitor(base, origin=alias)
        await visitor.close()
    # another port of the same host is another origin
    client = httpx.AsyncClient(base_url=base)
    async with contextlib.aclosing(client):
        other = await client.post(
            "/console/login",
            json={"username": "anna", "password": PASSWORD},
            headers={"origin": "http://localhost:1"},
        )
    assert other.status_code == 403


async def test_a_foreign_origin_is_told_which_url_to_open(tmp_path: Path, db_url: str) -> None:
    settings = make_settings(
        tmp_path / "conf", db_url, channels=WEB_CHANNELS, public_base_url="https://support.example"
    )
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        await make_agent(runtime, "anna")
        await runtime.db.write(set_password, "anna", PASSWORD)
        for origin in ("http://localhost:8080", "https://support.example.evil"):
            refused = await client.post(
                "/console/login",
                json={"username": "anna", "password": PASSWORD},
                headers={"origin": origin},
            )
            assert refused.status_code == 403
            assert "https://support.example/console/login" in refused.json()["message"]
