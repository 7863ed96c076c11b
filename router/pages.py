"""Static pages and assets: the widget, the demo pages. A strict Content-Security-Policy
(no inline script or style) on every page we serve."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

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
}


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
