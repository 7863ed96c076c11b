"""``omniroute serve`` refuses the placeholder secrets shipped in deploy/ and secret keys of
too little entropy, naming the setting and never the value; the demo (``make run``), which
generates its own secrets, still serves."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from router.secret_check import weak_key
from tests import peers
from tests.support import FAKE_SECRET, SECRET_KEY, make_settings, server_env

ROOT = Path(__file__).resolve().parents[2]


def shipped(name: str) -> str:
    """The value deploy/omniroute.env ships for ``name``."""
    for line in (ROOT / "deploy" / "omniroute.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            return value.strip()
    raise AssertionError(f"{name} is not in deploy/omniroute.env")


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    return subprocess.run(
        [sys.executable, "-m", "router.cli", "serve"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,  # a server that starts instead of refusing fails the test here
        check=False,
    )


@pytest.mark.parametrize(
    "key",
    [
        shipped("OMNIROUTE_SECRET_KEY"),
        "bench-" + "x" * 40,  # what the benchmarks used to start serve with
        "0123456789abcdef" * 2,
        "ab" * 24,
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1234567",
    ],
)
def test_serve_refuses_a_placeholder_or_weak_secret_key(
    tmp_path: Path, sqlite_url: str, key: str
) -> None:
    settings = make_settings(tmp_path / "conf", sqlite_url)
    env = {**server_env(settings, peers.free_port()), "OMNIROUTE_SECRET_KEY": key}
    done = serve(env)
    assert done.returncode == 2, done.stderr
    assert "refusing to serve" in done.stderr and "OMNIROUTE_SECRET_KEY: " in done.stderr
    assert key not in done.stderr and key[:12] not in done.stderr


@pytest.mark.parametrize(
    ("channels", "extra_env", "where"),
    [
        # the example channels.yaml with deploy/omniroute.env's fake-inbox secret
        (
            (ROOT / "examples" / "channels.yaml").read_text(),
            {"OMNIROUTE_DEMO_FAKE_SECRET": shipped("OMNIROUTE_DEMO_FAKE_SECRET")},
            "inboxes.demo-sms.secret",
        ),
        # a fake inbox without a secret signs with the built-in, public default
        ("version: 1\ninboxes:\n  sms: {channel: sms, provider: fake}\n", {}, "inboxes.sms.secret"),
        (
            "version: 1\nmeta_apps:\n  main: {app_secret: changeme-please, verify_token: v}\n",
            {},
            "meta_apps.main.app_secret",
        ),
    ],
)
def test_serve_refuses_placeholder_channel_secrets(
    tmp_path: Path, sqlite_url: str, channels: str, extra_env: dict[str, str], where: str
) -> None:
    settings = make_settings(tmp_path / "conf", sqlite_url, channels=channels)
    env = {**server_env(settings, peers.free_port()), **extra_env}
    done = serve(env)
    assert done.returncode == 2, done.stderr
    assert f"{settings.channels_path}: {where}: is a placeholder" in done.stderr
    for value in (*extra_env.values(), "changeme-please"):
        assert value not in done.stderr


def test_random_keys_pass_and_the_tests_key_too() -> None:
    for _ in range(500):
        assert weak_key(secrets.token_hex(16)) is None  # 128 random bits, 32 hex digits
        assert weak_key(secrets.token_urlsafe(48)) is None  # what the demo generates
    assert weak_key(SECRET_KEY) is None
    assert weak_key(FAKE_SECRET) is not None  # (only the key needs entropy; see docs)


def test_the_demo_generates_its_secrets_and_serves(tmp_path: Path) -> None:
    port = peers.free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "demo", "--var", str(tmp_path / "var")],
            env={**clean, "OMNIROUTE_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert (tmp_path / "var" / "secret_key").stat().st_mode & 0o077 == 0
