"""Shared test plumbing.

Real peers: tests call ``peers.need(...)``; a peer that cannot be had here skips the test,
or fails it when ``OMNIROUTE_REQUIRE_PEERS=1`` (as ``.ci/run`` sets). The run ends with
``peers: N skipped (names)``, also written to ``.pytest-peers.txt`` for ``make test``.
"""

from __future__ import annotations

import os
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
