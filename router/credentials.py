"""What a socket signed in with, whether that still holds, and ending it (docs/security.md,
"Revocation").

A socket depends on one **credential**: the user's API token (a hello with ``token``) or a
console session (a hello without one, authenticated by the session cookie). A credential
ends when the user is revoked, when the token is rotated (the token, and the console
sessions opened with it), when the password changes (the console sessions opened with the
password) and when a console session signs out or expires.

The transaction that ends a credential also ends the agent's sockets that depended on it in
the database (their ``agent_connections`` rows; presence offline and offers withdrawn when no
socket is left) and, after its commit, has every process told (``announce``): each process
closes its matching sockets with close code 4401 and the reason (router.revocation).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from router.db import Tx
from router.models import Agent, User, UserSession

__all__ = [
    "CLOSE_CODE",
    "MESSAGES",
    "PASSWORD_CHANGED",
    "PRESENCE_REASONS",
    "REVOKED",
    "SESSION_EXPIRED",
    "SIGNED_OUT",
    "TOKEN_ROTATED",
    "UNKNOWN",
    "WITH_PASSWORD",
    "WITH_TOKEN",
    "Credential",
    "announce",
    "end_credentials",
    "end_sessions",
    "ended_credentials",
    "problem_now",
]

# The websocket close code of a socket whose credential ended (4000-4999: the
# application's own; 4401 reads as "401: sign in again"). The close reason is MESSAGES[...].
CLOSE_CODE = 4401

REVOKED = "revoked"
TOKEN_ROTATED = "token_rotated"
PASSWORD_CHANGED = "password_changed"
SIGNED_OUT = "signed_out"
SESSION_EXPIRED = "session_expired"

MESSAGES = {
    REVOKED: "signed out: your access was revoked",
    TOKEN_ROTATED: "signed out: your token was rotated",
    PASSWORD_CHANGED: "signed out: your password was changed",
    SIGNED_OUT: "signed out: this session was signed out",
    SESSION_EXPIRED: "signed out: your session expired",
}
# why an agent went offline, as the presence events and the status log say it
PRESENCE_REASONS = {
    REVOKED: "access revoked",
    TOKEN_ROTATED: "token rotated",
    PASSWORD_CHANGED: "password changed",
    SIGNED_OUT: "signed out",
    SESSION_EXPIRED: "session expired",
}

# how a console session signed in (``unknown``: opened before this was recorded; such a
# session ends on a token rotation and on a password change alike)
WITH_PASSWORD = "password"
WITH_TOKEN = "token"
UNKNOWN = "unknown"

_CHUNK = 500  # ids per IN (...) list


@dataclass(frozen=True, slots=True)
class Credential:
    """What a socket signed in with: the API token (``token_hash``, its SHA-256) or a
    console session (``session_id``)."""

    user_id: int
    token_hash: str | None = None
    session_id: int | None = None


def _problem(cred: Credential, user: Any, session: Any, now: datetime) -> str | None:
    if user is None or user.revoked_at is not None:
        return REVOKED
    if cred.session_id is None:
        current = user.token_hash or ""
        if not hmac.compare_digest(current, cred.token_hash or "-"):
            return TOKEN_ROTATED
        return None
    if session is None or session.user_id != cred.user_id:
        return SIGNED_OUT
    if session.revoked_at is not None:
        return str(session.end_reason or SIGNED_OUT)
    if session.expires_at <= now:
        return SESSION_EXPIRED
    return None


def _chunks(ids: Iterable[int]) -> Iterable[list[int]]:
    ordered = sorted(set(ids))
    for i in range(0, len(ordered), _CHUNK):
        yield ordered[i : i + _CHUNK]


_USER_COLUMNS = (User.id, User.token_hash, User.revoked_at)
_SESSION_COLUMNS = (
    UserSession.id,
    UserSession.user_id,
    UserSession.revoked_at,
    UserSession.end_reason,
    UserSession.expires_at,
)


def ended_credentials(
    conn: Connection, credentials: Iterable[Credential], now: datetime
) -> dict[Credential, str]:
    """The credentials among ``credentials`` that no longer hold, each with its reason."""
    creds = set(credentials)
    users: dict[int, Any] = {}
    for chunk in _chunks(c.user_id for c in creds):
        for row in conn.execute(select(*_USER_COLUMNS).where(User.id.in_(chunk))):
            users[int(row.id)] = row
    sessions: dict[int, Any] = {}
    for chunk in _chunks(c.session_id for c in creds if c.session_id is not None):
        for found in conn.execute(select(*_SESSION_COLUMNS).where(UserSession.id.in_(chunk))):
            sessions[int(found.id)] = found
    out: dict[Credential, str] = {}
    for cred in creds:
        session = sessions.get(cred.session_id) if cred.session_id is not None else None
        reason = _problem(cred, users.get(cred.user_id), session, now)
        if reason is not None:
            out[cred] = reason
    return out


def problem_now(tx: Tx, cred: Credential) -> str | None:
    """Why ``cred`` no longer holds (None: it holds), read under a shared lock of the user's
    row and the session's row: a transaction ending the credential concurrently either
    finishes first (and is seen) or waits for ours (and sees what we wrote)."""
    user = tx.execute(
        select(*_USER_COLUMNS).where(User.id == cred.user_id).with_for_update(read=True)
    ).first()
    session = None
    if cred.session_id is not None:
        session = tx.execute(
            select(*_SESSION_COLUMNS)
            .where(UserSession.id == cred.session_id)
            .with_for_update(read=True)
        ).first()
    return _problem(cred, user, session, tx.now)


def end_sessions(
    tx: Tx,
    user_id: int,
    reason: str,
    *,
    signed_in_with: Sequence[str] | None = None,
    session_id: int | None = None,
) -> list[int]:
    """End the user's open console sessions (those signed in ``signed_in_with``, or the one
    ``session_id``); returns their ids."""
    statement = update(UserSession).where(
        UserSession.user_id == user_id, UserSession.revoked_at.is_(None)
    )
    if signed_in_with is not None:
        statement = statement.where(UserSession.signed_in_with.in_(list(signed_in_with)))
    if session_id is not None:
        statement = statement.where(UserSession.id == session_id)
    rows = tx.execute(
        statement.values(revoked_at=tx.now, end_reason=reason).returning(UserSession.id)
    ).all()
    return [int(r[0]) for r in rows]


def end_credentials(
    tx: Tx,
    user_id: int,
    reason: str,
    *,
    token: bool,
    sessions: Sequence[int],
    logout: bool = False,
    everything: bool = False,
) -> None:
    """The user's ``token`` and/or console ``sessions`` just ended (in ``tx``): end the
    agent's sockets that depended on them and tell every process after the commit.

    When that leaves the agent without a socket (always, with ``everything``: a revoked
    user), the agent goes offline now and their pending offers are withdrawn; ``logout``
    also returns their assigned work to its queues, as the protocol's ``logout`` does."""
    from router.assignment.service import end_sockets

    if not token and not sessions and not everything:
        return  # nothing a socket could have signed in with ended
    agent_id = tx.execute(
        select(Agent.id).where(Agent.user_id == user_id).with_for_update()
    ).scalar_one_or_none()
    if agent_id is not None:
        end_sockets(
            tx,
            int(agent_id),
            token=token,
            sessions=list(sessions),
            reason=PRESENCE_REASONS[reason],
            logout=logout,
            everything=everything,
        )
    announce(tx, user_id)


def announce(tx: Tx, user_id: int) -> None:
    """After the commit, tell every process that a credential of ``user_id`` ended (the
    runtime publishes a bus notice; its sockets re-check and close)."""
    notify = tx.context.get("credentials_changed")
    if notify is not None:
        tx.on_commit(lambda: notify(user_id))
