"""Users, tokens and passwords.

Tokens are 256-bit random strings shown once and stored as SHA-256; passwords are argon2
hashes. Roles are agent < supervisor < admin; what each may see and do is decided by
router.policy, where every route and socket command declares its rule.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, bindparam, insert, select, update

from router.credentials import (
    PASSWORD_CHANGED,
    REVOKED,
    TOKEN_ROTATED,
    UNKNOWN,
    WITH_PASSWORD,
    WITH_TOKEN,
    end_credentials,
    end_sessions,
)
from router.db import Tx
from router.exceptions import Conflict, InvalidInput, NotFound
from router.models import Agent, User
from router.types import Role

__all__ = [
    "Principal",
    "authenticate_token",
    "create_user",
    "hash_token",
    "new_token",
    "revoke_user",
    "rotate_token",
    "set_password",
    "verify_password",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_hasher = PasswordHasher()
MIN_PASSWORD = 10


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: int
    name: str
    role: Role
    agent_id: int | None
    password_changed_at: datetime | None = None

    def allows(self, role: Role) -> bool:
        return self.role.allows(role)


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user(conn: Connection, name: str) -> Any:
    row = conn.execute(select(User).where(User.name == name)).first()
    if row is None:
        raise NotFound(f'no user "{name}"')
    return row


def create_user(tx: Tx, name: str, role: Role | str) -> tuple[int, str]:
    """Create a user; returns ``(user_id, token)``. The token is not stored, only its hash."""
    if not _NAME.match(name):
        raise InvalidInput(f'invalid user name "{name}" (letters, digits, _ . @ -)')
    role = Role(role)
    if tx.execute(select(User.id).where(User.name == name)).first():
        raise Conflict(f'user "{name}" already exists')
    token = new_token()
    user_id = tx.execute(
        insert(User)
        .values(
            name=name,
            role=role.value,
            token_hash=hash_token(token),
            token_created_at=tx.now,
            created_at=tx.now,
        )
        .returning(User.id)
    ).scalar_one()
    return int(user_id), token


def rotate_token(tx: Tx, name: str) -> str:
    """A new token; the old one stops working, and with it every socket that signed in with
    it and every console session opened with it (and their sockets)."""
    user = _user(tx.conn, name)
    token = new_token()
    tx.execute(
        update(User)
        .where(User.id == user.id)
        .values(token_hash=hash_token(token), token_created_at=tx.now, revoked_at=None)
    )
    ended = end_sessions(tx, user.id, TOKEN_ROTATED, signed_in_with=(WITH_TOKEN, UNKNOWN))
    end_credentials(tx, user.id, TOKEN_ROTATED, token=True, sessions=ended)
    return token


def revoke_user(tx: Tx, name: str) -> None:
    """The token stops working, every console session of the user ends, and every socket of
    theirs is closed; an agent goes offline and their work returns to its queues."""
    user = _user(tx.conn, name)
    tx.execute(update(User).where(User.id == user.id).values(token_hash=None, revoked_at=tx.now))
    ended = end_sessions(tx, user.id, REVOKED)
    end_credentials(tx, user.id, REVOKED, token=True, sessions=ended, logout=True, everything=True)


def set_password(tx: Tx, name: str, password: str) -> None:
    """Set the password; the console sessions signed in with a password end (and their
    sockets); the API token and the sessions opened with it do not depend on it."""
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"a password needs at least {MIN_PASSWORD} characters")
    user = _user(tx.conn, name)
    tx.execute(
        update(User)
        .where(User.id == user.id)
        .values(password_hash=_hasher.hash(password), password_changed_at=tx.now)
    )
    ended = end_sessions(tx, user.id, PASSWORD_CHANGED, signed_in_with=(WITH_PASSWORD, UNKNOWN))
    end_credentials(tx, user.id, PASSWORD_CHANGED, token=False, sessions=ended)


# Built once: a statement built per call costs several times its execution (every request
# authenticates).
_AGENT_OF_USER = select(Agent.id).where(Agent.user_id == bindparam("user_id"))
_USER_BY_TOKEN = select(User).where(
    User.token_hash == bindparam("digest"), User.revoked_at.is_(None)
)


def _principal(conn: Connection, user: Any) -> Principal:
    agent_id = conn.execute(_AGENT_OF_USER, {"user_id": user.id}).scalar_one_or_none()
    return Principal(user.id, user.name, Role(user.role), agent_id, user.password_changed_at)


def authenticate_token(conn: Connection, token: str) -> Principal | None:
    if not token or len(token) > 256:
        return None
    digest = hash_token(token)
    user = conn.execute(_USER_BY_TOKEN, {"digest": digest}).first()
    # The lookup is by hash, so timing reveals nothing about the token; compare anyway.
    if user is None or user.token_hash is None or not hmac.compare_digest(user.token_hash, digest):
        return None
    return _principal(conn, user)


def verify_password(conn: Connection, name: str, password: str) -> Principal | None:
    user = conn.execute(select(User).where(User.name == name, User.revoked_at.is_(None))).first()
    if user is None or user.password_hash is None:
        _hasher.hash(password)  # spend the same time whether or not the user exists
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    return _principal(conn, user)
