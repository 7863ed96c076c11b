"""An asynchronous HTTP client for ``twilio.rest.Client`` on httpx.

Copied unchanged (apart from this docstring and the imports) from ``tests/fakes/twilio.py``,
whose docstring says it may move into production as is: channels may not import ``tests``.

Why not twilio's own async client: ``AsyncTwilioHttpClient`` (aiohttp) emits a
DeprecationWarning and does not honour a ``timeout`` given to its constructor. This one also
lets httpx's network exceptions through, so the SMS channel can tell "not sent" (connect
errors) from "maybe sent" (read timeouts) before a non-idempotent create is retried.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
from twilio.http import AsyncHttpClient
from twilio.http.response import Response as TwilioResponse

__all__ = ["HttpxTwilioClient", "rewrite_base_url"]

_logger = logging.getLogger("twilio.httpx_client")
_JSON_CONTENT_TYPES = ("application/json", "application/scim+json")


def rewrite_base_url(url: str, base: str) -> str:
    """Replace scheme and host of ``url`` by those of ``base``; keep path and query.

    A path in ``base`` is prepended: ``rewrite_base_url("https://api.twilio.com/2010-04-01/x",
    "http://127.0.0.1:8000/twilio")`` gives ``"http://127.0.0.1:8000/twilio/2010-04-01/x"``.
    """
    target = urlsplit(url)
    new = urlsplit(base)
    path = new.path.rstrip("/") + target.path
    return urlunsplit((new.scheme, new.netloc, path, target.query, target.fragment))


# twilio ships no type information: its base class is Any to mypy (``misc`` under --strict).
class HttpxTwilioClient(AsyncHttpClient):  # type: ignore[misc, unused-ignore]
    """Asynchronous ``twilio`` HTTP client on httpx (replaces ``AsyncTwilioHttpClient``).

    Use it as ``Client(sid, token, http_client=HttpxTwilioClient(timeout=10))`` and call the
    ``*_async`` methods of the Twilio client; close it with ``await http.close()`` (or use it
    as an async context manager). Compared with twilio's aiohttp client it emits no
    DeprecationWarning and it honours ``timeout`` given to the constructor.

    * ``auth`` is a ``(username, password)`` tuple sent as HTTP Basic auth.
    * ``data`` is form-encoded (list values become repeated keys, e.g. ``MediaUrl``); when
      the request's ``Content-Type`` header is JSON it is sent as a JSON body instead, like
      twilio's own ``TwilioHttpClient``.
    * ``timeout`` (seconds) per request, else the constructor's ``timeout``, else the httpx
      client's own timeout (httpx's default is 5 s; an ``httpx.AsyncClient`` passed in keeps
      its configuration). Unlike twilio's clients, ``None`` never silently means "no timeout".
    * Errors: HTTP error statuses are returned as responses; the twilio client turns them
      into ``TwilioRestException`` as usual. **Network errors are not mapped**: httpx's
      exceptions (``httpx.ConnectError``, ``httpx.ReadTimeout``, ... all ``httpx.TransportError``)
      propagate unchanged, so a caller can tell "not sent" (``httpx.ConnectError``,
      ``httpx.ConnectTimeout``) from "maybe sent" (``httpx.ReadTimeout``,
      ``httpx.RemoteProtocolError``) before deciding to retry a non-idempotent create.
    * ``rewrite_base`` (optional) sends every request, whatever Twilio domain
      (``api.twilio.com``, ``messaging.twilio.com``, ...), to that base URL instead.

    ``last_response`` holds the last ``twilio.http.response.Response`` (its ``headers`` is
    an ``httpx.Headers``, case-insensitive), e.g. to read ``Retry-After`` after a 429, since
    ``TwilioRestException`` does not carry response headers.
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        rewrite_base: str | None = None,
        client: httpx.AsyncClient | None = None,
        trust_env: bool = True,
        logger: logging.Logger = _logger,
    ) -> None:
        super().__init__(logger, True, timeout)
        self.rewrite_base = rewrite_base
        self._client = client if client is not None else httpx.AsyncClient(trust_env=trust_env)
        self._owns_client = client is None
        self.last_response: TwilioResponse | None = None

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        """Make one HTTP request; see the class docstring for the conventions."""
        if timeout is not None and timeout <= 0:
            raise ValueError(timeout)
        effective_timeout: Any = timeout if timeout is not None else self.timeout
        if effective_timeout is None:
            effective_timeout = httpx.USE_CLIENT_DEFAULT
        target = rewrite_base_url(url, self.rewrite_base) if self.rewrite_base else url
        content_type = ""
        for key, value in (headers or {}).items():
            if key.lower() == "content-type":
                content_type = value.split(";", 1)[0].strip().lower()
        body: dict[str, Any] = {}
        if data is not None:
            if isinstance(data, str | bytes):
                body["content"] = data
            elif content_type in _JSON_CONTENT_TYPES:
                body["json"] = data
            else:
                body["data"] = data
        self.log_request(
            {"method": method.upper(), "url": target, "params": params, "headers": headers}
        )
        self._test_only_last_response = None
        response = await self._client.request(
            method.upper(),
            target,
            params=cast(Any, params),
            headers=headers,
            auth=auth,
            timeout=effective_timeout,
            follow_redirects=allow_redirects,
            **body,
        )
        self.log_response(response.status_code, cast(Any, response))
        result = TwilioResponse(response.status_code, response.text, response.headers)
        self._test_only_last_response = result
        self.last_response = result
        return result

    async def close(self) -> None:
        """Close the underlying httpx client if this object created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> HttpxTwilioClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
