"""The signed-in user."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from router import policy
from router.api.deps import get_runtime, needs
from router.auth import set_password, verify_password
from router.exceptions import Forbidden, RateLimited
from router.policy import Caller
from router.ratelimit import RateLimiter
from router.runtime import Runtime
from router.sessions import PASSWORD_CHANGES, PASSWORD_WINDOW

router = APIRouter(prefix="/api/me", tags=["me"])


class PasswordChange(BaseModel):
    current: str | None = Field(None, description="required when a password is already set")
    new: str = Field(min_length=10, max_length=1024)


@router.get("", summary="Who am I")
async def me(caller: Caller = Depends(needs(policy.SELF))) -> dict[str, Any]:
    user = caller.principal
    return {
        "id": user.user_id,
        "name": user.name,
        "role": user.role.value,
        "agent_id": user.agent_id,
    }


@router.post(
    "/password",
    summary="Set or change my password (argon2)",
    description=f"Limited to {PASSWORD_CHANGES} attempts per account in "
    f"{PASSWORD_WINDOW // 60} minutes (429 with Retry-After beyond).",
)
async def change_password(
    change: PasswordChange,
    request: Request,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.SELF)),
) -> dict[str, bool]:
    user = caller.principal
    # Every attempt counts, right or wrong, before the current password is checked: a
    # stolen session must not be a way to try passwords (docs/security.md).
    limiter: RateLimiter = request.app.state.sessions.password_changes
    key = str(user.user_id)
    if not limiter.allow(key):
        wait = max(1, math.ceil(limiter.retry_after(key)))
        raise RateLimited(
            f"too many password changes for this account: try again in {math.ceil(wait / 60)} "
            "minutes",
            retry_after=wait,
        )
    if user.password_changed_at is not None:
        ok = (
            change.current is not None
            and await runtime.db.read(verify_password, user.name, change.current) is not None
        )
        if not ok:
            raise Forbidden("the current password is wrong")
    await runtime.db.write(set_password, user.name, change.new)
    return {"changed": True}
