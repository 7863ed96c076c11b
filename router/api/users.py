"""Users (admins): create with a role (the token is returned once), rotate, revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from router import policy
from router.api.deps import get_runtime, needs
from router.auth import create_user, revoke_user, rotate_token
from router.models import User
from router.policy import Caller
from router.runtime import Runtime
from router.serialize import iso
from router.types import Role

router = APIRouter(prefix="/api/users", tags=["users"])
admin = needs(policy.ADMIN)


@router.get("", summary="Users and roles (no tokens: only their hashes are stored)")
async def list_users(
    runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> list[dict[str, Any]]:
    rows = await runtime.db.read(lambda c: c.execute(select(User).order_by(User.id)).all())
    return [
        {
            "id": u.id,
            "name": u.name,
            "role": u.role,
            "created_at": iso(u.created_at),
            "revoked": u.revoked_at is not None,
            "has_password": u.password_hash is not None,
        }
        for u in rows
    ]


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: Role = Role.AGENT


@router.post("", status_code=201, summary="Create a user; the token is shown in this response only")
async def add_user(
    body: NewUser, runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> dict[str, Any]:
    user_id, token = await runtime.db.write(create_user, body.name, body.role)
    return {"id": user_id, "name": body.name, "role": body.role.value, "token": token}


@router.post("/{name}/rotate", summary="Issue a new token (the old one stops working)")
async def rotate(
    name: str, runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> dict[str, str]:
    return {"token": await runtime.db.write(rotate_token, name)}


@router.delete("/{name}", summary="Revoke a user")
async def revoke(
    name: str, runtime: Runtime = Depends(get_runtime), _: Caller = Depends(admin)
) -> dict[str, bool]:
    await runtime.db.write(revoke_user, name)
    return {"revoked": True}
