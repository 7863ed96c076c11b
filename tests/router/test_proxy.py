"""Behind a proxy: ``OMNIROUTE_TRUSTED_PROXIES`` names the proxies whose X-Forwarded-For is
believed, and every per-IP limit keys on the real client.

A tiny HTTP proxy on loopback (connecting to the server from 127.0.0.2, appending the
client's address to X-Forwarded-For as Caddy and nginx do) stands in front of a real
``omniroute serve``. Clients connect to it from 127.0.0.3 and 127.0.0.4: their sign-in and
bad-signature limits are separate. A client talking to the server directly is not a trusted
proxy: whatever X-Forwarded-For it sends is ignored."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.exceptions import ConfigError
from router.settings import load_settings
from tests import peers
from tests.support import ServerProcess, make_settings, server_env

PROXY_SOURCE = "127.0.0.2"


class _Forward(socketserver.BaseRequestHandler):
    """One client connection: add the client's address to X-Forwarded-For, then pipe."""

    server: _Proxy

    def handle(self) -> None:
        client = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                return
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        peer = self.client_address[0].encode()
        forwarded = [line for line in lines[1:] if line.lower().startswith(b"x-forwarded-for:")]
        others = [line for line in lines[1:] if line not in forwarded]
        chain = b", ".join([*(line.split(b":", 1)[1].strip() for line in forwarded), peer])
        request = b"\r\n".join([lines[0], *others, b"X-Forwarded-For: " + chain])
        upstream = socket.create_connection(
            ("127.0.0.1", self.server.upstream_port), source_address=(PROXY_SOURCE, 0)
        )
        with upstream:
            upstream.sendall(request + b"\r\n\r\n" + rest)
            pump = threading.Thread(target=_pipe, args=(client, upstream), daemon=True)
            pump.start()
            _pipe(upstream, client)
            pump.join(10)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _Proxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream_port = upstream_port


@pytest.fixture
def proxied(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[ServerProcess, str]]:
    settings = make_settings(tmp_path / "conf", sqlite_url)
    env = server_env(settings, peers.free_port())
    env["OMNIROUTE_TRUSTED_PROXIES"] = f"{PROXY_SOURCE}, 10.0.0.0/8"
    server = ServerProcess(env, tmp_path / "server.log")
    server.start()
    proxy = _Proxy(server.port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        proxy.server_close()
        server.stop()


def client_from(address: str, base: str) -> httpx.Client:
    return httpx.Client(
        base_url=base,
        transport=httpx.HTTPTransport(local_address=address),
        headers={"connection": "close"},  # one request per connection, as the proxy expects
        timeout=30,
    )


def sign_in(client: httpx.Client, **headers: str) -> int:
    return client.post("/console/login", json={"token": "wrong"}, headers=headers).status_code


def forged_webhook(client: httpx.Client, **headers: str) -> int:
    return client.post(
        "/webhooks/fake/sms", content=b"{}", headers={"x-fake-signature": "sha256=00", **headers}
    ).status_code


def test_limits_key_on_the_client_behind_a_trusted_proxy(
    proxied: tuple[ServerProcess, str],
) -> None:
    server, via_proxy = proxied
    with (
        client_from("127.0.0.3", via_proxy) as alice,
        client_from("127.0.0.4", via_proxy) as bob,
        client_from("127.0.0.1", server.url) as direct,
    ):
        # Alice uses up her sign-in attempts, claiming other addresses does not help her
        assert [sign_in(alice) for _ in range(10)] == [401] * 10
        assert sign_in(alice) == 429
        assert sign_in(alice, **{"x-forwarded-for": "198.51.100.7"}) == 429
        # Bob, behind the same proxy, is someone else
        assert sign_in(bob) == 401
        # the same for bad webhook signatures: Alice's forgeries do not limit Bob
        assert [forged_webhook(alice) for _ in range(20)] == [403] * 20
        assert forged_webhook(alice) == 429
        assert forged_webhook(bob) == 403

        # a client that is not a trusted proxy cannot pick its address
        spoofed = [sign_in(direct, **{"x-forwarded-for": f"203.0.113.{i}"}) for i in range(11)]
        assert spoofed == [401] * 10 + [429]
        assert sign_in(bob) == 401  # ... nor spend Bob's attempts by claiming to be him
        assert sign_in(direct, **{"x-forwarded-for": "127.0.0.4"}) == 429


def test_trusted_proxies_are_passed_to_uvicorn_and_checked() -> None:
    assert load_settings().proxy_options() == {"proxy_headers": False}
    options = load_settings(trusted_proxies="172.28.0.10, fd00::/8").server_options()
    assert options["proxy_headers"] is True
    assert options["forwarded_allow_ips"] == "172.28.0.10,fd00::/8"
    assert options["ws_max_size"] > 0  # the websocket options stay
    for bad, message in (("caddy", "entry 1 is not"), ("10.0.0.1, *", "'*' would believe")):
        with pytest.raises(ConfigError) as raised:
            load_settings(trusted_proxies=bad)
        assert f"OMNIROUTE_TRUSTED_PROXIES: Value error, {message}" in raised.value.message
