"""Settings from the environment (``OMNIROUTE_*``) or an env file, validated at start-up.

An invalid setting fails with a message naming the variable, never its value (values
may be secrets).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from router import failpoints as _failpoints
from router.exceptions import ConfigError

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OMNIROUTE_", extra="ignore", validate_default=True
    )

    # storage
    database_url: str = Field(
        "sqlite:///var/omniroute.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql://...",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="FULL survives power loss after an acknowledgement; NORMAL only a process crash",
    )
    db_pool_size: int = Field(10, ge=1, le=500)
    db_max_overflow: int = Field(10, ge=0, le=500)
    redis_url: str | None = Field(
        None, description="redis://...; the in-process bus is used when unset"
    )
    redis_prefix: str = "omniroute:"
    data_dir: Path = Field(Path("var"), description="blobs and local state")

    # the two files admins edit
    rules_path: Path = Path("rules.yaml")
    channels_path: Path | None = None

    # serving
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_base_url: str = Field(
        "http://127.0.0.1:8080", description="the URL providers and browsers use to reach us"
    )
    secret_key: SecretStr | None = Field(
        None, description="32+ random characters; signs threading tokens and sessions"
    )
    supervisor_snapshot_interval: float = Field(
        1.0, gt=0, description="how often the dashboard's socket checks for a changed snapshot"
    )
    shutdown_drain: float = Field(
        10.0, ge=0, description="on SIGTERM, seconds for sends in flight to finish"
    )
    session_hours: float = Field(
        12.0, gt=0, le=24 * 30, description="how long a console sign-in lasts"
    )
    credential_check_interval: float = Field(
        2.0,
        gt=0,
        description="how often each process re-checks the credentials of its open sockets "
        "(revocation's fallback when a bus notice is lost)",
    )
    ws_compression: bool = Field(
        False,
        description=(
            "negotiate per-message deflate on websockets: less traffic for a compressor "
            "per socket (about 40 KB) and CPU on every frame"
        ),
    )
    trusted_proxies: str = Field(
        "",
        description=(
            "comma-separated addresses or CIDR networks of the reverse proxies in front of "
            "us: their X-Forwarded-For / X-Forwarded-Proto are believed, nobody else's "
            "(empty: nobody's, the client is the peer of the TCP connection)"
        ),
    )
    process_id: str = Field(default_factory=lambda: f"{socket.gethostname()}")
    failpoints: str = Field(
        "",
        description="crash tests only: kill the process at these named lines "
        "(docs/delivery.md, Failpoints); an unknown name is an error",
    )

    # workers (seconds)
    worker_interval: float = Field(1.0, gt=0)
    outbox_interval: float = Field(1.0, gt=0)
    rules_watch_interval: float = Field(2.0, gt=0)
    rules_poll_interval: float = Field(5.0, gt=0)
    heartbeat_interval: float = Field(5.0, gt=0)
    lease_ttl: float = Field(30.0, gt=0)
    outbox_max_attempts: int = Field(12, ge=1)
    outbox_backoff_base: float = Field(1.0, gt=0)
    outbox_backoff_max: float = Field(600.0, gt=0)
    outbox_concurrency: int = Field(
        64, ge=1, description="sends in flight at once in one process, all inboxes together"
    )
    outbox_per_inbox: int = Field(
        8, ge=1, description="sends in flight at once in one process for one inbox"
    )
    presence_grace: float = Field(
        60.0, ge=0, description="after a socket loss, presence goes offline after this"
    )
    stream_retention_days: float = Field(
        7.0,
        gt=0,
        description="stream events (websocket resume) older than this are deleted; a client "
        "resuming from before them gets resync_required",
    )
    stream_prune_interval: float = Field(
        300.0, gt=0, description="how often the retention lease's holder prunes stream events"
    )
    db_wait: float | None = Field(
        None,
        ge=0,
        description="how long `serve` waits at start for a PostgreSQL that does not answer "
        "(seconds; unset: as long as it takes)",
    )

    # limits
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="request bodies of the JSON APIs and every route not named below",
    )
    max_upload_bytes: int = Field(
        50 * 1024 * 1024 + 64 * 1024,
        ge=1024,
        description="POST /api/uploads: the largest attachment (50 MB) plus multipart framing",
    )
    max_webhook_bytes: int = Field(
        5 * 1024 * 1024, ge=1024, description="provider webhooks (/webhooks/...)"
    )
    max_signin_bytes: int = Field(
        16 * 1024, ge=1024, description="sign-in and sign-out (/console/...), survey answers"
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must start with sqlite:// or postgresql://")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        entries = [e.strip() for e in value.split(",") if e.strip()]
        for number, entry in enumerate(entries, 1):
            if entry == "*":
                raise ValueError("'*' would believe any client's X-Forwarded-For: name the proxies")
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"entry {number} is not an IP address or CIDR network") from None
        return ",".join(entries)

    @field_validator("failpoints")
    @classmethod
    def _failpoints(cls, value: str) -> str:
        _failpoints.parse(value)  # an unknown name fails here, at start-up
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    def websocket_options(self) -> dict[str, Any]:
        """uvicorn's websocket settings for this deployment (see :func:`websocket_options`)."""
        return websocket_options(compression=self.ws_compression)

    def proxy_options(self) -> dict[str, Any]:
        """uvicorn's proxy settings: X-Forwarded-For and -Proto are believed only from
        ``trusted_proxies`` (uvicorn's own default would believe 127.0.0.1, and nobody
        behind a proxy on another host). The client address every per-IP limit keys on is
        then the real client's."""
        if not self.trusted_proxies:
            return {"proxy_headers": False}
        return {"proxy_headers": True, "forwarded_allow_ips": self.trusted_proxies}

    def server_options(self) -> dict[str, Any]:
        """Everything ``omniroute serve`` and the tests' live server pass to uvicorn."""
        return {**self.websocket_options(), **self.proxy_options()}

    def require_secret(self) -> str:
        if self.secret_key is None:
            raise ConfigError("OMNIROUTE_SECRET_KEY: required to serve (32+ random characters)")
        return self.secret_key.get_secret_value()

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(env_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings, turning validation errors into a :class:`ConfigError` that names each
    variable and the problem, and never repeats a value."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False, include_context=False):
            field = "_".join(str(p) for p in error["loc"]).upper()
            lines.append(f"OMNIROUTE_{field}: {error['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None


#: The largest websocket frame a server of ours reads: a bigger one closes the socket (1009)
#: before it is buffered whole. Frames between the sockets' own limit (64 KB) and this get a
#: clear ``too_large`` error and the socket stays open.
WS_MAX_FRAME_BYTES = 1 << 20


def websocket_options(*, compression: bool = False) -> dict[str, Any]:
    """uvicorn's websocket settings, shared by ``omniroute serve``, the tests' live server
    and the benchmarks' raw baselines (so that those compare like with like). uvicorn's
    defaults would buffer frames of up to 16 MiB and negotiate per-message deflate, which
    keeps a compressor per socket (about 40 KB measured with 2,000 web-chat visitors) and
    compresses every frame, for frames of a few hundred bytes."""
    return {"ws_max_size": WS_MAX_FRAME_BYTES, "ws_per_message_deflate": compression}
