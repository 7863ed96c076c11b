"""Self-test of tests/peers.py: every peer starts, answers for real, and cleans up.

A peer that can't be had here (PeerUnavailable) skips its test, or fails it under
OMNIROUTE_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

import pytest

try:
    from tests import peers
except ImportError:  # run with tests/ itself on sys.path
    import peers  # type: ignore[no-redef]

_T = TypeVar("_T")

SUBJECT_LINE = b"Subject: "


unavailable = peers.unavailable
need = peers.need


def raw_message(subject: str, body: str = "hello") -> bytes:
    return (
        f"From: customer@example.net\r\nTo: agent@example.com\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject}@example.net>\r\n\r\n{body}\r\n"
    ).encode()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- basics


def test_free_port_is_bindable() -> None:
    port = peers.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_process_lifecycle(tmp_path: Path) -> None:
    port = peers.free_port()
    code = (
        "import socket,sys;s=socket.socket();"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('127.0.0.1',{port}));s.listen();print('listening',flush=True);"
        "c,_=s.accept();c.sendall(b'HELLO\\r\\n');c.close();s.accept()"
    )
    proc = peers.ServerProcess([sys.executable, "-c", code], log_path=tmp_path / "srv.log")
    with proc:
        proc.wait_port("127.0.0.1", port, 10, expect=b"HELLO")
        assert proc.running and proc.pid is not None
        assert "listening" in proc.log_text()
    assert not proc.running
    assert proc.returncode is not None
    assert not port_open(port)
    # A second start appends to the log; kill() takes down the process group.
    proc.start()
    proc.wait_port("127.0.0.1", port, 10)
    proc.kill()
    assert proc.returncode == -9
    assert proc.log_text().count("listening") == 2


def test_server_process_reports_early_exit(tmp_path: Path) -> None:
    proc = peers.ServerProcess(
        [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        log_path=tmp_path / "x.log",
    ).start()
    with pytest.raises(peers.ServerStartError) as info:
        proc.wait_port("127.0.0.1", peers.free_port(), 10)
    assert info.value.returncode == 3
    assert "boom" in info.value.log


@pytest.mark.parametrize("kind", ["redis", "pymap", "dovecot"])
def test_start_retries_on_a_taken_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    starters: dict[str, Callable[[], peers.PrivateRedis | peers.Pymap | peers.Dovecot]] = {
        "redis": lambda: peers.PrivateRedis.start(tmp_path),
        "pymap": lambda: peers.Pymap.start(tmp_path),
        "dovecot": lambda: peers.Dovecot.start(tmp_path),
    }
    real_free_port = peers.free_port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        handed_out: list[int] = []

        def rigged(host: str = "127.0.0.1") -> int:
            port = taken if not handed_out else real_free_port(host)
            handed_out.append(port)
            return port

        monkeypatch.setattr(peers, "free_port", rigged)
        with need(starters[kind]) as server:
            assert handed_out[0] == taken and server.port == handed_out[-1] != taken
            assert server.running
            assert "address already in use" in server.log_text().lower()


def test_atexit_kills_forgotten_servers(tmp_path: Path) -> None:
    need(lambda: peers._redis_binary())
    code = (
        f"import sys, pathlib; sys.path.insert(0, {str(Path(peers.__file__).parent)!r}); "
        "import peers; "
        f"r = peers.PrivateRedis.start(pathlib.Path({str(tmp_path)!r})); "
        "print(r.pid, r.port, flush=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    pid, port = map(int, done.stdout.split())
    deadline = time.monotonic() + 5
    while peers._pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not peers._pid_alive(pid)
    assert not port_open(port)


# --------------------------------------------------------------------------- Dovecot

USER = "agent@example.com"
PASSWORD = "secret"


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Dovecot]:
    server = need(lambda: peers.Dovecot.start(tmp_path_factory.mktemp("dovecot")))
    with server:
        yield server


@pytest.mark.asyncio
async def test_dovecot_append_then_search(dovecot: peers.Dovecot) -> None:
    assert dovecot.users == {USER: PASSWORD}
    uid = await dovecot.append(USER, PASSWORD, raw_message("dovecot-append"))
    assert uid is not None
    async with dovecot.session(USER, PASSWORD) as imap:
        assert (await imap.select("INBOX")).result == "OK"
        found = await imap.search("SUBJECT", '"dovecot-append"')
        assert found.result == "OK"
        assert found.lines[0].split(), found.lines
        ids = found.lines[0].split()
        fetched = await imap.fetch(ids[-1].decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"dovecot-append" in b"".join(bytes(line) for line in fetched.lines)
    assert any(dovecot.maildir(USER).glob("cur/*")) or any(dovecot.maildir(USER).glob("new/*"))


@pytest.mark.asyncio
async def test_dovecot_deliver_file_pushes_exists_to_idle(dovecot: peers.Dovecot) -> None:
    async with dovecot.session(USER, PASSWORD) as imap:
        await imap.select("INBOX")
        idle = await imap.idle_start(timeout=30)
        started = time.monotonic()
        path = dovecot.deliver_file(USER, raw_message("dovecot-delivered"))
        assert path.parent.name == "new"
        assert path.stat().st_uid == dovecot.mail_uid
        seen = False
        while not seen and time.monotonic() - started < 10:
            pushed = await imap.wait_server_push(timeout=10)
            seen = isinstance(pushed, list) and any(b"EXISTS" in bytes(x) for x in pushed)
        imap.idle_done()
        await asyncio.wait_for(idle, 5)
        assert seen, "no EXISTS within 10 s"
        found = await imap.search("SUBJECT", '"dovecot-delivered"')
        assert found.lines[0].split()


@pytest.mark.asyncio
async def test_dovecot_kill_and_restart_on_same_port(tmp_path: Path) -> None:
    server = need(lambda: peers.Dovecot.start(tmp_path, {"kill@example.com": "pw"}))
    with server:
        port, old_pid = server.port, server.pid
        await server.append("kill@example.com", "pw", raw_message("before-kill"))
        server.kill()
        assert not server.running and server.pid is None
        assert not port_open(port)
        server.restart()
        assert server.port == port and server.pid not in (None, old_pid)
        async with server.session("kill@example.com", "pw") as imap:
            await imap.select("INBOX")
            found = await imap.search("SUBJECT", '"before-kill"')
            assert found.lines[0].split(), "mail must survive a crash"
        pid = server.pid
        assert pid is not None
    assert not port_open(port)


# --------------------------------------------------------------------------- pymap


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", ["dict", "maildir"])
async def test_pymap_append_fetch_restart(tmp_path: Path, backend: str) -> None:
    server = need(lambda: peers.Pymap.start(tmp_path, backend=backend))  # type: ignore[arg-type]
    with server:
        user, password = server.credentials
        await server.append(user, password, raw_message(f"pymap-{backend}"))
        if backend == "maildir":
            server.deliver_file(raw_message("pymap-dropped"))
        async with server.session() as imap:
            selected = await imap.select("INBOX")
            exists = [x for x in selected.lines if bytes(x).endswith(b"EXISTS")]
            assert exists == [b"2 EXISTS" if backend == "maildir" else b"1 EXISTS"]
            fetched = await imap.fetch("1", "(BODY.PEEK[])")
            assert f"pymap-{backend}".encode() in b"".join(bytes(x) for x in fetched.lines)
        port = server.port
        server.kill()
        assert not port_open(port)
        server.restart()
        assert server.port == port and server.running
        async with server.session() as imap:
            selected = await imap.select("INBOX")
            exists = [x for x in selected.lines if bytes(x).endswith(b"EXISTS")]
            # dict keeps mail in memory only; maildir keeps it on disk
            assert exists == [b"2 EXISTS" if backend == "maildir" else b"0 EXISTS"]
    assert not port_open(port)


# --------------------------------------------------------------------------- SMTP


def email(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "agent@example.com"
    msg["To"] = "customer@example.net"
    msg["Subject"] = subject
    msg.set_content("hi there")
    return msg


@pytest.mark.asyncio
async def test_smtp_sink_receives_message() -> None:
    import aiosmtplib

    with need(lambda: peers.SmtpSink().start()) as sink:
        await aiosmtplib.send(email("sink-plain"), hostname=sink.host, port=sink.port)
        messages = await sink.wait_for(1, timeout=10)
        # stop() keeps the port: a restarted sink is reachable at the same address.
        port = sink.port
        sink.stop()
        assert not port_open(port)
        sink.start()
        assert sink.port == port
        await aiosmtplib.send(email("sink-again"), hostname=sink.host, port=sink.port)
        assert len(await sink.wait_for(2)) == 2
    mail_from, rcpt_tos, raw = messages[0]
    assert mail_from == "agent@example.com"
    assert rcpt_tos == ["customer@example.net"]
    assert b"Subject: sink-plain" in raw
    assert not sink.running
    with pytest.raises(TimeoutError):
        await sink.wait_for(3, timeout=0.05)


@pytest.mark.asyncio
async def test_smtp_sink_auth_xoauth2_plain_login() -> None:
    import aiosmtplib

    def check(mechanism: str, login: str, secret: str) -> bool:
        return secret in ("good-token", "good-password")

    with need(lambda: peers.SmtpSink(auth_handler=check, auth_required=True).start()) as sink:
        # Unauthenticated MAIL FROM is refused.
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            await aiosmtplib.send(email("no-auth"), hostname=sink.host, port=sink.port)
        # XOAUTH2 with a bad token: error challenge, then 535.
        client = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False)
        await client.connect()
        try:
            await client.ehlo()
            assert client.server_auth_methods == ["login", "plain", "xoauth2"]
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
                await client.auth_xoauth2("agent@example.com", "bad-token")
            assert info.value.code == 535
        finally:
            await client.quit()

        async def token() -> str:
            return "good-token"

        await aiosmtplib.send(
            email("sink-xoauth2"),
            hostname=sink.host,
            port=sink.port,
            username="agent@example.com",
            oauth_token_generator=token,
        )
        for mechanism in ("PLAIN", "LOGIN"):
            client = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False)
            await client.connect()
            try:
                await client.ehlo()
                auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
                await auth("agent@example.com", "good-password")
                await client.send_message(email(f"sink-{mechanism}"))
            finally:
                await client.quit()
        await sink.wait_for(3)
    assert sink.auth_attempts == [
        ("XOAUTH2", "agent@example.com", "bad-token"),
        ("XOAUTH2", "agent@example.com", "good-token"),
        ("PLAIN", "agent@example.com", "good-password"),
        ("LOGIN", "agent@example.com", "good-password"),
    ]
    assert [m.raw.count(b"Subject: sink-") for m in sink.messages] == [1, 1, 1]


@pytest.mark.asyncio
async def test_smtp_sink_starttls() -> None:
    import aiosmtplib

    with need(lambda: peers.SmtpSink(tls=True).start()) as sink:
        assert sink.cert_path is not None and sink.cert_path.exists()
        with pytest.raises(aiosmtplib.SMTPResponseException) as info:
            await aiosmtplib.send(
                email("no-tls"), hostname=sink.host, port=sink.port, start_tls=False
            )
        assert info.value.code == 530
        await aiosmtplib.send(
            email("sink-tls"),
            hostname=sink.host,
            port=sink.port,
            start_tls=True,
            tls_context=sink.client_tls_context(),
            username="agent@example.com",
            password="pw",
        )
        messages = await sink.wait_for(1)
        cert_dir = sink.cert_path.parent
    assert b"Subject: sink-tls" in messages[0].raw
    assert sink.auth_attempts[0].mechanism in ("PLAIN", "LOGIN")
    assert not cert_dir.exists()


@pytest.mark.parametrize("backend", ["openssl", "cryptography"])
def test_self_signed_cert(tmp_path: Path, backend: str) -> None:
    import ssl

    cert, key = need(lambda: peers.generate_self_signed_cert(tmp_path, backend=backend))  # type: ignore[arg-type]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(key))
    client = ssl.create_default_context(cafile=str(cert))
    assert client.cert_store_stats()["x509"] == 1


# --------------------------------------------------------------------------- PostgreSQL


async def _pg_one(url: str, sql: str) -> object:
    """Run ``sql`` through SQLAlchemy's asyncpg dialect in a committed transaction."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(sql))
            return result.scalar_one() if result.returns_rows else None
    finally:
        await engine.dispose()


async def _pg_database_exists(dsn: str, name: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname=$1", name))
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_pg_test_database_created_and_dropped() -> None:
    with contextlib.ExitStack() as stack:
        url = need(lambda: stack.enter_context(peers.pg_test_database()))
        assert url.startswith("postgresql+asyncpg://")
        name = url.rsplit("/", 1)[1]
        assert name.startswith("omniroute_test_")
        assert await _pg_one(url, "SELECT current_database()") == name
        # An open connection must not stop the drop (WITH (FORCE)).
        import asyncpg

        lingering = await asyncpg.connect(url.replace("+asyncpg", ""))
    admin = url.replace("+asyncpg", "").rsplit("/", 1)[0] + "/postgres"
    assert not await _pg_database_exists(admin, name)
    assert lingering.is_closed() or not await _connection_usable(lingering)
    await lingering.close(timeout=1)


async def _connection_usable(conn: object) -> bool:
    try:
        await conn.fetchval("SELECT 1")  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


@pytest.mark.asyncio
async def test_pg_test_database_falls_back_to_private(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = peers.free_port()
    monkeypatch.setenv("OMNIROUTE_TEST_PG_URL", f"postgresql://postgres@127.0.0.1:{dead}/postgres")
    try:
        with contextlib.ExitStack() as stack:
            url = need(lambda: stack.enter_context(peers.pg_test_database()))
            assert f":{dead}/" not in url
            assert await _pg_one(url, "SELECT 41 + 1") == 42
    finally:
        peers.stop_private_fallbacks()


@pytest.mark.asyncio
async def test_private_postgres_restart_and_kill(tmp_path: Path) -> None:
    server = need(lambda: peers.PrivatePostgres.start(tmp_path))
    with server:
        assert await _pg_one(server.url, "SELECT 1") == 1
        await _pg_one(server.url, "CREATE TABLE t AS SELECT 7 AS v")
        port = server.port
        server.restart()
        assert server.port == port
        assert await _pg_one(server.url, "SELECT v FROM t") == 7
        server.kill()
        assert not server.running and not port_open(port)
        server.restart()
        assert await _pg_one(server.url, "SELECT v FROM t") == 7
    assert not server.running and not port_open(port)


# --------------------------------------------------------------------------- Redis


@pytest.mark.asyncio
async def test_redis_shared_ping_with_prefix() -> None:
    import redis.asyncio as aioredis

    url = need(peers.redis_test_url)
    prefix = peers.unique_prefix()
    assert prefix.startswith("omniroute-test:") and prefix.endswith(":")
    client = aioredis.Redis.from_url(url)
    try:
        assert await client.ping()
        await client.set(prefix + "k", "v", ex=30)
        assert await client.get(prefix + "k") == b"v"
        await client.delete(prefix + "k")
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_private_redis_kill_and_restart(tmp_path: Path) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    server = need(lambda: peers.PrivateRedis.start(tmp_path))
    with server:
        client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
        try:
            await client.set("k", "v")
            server.kill()
            with pytest.raises(RedisConnectionError):
                await client.get("k")
            server.restart()
            assert await client.ping()
            assert await client.get("k") is None  # no persistence
        finally:
            await client.aclose()
        port = server.port
    assert not port_open(port)


@pytest.mark.asyncio
async def test_redis_falls_back_to_private(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIROUTE_TEST_REDIS_URL", f"redis://127.0.0.1:{peers.free_port()}/0")
    try:
        url = need(peers.redis_test_url)
        assert url == need(peers.redis_test_url)  # started once per process
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port_open(port)
    finally:
        peers.stop_private_fallbacks()
    assert not port_open(port)


# --------------------------------------------------------------------------- Chromium


@pytest.mark.asyncio
async def test_chromium_launch_and_evaluate() -> None:
    async with contextlib.AsyncExitStack() as stack:
        try:
            browser = await stack.enter_async_context(peers.launch_browser())
        except peers.PeerUnavailable as exc:
            unavailable(exc)
        page = await browser.new_page()
        await page.set_content("<p id='x'>omniroute</p>")
        assert await page.evaluate("document.getElementById('x').textContent") == "omniroute"
        assert await page.evaluate("navigator.userAgent.includes('HeadlessChrome')")
