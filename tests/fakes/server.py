"""Serve an ASGI app with uvicorn from a daemon thread on a free local port (for fakes).

:class:`ThreadedASGIServer` is what ``FakeGraphServer`` and ``FakeTwilioServer`` run on::

    with ThreadedASGIServer(app, name="fake-thing") as server:
        httpx.get(server.url + "/ping")

The listening socket is bound (port 0) before uvicorn starts and handed to it, so there is
no port race. Signal handlers are not touched: uvicorn 0.54 only installs them from the main
thread (it has no ``install_signal_handlers`` switch any more; ``Server.capture_signals``
checks). Starting takes ~10 ms, stopping ~0.2 s (uvicorn's 0.1 s ticks).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp

__all__ = ["ServerStartTimeout", "ThreadedASGIServer"]


class ServerStartTimeout(TimeoutError, RuntimeError):
    """The server did not come up within its startup timeout.

    Both a ``TimeoutError`` and a ``RuntimeError``, so callers catching either still work.
    """


@dataclass(eq=False)
class ThreadedASGIServer:
    """Serves ``app`` on ``http://{host}:{port}`` (free port) with uvicorn in a daemon thread.

    ``ThreadedASGIServer(app, name=..., host=..., startup_timeout=..., on_stop=...)``; ``name``
    names the thread and appears in errors.

    * :meth:`start` binds the port, starts the thread and waits until uvicorn is serving;
      it raises ``RuntimeError`` (the cause chained) when uvicorn dies while starting, and
      :class:`ServerStartTimeout` after ``timeout`` (default ``startup_timeout``) seconds.
      Starting a running server is a ``RuntimeError``.
    * :meth:`stop` calls ``on_stop`` first (e.g. to release requests a fake keeps hanging,
      which would otherwise hold up uvicorn's graceful shutdown), asks uvicorn to exit, and
      forces it after ``timeout`` seconds. Stopping a stopped server does nothing.
    * ``port`` (and so ``url``) stays set after :meth:`stop`: requests to it then fail to
      connect. A stopped server can be started again (on a new port).
    """

    app: ASGIApp = field(repr=False)
    _: KW_ONLY
    name: str
    host: str = "127.0.0.1"
    startup_timeout: float = 10.0
    on_stop: Callable[[], None] | None = field(default=None, repr=False)
    port: int | None = field(default=None, init=False)
    _server: uvicorn.Server | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Started and not stopped since."""
        return self._thread is not None

    def start(self, timeout: float | None = None) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto is IPPROTO_TCP; with proto 0, Nagle + delayed ACK add ~40 ms per response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            loop="asyncio",
            interface="asgi3",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._error = None

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # surfaced by start()
                self._error = exc
            finally:
                sock.close()

        thread = threading.Thread(target=run, name=f"{self.name}-{self.port}", daemon=True)
        try:
            thread.start()
        except BaseException:
            sock.close()
            self._server = None
            raise
        self._thread = thread
        wait = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while not server.started:
            if self._error is not None or not thread.is_alive():
                error = self._error
                self.stop()
                raise RuntimeError(f"{self.name} failed to start: {error!r}") from error
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartTimeout(f"{self.name} not ready after {wait}s")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        try:
            if self.on_stop is not None:
                self.on_stop()
        finally:
            server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout)
            self._server = None
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
