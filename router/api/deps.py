"""Dependencies shared by the API routes: the runtime and the caller's role."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Request

from router.auth import Principal, authenticate_token
from router.exceptions import Forbidden, NotFound, Unauthorized
from router.runtime import Runtime
from router.types import Role

__all__ = ["get_runtime", "my_agent_id", "require"]


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    """The app's runtime. Async on purpose: FastAPI runs a plain ``def`` dependency in a
    worker thread, a thread hop on every request for one attribute read."""
    return _runtime(request)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require(role: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that authenticates the caller and checks they have at least ``role``."""

    async def dependency(request: Request) -> Principal:
        runtime = _runtime(request)
        principal = None
        token = bearer(request)
        if token is not None:
            principal = await runtime.db.read(authenticate_token, token)
        if principal is None:
            session = getattr(request.app.state, "sessions", None)
            if session is not None:
                principal = await session.principal(request)
        if principal is None:
            raise Unauthorized("a valid token is required (Authorization: Bearer ...)")
        if not principal.allows(role):
            raise Forbidden(f"this needs the {role.value} role")
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{role.value}"
    return dependency


async def my_agent_id(principal: Principal = Depends(require(Role.AGENT))) -> int:
    """The caller's agent id, for routes that act on the caller's own work."""
    if principal.agent_id is None:
        raise NotFound("you are not an agent")
    return principal.agent_id
