"""Failpoints: one list of names (router/failpoints.py) that the code calls and
docs/delivery.md documents, and an unknown name is a start-up error, never a failpoint that
silently never fires. (The crash tests that use them are in test_crash.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from router import failpoints
from router.exceptions import ConfigError
from router.settings import load_settings
from tests.support import ROOT, SECRET_KEY

VALID = ", ".join(failpoints.NAMES)


def test_the_code_calls_exactly_the_named_failpoints() -> None:
    called: set[str] = set()
    for package in ("router", "channels", "adapters"):
        for path in (ROOT / package).rglob("*.py"):
            called.update(re.findall(r"\bfailpoint\(\s*\"([^\"]+)\"", path.read_text()))
    assert called == set(failpoints.NAMES)


def test_the_docs_list_the_failpoints_of_the_code() -> None:
    text = (ROOT / "docs" / "delivery.md").read_text()
    section = text.split("## Failpoints", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)
    assert documented == list(failpoints.NAMES)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("after_ingest_comit", f"unknown failpoint 'after_ingest_comit' (valid: {VALID})"),
        ("before_outbox_send,after_offer_commit@2", "unknown failpoint 'after_offer_commit'"),
        ("before_outbox_send@x", "failpoint 'before_outbox_send@x': the count must be a whole"),
        ("before_outbox_send@0", "failpoint 'before_outbox_send@0': the count must be at least 1"),
    ],
)
def test_a_bad_failpoint_spec_is_a_settings_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(failpoints=spec)
    assert info.value.message.startswith("invalid settings:\n  OMNIROUTE_FAILPOINTS: ")
    assert message in info.value.message


def test_valid_failpoints_are_armed_and_replaced() -> None:
    assert load_settings(failpoints="after_ingest_commit, before_outbox_send@3").failpoints
    try:
        failpoints.configure("after_ingest_commit, before_outbox_send@3")
        assert failpoints.active() == {"after_ingest_commit": 1, "before_outbox_send": 3}
        with pytest.raises(ValueError, match="unknown failpoint 'nope'"):
            failpoints.configure("nope")
        assert failpoints.active() == {"after_ingest_commit": 1, "before_outbox_send": 3}
    finally:
        failpoints.configure("")
    assert failpoints.active() == {}


def test_serve_refuses_an_unknown_failpoint(sqlite_url: str) -> None:
    env = {
        **os.environ,
        "OMNIROUTE_DATABASE_URL": sqlite_url,
        "OMNIROUTE_SECRET_KEY": SECRET_KEY,
        "OMNIROUTE_PORT": "0",
        "OMNIROUTE_FAILPOINTS": "after_provider_sent",
    }
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert (
        f"OMNIROUTE_FAILPOINTS: Value error, unknown failpoint 'after_provider_sent' (valid: {VALID})"
        in done.stderr
    )
