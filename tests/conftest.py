"""Shared test plumbing.

Real peers: tests call ``peers.need(...)``; a peer that cannot be had here skips the test,
or fails it when ``OMNIROUTE_REQUIRE_PEERS=1`` (as ``.ci/run`` sets). The run ends with
``peers: N skipped (names)``, also written to ``.pytest-peers.txt`` for ``make test``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests import peers

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_PEERS = os.environ.get("OMNIROUTE_REQUIRE_PEERS") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.skipped and peers.SKIP_PREFIX in str(report.longrepr):
        if REQUIRE_PEERS:  # belt and braces: a peer skip from any path fails under CI
            report.outcome = "failed"
        else:
            name = str(report.longrepr).split(peers.SKIP_PREFIX, 1)[1].split(":", 1)[0]
            peers.skipped_peers.add(name)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    names = sorted(peers.skipped_peers)
    line = f"peers: {len(names)} skipped ({', '.join(names) if names else 'none'})"
    terminalreporter.write_line(line)
    (ROOT / ".pytest-peers.txt").write_text(line + "\n")


def pytest_sessionfinish(session: pytest.Session) -> None:
    peers.stop_private_fallbacks()


# A test that hangs is first described (every thread, and every task of a running event
# loop, which is where an asyncio hang hides), then failed by pytest-timeout (pyproject).
HANG_REPORT_AFTER = float(os.environ.get("OMNIROUTE_HANG_REPORT_AFTER", "240"))


def _describe_hang(name: str) -> None:
    out = sys.__stderr__ or sys.stderr
    print(f"\n=== {name} still running after {HANG_REPORT_AFTER:.0f}s ===", file=out)
    faulthandler.dump_traceback(file=out, all_threads=True)
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    for loop in loops:
        if not loop.is_running():
            continue
        for task in list(asyncio.all_tasks(loop)):
            print(f"--- {task!r}", file=out)
            task.print_stack(file=out)
    out.flush()


@pytest.fixture(autouse=True)
def _hang_report(request: pytest.FixtureRequest) -> Iterator[None]:
    timer = threading.Timer(HANG_REPORT_AFTER, _describe_hang, (request.node.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# -- the server under test ---------------------------------------------------------------

import httpx  # noqa: E402

from adapters.clock import FakeClock  # noqa: E402
from router.runtime import Runtime  # noqa: E402
from router.settings import Settings  # noqa: E402
from tests import support  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    with support.database_url(backend, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with support.database_url("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return support.make_settings(tmp_path / "conf", db_url)


@pytest.fixture
async def runtime(settings: Settings, clock: FakeClock) -> AsyncIterator[Runtime]:
    async with support.started_runtime(settings, clock) as rt:
        yield rt


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with support.client_for(runtime) as c:
        yield c


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A migrated PostgreSQL database of its own (for tests of several processes)."""
    with support.database_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def pg_settings(tmp_path: Path, pg_url: str) -> Settings:
    return support.make_settings(tmp_path / "conf", pg_url)
