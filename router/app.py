"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from adapters.clock import Clock
from router.api import admin, contacts, health, me, webhooks
from router.exceptions import OmnirouteError
from router.runtime import Runtime
from router.settings import Settings, load_settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


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
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="omniroute",
        summary="Omnichannel contact-center router",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
    )
    app.state.runtime = runtime

    @app.exception_handler(OmnirouteError)
    async def _omniroute_error(_: Request, exc: OmnirouteError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "invalid", "message": "the request is invalid", "errors": errors},
            status_code=422,
        )

    for module in (health, admin, contacts, me, webhooks):
        app.include_router(module.router)
    return app
