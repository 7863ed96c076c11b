"""Settings, channels.yaml, migrations and the server CLI: clear errors, nothing leaked."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from router.cli import app
from router.exceptions import ConfigError
from router.migrate import head_revision, pending_diff, upgrade
from router.settings import Settings, load_settings
from tests.router.test_pipeline import settle
from tests.support import (
    CHANNELS,
    ROOT,
    RULES,
    client_for,
    make_settings,
    post_fake,
    started_runtime,
)

runner = CliRunner()
SECRET = "a-very-secret-value-that-must-never-be-printed-123"


def run(
    args: list[str], env: dict[str, str] | None = None, input_: str | None = None
) -> tuple[int, str]:
    result = runner.invoke(app, args, env=env, input=input_)
    return result.exit_code, result.output


def test_invalid_settings_name_the_variable_never_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(port="http", secret_key="short-" + SECRET[:10], database_url="mysql://x")
    message = info.value.message
    assert (
        "OMNIROUTE_PORT:" in message
        and "OMNIROUTE_SECRET_KEY: Value error, must be at least 32 characters" in message
    )
    assert (
        "OMNIROUTE_DATABASE_URL: Value error, must start with sqlite:// or postgresql://" in message
    )
    assert SECRET[:10] not in message and "mysql" not in message


def test_serve_without_a_secret_names_the_field_only(tmp_path: Path, sqlite_url: str) -> None:
    env = {"OMNIROUTE_DATABASE_URL": sqlite_url, "OMNIROUTE_SECRET_KEY": ""}
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve"],
        env={**os.environ, **env, "OMNIROUTE_SECRET_KEY": "x" * 5 + SECRET[:3]},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert (
        "OMNIROUTE_SECRET_KEY: Value error, must be at least 32 characters" in done.stderr
        and SECRET[:3] not in done.stderr.replace("OMNIROUTE", "")
    )
    env_without = {k: v for k, v in os.environ.items() if k != "OMNIROUTE_SECRET_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve"],
        env={**env_without, "OMNIROUTE_DATABASE_URL": sqlite_url},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr.strip()) == (
        2,
        "error: OMNIROUTE_SECRET_KEY: required to serve (32+ random characters)",
    )


def test_serve_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMNIROUTE_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "OMNIROUTE_SECRET_KEY": SECRET,
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
    assert done.returncode == 2
    assert (
        "the database is at migration none" in done.stderr
        and "run `omniroute db upgrade`" in done.stderr
    )


def test_channels_check_reports_located_errors_and_names_missing_variables(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    path = tmp_path / "channels.yaml"
    path.write_text(
        'version: 1\ninboxes:\n  sms: {channel: sms, provider: fake, secret: "${NOT_SET_ANYWHERE}", default_queue: genral, contnuity: join_open}\n'
    )
    code, out = run(["channels", "check", str(path), "--rules", str(rules)])
    assert code == 1
    assert out.splitlines() == [
        f"{path}:3:47: inboxes.sms.secret: environment variable NOT_SET_ANYWHERE is not set",
        f'{path}:3:85: inboxes.sms.default_queue: unknown queue "genral" (did you mean "general"?)',
        f'{path}:3:93: inboxes.sms: unknown key "contnuity" (did you mean "continuity"?)',
    ]
    path.write_text(CHANNELS)
    assert run(["channels", "check", str(path), "--rules", str(rules)]) == (
        0,
        "ok: 3 inboxes, 0 Meta apps\n",
    )


def test_secret_values_never_appear_in_channels_errors(tmp_path: Path) -> None:
    path = tmp_path / "channels.yaml"
    path.write_text(
        'version: 1\ninboxes:\n  sms: {channel: sms, provider: fake, secret: "${MY_SECRET}", fail_first: lots}\n'
    )
    code, out = run(["channels", "check", str(path)], env={"MY_SECRET": SECRET})
    assert code == 1 and SECRET not in out and "fail_first" in out


def test_users_and_agents(tmp_path: Path, sqlite_url: str) -> None:
    env = {"OMNIROUTE_DATABASE_URL": sqlite_url}
    code, out = run(["users", "add", "root", "--role", "admin"], env)
    assert code == 0 and out.startswith("user root (admin) created. Token (shown once):\n")
    token = out.splitlines()[-1]
    assert len(token) >= 43  # 256 bits, url-safe base64
    assert run(["users", "add", "root", "--role", "admin"], env) == (
        2,
        'error: user "root" already exists\n',
    )
    assert run(["users", "add", "x", "--role", "god"], env)[0] == 2
    code, out = run(
        [
            "agents",
            "add",
            "anna",
            "--skills",
            "billing=5,lang_de=3",
            "--capacity",
            "webchat=3,email=5,total=6",
            "--phone",
            "+4930123456",
            "--exclusive-channels",
            "voice",
        ],
        env,
    )
    assert code == 0 and "agent anna (#1) created" in out and "token (shown once)" in out
    assert run(["agents", "add", "ben", "--skills", "billing=11"], env) == (
        2,
        'error: skill "billing" must be between 1 and 10, got 11\n',
    )
    assert run(["agents", "add", "ben", "--capacity", "fax=1"], env)[0] == 2
    assert run(["agents", "add", "ben", "--phone", "030123"], env) == (
        2,
        'error: phone "030123" must be E.164, like +4930123456\n',
    )
    code, out = run(["users", "rotate", "root"], env)
    assert code == 0 and out.splitlines()[-1] != token
    assert run(["users", "passwd", "root"], env, input_="long enough pw\nlong enough pw\n")[0] == 0
    assert run(["users", "revoke", "root"], env) == (0, "root revoked\n")
    assert run(["users", "revoke", "nobody"], env) == (2, 'error: no user "nobody"\n')


async def test_revoked_and_rotated_tokens_stop_working(tmp_path: Path, sqlite_url: str) -> None:
    env = {"OMNIROUTE_DATABASE_URL": sqlite_url}
    token = (await asyncio.to_thread(run, ["users", "add", "root", "--role", "admin"], env))[
        1
    ].splitlines()[-1]
    settings = make_settings(tmp_path / "conf", sqlite_url)
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        assert (
            await client.get("/api/me", headers={"authorization": f"Bearer {token}"})
        ).status_code == 200
        new = (await asyncio.to_thread(run, ["users", "rotate", "root"], env))[1].splitlines()[-1]
        assert (
            await client.get("/api/me", headers={"authorization": f"Bearer {token}"})
        ).status_code == 401
        assert (
            await client.get("/api/me", headers={"authorization": f"Bearer {new}"})
        ).status_code == 200
        await asyncio.to_thread(run, ["users", "revoke", "root"], env)
        assert (
            await client.get("/api/me", headers={"authorization": f"Bearer {new}"})
        ).status_code == 401


async def test_rules_explain_replays_a_stored_decision(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path / "conf", sqlite_url)
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        await post_fake(
            client, "sms", {"id": "d1", "from": "+4917012345600", "text": "please refund me"}
        )
        await settle(runtime)
    code, out = await asyncio.to_thread(
        run,
        ["rules", "explain", "--decision", "1", "--trace"],
        {"OMNIROUTE_DATABASE_URL": sqlite_url},
    )
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("decision 1 for conversation 1 with ruleset sha256:")
    assert json.loads(lines[1].removeprefix("facts: "))["message.text"] == "please refund me"
    assert "rule refund: matched" in lines
    assert (
        json.loads("\n".join(lines[lines.index("rule refund: matched") + 1 :]))["queue"]
        == "billing"
    )
    assert await asyncio.to_thread(
        run, ["rules", "explain", "--decision", "99"], {"OMNIROUTE_DATABASE_URL": sqlite_url}
    ) == (2, "error: no routing decision 99\n")


async def test_rules_explain_replays_a_stored_decision_against_a_rules_file(
    tmp_path: Path, sqlite_url: str
) -> None:
    """``explain FILE --decision N`` answers "what would this file have decided": the stored
    facts against FILE's rules, with each key that differs (it used to ignore FILE)."""
    settings = make_settings(tmp_path / "conf", sqlite_url)
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        await post_fake(
            client, "sms", {"id": "d1", "from": "+4917012345600", "text": "please refund me"}
        )
        await settle(runtime)
    env = {"OMNIROUTE_DATABASE_URL": sqlite_url}
    # refunds to sales, at normal priority, with no tag
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        RULES.replace(
            "then: {queue: billing, priority: high, tags: [refund]}", "then: {queue: sales}"
        )
    )
    code, out = await asyncio.to_thread(
        run, ["rules", "explain", str(changed), "--decision", "1", "--trace"], env
    )
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0].startswith("decision 1 for conversation 1 with ruleset sha256:")
    assert lines[2].startswith(f"replayed against {changed} (ruleset sha256:")
    assert "rule refund: matched" in lines
    assert lines[lines.index("differs from the stored decision:") + 1 :] == [
        f'  queue: stored "billing", {changed} "sales"',
        f'  priority: stored "high", {changed} "normal"',
        f'  skills: stored {{"billing": 3}}, {changed} {{}}',
        f'  tags: stored ["refund"], {changed} []',
    ]
    # the same rules in another file (another version): the same decision
    same = tmp_path / "same.yaml"
    same.write_text(RULES + "# a comment changes the version, not the decision\n")
    code, out = await asyncio.to_thread(
        run, ["rules", "explain", str(same), "--decision", "1"], env
    )
    assert code == 0 and out.splitlines()[-1] == "same as the stored decision", out
    # a bad file: its located errors, before the database is asked
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        RULES.replace("queue: billing, priority: high", "queue: nowhere, priority: high")
    )
    code, out = await asyncio.to_thread(run, ["rules", "explain", str(bad), "--decision", "1"], env)
    assert code == 1 and out.startswith(f"{bad}:") and "nowhere" in out, out
    facts = tmp_path / "facts.json"
    facts.write_text("{}")
    assert await asyncio.to_thread(
        run, ["rules", "explain", str(same), "--decision", "1", "--facts", str(facts)], env
    ) == (2, "error: --decision replays the stored facts: give --facts or --decision, not both\n")


def test_db_upgrade_creates_and_migrates(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'fresh.db'}"
    code, out = run(["db", "upgrade"], {"OMNIROUTE_DATABASE_URL": url})
    assert (code, out) == (0, f"database at {head_revision()}\n")
    assert pending_diff(url) == []


def test_autogenerate_finds_no_difference(db_url: str) -> None:
    """The migrations create exactly what the models describe, on SQLite and PostgreSQL."""
    upgrade(db_url)
    assert pending_diff(db_url) == []


async def test_readyz_reports_unmigrated_schema_and_lost_database(
    tmp_path: Path, sqlite_url: str
) -> None:
    settings = make_settings(tmp_path / "conf", sqlite_url)
    async with started_runtime(settings) as runtime, client_for(runtime) as client:
        assert (await client.get("/readyz")).status_code == 200
        await runtime.db.write(
            lambda tx: tx.execute(
                __import__("sqlalchemy").text("UPDATE alembic_version SET version_num = 'old'")
            )
        )
        response = await client.get("/readyz")
        assert response.status_code == 503 and response.json()["reasons"] == [
            "migrations not current"
        ]


def _attributes_read(tree: ast.AST) -> set[str]:
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def test_every_setting_is_read_somewhere() -> None:
    """A field of Settings that no code reads is a knob that does nothing (an admin sets it
    and nothing changes): each must be read as an attribute in the product's source outside
    settings.py, or by a Settings method that is. Wire a new setting or do not add it."""
    settings_py = ROOT / "router" / "settings.py"
    read: set[str] = set()
    for package in ("router", "channels", "adapters", "routing_rules", "migrations"):
        for path in (ROOT / package).rglob("*.py"):
            if path != settings_py:
                read |= _attributes_read(ast.parse(path.read_text(), str(path)))
    settings_class = next(
        node
        for node in ast.parse(settings_py.read_text()).body
        if isinstance(node, ast.ClassDef) and node.name == "Settings"
    )
    methods = [m for m in settings_class.body if isinstance(m, ast.FunctionDef)]
    while True:  # methods called from outside, and the methods they call, read fields too
        before = len(read)
        for method in methods:
            if method.name in read:
                read |= _attributes_read(method)  # e.g. websocket_options: ws_compression
        if len(read) == before:
            break
    unread = sorted(set(Settings.model_fields) - read)
    assert unread == [], f"settings nothing reads: {', '.join(unread)}"
