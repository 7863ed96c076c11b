"""Real protocol peers for omniroute's tests.

Plain classes, functions and context managers that start, stop, kill and restart
the real servers the tests talk to: Dovecot and pymap (IMAP), an in-process
aiosmtpd sink (SMTP), PostgreSQL, Redis and headless Chromium.  See
``shared/TEST-PEERS.md`` for the recipes this module follows.  There are no pytest
fixtures here: ``tests/conftest.py`` wraps these.

Rules every helper keeps:

* Ports are never hard-coded: a free port is found by binding 127.0.0.1:0, and a
  server that then fails with EADDRINUSE is started again on a new port.
* Every server process is started in a new session (its own process group), and
  is stopped by its context manager, by ``close()``/``stop()``/``kill()`` or, as a
  last resort, by an ``atexit`` hook.
* The shared PostgreSQL and Redis servers are only ever touched to create and
  drop a uniquely named database (PostgreSQL) or to PING (Redis).  Fault tests
  that stop, kill or restart a server use :class:`PrivatePostgres` and
  :class:`PrivateRedis`.
* A peer that can't be had on this machine raises :class:`PeerUnavailable`; a
  peer that is there but fails to start raises :class:`ServerStartError`.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import contextlib
import functools
import grp
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, NoReturn, Self, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from aioimaplib import IMAP4
    from playwright.async_api import Browser

__all__ = [
    "CHROMIUM_ARGS",
    "DEFAULT_PG_URL",
    "DEFAULT_REDIS_URL",
    "AuthAttempt",
    "AuthHandler",
    "Dovecot",
    "PeerUnavailable",
    "PrivatePostgres",
    "PrivateRedis",
    "Pymap",
    "ReceivedMessage",
    "ServerProcess",
    "ServerStartError",
    "SmtpSink",
    "chromium_path",
    "free_port",
    "generate_self_signed_cert",
    "imap_append",
    "imap_session",
    "launch_browser",
    "need",
    "pg_test_database",
    "redis_test_url",
    "skipped_peers",
    "stop_private_fallbacks",
    "unavailable",
    "unique_prefix",
    "wait_port",
]

LOCALHOST = "127.0.0.1"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CHROMIUM_ARGS: tuple[str, ...] = (
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
_START_ATTEMPTS = 5
_ADDR_IN_USE = "address already in use"

_T = TypeVar("_T")


# --------------------------------------------------------------------------- errors


class PeerUnavailable(Exception):
    """A protocol peer can't be had on this machine (binary or package missing, ...).

    ``peer`` is a short name: "dovecot", "pymap", "aiosmtpd", "postgres", "redis",
    "chromium", "playwright", "openssl", "tmpfs".  The conftest skips the test, or fails it
    under ``OMNIROUTE_REQUIRE_PEERS=1``.
    """

    def __init__(self, peer: str, reason: str = "") -> None:
        super().__init__(f"{peer} unavailable: {reason}" if reason else f"{peer} unavailable")
        self.peer = peer
        self.reason = reason


class ServerStartError(RuntimeError):
    """A server process exited, or never became ready, while being started."""

    def __init__(self, name: str, message: str, returncode: int | None, log: str) -> None:
        tail = log[-4000:]
        super().__init__(f"{name}: {message} (returncode={returncode}); log tail:\n{tail}")
        self.name = name
        self.returncode = returncode
        self.log = log

    @property
    def address_in_use(self) -> bool:
        """Whether the log says the listening port was taken (EADDRINUSE)."""
        return _ADDR_IN_USE in self.log.lower()


# --------------------------------------------------------------------------- atexit

_cleanup_lock = threading.Lock()
_cleanups: dict[int, Callable[[], None]] = {}


def _register_cleanup(owner: object, func: Callable[[], None]) -> None:
    with _cleanup_lock:
        _cleanups[id(owner)] = func


def _unregister_cleanup(owner: object) -> None:
    with _cleanup_lock:
        _cleanups.pop(id(owner), None)


@atexit.register
def _run_cleanups() -> None:
    """Last resort: kill whatever is still running and remove private temp dirs."""
    with _cleanup_lock:
        funcs = list(_cleanups.values())
        _cleanups.clear()
    for func in reversed(funcs):
        with contextlib.suppress(Exception):
            func()


def _remove_tree(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- ports


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that was free a moment ago (bind to port 0, read it, close).

    Another process can take it before the caller binds it: servers started here
    retry on EADDRINUSE with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _probe(
    host: str, port: int, send: bytes | None, expect: bytes | None, io_timeout: float
) -> bool:
    """Connect once; when ``expect`` is given, also check the first reply line."""
    try:
        with socket.create_connection((host, port), timeout=io_timeout) as sock:
            if expect is None:
                return True
            if send:
                sock.sendall(send)
            data = b""
            while len(data) < len(expect) and b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(expect)
    except OSError:
        return False


def wait_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    send: bytes | None = None,
    expect: bytes | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Wait until ``host:port`` accepts a TCP connection.

    With ``expect``, the first line the server sends (after ``send``, if given)
    must start with it: e.g. ``expect=b"* OK"`` for IMAP, or ``send=b"PING\\r\\n",
    expect=b"+PONG"`` for Redis.  ``alive`` is polled between tries; when it
    returns False a :class:`ServerStartError` is raised at once.  Raises
    :class:`TimeoutError` when the port isn't ready in time.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    # Short reads first, so that a listener that isn't ours (it never greets) and a
    # server that died meanwhile are noticed quickly; longer ones for slow greeters.
    io_timeout = 0.25
    while True:
        if alive is not None and not alive():
            raise ServerStartError(f"{host}:{port}", "server exited before it was ready", None, "")
        remaining = deadline - time.monotonic()
        if _probe(host, port, send, expect, max(0.05, min(io_timeout, remaining))):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not ready within {timeout:.1f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
        io_timeout = min(io_timeout * 2, 2.0)


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for pid in _all_pids():
        info = _proc_stat(pid)
        if info is not None and info[2] == pgid and info[0] != "Z":
            members.append(pid)
    return members


def _children_of(ppid: int) -> list[int]:
    """Live (non-zombie) direct children of ``ppid``."""
    children = []
    for pid in _all_pids():
        info = _proc_stat(pid)
        if info is not None and info[1] == ppid and info[0] != "Z":
            children.append(pid)
    return children


def _pid_alive(pid: int) -> bool:
    info = _proc_stat(pid)
    return info is not None and info[0] != "Z"


def _wait_gone(pids: Callable[[], list[int]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pids() and time.monotonic() < deadline:
        time.sleep(0.01)


class ServerProcess:
    """A server subprocess in its own session, with stdout and stderr in a log file.

    ``env`` is merged over ``os.environ``; ``user`` (needs root) runs it as that
    user with that user's group and no supplementary groups.  ``start()`` returns ``self``, so
    ``ServerProcess(argv, log_path=p).start()`` is the usual form; it may be called
    again after ``stop()``/``kill()`` (the log file is appended to).  Also a
    context manager that stops the process on exit.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        stop_signal: int = signal.SIGTERM,
        user: str | None = None,
    ) -> None:
        self.argv = [str(arg) for arg in argv]
        self.user = user
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else {}
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.stop_signal = stop_signal
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"<ServerProcess {self.name} pid={self.pid} returncode={self.returncode}>"

    # ---- state

    @property
    def pid(self) -> int | None:
        """PID of the last started process (also its process group id)."""
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running (or never started), else the exit status."""
        return self._popen.poll() if self._popen is not None else None

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._popen is not None and self._popen.poll() is None

    def log_text(self, *, since_start: bool = False) -> str:
        """The log file's text; with ``since_start``, only what the last start wrote."""
        try:
            with self.log_path.open("rb") as fh:
                if since_start:
                    fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # ---- control

    def start(self) -> Self:
        """Start the process (new session, stdin from /dev/null, output to the log)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        as_user: dict[str, Any] = {}
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                **as_user,
            )
        _register_cleanup(self, self.kill)
        return self

    def wait_port(
        self,
        host: str,
        port: int,
        timeout: float = 10.0,
        *,
        send: bytes | None = None,
        expect: bytes | None = None,
    ) -> None:
        """Like :func:`wait_port`, but fails fast with the log when the process exits.

        Raises :class:`ServerStartError` if the process exits or the port is not
        ready in time (the process is left running in that case: call ``kill()``).
        """
        try:
            wait_port(host, port, timeout, send=send, expect=expect, alive=lambda: self.running)
        except ServerStartError:
            raise ServerStartError(
                self.name,
                "exited before it was ready",
                self.returncode,
                self.log_text(since_start=True),
            ) from None
        except TimeoutError:
            raise ServerStartError(
                self.name,
                f"{host}:{port} not ready within {timeout:.1f} s",
                self.returncode,
                self.log_text(since_start=True),
            ) from None
        if not self.running:  # the port answered, but not for us
            raise ServerStartError(
                self.name,
                "exited right after start",
                self.returncode,
                self.log_text(since_start=True),
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send ``stop_signal`` (SIGTERM), wait; SIGKILL the process group after ``timeout``.

        Leftover members of the process group are killed too.  Returns the exit
        status (None if the process was never started).
        """
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, self.stop_signal)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return popen.returncode
            # Only right after reaping the leader: its PID can't have been reused yet.
            self._kill_group(popen.pid)
        _unregister_cleanup(self)
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group and wait until its members are gone."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:  # once reaped, the PID (= PGID) may belong to others
            self._kill_group(popen.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(10)
        _wait_gone(lambda: _group_members(popen.pid), 5.0)
        _unregister_cleanup(self)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def __enter__(self) -> Self:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- dirs


def _is_root() -> bool:
    return os.geteuid() == 0


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _can_traverse(path: Path, user: str) -> bool:
    """Whether ``user`` may traverse every ancestor directory of ``path``."""
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return True
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for directory in Path(path).resolve().parents:
        st = directory.stat()
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _peer_dir(base_dir: Path, users: Sequence[str], prefix: str) -> tuple[Path, Path | None]:
    """The directory a peer runs in, and the temp dir to remove later (or None).

    Servers that drop privileges (Dovecot's mail processes run as ``nobody``,
    PostgreSQL as ``postgres``) need every ancestor of their directory to be
    traversable by that user.  pytest's ``tmp_path`` lives under a 0700 directory,
    so in that case a fresh 0755 directory under /tmp is used instead.
    """
    base_dir = Path(base_dir)
    users = [user for user in users if _user_exists(user)]
    if not _is_root() or all(_can_traverse(base_dir, user) for user in users):
        base_dir.mkdir(parents=True, exist_ok=True)
        if _is_root():
            base_dir.chmod(0o755)
        return base_dir, None
    root = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    private = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    private.chmod(0o755)
    if not all(_can_traverse(private, user) for user in users):
        _remove_tree(private)
        raise PeerUnavailable(prefix.strip("-"), f"no directory traversable by {list(users)}")
    return private, private


# --------------------------------------------------------------------------- IMAP base


@contextlib.asynccontextmanager
async def imap_session(
    host: str, port: int, user: str, password: str, *, command_timeout: float = 10.0
) -> AsyncIterator[IMAP4]:
    """A logged-in aioimaplib ``IMAP4`` client; logs out (best effort) on exit.

    ``command_timeout`` is aioimaplib's per-command timeout.
    """
    from aioimaplib import IMAP4

    client = IMAP4(host=host, port=port, timeout=command_timeout)
    try:
        await client.wait_hello_from_server()
        response = await client.login(user, password)
        if response.result != "OK":
            raise RuntimeError(f"IMAP LOGIN {user!r} failed: {response.lines!r}")
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.logout()
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()


_APPENDUID = re.compile(rb"APPENDUID \d+ (\d+)")


async def imap_append(
    host: str,
    port: int,
    user: str,
    password: str,
    raw: bytes,
    folder: str = "INBOX",
    *,
    command_timeout: float = 10.0,
) -> int | None:
    """APPEND ``raw`` to ``folder`` over IMAP; returns the APPENDUID uid if the server sent one."""
    async with imap_session(host, port, user, password, command_timeout=command_timeout) as client:
        response = await client.append(raw, mailbox=folder)
        if response.result != "OK":
            raise RuntimeError(f"IMAP APPEND to {folder!r} failed: {response.lines!r}")
        for line in response.lines:
            match = _APPENDUID.search(bytes(line))
            if match:
                return int(match.group(1))
        return None


class _ManagedServer:
    """Shared start/stop/kill/restart logic for servers run as one subprocess."""

    peer: ClassVar[str] = "server"
    ready_send: ClassVar[bytes | None] = None
    ready_expect: ClassVar[bytes | None] = None

    host: str = LOCALHOST

    def __init__(self, base_dir: Path, owned_dir: Path | None, timeout: float) -> None:
        self.base_dir = base_dir
        self.port = 0
        self.timeout = timeout
        self.process_log = base_dir / f"{self.peer}.process.log"
        self._proc: ServerProcess | None = None
        self._owned_dir = owned_dir
        self._closed = False
        _register_cleanup(self, self._atexit)

    # ---- hooks

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return {}

    def _prepare(self) -> None:
        """Write whatever config depends on ``self.port``; called before each start."""

    def _stop_signal(self) -> int:
        return signal.SIGTERM

    def _run_as(self) -> str | None:
        return None

    # ---- state

    @property
    def pid(self) -> int | None:
        """PID of the running server (the master/leader process), or None."""
        return self._proc.pid if self._proc is not None and self._proc.running else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.running

    def log_text(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        return self._proc.log_text() if self._proc is not None else ""

    # ---- control

    def _boot(self, *, new_port: bool) -> None:
        """Start the server; with ``new_port``, pick a free port (retrying on EADDRINUSE)."""
        last: ServerStartError | None = None
        for _attempt in range(_START_ATTEMPTS):
            if new_port:
                self.port = free_port(self.host)
            self._prepare()
            proc = ServerProcess(
                self._argv(),
                log_path=self.process_log,
                env=self._env(),
                cwd=self.base_dir,
                name=self.peer,
                stop_signal=self._stop_signal(),
                user=self._run_as(),
            )
            self._proc = proc.start()
            try:
                proc.wait_port(
                    self.host,
                    self.port,
                    self.timeout,
                    send=self.ready_send,
                    expect=self.ready_expect,
                )
                return
            except ServerStartError as exc:
                proc.kill()
                if not exc.address_in_use:
                    raise
                last = exc
                if not new_port:  # restart on the same port: let the old socket go
                    time.sleep(0.2)
        assert last is not None
        raise last

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after ``timeout``)."""
        if self._proc is not None:
            self._proc.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the server and its whole process group (simulates a crash)."""
        if self._proc is not None:
            self._proc.kill()

    def restart(self) -> None:
        """Start again on the same port (stopping first if still running); waits until ready."""
        if self.running:
            self.stop()
        self._boot(new_port=False)

    def close(self) -> None:
        """Stop the server and remove any private temp directory it made."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            _remove_tree(self._owned_dir)
            _unregister_cleanup(self)

    def _atexit(self) -> None:
        self.kill()
        _remove_tree(self._owned_dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.pid}>"


# --------------------------------------------------------------------------- Dovecot

_DOVECOT_CONF = """\
# Standalone test config written by tests/peers.py (see shared/TEST-PEERS.md).
base_dir = {base}/run
state_dir = {base}/state
instance_name = {instance}
log_path = {base}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{base}/mail/%u
mail_fsync = never
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
  }}
}}
"""


def _dovecot_binary() -> str:
    found = shutil.which("dovecot")
    if found:
        return found
    for candidate in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise PeerUnavailable(
        "dovecot", "the dovecot binary is missing (apt-get install dovecot-imapd)"
    )


def _is_dovecot_log(pid: int) -> bool:
    """Whether ``pid`` is a Dovecot master's log process (title ``dovecot-<instance>/log``)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.rstrip(b"\0 ").endswith(b"/log")


class Dovecot(_ManagedServer):
    """A private Dovecot IMAP server (plaintext, passwd-file users, Maildir storage).

    Start with :meth:`start`; use as a context manager or call :meth:`close`.
    Needs root (mail processes run as ``nobody``).  Mail for ``user`` is in
    :meth:`maildir` and survives :meth:`kill`/:meth:`restart`.
    """

    peer: ClassVar[str] = "dovecot"
    ready_expect: ClassVar[bytes | None] = b"* OK"
    DEFAULT_USERS: ClassVar[Mapping[str, str]] = {"agent@example.com": "secret"}

    def __init__(
        self,
        base_dir: Path,
        owned_dir: Path | None,
        users: Mapping[str, str],
        timeout: float,
    ) -> None:
        super().__init__(base_dir, owned_dir, timeout)
        self.users: dict[str, str] = dict(users)
        self.binary = _dovecot_binary()
        self.config_path = base_dir / "dovecot.conf"
        self.log_path = base_dir / "dovecot.log"
        nobody = pwd.getpwnam("nobody")
        self.mail_uid = nobody.pw_uid
        self.mail_gid = nobody.pw_gid
        self._instance = f"omniroute-test-{secrets.token_hex(4)}"
        self._deliveries = 0
        self.imaps_port = 0  # with tls: implicit TLS here, STARTTLS on ``port``
        self.tls_cert: Path | None = None
        self.tls_key: Path | None = None

    @classmethod
    def start(
        cls,
        base_dir: Path,
        users: Mapping[str, str] | None = None,
        *,
        timeout: float = 10.0,
        tls: bool = False,
    ) -> Dovecot:
        """Write a standalone config under ``base_dir`` and start Dovecot on a free port.

        ``users`` maps login to plaintext password (default
        ``{"agent@example.com": "secret"}``).  If ``base_dir``'s ancestors aren't
        traversable by ``nobody`` (pytest's tmp_path), a private /tmp directory is
        used instead (see ``base_dir`` on the result) and removed by :meth:`close`.
        Raises :class:`PeerUnavailable` if dovecot is not installed or we are not root.
        """
        _dovecot_binary()
        if not _is_root():
            raise PeerUnavailable(
                "dovecot", "the test Dovecot runs its mail processes as nobody: needs root"
            )
        users = dict(cls.DEFAULT_USERS if users is None else users)
        for user, password in users.items():
            if not user or any(c in user + password for c in ":\n\r") or "/" in user:
                raise ValueError(f"unusable Dovecot test user {user!r}")
        directory, owned = _peer_dir(
            Path(base_dir), ["nobody", "dovenull", "dovecot"], "omniroute-dovecot-"
        )
        server = cls(directory, owned, users, timeout)
        try:
            if tls:  # a self-signed certificate: STARTTLS on the port, implicit TLS on imaps
                server.tls_cert, server.tls_key = generate_self_signed_cert(directory / "tls")
                server.imaps_port = free_port()
            server._setup_dirs()
            server._boot(new_port=True)
        except BaseException:
            server.close()
            raise
        return server

    def _setup_dirs(self) -> None:
        base = self.base_dir
        for sub in ("run", "state"):
            (base / sub).mkdir(exist_ok=True)
            (base / sub).chmod(0o755)
        mail = base / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, self.mail_uid, self.mail_gid)
        users_file = base / "users"
        users_file.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()))
        users_file.chmod(0o644)  # read by Dovecot's auth process (user dovecot)

    def _prepare(self) -> None:
        self.config_path.write_text(
            _DOVECOT_CONF.format(
                base=self.base_dir,
                instance=self._instance,
                uid=self.mail_uid,
                gid=self.mail_gid,
                port=self.port,
                imaps_port=self.imaps_port,
                ssl=(
                    f"ssl = yes\nssl_cert = <{self.tls_cert}\nssl_key = <{self.tls_key}"
                    if self.tls_cert is not None
                    else "ssl = no"
                ),
            )
        )

    def _argv(self) -> list[str]:
        return [self.binary, "-F", "-c", str(self.config_path)]

    def log_text(self) -> str:
        """Dovecot's own log (``dovecot.log``) followed by the master's stdout/stderr."""
        try:
            own = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            own = ""
        return own + super().log_text()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master, wait for every worker (imap, auth, ...) to exit, then SIGKILL.

        After SIGTERM the master sits about 1 s waiting for its log process; by
        then the mail processes have flushed and exited, so this skips that wait
        (0.15 s instead of 1.1 s).  A stale master.pid is fine for :meth:`restart`.
        """
        proc = self._proc
        if proc is None or not proc.running or proc.pid is None:
            super().stop(timeout)
            return
        master = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.running and time.monotonic() < deadline:
            workers = [
                pid for pid in _group_members(master) if pid != master and not _is_dovecot_log(pid)
            ]
            if not workers:
                break
            time.sleep(0.02)
        proc.kill()

    @property
    def credentials(self) -> tuple[str, str]:
        """(login, password) of the first configured user."""
        return next(iter(self.users.items()))

    def maildir(self, user: str) -> Path:
        """Root of ``user``'s Maildir (``<base>/mail/<user>``, with cur/new/tmp)."""
        return self.base_dir / "mail" / user

    def deliver_file(self, user: str, raw: bytes) -> Path:
        """Deliver ``raw`` into ``user``'s INBOX the way an MTA does; returns the new file.

        Writes ``tmp/<unique>``, makes it owned by the mail user, then renames it
        into ``new/``.  Creates the Maildir (cur/new/tmp, 0700, owned by nobody)
        if needed.  Dovecot pushes EXISTS to an IDLE client about 0.5 s later.
        """
        if user not in self.users:
            raise KeyError(f"unknown Dovecot test user {user!r}")
        root = self.maildir(user)
        for directory in (root, root / "cur", root / "new", root / "tmp"):
            if not directory.is_dir():
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o700)
                os.chown(directory, self.mail_uid, self.mail_gid)
        self._deliveries += 1
        now = time.time()
        name = (
            f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}"
            f"Q{self._deliveries}R{secrets.token_hex(4)}.{socket.gethostname()}"
        )
        tmp_path = root / "tmp" / name
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            os.fchown(fd, self.mail_uid, self.mail_gid)
        finally:
            os.close(fd)
        new_path = root / "new" / name
        os.rename(tmp_path, new_path)
        return new_path

    async def append(
        self, user: str, password: str, raw: bytes, folder: str = "INBOX"
    ) -> int | None:
        """APPEND ``raw`` to ``folder`` over IMAP (aioimaplib); returns the new UID."""
        return await imap_append(self.host, self.port, user, password, raw, folder)

    def session(self, user: str, password: str) -> contextlib.AbstractAsyncContextManager[IMAP4]:
        """``async with dovecot.session(user, pw) as imap:`` a logged-in aioimaplib client."""
        return imap_session(self.host, self.port, user, password)


# --------------------------------------------------------------------------- pymap

_PYMAP_MAIN = "import sys; from pymap.main import main; sys.exit(main())"


class Pymap(_ManagedServer):
    """A pymap IMAP server (pure Python) run as ``python -c 'pymap.main.main()'``.

    ``python -m pymap`` does not work (pymap has no ``__main__``); this is what
    the ``pymap`` console script runs.  ``backend="dict"`` keeps mail in memory
    (lost on restart, APPEND only); ``backend="maildir"`` stores it under
    ``<base>/md/<user>``.
    """

    peer: ClassVar[str] = "pymap"
    ready_expect: ClassVar[bytes | None] = b"* OK"

    def __init__(
        self,
        base_dir: Path,
        user: str,
        password: str,
        backend: Literal["dict", "maildir"],
        timeout: float,
    ) -> None:
        super().__init__(base_dir, None, timeout)
        self.user = user
        self.password = password
        self.backend = backend
        self.maildir_base = base_dir / "md"
        self._deliveries = 0

    @classmethod
    def start(
        cls,
        base_dir: Path,
        user: str = "agent",
        password: str = "secret",
        backend: Literal["dict", "maildir"] = "dict",
        *,
        timeout: float = 15.0,
    ) -> Pymap:
        """Start pymap (``--no-tls``) on a free port; for maildir, write its passwd/shadow files."""
        import importlib.util

        if importlib.util.find_spec("pymap") is None:
            raise PeerUnavailable("pymap", "the pymap package is not installed (pip install pymap)")
        if backend not in ("dict", "maildir"):
            raise ValueError(f"unknown pymap backend {backend!r}")
        if not user or any(c in user + password for c in ":\n\r") or "/" in user:
            raise ValueError(f"unusable pymap test user {user!r}")
        base_dir = Path(base_dir)
        base_dir.mkdir(parents=True, exist_ok=True)
        server = cls(base_dir, user, password, backend, timeout)
        try:
            if backend == "maildir":
                server._write_users()
            server._boot(new_port=True)
        except BaseException:
            server.close()
            raise
        return server

    def _write_users(self) -> None:
        from pysasl.hashing import BuiltinHash

        self.maildir_base.mkdir(exist_ok=True)
        # Few PBKDF2 rounds: the default 500k makes every LOGIN take about 0.2 s.
        hashed = BuiltinHash(rounds=1000).hash(self.password)
        (self.maildir_base / "pymap-etc-passwd").write_text(f"{self.user}:::::{self.user}:\n")
        (self.maildir_base / "pymap-etc-shadow").write_text(f"{self.user}:{hashed}::::::\n")

    def _argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-c",
            _PYMAP_MAIN,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--no-tls",
            self.backend,
        ]
        if self.backend == "dict":
            argv += ["--demo-user", self.user, "--demo-password", self.password]
        else:
            argv += [str(self.maildir_base)]
        return argv

    def _env(self) -> dict[str, str]:
        # The server's own warnings are no business of the test run (-W error).
        return {"PYTHONWARNINGS": "ignore"}

    @property
    def credentials(self) -> tuple[str, str]:
        """(login, password) of the single user."""
        return self.user, self.password

    def maildir(self, user: str | None = None) -> Path:
        """Root of the user's Maildir (maildir backend only)."""
        if self.backend != "maildir":
            raise RuntimeError("the dict backend has no maildir")
        return self.maildir_base / (user or self.user)

    def deliver_file(self, raw: bytes) -> Path:
        """Drop ``raw`` into the user's Maildir ``new/`` via ``tmp/`` (maildir backend only).

        pymap polls: a client sees it about 1 s later (or on the next SELECT).
        """
        root = self.maildir()
        for directory in (root, root / "cur", root / "new", root / "tmp"):
            directory.mkdir(exist_ok=True)
        self._deliveries += 1
        name = f"{int(time.time())}.P{os.getpid()}Q{self._deliveries}R{secrets.token_hex(4)}.test"
        tmp_path = root / "tmp" / name
        tmp_path.write_bytes(raw)
        new_path = root / "new" / name
        os.rename(tmp_path, new_path)
        return new_path

    async def append(
        self, user: str, password: str, raw: bytes, folder: str = "INBOX"
    ) -> int | None:
        """APPEND ``raw`` to ``folder`` over IMAP (aioimaplib); returns the new UID."""
        return await imap_append(self.host, self.port, user, password, raw, folder)

    def session(
        self, user: str | None = None, password: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[IMAP4]:
        """``async with pymap.session() as imap:`` a logged-in aioimaplib client."""
        return imap_session(
            self.host,
            self.port,
            user or self.user,
            password if password is not None else self.password,
        )


# --------------------------------------------------------------------------- TLS certs


def generate_self_signed_cert(
    directory: Path,
    hostname: str = "localhost",
    *,
    backend: Literal["auto", "cryptography", "openssl"] = "auto",
) -> tuple[Path, Path]:
    """Write a self-signed ``cert.pem``/``key.pem`` (SAN: hostname and 127.0.0.1), valid 2 days.

    Uses the ``cryptography`` package when importable, else the ``openssl`` CLI.
    Returns ``(cert_path, key_path)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if backend in ("auto", "cryptography"):
        try:
            _cert_with_cryptography(cert_path, key_path, hostname)
            return cert_path, key_path
        except ImportError as exc:
            if backend == "cryptography":
                raise PeerUnavailable("cryptography", str(exc)) from exc
    openssl = shutil.which("openssl")
    if openssl is None:
        raise PeerUnavailable("openssl", "neither the cryptography package nor the openssl CLI")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={hostname}",
            "-addext",
            f"subjectAltName=DNS:{hostname},IP:127.0.0.1",
            "-days",
            "2",
            "-keyout",
            str(key_path),
            "-out",
            str(cert_path),
        ],
        check=True,
        capture_output=True,
    )
    return cert_path, key_path


def _cert_with_cryptography(cert_path: Path, key_path: Path, hostname: str) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --------------------------------------------------------------------------- SMTP sink


class ReceivedMessage(NamedTuple):
    """One message the sink accepted: unpacks as ``(mail_from, rcpt_tos, raw)``."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes


class AuthAttempt(NamedTuple):
    """One AUTH attempt: ``(mechanism, login, password_or_token)``."""

    mechanism: str
    login: str
    secret: str


AuthHandler = Callable[[str, str, str], bool]
"""``auth_handler(mechanism, login, password_or_token) -> accept?``"""


class _SinkHandler:
    """aiosmtpd handler: records messages, enforces AUTH, implements XOAUTH2.

    aiosmtpd turns every ``auth_*`` attribute of the handler into a mechanism, so
    nothing else here may start with ``auth_``.
    """

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self._sink.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content
        if content is None:
            content = envelope.content
        raw = content.encode() if isinstance(content, str) else bytes(content or b"")
        self._sink.messages.append(
            ReceivedMessage(str(envelope.mail_from), list(envelope.rcpt_tos), raw)
        )
        return "250 2.0.0 Message accepted"

    def authenticator(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        """aiosmtpd ``authenticator`` for the built-in PLAIN and LOGIN."""
        from aiosmtpd.smtp import AuthResult

        login = bytes(auth_data.login).decode(errors="replace")
        password = bytes(auth_data.password).decode(errors="replace")
        ok = self._sink._check_auth(mechanism, login, password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
        """SASL XOAUTH2: ``base64("user=" U "\\x01auth=Bearer " T "\\x01\\x01")``.

        On rejection it sends the base64 JSON error challenge, reads the client's
        empty reply, then answers 535, as Gmail and Outlook do.
        """
        from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword

        if len(args) == 1:
            blob = await server.challenge_auth("", encode_to_b64=False)
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        user = token = None
        for part in bytes(blob).split(b"\x01"):
            if part.startswith(b"user="):
                user = part[5:].decode(errors="replace")
            elif part.lower().startswith(b"auth=bearer "):
                token = part[12:].decode(errors="replace")
        if user is None or token is None:
            await server.push("501 5.5.2 Malformed XOAUTH2 initial response")
            return AuthResult(success=False, handled=True)
        if self._sink._check_auth("XOAUTH2", user, token):
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), token.encode()))
        error = json.dumps(
            {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}
        )
        reply = await server.challenge_auth(error)
        if reply is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )


@functools.cache
def _controller_class() -> type:
    """aiosmtpd's threaded Controller, serving on a socket we bound ourselves (no race)."""
    from aiosmtpd.controller import Controller

    class _SocketController(Controller):
        def __init__(self, handler: Any, sock: socket.socket, **kwargs: Any) -> None:
            host, port = sock.getsockname()[:2]
            super().__init__(handler, hostname=host, port=port, **kwargs)
            self._listen_sock = sock

        def _create_server(self) -> Any:
            return self.loop.create_server(
                self._factory_invoker, sock=self._listen_sock, ssl=self.ssl_context
            )

    return _SocketController


class SmtpSink:
    """In-process SMTP server (aiosmtpd Controller in a thread) that records what it gets.

    ``messages`` holds :class:`ReceivedMessage` tuples ``(mail_from, rcpt_tos, raw)``
    and ``auth_attempts`` :class:`AuthAttempt` tuples ``(mechanism, login, secret)``.
    AUTH PLAIN, LOGIN and XOAUTH2 are offered (after STARTTLS when ``tls``, else in
    the clear); ``auth_handler`` decides (default: accept all).  ``auth_required``
    makes MAIL FROM answer 530 before a successful AUTH.  With ``tls`` a
    self-signed certificate is made and STARTTLS is offered (and required unless
    ``require_starttls=False``); :meth:`client_tls_context` trusts it.

    ``with SmtpSink() as sink:`` starts and stops it; so do :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        require_starttls: bool = True,
        auth_handler: AuthHandler | None = None,
        auth_required: bool = False,
        cert_dir: Path | None = None,
        host: str = LOCALHOST,
        server_hostname: str = "localhost",
    ) -> None:
        self.host = host
        self.port = 0
        self.tls = tls
        self.require_starttls = require_starttls
        self.auth_handler = auth_handler
        self.auth_required = auth_required
        self.server_hostname = server_hostname
        self.messages: list[ReceivedMessage] = []
        self.auth_attempts: list[AuthAttempt] = []
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self._cert_dir = cert_dir
        self._owned_cert_dir: Path | None = None
        self._controller: Any = None

    def _check_auth(self, mechanism: str, login: str, secret: str) -> bool:
        self.auth_attempts.append(AuthAttempt(mechanism, login, secret))
        if self.auth_handler is None:
            return True
        return bool(self.auth_handler(mechanism, login, secret))

    def start(self) -> Self:
        """Bind a free port (or the previous one, after :meth:`stop`) and serve."""
        try:
            controller_cls = _controller_class()
        except ImportError as exc:
            raise PeerUnavailable("aiosmtpd", str(exc)) from exc
        if self._controller is not None:
            raise RuntimeError("SmtpSink already started")
        tls_context = None
        if self.tls:
            if self.cert_path is None:
                directory = self._cert_dir
                if directory is None:
                    directory = self._owned_cert_dir = Path(
                        tempfile.mkdtemp(prefix="omniroute-smtp-")
                    )
                self.cert_path, self.key_path = generate_self_signed_cert(
                    directory, self.server_hostname
                )
            tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls_context.load_cert_chain(str(self.cert_path), str(self.key_path))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(100)
            sock.setblocking(False)
            handler = _SinkHandler(self)
            controller = controller_cls(
                handler,
                sock,
                server_hostname=self.server_hostname,
                ready_timeout=10.0,
                tls_context=tls_context,
                require_starttls=bool(self.tls and self.require_starttls),
                auth_require_tls=self.tls,
                authenticator=handler.authenticator,
            )
            self.port = sock.getsockname()[1]
            controller.start()
        except BaseException:
            sock.close()
            raise
        self._controller = controller
        _register_cleanup(self, self.stop)
        return self

    def stop(self) -> None:
        """Stop serving (the port is kept for a later :meth:`start`)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            with contextlib.suppress(Exception):
                controller.stop()
            controller._listen_sock.close()
        _unregister_cleanup(self)

    def close(self) -> None:
        """Stop and remove the generated certificate directory."""
        self.stop()
        _remove_tree(self._owned_cert_dir)
        self._owned_cert_dir = None

    @property
    def running(self) -> bool:
        """Whether the sink is serving."""
        return self._controller is not None

    def clear(self) -> None:
        """Forget the recorded messages and AUTH attempts."""
        self.messages.clear()
        self.auth_attempts.clear()

    async def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Return (a copy of) ``messages`` once at least ``n`` arrived; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"SMTP sink got {len(self.messages)} of {n} messages in {timeout} s"
                )
            await asyncio.sleep(0.01)
        return list(self.messages)

    def client_tls_context(self) -> ssl.SSLContext:
        """An SSL context for clients that trusts this sink's self-signed certificate."""
        if self.cert_path is None:
            raise RuntimeError("the sink was not started with tls=True")
        return ssl.create_default_context(cafile=str(self.cert_path))

    def __enter__(self) -> Self:
        return self.start() if self._controller is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SmtpSink {self.host}:{self.port} tls={self.tls} messages={len(self.messages)}>"


# --------------------------------------------------------------------------- asyncio helper


def _run_async(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine in a private event loop on a helper thread.

    Works whether or not the calling thread already runs a loop, and never
    touches the calling thread's current-loop state (pytest-asyncio's).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="peers-async") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> Path:
    override = os.environ.get("OMNIROUTE_PG_BINDIR")
    if override:
        if not (Path(override) / "initdb").exists():
            raise PeerUnavailable("postgres", f"no initdb in OMNIROUTE_PG_BINDIR={override}")
        return Path(override)
    candidates = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            with contextlib.suppress(ValueError):
                candidates.append((float(path.parent.name), path))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise PeerUnavailable("postgres", "initdb/pg_ctl not found (apt-get install postgresql)")


def _pg_startup_message(user: str = "postgres", database: str = "postgres") -> bytes:
    """A protocol-3.0 StartupMessage; a ready trust-auth server answers AuthenticationOk."""
    body = b"\x00\x03\x00\x00" + f"user\0{user}\0database\0{database}\0\0".encode()
    return (len(body) + 4).to_bytes(4, "big") + body


class PrivatePostgres(_ManagedServer):
    """A private PostgreSQL cluster (trust auth, fsync off) on a free port, for fault tests.

    ``initdb`` runs once; the postmaster then runs in the foreground as our own
    child (new session), as the ``postgres`` user when we are root, with the
    recipe's settings.  Being our child (rather than daemonized by ``pg_ctl``)
    means a killed postmaster is reaped at once, so :meth:`restart` after
    :meth:`kill` never trips over "lock file postmaster.pid already exists".
    Ready means a StartupMessage gets AuthenticationOk (not "the database
    system is starting up").  TCP on 127.0.0.1 only, no Unix socket.  ``url`` is
    an SQLAlchemy asyncpg URL, ``dsn`` a plain ``postgresql://`` DSN.
    """

    peer: ClassVar[str] = "postgres"
    ready_send: ClassVar[bytes | None] = _pg_startup_message()
    ready_expect: ClassVar[bytes | None] = b"R\x00\x00\x00\x08\x00\x00\x00\x00"

    def __init__(self, base_dir: Path, owned_dir: Path | None, timeout: float) -> None:
        super().__init__(base_dir, owned_dir, timeout)
        self.data_dir = base_dir / "data"
        self.process_log = self.log_path = base_dir / "server.log"
        self.bindir = _pg_bindir()
        self._user = "postgres" if _is_root() else None

    @classmethod
    def start(cls, base_dir: Path, *, timeout: float = 30.0) -> PrivatePostgres:
        """initdb under ``base_dir`` (or a private /tmp dir if postgres can't reach it) and start.

        Raises :class:`PeerUnavailable` ("postgres") if the server binaries or the
        ``postgres`` system user are missing.
        """
        _pg_bindir()
        if _is_root() and not _user_exists("postgres"):
            raise PeerUnavailable("postgres", "no postgres system user")
        directory, owned = _peer_dir(Path(base_dir), ["postgres"], "omniroute-pg-")
        server = cls(directory, owned, timeout)
        try:
            server._initdb()
            server._boot(new_port=True)
        except BaseException:
            server.close()
            raise
        return server

    def _initdb(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            os.chown(self.base_dir, pw.pw_uid, pw.pw_gid)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=max(self.timeout, 60),
            stdin=subprocess.DEVNULL,
            check=False,
            **kwargs,
        )
        if result.returncode != 0:
            raise ServerStartError(
                "initdb", "failed", result.returncode, result.stdout + result.stderr
            )

    def _argv(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]

    def _run_as(self) -> str | None:
        return self._user

    def _stop_signal(self) -> int:
        return signal.SIGINT  # "fast" shutdown: SIGTERM would wait for clients to leave

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash; recovery runs on restart).

        Backends call setsid(), so they are not in the postmaster's process group
        and are killed one by one.
        """
        pid = self.pid
        children = _children_of(pid) if pid is not None else []
        super().kill()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        _wait_gone(lambda: [c for c in children if _pid_alive(c)], 10.0)

    def url_for(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (``postgresql+asyncpg://``) for ``database`` on this cluster."""
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """SQLAlchemy asyncpg URL of the ``postgres`` database."""
        return self.url_for("postgres")

    @property
    def dsn(self) -> str:
        """Plain libpq/asyncpg DSN of the ``postgres`` database."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"


def _pg_urls(url: str, database: str | None = None) -> tuple[str, str]:
    """(asyncpg DSN, SQLAlchemy asyncpg URL) for ``url`` with ``database`` swapped in."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if database is not None:
        parsed = parsed.set(database=database)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    sa_url = parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    return dsn, sa_url


async def _pg_ping(dsn: str) -> str | None:
    """None if ``SELECT 1`` works on ``dsn``, else a reason."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        await conn.fetchval("SELECT 1")
        return None
    finally:
        await conn.close()


async def _pg_execute(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


_fallback_lock = threading.Lock()
_fallback_pg: PrivatePostgres | None = None
_fallback_pg_error: PeerUnavailable | None = None
_fallback_redis: PrivateRedis | None = None
_fallback_redis_error: PeerUnavailable | None = None


def _fallback_postgres(reason: str) -> PrivatePostgres:
    """The process-wide private PostgreSQL used when the shared one is unreachable."""
    global _fallback_pg, _fallback_pg_error
    with _fallback_lock:
        if _fallback_pg is not None and _fallback_pg.running:
            return _fallback_pg
        if _fallback_pg_error is not None:
            raise _fallback_pg_error
        try:
            base = Path(tempfile.mkdtemp(prefix="omniroute-pg-fallback-"))
            try:
                _fallback_pg = PrivatePostgres.start(base)
            except BaseException:
                _remove_tree(base)
                raise
            _fallback_pg._owned_dir = base
            return _fallback_pg
        except PeerUnavailable as exc:
            _fallback_pg_error = PeerUnavailable(
                "postgres", f"shared server unreachable ({reason}); private: {exc.reason}"
            )
        except (ServerStartError, OSError, subprocess.SubprocessError) as exc:
            _fallback_pg_error = PeerUnavailable(
                "postgres", f"shared server unreachable ({reason}); private failed: {exc}"
            )
        raise _fallback_pg_error


@contextlib.contextmanager
def pg_test_database(base_url: str | None = None) -> Iterator[str]:
    """Create a uniquely named database, yield its SQLAlchemy asyncpg URL, drop it after.

    The server is ``base_url``, else ``OMNIROUTE_TEST_PG_URL``, else
    ``postgresql://postgres@127.0.0.1:5432/postgres``.  When that server is
    unreachable (and ``base_url`` was not given explicitly) a private instance is
    started once per process and used instead; if that fails too,
    :class:`PeerUnavailable` ("postgres") is raised.  The database is
    ``omniroute_test_<hex>`` and is dropped ``WITH (FORCE)``, so open pool
    connections don't block it.  Safe to call from sync or async code.
    """
    url = base_url or os.environ.get("OMNIROUTE_TEST_PG_URL") or DEFAULT_PG_URL
    try:
        import asyncpg  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable("postgres", "asyncpg is not installed") from exc
    admin_dsn, _ = _pg_urls(url)
    problem = _run_async(lambda: _pg_ping(admin_dsn))
    if problem is not None:
        if base_url is not None:
            raise PeerUnavailable("postgres", f"{base_url}: {problem}")
        admin_dsn = _fallback_postgres(problem).dsn
    name = f"omniroute_test_{secrets.token_hex(6)}"
    _run_async(lambda: _pg_execute(admin_dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield _pg_urls(admin_dsn, name)[1]
    finally:
        _run_async(lambda: _pg_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --------------------------------------------------------------------------- Redis


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise PeerUnavailable("redis", "redis-server not found (apt-get install redis-server)")
    return found


class PrivateRedis(_ManagedServer):
    """A private redis-server (no persistence) on a free port, for fault tests."""

    peer: ClassVar[str] = "redis"
    ready_send: ClassVar[bytes | None] = b"PING\r\n"
    ready_expect: ClassVar[bytes | None] = b"+PONG"

    def __init__(self, base_dir: Path, timeout: float) -> None:
        super().__init__(base_dir, None, timeout)
        self.binary = _redis_binary()

    @classmethod
    def start(cls, base_dir: Path, *, timeout: float = 10.0) -> PrivateRedis:
        """Start ``redis-server --port N --bind 127.0.0.1 --save '' --appendonly no``."""
        _redis_binary()
        base_dir = Path(base_dir)
        base_dir.mkdir(parents=True, exist_ok=True)
        server = cls(base_dir, timeout)
        try:
            server._boot(new_port=True)
        except BaseException:
            server.close()
            raise
        return server

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.base_dir),
            "--daemonize",
            "no",
        ]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"


def _redis_ping(url: str) -> str | None:
    """None if the Redis at ``url`` answers PING, else a reason."""
    try:
        import redis
    except ImportError:
        parts = urlsplit(url)
        host, port = parts.hostname or LOCALHOST, parts.port or 6379
        return None if _probe(host, port, b"PING\r\n", b"+PONG", 2.0) else "no PONG"
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return None if client.ping() else "PING failed"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def _fallback_redis_server(reason: str) -> PrivateRedis:
    global _fallback_redis, _fallback_redis_error
    with _fallback_lock:
        if _fallback_redis is not None and _fallback_redis.running:
            return _fallback_redis
        if _fallback_redis_error is not None:
            raise _fallback_redis_error
        base = Path(tempfile.mkdtemp(prefix="omniroute-redis-fallback-"))
        try:
            _fallback_redis = PrivateRedis.start(base)
            _fallback_redis._owned_dir = base
            return _fallback_redis
        except PeerUnavailable as exc:
            _fallback_redis_error = PeerUnavailable(
                "redis", f"shared server unreachable ({reason}); private: {exc.reason}"
            )
        except (ServerStartError, OSError) as exc:
            _fallback_redis_error = PeerUnavailable(
                "redis", f"shared server unreachable ({reason}); private failed: {exc}"
            )
        _remove_tree(base)
        raise _fallback_redis_error


def redis_test_url() -> str:
    """URL of a Redis that answers PING.

    ``OMNIROUTE_TEST_REDIS_URL`` or ``redis://127.0.0.1:6379/0``; if that doesn't
    answer, a private redis-server started once per process.  Raises
    :class:`PeerUnavailable` ("redis") if neither works.  Use
    :func:`unique_prefix` for keys on the shared server.
    """
    url = os.environ.get("OMNIROUTE_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    problem = _redis_ping(url)
    if problem is None:
        return url
    return _fallback_redis_server(problem).url


def unique_prefix() -> str:
    """A key prefix no other test run uses: ``omniroute-test:<hex>:``."""
    return f"omniroute-test:{secrets.token_hex(8)}:"


def stop_private_fallbacks() -> None:
    """Stop the private PostgreSQL/Redis started because a shared one was unreachable."""
    global _fallback_pg, _fallback_redis, _fallback_pg_error, _fallback_redis_error
    with _fallback_lock:
        servers: list[PrivatePostgres | PrivateRedis | None] = [_fallback_pg, _fallback_redis]
        _fallback_pg = _fallback_redis = None
        _fallback_pg_error = _fallback_redis_error = None
    for server in servers:
        if server is not None:
            server.close()


# --------------------------------------------------------------------------- Chromium


def chromium_path() -> str:
    """Path of the Debian Chromium (``/usr/bin/chromium``); PeerUnavailable if missing."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise PeerUnavailable("chromium", "/usr/bin/chromium is missing (apt-get install chromium)")


@contextlib.asynccontextmanager
async def launch_browser(
    *, headless: bool = True, extra_args: Sequence[str] = ()
) -> AsyncIterator[Browser]:
    """``async with launch_browser() as browser:`` a Playwright Chromium Browser.

    Uses the system Chromium (no ``playwright install``) with :data:`CHROMIUM_ARGS`.
    Raises :class:`PeerUnavailable` ("chromium" or "playwright").
    """
    executable = chromium_path()
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        raise PeerUnavailable("playwright", str(exc)) from exc
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable,
            headless=headless,
            args=[*CHROMIUM_ARGS, *extra_args],
        )
        try:
            yield browser
        finally:
            await browser.close()


# --------------------------------------------------------------------------- skip or fail

#: Names of the peers whose tests were skipped in this run (for the "peers:" summary line).
skipped_peers: set[str] = set()
SKIP_PREFIX = "peer unavailable: "


def unavailable(exc: PeerUnavailable) -> NoReturn:
    """Skip the calling test, or fail it when ``OMNIROUTE_REQUIRE_PEERS=1`` (as CI runs)."""
    import pytest

    if os.environ.get("OMNIROUTE_REQUIRE_PEERS") == "1":
        pytest.fail(f"required peer unavailable: {exc.peer}: {exc}")
    skipped_peers.add(exc.peer)
    pytest.skip(f"{SKIP_PREFIX}{exc.peer}: {exc}")


def need(make: Callable[[], _T]) -> _T:
    """Call ``make``; a :class:`PeerUnavailable` from it skips (or fails) the test."""
    try:
        return make()
    except PeerUnavailable as exc:
        unavailable(exc)


# -- a small filesystem that can be filled (disk-full tests) ----------------------------------
class SmallDisk:
    """A private tmpfs of ``size`` bytes mounted at ``path`` (needs root, as CI runs): fill it
    to make the storage refuse writes, free it to let them through again."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._filler = path / "filler"

    @classmethod
    def mount(cls, path: Path, size: int = 8 << 20) -> SmallDisk:
        path.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            raise PeerUnavailable("tmpfs", "the mount command is missing")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise PeerUnavailable("tmpfs", f"cannot mount a tmpfs (root needed): {done.stderr}")
        return cls(path, size)

    def fill(self) -> None:
        """Write until the filesystem is full."""
        with open(self._filler, "ab", buffering=0) as out:
            chunk = b"\0" * 65536
            with contextlib.suppress(OSError):
                while True:
                    out.write(chunk)
            with contextlib.suppress(OSError):
                while True:  # the last partial block
                    out.write(b"\0" * 512)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._filler.unlink()

    def __enter__(self) -> SmallDisk:
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
