"""The exception tree of the core.

OmnirouteError
├── ConfigError            settings, channels.yaml: names the field, never a secret
│   └── DatabaseUnreachable  the database does not answer (yet): `serve` waits for it
├── NotFound               an id that does not exist (HTTP 404)
├── Forbidden              authenticated but not allowed (HTTP 403)
├── Unauthorized           missing or wrong credentials (HTTP 401)
├── InvalidInput           bad input with a clear message (HTTP 422)
│   └── RulesRejected      a ruleset that fails validation or would orphan work
├── Conflict               the state changed underneath (HTTP 409): lost a race, stale
├── CapacityExceeded       the agent has no free capacity for this (HTTP 409)
├── RateLimited            too many attempts; ``retry_after`` seconds (HTTP 429, Retry-After)
├── Unavailable            not now, retry later (HTTP 503)
│   └── DatabaseUnavailable  the database is unreachable or refuses writes
├── AlreadyRunning         a second `serve` on one SQLite file
└── ChannelUnavailable     the inbox is disabled or its channel is not configured
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlreadyRunning",
    "CapacityExceeded",
    "ChannelUnavailable",
    "ConfigError",
    "Conflict",
    "DatabaseUnavailable",
    "DatabaseUnreachable",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "OmnirouteError",
    "RateLimited",
    "RulesRejected",
    "Unauthorized",
    "Unavailable",
]


class OmnirouteError(Exception):
    """Base of every error the core raises on purpose."""

    status = 500
    code = "error"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.detail}


class ConfigError(OmnirouteError):
    code = "config"


class DatabaseUnreachable(ConfigError):
    code = "database_unreachable"


class NotFound(OmnirouteError):
    status = 404
    code = "not_found"


class Forbidden(OmnirouteError):
    status = 403
    code = "forbidden"


class Unauthorized(OmnirouteError):
    status = 401
    code = "unauthorized"


class InvalidInput(OmnirouteError):
    status = 422
    code = "invalid"


class RulesRejected(InvalidInput):
    code = "rules_rejected"


class Conflict(OmnirouteError):
    status = 409
    code = "conflict"


class CapacityExceeded(OmnirouteError):
    status = 409
    code = "capacity"


class RateLimited(OmnirouteError):
    """Too many attempts: answered with 429 and a ``Retry-After`` of ``retry_after`` seconds."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class AlreadyRunning(OmnirouteError):
    code = "already_running"


class ChannelUnavailable(OmnirouteError):
    status = 409
    code = "channel_unavailable"


class Unavailable(OmnirouteError):
    """The server cannot do it right now (e.g. no active ruleset yet); retry later."""

    status = 503
    code = "unavailable"


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached, or its storage refuses writes: nothing was stored."""
