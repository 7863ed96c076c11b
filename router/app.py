"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.clock import Clock
from router import console, pages, ws_agent, ws_chat, ws_supervisor
from router.api import (
    admin,
    agents,
    compose,
    contacts,
    conversations,
    health,
    me,
    queues,
    reports,
    users,
    webhooks,
)
from router.bodylimit import BodyLimit, BodyLimits
from router.db import storage_failure
from router.exceptions import OmnirouteError, RateLimited
from router.runtime import Runtime
from router.sessions import Sessions
from router.settings import Settings, load_settings
from router.ws_frames import quiet_invalid_utf8

__all__ = ["create_app"]

log = logging.getLogger(__name__)


_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeaders:
    """Adds the security headers to every HTTP response that does not set them itself.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs
    each request through an extra task and memory streams, which cost about a millisecond a
    request on a slow core, more than the rest of a webhook's handling."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in _SECURITY_HEADERS if h[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with one change at shutdown (SIGTERM): the runtime's sockets are
    told to reconnect (a `reconnect` frame, then close 1012) before uvicorn closes every
    connection itself. uvicorn closes websockets before the application's shutdown runs, so
    without this the clients would get a bare 1012 and no frame."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self.runtime.drain_sockets()
        except Exception:
            log.exception("telling the sockets to reconnect failed")
        await super().shutdown(sockets)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    runtime: Runtime | None = None,
    workers: bool = True,
) -> FastAPI:
    settings = settings or load_settings()
    runtime = runtime or Runtime(settings, clock=clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start(workers=workers)
        # Everything loaded at start-up lives as long as the process: keep it out of the
        # cyclic collector, and collect the young generation less often than the default
        # (700) but not so rarely that one collection stalls routing: at 50,000 a young
        # collection took 20-40 ms on a slow core (the p99 of bench/e2e.py), at 5,000 about
        # 5 ms, for the same total work.
        gc.freeze()
        gc.set_threshold(5_000, 20, 20)
        try:
            yield
        finally:
            await runtime.stop(drain=settings.shutdown_drain)

    app = FastAPI(
        title="omniroute",
        summary="Omnichannel contact-center router",
        version="0.1.0",
        lifespan=lifespan,
        # served by router/pages.py from local assets under our CSP (FastAPI's own pages
        # load Swagger UI and ReDoc from a CDN with an inline script)
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.sessions = Sessions(
        runtime.db, runtime.channel_secret, settings.public_base_url, settings.session_hours
    )

    @app.exception_handler(OmnirouteError)
    async def _omniroute_error(_: Request, exc: OmnirouteError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    @app.exception_handler(DBAPIError)
    async def _database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        # Nothing was stored (the transaction did not commit): the caller should retry; a
        # provider retries a webhook that did not get its 2xx. No details: they may hold data.
        reason = storage_failure(exc)
        log.error("request failed on the database: %s", reason or type(exc.orig).__name__)
        return JSONResponse(
            {
                "error": "unavailable",
                "message": "the database cannot take this right now; nothing was stored: retry",
            },
            status_code=503,
            headers={"retry-after": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "invalid", "message": "the request is invalid", "errors": errors},
            status_code=422,
        )

    # Added first, so it runs inside SecurityHeaders (its 413s get the headers too) and
    # before routing: no route ever buffers a body over its limit.
    app.add_middleware(
        BodyLimit,
        limits=BodyLimits(
            default=settings.max_body_bytes,
            upload=settings.max_upload_bytes,
            webhook=settings.max_webhook_bytes,
            small=settings.max_signin_bytes,
        ),
    )
    app.add_middleware(SecurityHeaders)
    quiet_invalid_utf8()

    for router in (
        health.router,
        admin.router,
        agents.router,
        queues.router,
        conversations.router,
        compose.router,
        contacts.router,
        reports.router,
        users.router,
        me.router,
        webhooks.routes(),  # one set per provider of the channel registry
        ws_agent.router,
        ws_chat.router,
        ws_supervisor.router,
        pages.router,
        console.router,
    ):
        app.include_router(router)
    return app
