"""The agent console: ``/console`` (docs/console.md). Sign-in with a user name and password
(argon2) or an agent token gives a session cookie (router.sessions); the page is plain
HTML and one script, and talks only the documented agent websocket and REST API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from router.auth import authenticate_token, verify_password
from router.exceptions import Forbidden, Unauthorized
from router.pages import page
from router.runtime import Runtime
from router.sessions import CSRF_HEADER, Sessions

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str | None = Field(None, max_length=128)
    password: str | None = Field(None, max_length=1024)
    token: str | None = Field(None, max_length=256)


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


@router.get("/console/login")
async def login_page() -> Response:
    return page("console-login.html")


@router.post("/console/login")
async def login(body: Login, request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    sessions = _sessions(request)
    if not sessions.same_origin(request, required=False):
        raise Forbidden("sign in from this site's own page")
    ip = request.client.host if request.client else "?"
    if not sessions.attempts.allow(ip):
        return JSONResponse(
            {"error": "rate_limited", "message": "too many sign-in attempts: wait a minute"},
            status_code=429,
        )
    principal = None
    if body.token:
        principal = await runtime.db.read(authenticate_token, body.token)
    elif body.username and body.password:
        principal = await runtime.db.read(verify_password, body.username, body.password)
    if principal is None:
        raise Unauthorized("wrong user name or password (or token)")
    signed = await sessions.sign_in(principal)
    response = JSONResponse({"signed_in": True, "name": principal.name})
    sessions.set_cookie(response, signed)
    return response


@router.get("/console/session")
async def session(request: Request) -> dict[str, Any]:
    """Who is signed in, and the CSRF token the page sends with changes."""
    found = await _sessions(request).from_cookie(request)
    if found is None:
        raise Unauthorized("not signed in")
    principal, token = found
    return {
        "user": {
            "id": principal.user_id,
            "name": principal.name,
            "role": principal.role.value,
            "agent_id": principal.agent_id,
        },
        "csrf": _sessions(request).csrf(token),
        "csrf_header": CSRF_HEADER,
    }


@router.post("/console/logout")
async def logout(request: Request) -> Response:
    sessions = _sessions(request)
    found = await sessions.from_cookie(request)
    response = JSONResponse({"signed_out": True})
    if found is not None:
        await sessions.principal(request)  # the CSRF check for this change
        await sessions.sign_out(found[1])
    sessions.clear_cookie(response)
    return response


@router.get("/console")
async def console(request: Request) -> Response:
    if await _sessions(request).from_cookie(request) is None:
        return RedirectResponse("/console/login", status_code=303)
    return page("console.html")
