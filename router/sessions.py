"""Console sign-in: a session cookie for browsers (docs/console.md).

The cookie holds a random 256-bit token (only its SHA-256 is stored); it is HttpOnly,
SameSite=Strict, Secure when we are served over https, and expires. A session remembers
whether it signed in with the password or the API token, and ends on sign-out, at expiry,
when the user is revoked and when that credential changes (docs/security.md, "Revocation";
its sockets are closed then). Requests that
change state and authenticate by cookie must carry ``X-CSRF-Token`` (an HMAC of the session
token, handed to the page by ``GET /console/session``) and, when the browser sends one, our
own ``Origin``. The agent websocket takes the cookie only from our own origin.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, insert, select, update
from starlette.requests import HTTPConnection
from starlette.responses import Response

from router.auth import Principal, _principal, authenticate_token, hash_token, new_token
from router.credentials import SIGNED_OUT, Credential, end_credentials
from router.db import Database, Tx
from router.exceptions import Forbidden, Unauthorized
from router.models import User, UserSession
from router.ratelimit import RateLimiter

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "CookieSession",
    "Sessions",
    "hello_principal",
    "origin_of",
    "own_origins",
]

COOKIE = "omniroute_session"
CSRF_HEADER = "x-csrf-token"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
PASSWORD_CHANGES = 5  # attempts to change the password, per account (and process) ...
PASSWORD_WINDOW = 15 * 60  # ... in this many seconds


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def own_origins(public_base_url: str) -> frozenset[str]:
    """The origins of our own pages: that of ``public_base_url`` and, when its host is a
    loopback name or address, the other loopback aliases with the same scheme and port (the
    demo serves http://127.0.0.1:8080, and a browser opened at http://localhost:8080 is on
    the same machine, the same server)."""
    parts = urlsplit(public_base_url)
    origin = origin_of(public_base_url)
    host = (parts.hostname or "").lower()
    if f"[{host}]" not in _LOOPBACK and host not in _LOOPBACK:
        return frozenset({origin})
    port = f":{parts.port}" if parts.port is not None else ""
    return frozenset({origin, *(f"{parts.scheme}://{alias}{port}".lower() for alias in _LOOPBACK)})


@dataclass(frozen=True, slots=True)
class SignedIn:
    principal: Principal
    token: str
    expires_at: Any


@dataclass(frozen=True, slots=True)
class CookieSession:
    """A request's valid console session: who, the cookie's token, the session's id."""

    principal: Principal
    token: str
    session_id: int

    @property
    def credential(self) -> Credential:
        return Credential(self.principal.user_id, session_id=self.session_id)


def _open(tx: Tx, user_id: int, token_hash: str, hours: float, signed_in_with: str) -> Any:
    expires = tx.now + timedelta(hours=hours)
    tx.execute(
        insert(UserSession).values(
            token_hash=token_hash,
            user_id=user_id,
            created_at=tx.now,
            expires_at=expires,
            signed_in_with=signed_in_with,
        )
    )
    return expires


def _lookup(conn: Connection, token_hash: str, now: Any) -> tuple[Principal, int] | None:
    row = conn.execute(
        select(User, UserSession.id.label("session_id"))
        .join(UserSession, UserSession.user_id == User.id)
        .where(
            UserSession.token_hash == token_hash,
            UserSession.revoked_at.is_(None),
            UserSession.expires_at > now,
            User.revoked_at.is_(None),
        )
    ).first()
    return (_principal(conn, row), int(row.session_id)) if row is not None else None


def _close(tx: Tx, token_hash: str) -> None:
    """Sign-out: the session ends, its sockets close; an agent left without a socket logs
    out (offline, work back to its queues), as the protocol's ``logout`` does."""
    row = tx.execute(
        update(UserSession)
        .where(UserSession.token_hash == token_hash, UserSession.revoked_at.is_(None))
        .values(revoked_at=tx.now, end_reason=SIGNED_OUT)
        .returning(UserSession.id, UserSession.user_id)
    ).first()
    if row is not None:
        end_credentials(
            tx, int(row.user_id), SIGNED_OUT, token=False, sessions=[int(row.id)], logout=True
        )


class Sessions:
    def __init__(self, db: Database, secret: bytes, public_base_url: str, hours: float) -> None:
        self.db = db
        self.secret = secret
        self.origin = origin_of(public_base_url)
        self.origins = own_origins(public_base_url)
        self.login_url = f"{public_base_url.rstrip('/')}/console/login"
        self.secure = self.origin.startswith("https://")
        self.hours = hours
        self.attempts = RateLimiter(10, 60)  # sign-in attempts per IP per minute
        # password changes per account (router/api/me.py)
        self.password_changes = RateLimiter(PASSWORD_CHANGES, PASSWORD_WINDOW)

    def csrf(self, token: str) -> str:
        return hmac.new(self.secret, b"csrf:" + token.encode(), hashlib.sha256).hexdigest()

    async def sign_in(self, principal: Principal, signed_in_with: str) -> SignedIn:
        """A new session for ``principal``, who proved themselves ``signed_in_with`` the
        password or the API token (it ends when that credential changes)."""
        token = new_token()
        expires = await self.db.write(
            _open, principal.user_id, hash_token(token), self.hours, signed_in_with
        )
        return SignedIn(principal, token, expires)

    def set_cookie(self, response: Response, signed: SignedIn) -> None:
        response.set_cookie(
            COOKIE,
            signed.token,
            max_age=int(self.hours * 3600),
            httponly=True,
            secure=self.secure,
            samesite="strict",
            path="/",
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(
            COOKIE, path="/", httponly=True, secure=self.secure, samesite="strict"
        )

    async def sign_out(self, token: str) -> None:
        await self.db.write(_close, hash_token(token))

    async def from_cookie(self, connection: HTTPConnection) -> CookieSession | None:
        token = connection.cookies.get(COOKIE)
        if not token or len(token) > 256:
            return None
        found = await self.db.read(_lookup, hash_token(token), self.db.clock.now())
        return CookieSession(found[0], token, found[1]) if found is not None else None

    def same_origin(self, connection: HTTPConnection, *, required: bool) -> bool:
        origin = connection.headers.get("origin")
        if origin is None:
            return not required
        return origin.lower() in self.origins

    async def principal(self, connection: HTTPConnection) -> Principal | None:
        """The cookie's user for an API request; state-changing requests must prove they
        come from our page (CSRF token and Origin), or they are refused."""
        found = await self.from_cookie(connection)
        if found is None:
            return None
        principal, token = found.principal, found.token
        method = connection.scope.get("method", "GET")
        if method not in _SAFE:
            sent = connection.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent, self.csrf(token)) or not self.same_origin(
                connection, required=False
            ):
                raise Forbidden("a signed-in request that changes something needs the CSRF token")
        return principal


async def hello_principal(
    connection: HTTPConnection, db: Database, hello: dict[str, Any]
) -> tuple[Principal, Credential]:
    """Who opens a socket, and the credential the socket depends on: the hello's ``token``,
    or without one the console's session cookie, taken only from our own pages (a page of
    another site must not ride on the cookie: cross-site websocket hijacking)."""
    token = hello.get("token")
    if token is None:
        sessions: Sessions = connection.app.state.sessions
        if not sessions.same_origin(connection, required=True):
            raise Forbidden(
                "the session cookie is accepted only from this site's own pages: "
                f"open {sessions.login_url}"
            )
        found = await sessions.from_cookie(connection)
        if found is None:
            raise Unauthorized("not signed in: send a token or sign in to the console")
        return found.principal, found.credential
    if not isinstance(token, str):
        raise Unauthorized('the first frame must be {"type": "hello", "token": ...}')
    principal = await db.read(authenticate_token, token)
    if principal is None:
        raise Unauthorized("invalid token")
    return principal, Credential(principal.user_id, token_hash=hash_token(token))
