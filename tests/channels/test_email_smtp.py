"""channels.email_smtp against real SMTP servers: tests/peers.SmtpSink and small aiosmtpd
handlers of our own (in-process, free ports). The OAuth token endpoint is an
httpx.MockTransport: the peer under test is SMTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import logging
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from channels.base import PermanentSendError, TemporarySendError
from channels.email_smtp import (
    OAuth2Tokens,
    OAuthError,
    OutgoingAttachment,
    SmtpSettings,
    build_message,
    make_message_id,
    send,
    xoauth2_string,
)
from tests import peers
from tests.peers import SmtpSink, need

SECRET = b"message-id-secret"
INBOX = "support@example.com"
CUSTOMER = "customer@example.net"
DATE = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
USER = "support@example.com"
PASSWORD = "s3cret-Pa55word"
PARENT = "<CAF=x1y2@mail.example.net>"
ROOT = "<root-0001@mail.example.net>"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
TOKEN_URL = "https://login.example.com/oauth2/v2.0/token"


# -- helpers -----------------------------------------------------------------------------
def reply(**overrides: Any) -> EmailMessage:
    """An agent's reply to CUSTOMER, with whatever the test changes."""
    args: dict[str, Any] = {
        "from_address": INBOX,
        "from_name": "Zoë Agent",
        "to": CUSTOMER,
        "subject": "Re: Order 1234 — where is it?",
        "text": "Hello,\nit ships today.\n",
        "html": None,
        "attachments": (),
        "message_id": make_message_id(SECRET, 42, "example.com"),
        "in_reply_to": PARENT,
        "references": [ROOT],
        "auto": False,
        "date": DATE,
    }
    args.update(overrides)
    return build_message(**args)


def settings(port: int, **overrides: Any) -> SmtpSettings:
    args: dict[str, Any] = {
        "host": peers.LOCALHOST,
        "port": port,
        "security": "plain",
        "username": None,
        "auth": "none",
        "timeout": 10.0,
    }
    args.update(overrides)
    return SmtpSettings(**args)


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


@contextlib.contextmanager
def running(sink: SmtpSink) -> Iterator[SmtpSink]:
    started = need(sink.start)
    try:
        yield started
    finally:
        started.close()


class Recorder:
    """An aiosmtpd handler: 450 for busy@, 550 for nouser@, records the rest."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.startswith("busy@"):
            return "450 4.2.0 mailbox busy"
        if address.startswith("nouser@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), bytes(envelope.original_content)))
        return "250 2.0.0 queued"


@contextlib.contextmanager
def smtp_server(handler: object, **kwargs: Any) -> Iterator[int]:
    """aiosmtpd serving ``handler`` on a socket bound to port 0; yields the port."""
    try:
        controller_cls = peers._controller_class()  # the sink's race-free Controller
    except ImportError as exc:
        peers.unavailable(peers.PeerUnavailable("aiosmtpd", str(exc)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((peers.LOCALHOST, 0))
        sock.listen(16)
        sock.setblocking(False)
        controller = controller_cls(
            handler, sock, server_hostname="localhost", ready_timeout=10.0, **kwargs
        )
        controller.start()
        try:
            yield sock.getsockname()[1]
        finally:
            controller.stop()
    finally:
        sock.close()


class TokenEndpoint:
    """A scripted OAuth token endpoint; records the forms it was sent."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.forms: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and str(request.url) == TOKEN_URL
        form = httpx.QueryParams(request.content.decode())
        self.forms.append(dict(form.items()))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def granted(access: str, expires_in: int = 3600, refresh: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "access_token": access,
        "expires_in": expires_in,
    }
    if refresh is not None:
        body["refresh_token"] = refresh
    return httpx.Response(200, json=body)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- building ----------------------------------------------------------------------------
def test_message_id_is_deterministic() -> None:
    first = make_message_id(SECRET, 42, "example.com")
    assert first == make_message_id(SECRET, 42, "Example.COM")
    assert first.startswith("<or-42.") and first.endswith("@example.com>")
    assert len(first.split(".", 1)[1].split("@")[0]) == 8
    assert make_message_id(SECRET, 43, "example.com") != first
    assert make_message_id(b"other-secret", 42, "example.com") != first
    with pytest.raises(ValueError):
        make_message_id(SECRET, 42, "example.com>\r\nBcc: x")
    with pytest.raises(ValueError):
        make_message_id(b"", 42, "example.com")


def test_references_keep_root_and_newest_and_long_ids_stay_verbatim() -> None:
    long_id = "<" + "x" * 120 + "@mail.example.net>"
    refs = [ROOT] + [f"<r{i}@example.net>" for i in range(30)] + ["not an id <>", ROOT]
    msg = reply(references=refs, in_reply_to=long_id)
    raw = msg.as_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    threading = head.split("\r\nIn-Reply-To:", 1)[1].split("\r\nMIME-Version:", 1)[0]
    assert long_id in threading and "=?" not in threading  # folded, never encoded
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    parsed = parse(raw)
    ids = str(parsed["References"]).split()
    assert len(ids) == 20
    assert ids[0] == ROOT and ids[-1] == long_id
    assert ids[1:-1] == [f"<r{i}@example.net>" for i in range(12, 30)]
    assert str(parsed["In-Reply-To"]) == long_id


def test_addresses_are_never_repaired() -> None:
    with pytest.raises(ValueError):
        reply(to="customer@example.net\r\nBcc: evil@example.com")
    with pytest.raises(ValueError):
        reply(to="customer@example.net, evil@example.com")
    with pytest.raises(ValueError):
        reply(message_id="<x@y>\r\nBcc: evil@example.com")
    with pytest.raises(ValueError):
        reply(date=datetime(2024, 3, 4, 10, 0))  # naive


def test_settings_validate_and_hide_the_password() -> None:
    s = settings(587, security="starttls", username=USER, auth="password", password=PASSWORD)
    assert PASSWORD not in repr(s)
    with pytest.raises(ValueError):
        settings(25, security="ssl")
    with pytest.raises(ValueError):
        settings(25, auth="password", username=USER)  # no password
    with pytest.raises(ValueError):
        settings(25, auth="xoauth2")  # no username
    assert "refresh" not in repr(OAuth2Tokens(TOKEN_URL, "client", "refresh-secret"))


def test_xoauth2_string() -> None:
    decoded = base64.b64decode(xoauth2_string("me@example.com", "tok"))
    assert decoded == b"user=me@example.com\x01auth=Bearer tok\x01\x01"


# -- delivery to the sink ----------------------------------------------------------------
async def test_reply_with_html_attachment_and_inline_image_arrives() -> None:
    message_id = make_message_id(SECRET, 42, "example.com")
    html = '<p>Hello,</p><p>it ships today.</p><img src="cid:logo@example.com">'
    msg = reply(
        html=html,
        attachments=[
            OutgoingAttachment("invoice März.pdf", "application/pdf", PDF),
            OutgoingAttachment(
                "logo.png", "image/png", PNG, inline=True, content_id="logo@example.com"
            ),
        ],
        references=[ROOT, "<mid-0002@mail.example.net>"],
        reply_to="replies@example.com",
    )
    with running(SmtpSink()) as sink:
        await send(settings(sink.port), msg)
        (mail_from, rcpt_tos, raw), *_ = await sink.wait_for(1)

    assert mail_from == INBOX and rcpt_tos == [CUSTOMER]
    got = parse(raw)
    sender = got["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == ("Zoë Agent", INBOX)
    assert [a.addr_spec for a in got["To"].addresses] == [CUSTOMER]
    assert got["Reply-To"].addresses[0].addr_spec == "replies@example.com"
    assert str(got["Subject"]) == "Re: Order 1234 — where is it?"
    assert str(got["Message-ID"]) == message_id
    assert str(got["In-Reply-To"]) == PARENT
    assert str(got["References"]).split() == [ROOT, "<mid-0002@mail.example.net>", PARENT]
    assert got["Date"].datetime == DATE
    assert "Auto-Submitted" not in got

    assert got.get_content_type() == "multipart/mixed"
    plain = got.get_body(("plain",))
    rich = got.get_body(("html",))
    # The parser keeps the wire's CRLF inside bodies.
    assert plain is not None
    assert plain.get_content().replace("\r\n", "\n") == "Hello,\nit ships today.\n"
    assert rich is not None and rich.get_content().strip() == html
    attachments = list(got.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["invoice März.pdf"]
    assert attachments[0].get_content_type() == "application/pdf"
    assert attachments[0].get_content() == PDF

    (related,) = [p for p in got.walk() if p.get_content_type() == "multipart/related"]
    html_part, image = list(related.iter_parts())
    assert html_part.get_content_type() == "text/html"
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == PNG


async def test_auto_submitted_only_on_automatic_messages() -> None:
    with running(SmtpSink()) as sink:
        await send(settings(sink.port), reply(subject="human", auto=False))
        await send(settings(sink.port), reply(subject="robot", auto=True))
        received = await sink.wait_for(2)
    by_subject = {str(m["Subject"]): m for m in (parse(r.raw) for r in received)}
    assert "Auto-Submitted" not in by_subject["human"]
    assert by_subject["robot"]["Auto-Submitted"] == "auto-replied"


async def test_header_injection_is_neutralized() -> None:
    evil = "\r\nBcc: evil@example.com"
    msg = reply(
        from_name=f"Agent{evil}",
        subject=f"Hello{evil}\nX-Injected: yes",
        attachments=[OutgoingAttachment(f"a.txt{evil}", "text/plain", b"hi")],
    )
    with running(SmtpSink()) as sink:
        await send(settings(sink.port), msg)
        (_, rcpt_tos, raw), *_ = await sink.wait_for(1)
    assert rcpt_tos == [CUSTOMER]
    got = parse(raw)
    assert "Bcc" not in got and "X-Injected" not in got
    assert b"\nBcc:" not in raw and b"\nX-Injected:" not in raw
    assert str(got["Subject"]) == "Hello Bcc: evil@example.com X-Injected: yes"
    sender = got["From"].addresses
    assert [a.addr_spec for a in sender] == [INBOX]
    assert sender[0].display_name == "Agent Bcc: evil@example.com"


# -- TLS and authentication --------------------------------------------------------------
async def test_starttls_and_auth_plain() -> None:
    def check(mechanism: str, login: str, secret: str) -> bool:
        return login == USER and secret == PASSWORD

    with running(SmtpSink(tls=True, auth_handler=check, auth_required=True)) as sink:
        good = settings(
            sink.port,
            security="starttls",
            username=USER,
            auth="password",
            password=PASSWORD,
            tls_context=sink.client_tls_context(),
        )
        await send(good, reply())
        assert len(await sink.wait_for(1)) == 1
        assert sink.auth_attempts == [("PLAIN", USER, PASSWORD)]

        wrong = "wrong-" + PASSWORD
        bad = settings(
            sink.port,
            security="starttls",
            username=USER,
            auth="password",
            password=wrong,
            tls_context=sink.client_tls_context(),
        )
        with pytest.raises(PermanentSendError) as info:
            await send(bad, reply())
        assert info.value.code == "535"
        assert "535" in info.value.reason
        for text in (info.value.reason, str(info.value), repr(info.value)):
            assert wrong not in text and PASSWORD not in text

        # The default context checks the certificate: a self-signed one is refused.
        untrusted = settings(
            sink.port, security="starttls", username=USER, auth="password", password=PASSWORD
        )
        with pytest.raises(TemporarySendError, match="TLS"):
            await send(untrusted, reply())
        assert len(sink.messages) == 1


async def test_starttls_is_never_skipped() -> None:
    with running(SmtpSink()) as sink:  # no STARTTLS offered
        with pytest.raises(TemporarySendError, match="STARTTLS"):
            await send(settings(sink.port, security="starttls"), reply())
        assert sink.messages == []


async def test_implicit_tls(tmp_path: Path) -> None:
    cert, key = need(lambda: peers.generate_self_signed_cert(tmp_path))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    recorder = Recorder()
    with smtp_server(recorder, ssl_context=server_context) as port:
        client_context = ssl.create_default_context(cafile=str(cert))
        await send(settings(port, security="tls", tls_context=client_context), reply())
    assert [rcpt for rcpt, _ in recorder.messages] == [[CUSTOMER]]


async def test_xoauth2_exchanges_caches_and_refreshes_tokens() -> None:
    endpoint = TokenEndpoint(
        granted("access-1", 3600, refresh="refresh-2"), granted("access-2", 3600)
    )
    clock = Clock()

    def check(mechanism: str, login: str, secret: str) -> bool:
        return mechanism == "XOAUTH2" and login == USER and secret in ("access-1", "access-2")

    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as client:
        tokens = OAuth2Tokens(
            TOKEN_URL,
            "client-id",
            "refresh-1",
            "client-secret",
            "https://outlook.office.com/SMTP.Send offline_access",
            client=client,
            now=clock,
        )
        with running(SmtpSink(auth_handler=check, auth_required=True)) as sink:
            oauth = settings(sink.port, username=USER, auth="xoauth2")
            await send(oauth, reply(), tokens=tokens)
            clock.t += 3500  # still within expires_in minus the safety margin: cached
            await send(oauth, reply(), tokens=tokens)
            clock.t += 100  # past it: refreshed with the rotated refresh token
            await send(oauth, reply(), tokens=tokens)
            assert len(await sink.wait_for(3)) == 3

    assert [(a.mechanism, a.login, a.secret) for a in sink.auth_attempts] == [
        ("XOAUTH2", USER, "access-1"),
        ("XOAUTH2", USER, "access-1"),
        ("XOAUTH2", USER, "access-2"),
    ]
    assert endpoint.forms == [
        {
            "grant_type": "refresh_token",
            "client_id": "client-id",
            "refresh_token": "refresh-1",
            "client_secret": "client-secret",
            "scope": "https://outlook.office.com/SMTP.Send offline_access",
        },
        {
            "grant_type": "refresh_token",
            "client_id": "client-id",
            "refresh_token": "refresh-2",
            "client_secret": "client-secret",
            "scope": "https://outlook.office.com/SMTP.Send offline_access",
        },
    ]


async def test_concurrent_callers_share_one_refresh() -> None:
    endpoint = TokenEndpoint(granted("access-1", refresh="refresh-2"), granted("access-2"))
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as client:
        tokens = OAuth2Tokens(TOKEN_URL, "client-id", "refresh-1", client=client, now=Clock())
        assert await asyncio.gather(*(tokens.token() for _ in range(5))) == ["access-1"] * 5
    assert [form["refresh_token"] for form in endpoint.forms] == ["refresh-1"]


async def test_xoauth2_refused_token_is_permanent_and_not_reused() -> None:
    endpoint = TokenEndpoint(granted("revoked-token"), granted("fresh-token"))

    def check(mechanism: str, login: str, secret: str) -> bool:
        return secret == "fresh-token"

    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as client:
        tokens = OAuth2Tokens(TOKEN_URL, "client-id", "refresh-1", client=client, now=Clock())
        with running(SmtpSink(auth_handler=check, auth_required=True)) as sink:
            oauth = settings(sink.port, username=USER, auth="xoauth2")
            with pytest.raises(PermanentSendError) as info:
                await send(oauth, reply(), tokens=tokens)
            assert info.value.code == "535"
            assert "revoked-token" not in str(info.value)
            assert xoauth2_string(USER, "revoked-token") not in str(info.value)
            await send(oauth, reply(), tokens=tokens)  # the refused token was dropped
            assert len(await sink.wait_for(1)) == 1
    assert [a.secret for a in sink.auth_attempts] == ["revoked-token", "fresh-token"]
    assert len(endpoint.forms) == 2


async def test_oauth_invalid_grant_is_permanent() -> None:
    refused = httpx.Response(
        400,
        json={
            "error": "invalid_grant",
            "error_description": "AADSTS70008: The refresh token has expired (refresh-1).",
        },
    )
    endpoint = TokenEndpoint(refused)
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as client:
        tokens = OAuth2Tokens(TOKEN_URL, "client-id", "refresh-1", "shh", client=client)
        with running(SmtpSink(auth_required=True)) as sink:
            oauth = settings(sink.port, username=USER, auth="xoauth2")
            with pytest.raises(OAuthError) as info:
                await send(oauth, reply(), tokens=tokens)
            assert sink.auth_attempts == []  # failed before connecting
    assert isinstance(info.value, PermanentSendError)
    assert info.value.code == "invalid_grant"
    assert "AADSTS70008" in info.value.reason
    assert "refresh-1" not in info.value.reason and "shh" not in info.value.reason


@pytest.mark.parametrize(
    ("answer", "retry_after"),
    [
        (httpx.Response(503, headers={"Retry-After": "30"}, text="busy"), 30.0),
        (httpx.Response(429, json={"error": "temporarily_unavailable"}), None),
        (httpx.ConnectError("connection refused"), None),
        (httpx.ReadTimeout("timed out"), None),
        (httpx.Response(200, json={"token_type": "Bearer"}), None),  # no access_token
    ],
)
async def test_oauth_outages_are_temporary(
    answer: httpx.Response | Exception, retry_after: float | None
) -> None:
    endpoint = TokenEndpoint(answer)
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as client:
        tokens = OAuth2Tokens(TOKEN_URL, "client-id", "refresh-1", client=client)
        with pytest.raises(TemporarySendError) as info:
            await tokens.token()
    assert info.value.retry_after == retry_after
    assert "refresh-1" not in info.value.reason


# -- classification ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recipient", "error", "code", "text"),
    [
        ("busy@example.net", TemporarySendError, None, "450 4.2.0 mailbox busy"),
        ("nouser@example.net", PermanentSendError, "550", "550 5.1.1 no such user"),
    ],
)
async def test_refused_recipients(
    recipient: str, error: type[Exception], code: str | None, text: str
) -> None:
    recorder = Recorder()
    with smtp_server(recorder) as port:
        with pytest.raises(error) as info:
            await send(settings(port), reply(to=recipient))
        await send(settings(port), reply())  # the server itself is fine
    assert text in str(info.value)
    assert getattr(info.value, "code", None) == code
    assert [rcpt for rcpt, _ in recorder.messages] == [[CUSTOMER]]


async def test_partly_refused_recipients_count_as_sent(caplog: pytest.LogCaptureFixture) -> None:
    # A retry would deliver a second copy to those who got it: logged, not raised.
    msg = reply()
    msg["Cc"] = "nouser@example.net"
    recorder = Recorder()
    with smtp_server(recorder) as port, caplog.at_level(logging.WARNING, "channels.email_smtp"):
        await send(settings(port), msg)
    assert [rcpt for rcpt, _ in recorder.messages] == [[CUSTOMER]]
    assert "nouser@example.net" in caplog.text and "550 5.1.1" in caplog.text


async def test_authentication_required_is_permanent() -> None:
    with running(SmtpSink(auth_required=True)) as sink, pytest.raises(PermanentSendError) as info:
        await send(settings(sink.port), reply())
    assert info.value.code == "530"
    assert "530 5.7.0 Authentication required" in info.value.reason


async def test_refused_connection_is_temporary() -> None:
    port = peers.free_port()  # bound and released: nobody listens there
    with pytest.raises(TemporarySendError, match="unreachable"):
        await send(settings(port), reply())


async def test_silent_server_times_out_temporarily() -> None:
    closed = asyncio.Event()

    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()
        closed.set()

    server = await asyncio.start_server(never_greet, peers.LOCALHOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TemporarySendError, match="timed out"):
            await send(settings(port, timeout=0.3), reply())
        await asyncio.wait_for(closed.wait(), 5)  # and the connection was closed
    finally:
        server.close()
        await server.wait_closed()


def test_formatted_text_gets_a_sanitized_html_part() -> None:
    from channels.email_smtp import text_to_html

    assert text_to_html("Thanks, it is done.") is None  # one line, no link: text only
    html = text_to_html(
        "Hi Ann,\n\nsee https://example.com/x?a=1&b=2. <script>alert(1)</script>\nThanks"
    )
    assert html is not None
    assert '<a href="https://example.com/x?a=1&amp;b=2" rel="noopener noreferrer">' in html
    assert "&lt;script&gt;" in html and "<script" not in html  # the agent's text is text
    assert html.count("<p>") == 2 and "<br>" in html
    tricky = text_to_html('a link "https://x.example/" onmouseover=alert(1) and javascript:x()')
    assert tricky is not None and "onmouseover=" not in tricky.split(">", 1)[0]
    assert 'href="javascript' not in tricky
