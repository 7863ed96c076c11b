"""The email channel against real peers: a private Dovecot (and pymap) for IMAP, aiosmtpd for
SMTP. Mail delivered by APPEND and as maildir files becomes conversations through IDLE; a
reply goes out threaded; the customer's reply joins, a stranger's does not; restarts and a
UIDVALIDITY reset store nothing twice; the poller survives its server being killed and the
awkward corpus; bounces and out-of-office replies are recognised."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from channels.email import EmailChannel
from router.messaging import agent_write
from router.models import ChannelState, Conversation, Message, Quarantine
from router.runtime import Runtime
from router.types import AgentPresence
from tests import peers
from tests.peers import need
from tests.router.test_api import admin_token, auth
from tests.router.test_live import make_agent
from tests.support import client_for, make_settings, started_runtime

FIXTURES = Path(__file__).parent / "fixtures" / "email"
RULES = """\
version: 1
queues:
  general: {}
default: {queue: general}
"""
USERS = {f"box{i}@example.com": "secret" for i in range(40)}
_boxes = iter(sorted(USERS))


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Dovecot]:
    server = need(lambda: peers.Dovecot.start(tmp_path_factory.mktemp("dovecot"), USERS))
    with server:
        yield server


@pytest.fixture
def sink() -> Iterator[peers.SmtpSink]:
    with peers.SmtpSink() as server:
        yield server


def channels_yaml(imap_port: int, user: str, smtp_port: int, **extra: Any) -> str:
    inbox = {
        "channel": "email",
        "provider": "imap",
        "address": "support@example.com",
        "allow_plaintext": True,
        "full_poll": "1h",  # only IDLE can bring mail in quickly
        "reconnect_max": "2s",
        "imap": {
            "host": "127.0.0.1",
            "port": imap_port,
            "security": "plain",
            "user": user,
            "password": USERS.get(user, "secret"),
        },
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "security": "plain", "auth": "none"},
        **extra,
    }
    return json.dumps({"version": 1, "inboxes": {"support": inbox}})


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.1)


async def count(runtime: Runtime, model: Any, *where: Any) -> int:
    return int(
        await runtime.db.read(
            lambda c: c.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
        )
    )


async def conversation_of(runtime: Runtime, thread_id: str) -> int | None:
    return await runtime.db.read(
        lambda c: c.execute(
            select(Message.conversation_id).where(Message.thread_id == thread_id)
        ).scalar_one_or_none()
    )


def mail(
    sender: str,
    subject: str,
    message_id: str,
    body: str = "hello",
    headers: str = "",
) -> bytes:
    return (
        f"From: Customer <{sender}>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\nDate: Wed, 25 Nov 2026 09:00:00 +0000\r\n{headers}"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


@contextlib.asynccontextmanager
async def open_mailbox(
    directory: Path,
    db_url: str,
    dovecot: peers.Dovecot,
    sink: peers.SmtpSink,
    user: str,
    rules: str = RULES,
    **inbox: Any,
) -> AsyncIterator[tuple[Runtime, str, Callable[..., Any]]]:
    """A runtime polling ``user``'s Dovecot mailbox; yields (runtime, user, restart)."""
    settings = make_settings(
        directory,
        db_url,
        rules=rules,
        channels=channels_yaml(dovecot.port, user, sink.port, **inbox),
        worker_interval=0.2,
        outbox_interval=0.1,
    )
    holder: dict[str, Runtime] = {}

    async def start() -> Runtime:
        runtime = Runtime(settings)
        await runtime.start(workers=True)
        holder["runtime"] = runtime
        channel = runtime.channels["support"]
        assert isinstance(channel, EmailChannel)
        await asyncio.wait_for(channel.connected.wait(), 10)
        return runtime

    async def restart() -> Runtime:
        await holder["runtime"].stop()
        return await start()

    runtime = await start()
    try:
        yield runtime, user, restart
    finally:
        await holder["runtime"].stop()


@pytest.fixture
async def mailbox(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> AsyncIterator[tuple[Runtime, str, Callable[..., Any]]]:
    """A runtime polling a fresh Dovecot mailbox; yields (runtime, user, restart)."""
    async with open_mailbox(tmp_path / "conf", db_url, dovecot, sink, next(_boxes)) as box:
        yield box


async def test_appended_and_dropped_mail_arrive_through_idle(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot
) -> None:
    runtime, user, _ = mailbox
    await dovecot.append(user, USERS[user], mail("a@example.net", "By APPEND", "<append-1@x>"))
    await eventually(lambda: conversation_of(runtime, "<append-1@x>"))
    dovecot.deliver_file(user, mail("b@example.net", "As a file", "<file-1@x>"))
    await eventually(lambda: conversation_of(runtime, "<file-1@x>"))
    channel = runtime.channels["support"]
    assert isinstance(channel, EmailChannel) and channel.polls == 1  # only the first poll
    rows = await runtime.db.read(
        lambda c: c.execute(select(Message.external_id, Message.text).order_by(Message.id)).all()
    )
    assert [r.text for r in rows] == ["hello", "hello"]
    # keyed by Message-ID, the same in every copy of the mail wherever it lies
    assert [r.external_id for r in rows] == ["mid:append-1@x", "mid:file-1@x"]


async def test_mail_announced_in_the_answer_to_our_own_command_is_fetched_at_once(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """Mail that arrives while the poller flags what it imported is announced (``* 2
    EXISTS``) in the answer to that STORE, and never again in the IDLE that follows: the
    poller must fetch again before idling, not wait for the full poll (an hour here)."""
    user = next(_boxes)
    channels = json.loads(channels_yaml(dovecot.port, user, sink.port))
    channels["inboxes"]["support"]["imap"]["after_import"] = "flag"
    settings = make_settings(tmp_path / "conf", db_url, rules=RULES, channels=json.dumps(channels))
    async with started_runtime(settings, workers=True) as runtime:
        channel = runtime.channels["support"]
        assert isinstance(channel, EmailChannel)
        await asyncio.wait_for(channel.connected.wait(), 10)
        deliver = channel.context.deliver
        assert deliver is not None
        appended: list[bool] = []

        async def deliver_and_receive_more(items: list[Any]) -> Any:
            result = await deliver(items)
            if not appended:  # the second mail lands before the poller's STORE
                appended.append(True)
                await dovecot.append(user, USERS[user], mail("m@example.net", "2", "<m2@x>"))
            return result

        channel.context.deliver = deliver_and_receive_more
        await dovecot.append(user, USERS[user], mail("m@example.net", "1", "<m1@x>"))
        await eventually(lambda: conversation_of(runtime, "<m2@x>"), timeout=20)
        assert channel.polls == 1


async def test_a_reply_is_threaded_and_only_the_customer_joins_it(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    runtime, user, _ = mailbox
    password = USERS[user]
    cid, _, received = await answered(
        mailbox, dovecot, sink, mail("vera@example.net", "Order 7", "<q1@example.net>")
    )
    assert received.rcpt_tos == ["vera@example.net"]
    sent = email.message_from_bytes(received.raw, policy=email.policy.default)
    assert str(sent["From"]) == "Anna <support@example.com>"
    assert sent["In-Reply-To"] == "<q1@example.net>"
    assert "<q1@example.net>" in sent["References"]
    subject = str(sent["Subject"])
    assert subject.startswith("Re: Order 7 [#") and subject.endswith("]")
    ours = str(sent["Message-ID"])

    async def stored() -> Any:  # marked sent just after the SMTP server took it
        row = await runtime.db.read(
            lambda c: c.execute(
                select(Message.external_id, Message.thread_id).where(Message.direction == "out")
            ).one()
        )
        return tuple(row) if row.external_id else None

    assert await eventually(stored) == (ours, ours)
    # the customer's reply (In-Reply-To our Message-ID) joins
    await dovecot.append(
        user,
        password,
        mail(
            "vera@example.net",
            f"Re: {subject}",
            "<q2@example.net>",
            headers=f"In-Reply-To: {ours}\r\nReferences: <q1@example.net> {ours}\r\n",
        ),
    )
    assert await eventually(lambda: conversation_of(runtime, "<q2@example.net>")) == cid
    # ... so does one that kept only the token in its subject
    await dovecot.append(user, password, mail("vera@example.net", subject, "<q3@example.net>"))
    assert await eventually(lambda: conversation_of(runtime, "<q3@example.net>")) == cid
    # a stranger copying the subject and the headers starts a new conversation, related
    await dovecot.append(
        user,
        password,
        mail(
            "mallory@example.org",
            subject,
            "<evil@example.org>",
            headers=f"In-Reply-To: {ours}\r\n",
        ),
    )
    other = await eventually(lambda: conversation_of(runtime, "<evil@example.org>"))
    assert other != cid
    data = await runtime.db.read(
        lambda c: c.execute(select(Conversation.data).where(Conversation.id == other)).scalar_one()
    )
    assert data["related_to"] == cid
    # a forged token does not join either
    forged = subject.replace(
        subject[subject.index("[#") : subject.index("]") + 1], f"[#{cid}-00000000]"
    )
    await dovecot.append(user, password, mail("mallory@example.org", forged, "<forged@x>"))
    assert await eventually(lambda: conversation_of(runtime, "<forged@x>")) != cid


async def answered(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot, sink: peers.SmtpSink, raw: bytes
) -> tuple[int, int, peers.ReceivedMessage]:
    """The customer's mail arrives, Anna takes it and answers: (conversation, anna, sent)."""
    runtime, user, _ = mailbox
    anna, _ = await make_agent(runtime, "anna", "", "email=5,total=5")
    await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
    await dovecot.append(user, USERS[user], raw)
    message_id = str(email.message_from_bytes(raw, policy=email.policy.default)["Message-ID"])
    cid = await eventually(lambda: conversation_of(runtime, message_id))
    offer = await eventually(lambda: runtime.db.read(_pending_offer))
    await runtime.assignment.accept(anna, offer)
    await runtime.db.write(agent_write, anna, cid, "Thanks, it is done.")
    runtime.outbox.wake()
    (received,) = await sink.wait_for(1)
    return cid, anna, received


def _pending_offer(conn: Any) -> int | None:
    from router.models import Offer

    return conn.execute(select(Offer.id).where(Offer.state == "pending")).scalar_one_or_none()


async def test_restarts_and_a_uidvalidity_reset_store_nothing_twice(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot
) -> None:
    runtime, user, restart = mailbox
    for i in range(3):
        await dovecot.append(user, USERS[user], mail(f"c{i}@example.net", f"n{i}", f"<n{i}@x>"))
    await eventually(lambda: conversation_of(runtime, "<n2@x>"))
    runtime = await restart()
    await asyncio.sleep(1)  # a poll after the restart has run (connected waits for SELECT)
    assert await count(runtime, Message) == 3
    before = await runtime.db.read(lambda c: c.execute(select(ChannelState.value)).scalar_one())
    # Dovecot forgets its UIDs: a new UIDVALIDITY, every message numbered again
    await holder_stop(runtime)
    maildir = dovecot.maildir(user)
    for name in ("dovecot-uidlist", "dovecot.index", "dovecot.index.cache", "dovecot.index.log"):
        (maildir / name).unlink(missing_ok=True)
    await dovecot.append(user, USERS[user], mail("d@example.net", "after reset", "<n3@x>"))
    runtime = await restart()
    await eventually(lambda: conversation_of(runtime, "<n3@x>"))
    after = await runtime.db.read(lambda c: c.execute(select(ChannelState.value)).scalar_one())
    assert after["uidvalidity"] != before["uidvalidity"]
    assert await count(runtime, Message) == 4


async def holder_stop(runtime: Runtime) -> None:
    channel = runtime.channels["support"]
    await channel.stop()


async def test_the_poller_survives_its_server_being_killed(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot
) -> None:
    runtime, user, _ = mailbox
    await dovecot.append(user, USERS[user], mail("k@example.net", "before", "<k1@x>"))
    await eventually(lambda: conversation_of(runtime, "<k1@x>"))
    dovecot.kill()
    dovecot.deliver_file(user, mail("k@example.net", "while down", "<k2@x>"))
    await asyncio.sleep(1.5)  # the poller notices and backs off
    dovecot.restart()
    await eventually(lambda: conversation_of(runtime, "<k2@x>"), timeout=30)
    assert await count(runtime, Message) == 2


async def test_bounces_autoreplies_oversize_and_the_awkward_corpus(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot
) -> None:
    runtime, user, _ = mailbox
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    names = sorted(manifest)
    for name in names:
        await dovecot.append(user, USERS[user], (FIXTURES / name).read_bytes())
    await dovecot.append(user, USERS[user], mail("last@example.net", "last", "<last@x>"))
    await eventually(lambda: conversation_of(runtime, "<last@x>"), timeout=60)
    quarantined = await count(runtime, Quarantine)
    expected_quarantine = [n for n in names if manifest[n]["classification"] == "quarantine"]
    # quarantined: what cannot be parsed, and bounces naming none of our messages
    assert quarantined >= len(expected_quarantine)
    messages = await count(runtime, Message, Message.direction == "in")
    kept = [n for n in names if manifest[n]["classification"] in ("message", "bulk", "auto_reply")]
    assert messages >= len(kept) - 2  # two fixtures share a Message-ID and content
    assert messages + quarantined >= len(kept) + len(expected_quarantine)


@pytest.mark.parametrize("backend", ["dict", "maildir"])
async def test_pymap_mail_arrives_too(
    tmp_path: Path, sqlite_url: str, sink: peers.SmtpSink, backend: str
) -> None:
    server = need(lambda: peers.Pymap.start(tmp_path / "pymap", backend=backend))  # type: ignore[arg-type]
    with server:
        settings = make_settings(
            tmp_path / "conf",
            sqlite_url,
            rules=RULES,
            channels=channels_yaml(server.port, "agent", sink.port),
        )
        async with started_runtime(settings, workers=True) as runtime:
            channel = runtime.channels["support"]
            assert isinstance(channel, EmailChannel)
            await asyncio.wait_for(channel.connected.wait(), 10)
            await server.append("agent", "secret", mail("p@example.net", "pymap", "<p1@x>"))
            await eventually(lambda: conversation_of(runtime, "<p1@x>"))
            if backend == "maildir":
                server.deliver_file(mail("p@example.net", "pymap file", "<p2@x>"))
                # pymap notices maildir files by polling its folder (about every second)
                await eventually(lambda: conversation_of(runtime, "<p2@x>"), timeout=30)


async def test_a_bounce_fails_our_message_and_an_out_of_office_does_not_reopen(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    runtime, user, _ = mailbox
    password = USERS[user]
    cid, anna, received = await answered(
        mailbox, dovecot, sink, mail("henry@example.com", "Hi", "<h1@example.com>")
    )
    ours = str(email.message_from_bytes(received.raw, policy=email.policy.default)["Message-ID"])
    await runtime.assignment.resolve(anna, cid)
    # Henry's out-of-office answers our reply: attached to the conversation, not reopened
    ooo = (FIXTURES / "ooo_auto_submitted.eml").read_bytes()
    ooo = ooo.replace(b"<out-42@support.example.com>", ours.encode())
    await dovecot.append(user, password, ooo)
    ooo_id = email.message_from_bytes(ooo, policy=email.policy.default)["Message-ID"]
    assert await eventually(lambda: conversation_of(runtime, str(ooo_id))) == cid
    state = await runtime.db.read(
        lambda c: c.execute(select(Conversation.state).where(Conversation.id == cid)).scalar_one()
    )
    assert state == "resolved"
    # a DSN naming our Message-ID marks it failed instead of opening a conversation
    dsn = (FIXTURES / "bounce_dsn_postfix.eml").read_bytes()
    await dovecot.append(
        user, password, dsn.replace(b"<out-123@support.example.com>", ours.encode())
    )

    async def failed() -> bool:
        status = await runtime.db.read(
            lambda c: c.execute(
                select(Message.delivery_status).where(Message.external_id == ours)
            ).scalar_one()
        )
        return bool(status == "failed")

    await eventually(failed)
    assert await count(runtime, Conversation) == 1


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_imap_over_implicit_tls_and_starttls(
    tmp_path: Path, sqlite_url: str, sink: peers.SmtpSink, security: str
) -> None:
    user = "tls@example.com"
    server = need(lambda: peers.Dovecot.start(tmp_path / "dovecot", {user: "secret"}, tls=True))
    with server:
        assert server.tls_cert is not None
        port = server.imaps_port if security == "tls" else server.port
        inbox = json.loads(channels_yaml(port, user, sink.port))
        imap = inbox["inboxes"]["support"]["imap"]
        imap.update(security=security, ca_file=str(server.tls_cert), host="localhost")
        settings = make_settings(
            tmp_path / "conf", sqlite_url, rules=RULES, channels=json.dumps(inbox)
        )
        async with started_runtime(settings, workers=True) as runtime:
            channel = runtime.channels["support"]
            assert isinstance(channel, EmailChannel)
            await asyncio.wait_for(channel.connected.wait(), 10)
            await server.append(user, "secret", mail("t@example.net", "over TLS", "<t1@x>"))
            await eventually(lambda: conversation_of(runtime, "<t1@x>"))


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_one_process_polls_a_mailbox_and_another_takes_over(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """Two processes share a mailbox: one holds its lease and polls, the other stands by;
    when the first stops, the second takes the lease and goes on from the same cursor."""
    user = next(_boxes)

    def settings_for(process: str) -> Any:
        return make_settings(
            tmp_path / process,
            db_url,
            rules=RULES,
            channels=channels_yaml(dovecot.port, user, sink.port),
            worker_interval=0.2,
            lease_ttl=1.5,
            process_id=process,
        )

    first = Runtime(settings_for("p1"))
    await first.start(workers=True)
    second = Runtime(settings_for("p2"))
    await second.start(workers=True)
    try:
        a, b = first.channels["support"], second.channels["support"]
        assert isinstance(a, EmailChannel) and isinstance(b, EmailChannel)
        await asyncio.wait_for(a.connected.wait(), 10)
        await dovecot.append(user, USERS[user], mail("x@example.net", "one", "<lease-1@x>"))
        await eventually(lambda: conversation_of(first, "<lease-1@x>"))
        await asyncio.sleep(1.5)  # the standby keeps checking, and keeps standing by
        assert (b.standby, b.polls, b.connected.is_set()) == (True, 0, False)
        await first.stop()
        await asyncio.wait_for(b.connected.wait(), 10)  # released at stop: taken at once
        await dovecot.append(user, USERS[user], mail("y@example.net", "two", "<lease-2@x>"))
        await eventually(lambda: conversation_of(second, "<lease-2@x>"))
        assert await count(second, Message) == 2  # the first message was not imported again
    finally:
        if first.started:
            await first.stop()
        await second.stop()


# -- nothing doubled: one mail, one message --------------------------------------------------
async def messages_from(runtime: Runtime, thread_id: str) -> list[Any]:
    return await runtime.db.read(
        lambda c: c.execute(
            select(Message.text, Message.conversation_id, Message.external_id)
            .where(Message.thread_id.ilike(thread_id), Message.direction == "in")
            .order_by(Message.id)
        ).all()
    )


def delivered_to(alias: str, raw: bytes) -> bytes:
    """``raw`` as the MTA stores it for ``alias``: its own trace headers on top."""
    return (
        f"Delivered-To: {alias}\r\nReceived: from mx.example.com by imap.example.com "
        f"for <{alias}>; Wed, 25 Nov 2026 09:00:02 +0000\r\n"
    ).encode() + raw


async def test_one_mail_delivered_to_two_aliases_is_stored_once(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot
) -> None:
    """The copies differ in their trace headers (bytes and SHA-256 differ); the Message-ID
    is the same, so it is one message. A client reusing a Message-ID for another mail (other
    Date, other text) still gets both kept."""
    runtime, user, _ = mailbox
    password = USERS[user]
    original = mail("ann@example.net", "Broken kettle", "<Kettle-1@Mail.Example.NET>", "It leaks.")
    for alias in ("support@example.com", "help@example.com"):
        await dovecot.append(user, password, delivered_to(alias, original))
    # the domain of a Message-ID is case-insensitive (RFC 5322)
    lowered = original.replace(b"Mail.Example.NET", b"mail.example.net")
    await dovecot.append(user, password, delivered_to("info@example.com", lowered))
    reused = mail(
        "ann@example.net", "Broken kettle", "<Kettle-1@Mail.Example.NET>", "Second question."
    ).replace(b"09:00:00", b"10:30:00")
    await dovecot.append(user, password, delivered_to("support@example.com", reused))
    await dovecot.append(user, password, delivered_to("help@example.com", reused))
    await dovecot.append(user, password, mail("z@example.net", "last", "<alias-last@x>"))
    await eventually(lambda: conversation_of(runtime, "<alias-last@x>"))
    rows = await messages_from(runtime, "<kettle-1@mail.example.net>")
    assert [r.text for r in rows] == ["It leaks.", "Second question."]
    assert rows[0].external_id == "mid:Kettle-1@mail.example.net"
    assert len({r.conversation_id for r in rows}) == 1


def oversized(message_id: str, size: int = 1_200_000) -> bytes:
    """A mail with an attachment of ``size`` bytes (over 1 MiB once base64-encoded)."""
    data = base64.encodebytes(bytes(range(256)) * (size // 256)).replace(b"\n", b"\r\n")
    return (
        b"From: Customer <big@example.net>\r\nTo: support@example.com\r\nSubject: Logs\r\n"
        + f"Message-ID: {message_id}\r\n".encode()
        + b"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
        b"Content-Type: text/plain\r\n\r\nThe logs are attached.\r\n--b1\r\n"
        b'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="dump.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + data + b"--b1--\r\n"
    )


async def test_a_uidvalidity_reset_imports_and_quarantines_nothing_twice(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """Everything the folder held is read again after a UIDVALIDITY change: messages (a
    mail without a Message-ID included) are recognised by their key, and what was
    quarantined (unparseable, oversized) is not quarantined again."""
    user = next(_boxes)
    password = USERS[user]
    async with open_mailbox(tmp_path / "conf", db_url, dovecot, sink, user, max_size_mb=1) as (
        runtime,
        _,
        restart,
    ):
        for raw in (
            mail("r@example.net", "first", "<reset-1@x>"),
            (FIXTURES / "no_message_id.eml").read_bytes(),
            (FIXTURES / "raises_from_unclosed_angle.eml").read_bytes(),
            oversized("<reset-big@x>"),
            mail("r@example.net", "marker", "<reset-2@x>"),
        ):
            await dovecot.append(user, password, raw)
        await eventually(lambda: conversation_of(runtime, "<reset-2@x>"))
        assert await count(runtime, Message) == 3
        reasons = sorted(
            await runtime.db.read(lambda c: c.execute(select(Quarantine.reason)).scalars().all())
        )
        assert len(reasons) == 2
        assert any("MiB limit" in r for r in reasons)
        assert any("no sender address" in r for r in reasons)
        # the cursor is saved just after the batch's commit
        before = await eventually(
            lambda: runtime.db.read(
                lambda c: c.execute(select(ChannelState.value)).scalar_one_or_none()
            )
        )
        await holder_stop(runtime)
        maildir = dovecot.maildir(user)
        for name in (
            "dovecot-uidlist",
            "dovecot.index",
            "dovecot.index.cache",
            "dovecot.index.log",
        ):
            (maildir / name).unlink(missing_ok=True)
        await dovecot.append(user, password, mail("r@example.net", "after", "<reset-3@x>"))
        runtime = await restart()
        await eventually(lambda: conversation_of(runtime, "<reset-3@x>"))
        after = await runtime.db.read(lambda c: c.execute(select(ChannelState.value)).scalar_one())
        assert after["uidvalidity"] != before["uidvalidity"]
        assert await count(runtime, Quarantine) == 2
        assert await count(runtime, Message) == 4


async def test_an_oversized_mail_is_never_reimported_without_its_body(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """Only the headers of a mail over max_size_mb are kept: re-importing them is refused
    (409) and the item stays in quarantine. Raising the limit and copying the mail into the
    folder again imports it whole, attachment in the blob store, and settles the item."""
    user = next(_boxes)
    password = USERS[user]
    big = oversized("<big-1@x>")
    async with open_mailbox(tmp_path / "small", db_url, dovecot, sink, user, max_size_mb=1) as (
        runtime,
        _,
        _,
    ):
        await dovecot.append(user, password, big)
        item_id = await eventually(
            lambda: runtime.db.read(lambda c: c.execute(select(Quarantine.id)).scalar_one_or_none())
        )
        token = await admin_token(runtime)
        async with client_for(runtime) as client:
            response = await client.post(
                f"/api/admin/quarantine/{item_id}/reimport", headers=auth(token)
            )
            assert response.status_code == 409, response.text
            assert "holds only part of what arrived" in response.json()["message"]
            [listed] = (await client.get("/api/admin/quarantine", headers=auth(token))).json()
        assert (listed["id"], listed["partial"], listed["resolved_at"]) == (item_id, True, None)
        assert listed["external_id"] == "mid:big-1@x"
        assert await count(runtime, Message) == 0
    async with open_mailbox(tmp_path / "large", db_url, dovecot, sink, user, max_size_mb=5) as (
        runtime,
        _,
        _,
    ):
        await dovecot.append(user, password, big)
        await eventually(lambda: conversation_of(runtime, "<big-1@x>"))
        stored = await runtime.db.read(
            lambda c: c.execute(select(Message.text, Message.attachments)).one()
        )
        assert stored.text == "The logs are attached."
        [attachment] = stored.attachments
        assert (attachment["filename"], attachment["size"]) == ("dump.bin", 1_200_000 // 256 * 256)
        assert await runtime.blobs.get(attachment["blob_key"]) == bytes(range(256)) * (
            1_200_000 // 256
        )
        resolved = await runtime.db.read(
            lambda c: c.execute(
                select(Quarantine.resolved_at).where(Quarantine.id == item_id)
            ).scalar_one()
        )
        assert resolved is not None


async def test_an_attachment_the_inbox_accepts_is_never_dropped_for_its_size(
    tmp_path: Path, sqlite_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """An inbox whose max_size_mb is above the blob store's default limit (50 MiB): a 51 MiB
    attachment within the inbox's limit is stored with its bytes. Before, it was stored as a
    name without a file (blob_key null) and only a warning said so."""
    user = next(_boxes)
    size = 51 * 1024 * 1024
    async with open_mailbox(tmp_path / "big", sqlite_url, dovecot, sink, user, max_size_mb=80) as (
        runtime,
        _,
        _,
    ):
        await dovecot.append(user, USERS[user], oversized("<huge-1@x>", size))
        await eventually(lambda: conversation_of(runtime, "<huge-1@x>"), timeout=120)
        attachments = await runtime.db.read(
            lambda c: c.execute(select(Message.attachments)).scalar_one()
        )
        [attachment] = attachments
        assert attachment["size"] == size and attachment["blob_key"]
        assert len(await runtime.blobs.get(attachment["blob_key"])) == size


# -- bounces that are not RFC 3464 reports ---------------------------------------------------
async def delivery(runtime: Runtime, message_id: str) -> tuple[str, str | None] | None:
    """(delivery status, error) of our outbound message ``message_id`` once it is sent."""
    row = await runtime.db.read(
        lambda c: c.execute(
            select(Message.delivery_status, Message.error).where(Message.external_id == message_id)
        ).first()
    )
    return None if row is None else (row.delivery_status, row.error)


async def status_of(runtime: Runtime, message_id: str) -> str | None:
    found = await delivery(runtime, message_id)
    return found[0] if found else None


async def test_non_standard_bounces_fail_our_message_and_open_no_conversation(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    runtime, user, _ = mailbox
    password = USERS[user]
    cid, _, received = await answered(
        mailbox, dovecot, sink, mail("olduser@legacy.example", "My ticket", "<t1@legacy.example>")
    )
    ours = str(email.message_from_bytes(received.raw, policy=email.policy.default)["Message-ID"])
    await eventually(lambda: delivery(runtime, ours))
    state = await runtime.db.read(
        lambda c: c.execute(select(Conversation.state).where(Conversation.id == cid)).scalar_one()
    )
    # qmail's plain-text bounce quoting our Message-ID in the returned copy
    qmail = (FIXTURES / "mailer_daemon_plain_no_dsn.eml").read_bytes()
    await dovecot.append(
        user, password, qmail.replace(b"<out-128@support.example.com>", ours.encode())
    )

    async def failed() -> bool:
        return await status_of(runtime, ours) == "failed"

    await eventually(failed)
    _, error = await delivery(runtime, ours) or ("", None)
    assert error is not None and "5.1.1" in error
    assert "Sorry, no mailbox here by that name" in error
    # a bounce naming a message this inbox never sent is kept for an admin, with the reason
    await dovecot.append(user, password, (FIXTURES / "bounce_gmail_text.eml").read_bytes())
    reason = await eventually(
        lambda: runtime.db.read(lambda c: c.execute(select(Quarantine.reason)).scalar_one_or_none())
    )
    assert "<out-133@support.example.com>, which this inbox did not send" in reason
    assert "550 5.1.1" in reason
    # a customer forwarding a bounce they got is a customer writing: a conversation
    await dovecot.append(user, password, (FIXTURES / "customer_forwards_bounce.eml").read_bytes())
    forwarded = await eventually(lambda: conversation_of(runtime, "<fwd-bounce-0138@example.com>"))
    assert forwarded != cid
    # the bounces opened nothing, stored no message and left the conversation alone
    assert await count(runtime, Conversation) == 2
    assert await count(runtime, Message, Message.direction == "in") == 2
    assert (
        await runtime.db.read(
            lambda c: c.execute(
                select(Conversation.state).where(Conversation.id == cid)
            ).scalar_one()
        )
        == state
    )


async def test_a_bounce_naming_only_its_recipient_fails_the_last_message_to_it(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """Exchange Online's HTML NDR returns nothing of the original: its failed recipient
    names our latest message to that address. A delay notice first leaves it sent."""
    runtime, user, _ = mailbox
    password = USERS[user]
    _, _, received = await answered(
        mailbox, dovecot, sink, mail("jane.doe@fabrikam.example", "Order", "<o1@fabrikam.example>")
    )
    ours = str(email.message_from_bytes(received.raw, policy=email.policy.default)["Message-ID"])

    async def sent() -> bool:
        return await status_of(runtime, ours) == "sent"

    await eventually(sent)
    delayed = (FIXTURES / "bounce_exchange_text_delayed.eml").read_bytes()
    await dovecot.append(
        user, password, delayed.replace(b"<out-136@support.example.com>", ours.encode())
    )
    await dovecot.append(user, password, mail("m@example.net", "marker", "<delay-marker@x>"))
    await eventually(lambda: conversation_of(runtime, "<delay-marker@x>"))
    assert await delivery(runtime, ours) == ("sent", None)
    await dovecot.append(
        user, password, (FIXTURES / "bounce_exchange_no_original.eml").read_bytes()
    )

    async def failed() -> bool:
        return await status_of(runtime, ours) == "failed"

    await eventually(failed)
    _, error = await delivery(runtime, ours) or ("", None)
    assert error is not None and "5.1.10" in error and "jane.doe@fabrikam.example" in error
    assert await count(runtime, Quarantine) == 0


# -- the sender is the address in angle brackets ---------------------------------------------
AUTO_REPLY_RULES = """\
version: 1
queues:
  general: {}
templates:
  ack: "Thanks, we got your message."
default: {queue: general, reply: ack}
"""


async def test_the_automatic_reply_goes_to_the_address_in_angle_brackets(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    user = next(_boxes)
    password = USERS[user]
    async with open_mailbox(
        tmp_path / "conf", db_url, dovecot, sink, user, rules=AUTO_REPLY_RULES
    ) as (runtime, _, _):
        disguised = mail("x", "Help", "<disguised-1@x>").replace(
            b"From: Customer <x>", b"From: support@example.com <x@customer.example>"
        )
        await dovecot.append(user, password, disguised)
        (reply,) = await sink.wait_for(1)
        assert reply.rcpt_tos == ["x@customer.example"]
        # mail from our own address itself is never answered automatically
        own = mail("support@example.com", "Loop?", "<own-1@x>")
        await dovecot.append(user, password, own)
        cid = await eventually(lambda: conversation_of(runtime, "<own-1@x>"))

        async def routed() -> bool:
            state = await runtime.db.read(
                lambda c: c.execute(
                    select(Conversation.state).where(Conversation.id == cid)
                ).scalar_one()
            )
            return bool(state != "new")

        await eventually(routed)
        assert await count(runtime, Message, Message.conversation_id == cid) == 1


NESTED_SUBJECT = (
    "=?utf-8?b?"
    + base64.b64encode(
        b"=?utf-8?q?x=0D=0AReply-To:_evil@example.org=0D=0AContent-Type:_text/html=0D=0A=0D=0A"
        b"<b>attacker's_body</b>?="
    ).decode()
    + "?="
)


OWN_HEADERS = [
    b"content-transfer-encoding",
    b"content-type",
    b"date",
    b"from",
    b"in-reply-to",
    b"message-id",
    b"mime-version",
    b"references",
    b"subject",
    b"to",
]


async def test_a_nested_encoded_subject_never_adds_headers_to_our_replies(
    tmp_path: Path, db_url: str, dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """The reported attack: an encoded word whose text is another encoded word carrying
    CR/LF. Our automatic reply and the agent's later reply keep their own headers and body."""
    user = next(_boxes)
    rules = RULES.replace(
        "default: {queue: general}",
        'default: {queue: general, reply: ack}\ntemplates:\n  ack: "We got your mail."',
    )
    settings = make_settings(
        tmp_path / "conf",
        db_url,
        rules=rules,
        channels=channels_yaml(dovecot.port, user, sink.port),
        worker_interval=0.2,
        outbox_interval=0.1,
    )
    async with started_runtime(settings, workers=True) as runtime:
        channel = runtime.channels["support"]
        assert isinstance(channel, EmailChannel)
        await asyncio.wait_for(channel.connected.wait(), 10)
        anna, _ = await make_agent(runtime, "anna", "", "email=5,total=5")
        await runtime.assignment.set_status(anna, AgentPresence.ONLINE, "test")
        await dovecot.append(
            user, USERS[user], mail("eve@example.net", NESTED_SUBJECT, "<nested-1@x>")
        )
        cid = await eventually(lambda: conversation_of(runtime, "<nested-1@x>"))
        await sink.wait_for(1)  # the automatic reply
        offer = await eventually(lambda: runtime.db.read(_pending_offer))
        await runtime.assignment.accept(anna, offer)
        await runtime.db.write(agent_write, anna, cid, "Thanks, it is done.")
        runtime.outbox.wake()
        received = await sink.wait_for(2)
    for got, body in ((received[0], "We got your mail."), (received[1], "Thanks, it is done.")):
        assert got.rcpt_tos == ["eve@example.net"]
        head = got.raw.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
        names = sorted(line.split(b":")[0] for line in head if not line[:1].isspace())
        auto_headers = (
            [b"auto-submitted", b"x-auto-response-suppress"] if got is received[0] else []
        )
        assert names == sorted([*OWN_HEADERS, *auto_headers])
        sent = email.message_from_bytes(got.raw, policy=email.policy.default)
        assert sent.get_content_type() == "text/plain"
        assert sent.get_content().strip() == body
        subject = str(sent["Subject"]).strip()
        assert "Reply-To: evil@example.org" in subject and subject.startswith("Re: x")


async def test_an_agent_reply_with_links_and_line_breaks_is_sent_as_multipart_alternative(
    mailbox: tuple[Runtime, str, Any], dovecot: peers.Dovecot, sink: peers.SmtpSink
) -> None:
    """Agent replies were text only; a reply with formatting (a link, line breaks) now also
    carries a sanitized HTML part, as mail clients expect; a plain one-liner stays plain."""
    runtime = mailbox[0]
    cid, anna, first = await answered(
        mailbox, dovecot, sink, mail("ann@example.net", "Kettle", "<fmt-1@x>")
    )
    plain = email.message_from_bytes(first.raw, policy=email.policy.default)
    assert plain.get_content_type() == "text/plain"
    text = "Hi Ann,\n\nthe manual is at https://example.com/manual?p=2&x=1 <b>now</b>.\nBest"
    await runtime.db.write(agent_write, anna, cid, text)
    runtime.outbox.wake()
    received = (await sink.wait_for(2))[-1]
    message = email.message_from_bytes(received.raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/alternative"
    parts = {p.get_content_type(): p.get_content() for p in message.iter_parts()}
    assert (
        parts["text/plain"].strip() == text.replace("\n", "\r\n").strip()
        or parts["text/plain"].replace("\r\n", "\n").strip() == text
    )
    html = parts["text/html"]
    assert '<a href="https://example.com/manual?p=2&amp;x=1" rel="noopener noreferrer">' in html
    assert "&lt;b&gt;now&lt;/b&gt;" in html and "<br>" in html
