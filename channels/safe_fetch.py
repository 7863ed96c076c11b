"""Fetch a URL a provider or a customer handed us (MMS media) without becoming an SSRF proxy.

A media URL in a webhook is attacker-influenced data (a signed webhook only proves Twilio
relayed it), so :func:`fetch_media` treats it like any untrusted URL:

* ``https`` only; the host must be **exactly** one of ``allowed_hosts`` (no suffix or prefix
  matching: ``api.twilio.com.evil.com`` and ``evil.com@api.twilio.com`` are refused);
  userinfo, backslashes, percent-encoded or non-ASCII hosts (IDN look-alikes), trailing
  dots and control characters are refused before anything is resolved.
* The host is resolved and **every** address must be public: private, loopback,
  link-local (169.254.169.254, the cloud metadata service), multicast, reserved,
  unspecified, shared (100.64/10), IPv6 ULA (fc00::/7) and IPv4-mapped/-embedding IPv6
  forms (``::ffff:127.0.0.1``, 6to4, Teredo, NAT64) are refused.
* The connection goes to the address that was checked (the URL is rewritten to the IP;
  ``Host`` and the TLS SNI/certificate name stay the hostname), so a DNS answer that changes
  between check and connect (DNS rebinding) cannot redirect it.
* Redirects are followed by hand (at most ``max_redirects``), each hop checked again from
  the start; Basic auth is sent only to ``auth_host`` (Twilio's API redirects media to a
  CDN/S3 that must not see our credentials).
* The body is streamed with a size cap (``Content-Length`` is checked first), and the
  ``Content-Type`` must match ``allowed_types`` before the body is read.

Every refusal or failure raises :class:`MediaRefused` with a reason fit for a log line (no
credentials in it).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = ["MediaRefused", "Resolver", "check_address", "fetch_media", "system_resolver"]

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``await resolver(host, port)`` -> the IP addresses (as strings) ``host`` resolves to."""

_HOST = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# IPv4 ranges Python's ipaddress flags as neither private nor reserved in every version.
_EXTRA_V4 = (
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT (shared address space)
    ipaddress.ip_network("192.0.0.0/24"),  # IETF protocol assignments
    ipaddress.ip_network("198.18.0.0/15"),  # benchmarking
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# SVG is XML that can carry scripts: a wildcard like image/* must not let it in by accident.
_SCRIPTABLE = frozenset({"image/svg+xml"})


class MediaRefused(Exception):
    """The media was not fetched: refused by policy or failed (``reason`` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Resolve ``host`` with the system resolver (``getaddrinfo``), every address family."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise MediaRefused(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    return [str(info[4][0]) for info in infos]


def check_address(address: str, *, allow_loopback: bool = False) -> str | None:
    """Why connecting to ``address`` is refused, or None when it is a public address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"not an IP address: {address!r}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"{ip} is an IPv4-mapped IPv6 address"
        if ip.sixtofour is not None or ip.teredo is not None:
            return f"{ip} embeds an IPv4 address (6to4/Teredo)"
        if ip in _NAT64 or ip in _NAT64_LOCAL:
            return f"{ip} is a NAT64 address"
        if ip in ipaddress.ip_network("fc00::/7"):
            return f"{ip} is a unique local (ULA) address"
        if ip.is_site_local:
            return f"{ip} is a site-local address"
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is a loopback address"
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_link_local, "link-local (cloud metadata lives here)"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (isinstance(ip, ipaddress.IPv4Address) and any(ip in n for n in _EXTRA_V4), "special"),
        (not ip.is_global, "not globally routable"),
    )
    for flagged, what in checks:
        if flagged:
            return f"{ip} is a {what} address"
    return None


def _type_allowed(content_type: str, allowed_types: Sequence[str]) -> bool:
    for pattern in allowed_types:
        pattern = pattern.strip().lower()
        if pattern == content_type:
            return True
        if (
            pattern.endswith("/*")
            and content_type.startswith(pattern[:-1])
            and content_type not in _SCRIPTABLE
        ):
            return True
    return False


def _checked_host(
    url: str, allowed_hosts: Sequence[str], allow_insecure: bool
) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path_and_query)`` of an acceptable URL, else MediaRefused."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F or c == "\\" for c in url):
        raise MediaRefused("the URL contains whitespace, control characters or backslashes")
    if not url.isascii():
        raise MediaRefused("the URL is not ASCII (look-alike host names are refused)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MediaRefused(f"malformed URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme != "https" and not (allow_insecure and scheme == "http"):
        raise MediaRefused(f"scheme {scheme or '(none)'!r} refused: https only")
    if "@" in parts.netloc:
        raise MediaRefused("credentials (userinfo) in the URL are refused")
    host = (parts.hostname or "").lower()
    if not host:
        raise MediaRefused("the URL has no host")
    literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None and not _HOST.match(host):
        raise MediaRefused(f"host {host!r} is not a plain DNS name")
    if literal is None and re.fullmatch(r"\d+|0x[0-9a-f]*", host.rsplit(".", 1)[-1]):
        # 127.1, 2130706433, 0x7f.1: resolvers read these as IPv4 numbers in odd notations.
        raise MediaRefused(f"host {host!r} is a numeric address in a non-standard notation")
    if host not in {h.strip().lower() for h in allowed_hosts}:
        raise MediaRefused(f"host {host!r} is not an allowed media host")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port if port is not None else (443 if scheme == "https" else 80), path


async def _resolve_checked(host: str, port: int, resolver: Resolver, allow_loopback: bool) -> str:
    """The address to connect to: every address of ``host`` must pass :func:`check_address`."""
    try:
        addresses = [ipaddress.ip_address(host).compressed]
    except ValueError:
        addresses = [a.split("%", 1)[0] for a in await resolver(host, port)]
    if not addresses:
        raise MediaRefused(f"{host} resolves to no address")
    for address in addresses:
        why = check_address(address, allow_loopback=allow_loopback)
        if why is not None:
            # One bad address is enough: with several A/AAAA records the connection could
            # land on any of them.
            raise MediaRefused(f"{host} resolves to a refused address: {why}")
    return addresses[0]


async def fetch_media(
    url: str,
    *,
    allowed_hosts: Sequence[str],
    max_bytes: int,
    allowed_types: Sequence[str],
    auth: tuple[str, str] | None = None,
    auth_host: str = "api.twilio.com",
    client: httpx.AsyncClient | None = None,
    allow_insecure: bool = False,
    resolver: Resolver = system_resolver,
    max_redirects: int = 5,
    timeout: float = 20.0,
) -> tuple[bytes, str]:
    """Fetch ``url`` under the rules of this module; returns ``(body, content_type)``.

    ``allowed_types`` holds MIME types or ``type/*`` wildcards (a wildcard never admits
    ``image/svg+xml``: list it explicitly to accept it). ``auth`` (user, password) is sent
    as HTTP Basic only to ``auth_host``. ``client`` is an httpx client to use (its
    redirect setting is overridden; it is not closed); by default a fresh one that ignores
    proxy environment variables (a proxy would resolve names itself, past our checks).
    ``timeout`` bounds the whole fetch, redirects included.

    ``allow_insecure`` is **for tests only**: it admits ``http`` and loopback addresses so
    a local fake can serve media. Never set it in production.
    """
    own = client is None
    http = client if client is not None else httpx.AsyncClient(trust_env=False)
    try:
        async with asyncio.timeout(timeout):
            return await _fetch(
                url,
                http,
                allowed_hosts=allowed_hosts,
                max_bytes=max_bytes,
                allowed_types=allowed_types,
                auth=auth,
                auth_host=auth_host.lower(),
                allow_insecure=allow_insecure,
                resolver=resolver,
                max_redirects=max_redirects,
            )
    except TimeoutError as exc:
        raise MediaRefused(f"fetching the media took longer than {timeout:g}s") from exc
    except httpx.HTTPError as exc:
        raise MediaRefused(f"fetching the media failed: {type(exc).__name__}") from exc
    finally:
        if own:
            await http.aclose()


async def _fetch(
    url: str,
    http: httpx.AsyncClient,
    *,
    allowed_hosts: Sequence[str],
    max_bytes: int,
    allowed_types: Sequence[str],
    auth: tuple[str, str] | None,
    auth_host: str,
    allow_insecure: bool,
    resolver: Resolver,
    max_redirects: int,
) -> tuple[bytes, str]:
    current = url
    for _hop in range(max_redirects + 1):
        scheme, host, port, path = _checked_host(current, allowed_hosts, allow_insecure)
        address = await _resolve_checked(host, port, resolver, allow_insecure)
        ip_host = f"[{address}]" if ":" in address else address
        default_port = 443 if scheme == "https" else 80
        host_header = host if port == default_port else f"{host}:{port}"
        request = http.build_request(
            "GET",
            f"{scheme}://{ip_host}:{port}{path}",
            # Connect to the checked address; the name stays in Host and in TLS (SNI and the
            # certificate check use sni_hostname), so rebinding the name changes nothing.
            headers={"Host": host_header, "Accept-Encoding": "identity"},
            extensions={"sni_hostname": host},
        )
        if auth is not None and host == auth_host:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            request.headers["Authorization"] = f"Basic {token}"
        # auth=None: a caller's client-wide auth must not ride along to redirect targets.
        response = await http.send(request, auth=None, stream=True, follow_redirects=False)
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise MediaRefused(f"redirect {response.status_code} without a Location")
                current = urljoin(current, location)
                continue
            if response.status_code != 200:
                raise MediaRefused(f"the media host answered HTTP {response.status_code}")
            return await _read(response, max_bytes, allowed_types)
        finally:
            await response.aclose()
    raise MediaRefused(f"more than {max_redirects} redirects")


async def _read(
    response: httpx.Response, max_bytes: int, allowed_types: Sequence[str]
) -> tuple[bytes, str]:
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not content_type or not _type_allowed(content_type, allowed_types):
        raise MediaRefused(f"content type {content_type or '(none)'!r} is not allowed")
    declared = response.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise MediaRefused(f"the media is {int(declared)} bytes, over {max_bytes}")
        except ValueError as exc:
            raise MediaRefused("invalid Content-Length") from exc
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise MediaRefused(f"the media is over {max_bytes} bytes")
    return bytes(body), content_type
