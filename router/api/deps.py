"""Dependencies shared by the routes: the runtime, and each route's authorization rule.

A route declares its rule (router.policy) with ``Depends(needs(rule))`` when staff call it
(the dependency authenticates, checks the role and agent profile, checks that the caller
may see the route's object, and hands the route the :class:`~router.policy.Caller`), or
with ``dependencies=[declare(rule)]`` when it authenticates another way (public pages,
provider signatures, visitors, the console's pages). :func:`rule_of` reads a route's rule
back; tests/router/test_authz.py requires one on every route of the app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from fastapi import Depends, Request
from starlette.routing import BaseRoute

from router import policy
from router.auth import Principal, authenticate_token
from router.policy import Caller, Gate, Rule
from router.runtime import Runtime

__all__ = ["declare", "get_runtime", "needs", "principal_of", "rule_of"]


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


async def principal_of(request: Request) -> Principal | None:
    """The caller by their token, else by the console's session cookie (a change made with
    the cookie must carry the CSRF token: router.sessions)."""
    runtime = _runtime(request)
    token = bearer(request)
    if token is not None:
        principal = await runtime.db.read(authenticate_token, token)
        if principal is not None:
            return principal
    session = getattr(request.app.state, "sessions", None)
    return await session.principal(request) if session is not None else None


def _object_id(request: Request, rule: Rule) -> int | None:
    if rule.target is None:
        return None
    raw = request.path_params.get(rule.target.field)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None  # the route's own validation answers 422


@cache
def needs(rule: Rule) -> Callable[[Request], Awaitable[Caller]]:
    """The dependency of a staff route: 401 without valid credentials, 403 without the
    rule's role or agent profile, 404 when the route's object is not one the caller may
    see (exactly as when it does not exist)."""
    if rule.gate is not Gate.STAFF:
        raise ValueError(f"rule {rule.name} is not for staff: declare() it")

    async def dependency(request: Request) -> Caller:
        runtime = _runtime(request)
        principal = policy.check_role(await principal_of(request), rule)
        request.state.principal = principal
        ruleset, object_id = runtime.rules.active, _object_id(request, rule)
        if object_id is None:  # nothing to check in the database for who sees everything
            unlimited = policy.sees_everything(principal, ruleset)
            if unlimited is not None:
                return unlimited
        caller: Caller = await runtime.db.read(
            policy.authorize, principal, rule, ruleset, object_id
        )
        return caller

    dependency.__name__ = f"needs_{rule.name.replace('-', '_')}"
    dependency.policy_rule = rule  # type: ignore[attr-defined]
    return dependency


@cache
def declare(rule: Rule) -> Any:
    """The rule of a route that authenticates its caller another way (``dependencies=``)."""
    if rule.gate is Gate.STAFF:
        raise ValueError(f"rule {rule.name} is for staff: use needs()")

    async def marker() -> None:
        return None

    marker.__name__ = f"declares_{rule.name.replace('-', '_')}"
    marker.policy_rule = rule  # type: ignore[attr-defined]
    return Depends(marker)


def rule_of(route: BaseRoute) -> Rule | None:
    """The rule a route declares (None: it declares none, a bug tests catch)."""
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return policy.FRAMEWORK_ROUTES.get(getattr(route, "path", ""))
    found: list[Rule] = []
    stack = list(dependant.dependencies)
    while stack:
        sub = stack.pop()
        rule = getattr(sub.call, "policy_rule", None)
        if isinstance(rule, Rule):
            found.append(rule)
        stack.extend(sub.dependencies)
    return found[0] if len(set(found)) == 1 else None
