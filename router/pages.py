"""Static pages and assets: the widget, the demo pages, the API docs (``/docs``,
``/redoc``). A strict Content-Security-Policy (no inline script or style) on every page we
serve; every script and stylesheet comes from this server."""

from __future__ import annotations

import importlib.util
import secrets
from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from router import policy
from router.api.deps import declare
from router.exceptions import NotFound

__all__ = ["CSP", "page", "router"]

router = APIRouter(include_in_schema=False, dependencies=[declare(policy.PUBLIC)])
STATIC = Path(__file__).resolve().parent / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
_ASSETS = {
    "demo.css": "text/css",
    "demo-agent.js": "application/javascript",
    "console.css": "text/css",
    "console.js": "application/javascript",
    "console-common.js": "application/javascript",
    "console-login.js": "application/javascript",
    "supervisor.js": "application/javascript",
    "docs-swagger.js": "application/javascript",
    "docs-redoc.js": "application/javascript",
}
# Swagger UI and ReDoc as the pinned fastapi-offline package (MIT) ships them: with 1.7.7,
# swagger-ui-dist 5.32.6 (Apache-2.0) and redoc 2.5.3 (MIT). The docs work offline and no
# script from a CDN ever runs on the console's origin (docs/security.md).
_DOCS_ASSETS = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "application/javascript",
}


@cache
def _docs_assets() -> Path:
    # found without importing the package (its module builds an app we do not use)
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastapi-offline is not installed (it is in requirements/serve.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def page(name: str) -> Response:
    return FileResponse(
        STATIC / name,
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
    )


@router.get("/widget.js")
async def widget_js() -> Response:
    return FileResponse(
        STATIC / "widget.js",
        media_type="application/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.get("/widget.css")
async def widget_css() -> Response:
    return FileResponse(
        STATIC / "widget.css",
        media_type="text/css",
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.get("/static/{name}")
async def static_asset(name: str) -> Response:
    if name not in _ASSETS:
        raise NotFound("no such asset")
    return FileResponse(
        STATIC / name, media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"}
    )


@router.get("/favicon.ico")
async def favicon() -> Response:
    return Response(status_code=204, headers={"Cache-Control": "public, max-age=86400"})


@router.get("/demo")
async def demo_chat() -> Response:
    return page("demo-chat.html")


@router.get("/demo/agent")
async def demo_agent() -> Response:
    return page("demo-agent.html")


@router.get("/docs")
async def swagger_ui() -> Response:
    """Swagger UI over ``/openapi.json``, from local assets under the console's policy."""
    return page("docs.html")


@router.get("/redoc")
async def redoc() -> Response:
    """ReDoc over ``/openapi.json``: scripts as everywhere (``script-src 'self'``); the
    ``<style>`` elements ReDoc writes carry this response's nonce."""
    nonce = secrets.token_urlsafe(18)
    html = (STATIC / "redoc.html").read_text().replace("{nonce}", nonce)
    csp = CSP.replace("style-src 'self';", f"style-src 'self' 'nonce-{nonce}';")
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"})


@router.get("/static/docs/{name}")
async def docs_asset(name: str) -> Response:
    if name not in _DOCS_ASSETS:
        raise NotFound("no such asset")
    return FileResponse(
        _docs_assets() / name,
        media_type=_DOCS_ASSETS[name],
        headers={"Cache-Control": "public, max-age=86400"},
    )
