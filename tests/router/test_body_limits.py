"""Request bodies over their route's limit are refused with 413 while being read, never after
being buffered: JSON APIs, sign-in, uploads and webhooks, with a Content-Length or chunked.

Against a real ``omniroute serve`` (a subprocess): unauthenticated 64 MB bodies to four
routes, both ways, are answered 413 before the client has sent them, and the server's
resident memory hardly moves (it grew by the size of each body before)."""

from __future__ import annotations

import select
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from router.runtime import Runtime
from tests import peers
from tests.router.test_live import make_agent
from tests.support import (
    ServerProcess,
    client_for,
    make_settings,
    server_env,
    signed,
    started_runtime,
)

MB = 1024 * 1024
MULTIPART = "multipart/form-data; boundary=xyz"
PART = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
ROUTES = [
    ("/api/conversations/1/messages", "application/json"),  # JSON API, needs a token
    ("/console/login", "application/json"),  # sign-in
    ("/api/uploads", MULTIPART),  # uploads (one file streaming in), need a token
    ("/webhooks/fake/sms", "application/json"),  # a webhook, needs a signature
]


def push(port: int, path: str, content_type: str, total: int, *, chunked: bool) -> tuple[int, int]:
    """POST ``total`` bytes, 64 KB at a time, stopping as soon as the server answers.

    Returns (status, bytes sent before the answer came)."""
    block = b"x" * (64 * 1024)
    first = PART if content_type == MULTIPART else b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"{framing}\r\n\r\n".encode()
        )
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            piece = (first + block)[: total - sent] if sent == 0 else block[: total - sent]
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        if sent == total and chunked:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1]), sent


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(tmp_path: Path, sqlite_url: str) -> Iterator[ServerProcess]:
    settings = make_settings(tmp_path / "conf", sqlite_url)
    env = server_env(settings, peers.free_port())
    env["OMNIROUTE_MAX_UPLOAD_BYTES"] = str(8 * MB)  # (the default is 50 MB)
    proc = ServerProcess(env, tmp_path / "server.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_oversized_bodies_are_refused_while_they_are_read(server: ServerProcess) -> None:
    assert server.proc is not None
    pid, total = server.proc.pid, 64 * MB
    push(server.port, "/console/login", "application/json", 2 * MB, chunked=True)  # warm up
    before = rss(pid)
    for path, content_type in ROUTES:
        for chunked in (False, True):
            status, sent = push(server.port, path, content_type, total, chunked=chunked)
            assert status == 413, (path, chunked, status)
            # answered while the client was still sending: the rest was never read
            assert sent < total, (path, chunked)
    grown = rss(pid) - before
    # Each of the 8 bodies used to be buffered whole (64 MB and more per request).
    assert grown < 24 * MB, f"the server grew by {grown / MB:.0f} MB"
    # ... and the server still serves
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


@pytest.fixture
async def api(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    settings = make_settings(
        tmp_path / "conf",
        db_url,
        max_body_bytes=64 * 1024,
        max_upload_bytes=4 * MB,
        max_webhook_bytes=256 * 1024,
        max_signin_bytes=4 * 1024,
    )
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        yield runtime, client


async def chunks(data: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def multipart(size: int) -> bytes:
    """A well-formed upload of exactly ``size`` bytes (also sent where JSON is expected)."""
    end = b"\r\n--xyz--\r\n"
    return PART + b"x" * (size - len(PART) - len(end)) + end


@pytest.mark.parametrize(
    ("method", "path", "limit", "reads"),
    [
        ("POST", "/api/conversations/1/messages", 64 * 1024, True),
        ("PUT", "/api/admin/rules", 64 * 1024, False),
        ("POST", "/console/login", 4 * 1024, True),
        ("POST", "/survey/1/x/5", 4 * 1024, False),
        ("POST", "/api/uploads", 4 * MB, True),
        ("POST", "/webhooks/fake/sms", 256 * 1024, True),
        ("POST", "/webhooks/twilio/tw/sms", 256 * 1024, False),
    ],
)
async def test_each_route_has_its_limit_chunked_or_not(
    api: tuple[Runtime, httpx.AsyncClient], method: str, path: str, limit: int, reads: bool
) -> None:
    """Over the limit with a Content-Length: 413 before the route runs. Chunked: 413 as soon
    as the route has read past the limit (a route that answers without reading the body,
    for want of a token or of a handler, just answers)."""
    _, client = api
    headers = {"content-type": MULTIPART if path == "/api/uploads" else "application/json"}
    over = multipart(limit + 1)
    for content, refused in ((over, True), (chunks(over), reads)):
        answer = await client.request(method, path, content=content, headers=headers)
        assert (answer.status_code == 413) == refused, (path, answer.status_code, answer.text)
        if refused:
            assert answer.json()["error"] == "too_large" and answer.json()["limit"] == limit
            assert answer.headers["x-content-type-options"] == "nosniff"  # security headers
    # at the limit, the route itself answers (here: no token, bad signature or bad body)
    answer = await client.request(method, path, content=multipart(limit), headers=headers)
    assert answer.status_code != 413


async def test_bodies_within_the_limits_still_work(api: tuple[Runtime, httpx.AsyncClient]) -> None:
    runtime, client = api
    _, token = await make_agent(runtime, "anna")
    data = bytes(range(256)) * (3 * MB // 256)
    uploaded = await client.post(
        "/api/uploads",
        files={"file": ("big.bin", data, "application/octet-stream")},
        headers={"authorization": f"Bearer {token}"},
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["size"] == len(data)
    body, headers = signed({"messages": [{"id": "m1", "from": "+4917012345678", "text": "hi"}]})
    webhook = await client.post("/webhooks/fake/sms", content=chunks(body, 7), headers=headers)
    assert webhook.status_code == 200, webhook.text
