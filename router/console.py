"""The agent console: ``/console`` (docs/console.md). Sign-in with a user name and password
(argon2) or an agent token gives a session cookie (router.sessions); the page is plain
HTML and one script, and talks only the documented agent websocket and REST API."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from router import policy
from router.api.deps import declare
from router.auth import authenticate_token, verify_password
from router.credentials import WITH_PASSWORD, WITH_TOKEN
from router.csat import link_answer, link_signature
from router.exceptions import Forbidden, Unauthorized
from router.pages import CSP, page
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


@router.get("/console/login", dependencies=[declare(policy.PUBLIC)])
async def login_page() -> Response:
    return page("console-login.html")


@router.post("/console/login", dependencies=[declare(policy.SIGN_IN)])
async def login(body: Login, request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    sessions = _sessions(request)
    if not sessions.same_origin(request, required=False):
        raise Forbidden(f"sign in from this site's own page: open {sessions.login_url}")
    ip = request.client.host if request.client else "?"
    if not sessions.attempts.allow(ip):
        return JSONResponse(
            {"error": "rate_limited", "message": "too many sign-in attempts: wait a minute"},
            status_code=429,
        )
    principal = None
    if body.token:
        principal = await runtime.db.read(authenticate_token, body.token)
        signed_in_with = WITH_TOKEN
    elif body.username and body.password:
        principal = await runtime.db.read(verify_password, body.username, body.password)
        signed_in_with = WITH_PASSWORD
    if principal is None:
        raise Unauthorized("wrong user name or password (or token)")
    signed = await sessions.sign_in(principal, signed_in_with)
    response = JSONResponse({"signed_in": True, "name": principal.name})
    sessions.set_cookie(response, signed)
    return response


@router.get("/console/session", dependencies=[declare(policy.SESSION_INFO)])
async def session(request: Request) -> dict[str, Any]:
    """Who is signed in, and the CSRF token the page sends with changes."""
    found = await _sessions(request).from_cookie(request)
    if found is None:
        raise Unauthorized("not signed in")
    principal, token = found.principal, found.token
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


@router.post("/console/logout", dependencies=[declare(policy.SESSION_INFO)])
async def logout(request: Request) -> Response:
    sessions = _sessions(request)
    found = await sessions.from_cookie(request)
    response = JSONResponse({"signed_out": True})
    if found is not None:
        await sessions.principal(request)  # the CSRF check for this change
        await sessions.sign_out(found.token)
    sessions.clear_cookie(response)
    return response


@router.get("/console/supervisor", dependencies=[declare(policy.DASHBOARD_PAGE)])
async def supervisor_console(request: Request) -> Response:
    found = await _sessions(request).from_cookie(request)
    if found is None:
        return RedirectResponse("/console/login", status_code=303)
    policy.check_role(found.principal, policy.DASHBOARD_PAGE)
    return page("supervisor.html")


@router.get("/console", dependencies=[declare(policy.CONSOLE_PAGE)])
async def console(request: Request) -> Response:
    found = await _sessions(request).from_cookie(request)
    if found is None:
        return RedirectResponse("/console/login", status_code=303)
    policy.check_role(found.principal, policy.CONSOLE_PAGE)
    return page("console.html")


# -- the survey links of an email (docs/kpis.md) ------------------------------------------
_SURVEY_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Your rating</title>
<link rel="stylesheet" href="/static/console.css"></head><body class="login">
<main class="login-box"><h1>{title}</h1><p>{text}</p>{form}</main></body></html>"""


def _survey_page(title: str, text: str, form: str = "", status: int = 200) -> Response:
    return Response(
        _SURVEY_PAGE.format(title=title, text=text, form=form),
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
    )


def _survey_ok(request: Request, conversation_id: int, signature: str, score: int) -> bool:
    runtime: Runtime = request.app.state.runtime
    expected = link_signature(runtime.channel_secret, conversation_id)
    return hmac.compare_digest(expected, signature) and 0 <= score <= 10


@router.get(
    "/survey/{conversation_id}/{signature}/{score}", dependencies=[declare(policy.SURVEY_LINK)]
)
async def survey_confirm(
    conversation_id: int, signature: str, score: int, request: Request
) -> Response:
    """A link in the survey email: a page with one button (mail scanners that follow links
    must not answer for the customer)."""
    if not _survey_ok(request, conversation_id, signature, score):
        return _survey_page("Link not valid", "This survey link is not valid.", status=404)
    form = (
        f'<form method="post" action="/survey/{conversation_id}/{signature}/{score}">'
        f'<button type="submit">Send my rating: {score}</button></form>'
    )
    return _survey_page("Your rating", f"You chose {score}.", form)


@router.post(
    "/survey/{conversation_id}/{signature}/{score}", dependencies=[declare(policy.SURVEY_LINK)]
)
async def survey_answer(
    conversation_id: int, signature: str, score: int, request: Request
) -> Response:
    if not _survey_ok(request, conversation_id, signature, score):
        return _survey_page("Link not valid", "This survey link is not valid.", status=404)
    runtime: Runtime = request.app.state.runtime
    if not await runtime.db.write(link_answer, conversation_id, score):
        return _survey_page("Thank you", "This survey was already answered or has expired.")
    return _survey_page("Thank you", "Thank you for your feedback!")
