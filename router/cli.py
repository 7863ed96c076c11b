"""The ``omniroute`` command line.

Exit codes: 0 success, 1 the input has errors (each printed as
``PATH:LINE:COL: where: message``) or test cases failed, or a replayed decision differs from
the stored one, 2 usage or I/O errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from router.exceptions import OmnirouteError
from router.types import CHANNEL_IDS
from routing_rules import (
    RulesError,
    TraceStep,
    did_you_mean,
    flatten_facts,
    load_cases,
    load_ruleset,
    parse_time,
    reference_evaluate,
    run_cases,
)
from routing_rules.facts import FactType, is_number

app = typer.Typer(
    help="omniroute: the omnichannel contact-center router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
rules_app = typer.Typer(help="Check, explain and test routing rules.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


def _fail_usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail_usage(f"cannot read {path}: {exc.strerror or exc}")


def _print_errors(exc: RulesError, path: Path) -> NoReturn:
    for error in exc.errors:
        typer.echo(error.format(str(path)))
    raise typer.Exit(1)


def _load_rules(path: Path) -> Any:
    try:
        return load_ruleset(_read(path), str(path), channels=CHANNEL_IDS)
    except RulesError as exc:
        _print_errors(exc, path)


@rules_app.command("check")
def rules_check(path: Annotated[Path, typer.Argument(help="the rules file")]) -> None:
    """Validate a rules file and print every error, one per line."""
    ruleset = _load_rules(path)
    typer.echo(f"ok: {len(ruleset.rules)} rules, {len(ruleset.queues)} queues")


def _fact_warnings(facts: dict[str, Any], ruleset: Any) -> list[str]:
    warnings = []
    for name, value in flatten_facts(facts).items():
        fact = ruleset.facts.get(name)
        if fact is None:
            warnings.append(f'unknown fact "{name}"{did_you_mean(name, ruleset.facts.names())}')
            continue
        if value is None:
            continue
        ok = {
            FactType.STRING: isinstance(value, str),
            FactType.ENUM: isinstance(value, str) and value in fact.values,
            FactType.BOOL: isinstance(value, bool),
            FactType.NUMBER: is_number(value),
            FactType.LIST: isinstance(value, list) and all(isinstance(v, str) for v in value),
            FactType.TIME: parse_time(value) is not None,
        }[fact.type]
        if not ok:
            warnings.append(
                f"{name}: {value!r} is not a valid {fact.type.value} (tests on it are false)"
            )
    return warnings


@rules_app.command("explain")
def rules_explain(
    rules: Annotated[
        Path | None,
        typer.Argument(
            help="the rules file (with --decision: replay the stored facts against it instead)"
        ),
    ] = None,
    facts: Annotated[Path | None, typer.Option("--facts", help="a JSON object of facts")] = None,
    trace: Annotated[bool, typer.Option("--trace", help="show each rule tried")] = False,
    decision: Annotated[
        int | None, typer.Option("--decision", help="replay a stored routing decision by id")
    ] = None,
) -> None:
    """Print the Decision JSON for some facts (``--trace``: why each rule did or did not match),
    or replay a stored decision (``--decision ID``) against the ruleset it was made with, or
    against RULES ("what would this file have decided?"), with the difference from the
    stored decision (exit 1 when it differs)."""
    if decision is not None:
        if facts is not None:
            _fail_usage("--decision replays the stored facts: give --facts or --decision, not both")
        _replay_decision(decision, trace, rules)
        return
    if rules is None or facts is None:
        _fail_usage("give RULES and --facts FACTS.json, or --decision ID")
    ruleset = _load_rules(rules)
    try:
        given = json.loads(_read(facts))
    except json.JSONDecodeError as exc:
        _fail_usage(f"{facts}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}")
    if not isinstance(given, dict):
        _fail_usage(f"{facts}: facts must be a JSON object")
    for warning in _fact_warnings(given, ruleset):
        typer.echo(f"warning: {warning}", err=True)
    _print_decision(ruleset, given, trace)


def _evaluate(ruleset: Any, given: dict[str, Any], trace: bool) -> Any:
    """The decision for ``given`` (``trace``: each rule tried is printed)."""
    steps: list[TraceStep] = []
    decision = reference_evaluate(given, ruleset, steps)
    assert ruleset.engine.evaluate(given) == decision, (
        "engine and reference disagree: please report this"
    )
    if trace:
        for step in steps:
            outcome = "matched" if step.matched else f"no: {step.reason}"
            typer.echo(f"rule {step.rule}: {outcome}")
        if not any(s.matched for s in steps):
            typer.echo("no rule matched: default")
    return decision


def _print_decision(ruleset: Any, given: dict[str, Any], trace: bool) -> Any:
    decision = _evaluate(ruleset, given, trace)
    typer.echo(json.dumps(decision.to_dict(), indent=2))
    return decision


def _replay_decision(decision_id: int, trace: bool, rules: Path | None = None) -> None:
    """Replay a stored decision's facts against the ruleset it was made with, or against
    the rules file ``rules`` (a what-if: the difference from the stored decision is the
    answer). Exit 1 when the replay differs from the stored decision."""
    from sqlalchemy import select

    from router.models import Conversation, Inbox, RoutingDecision
    from router.models import Ruleset as RulesetRow

    file_ruleset = _load_rules(rules) if rules is not None else None  # errors before the DB

    def load(conn: Any) -> tuple[Any, Any, Any]:
        row = conn.execute(select(RoutingDecision).where(RoutingDecision.id == decision_id)).first()
        if row is None:
            return None, None, None
        text = conn.execute(
            select(RulesetRow.text)
            .where(RulesetRow.version == row.ruleset_version)
            .order_by(RulesetRow.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        default_queue = conn.execute(
            select(Inbox.default_queue)
            .join(Conversation, Conversation.inbox_id == Inbox.id)
            .where(Conversation.id == row.conversation_id)
        ).scalar_one_or_none()
        return row, text, default_queue

    row, text, default_queue = _with_db(lambda db: db.read(load))
    if row is None:
        _fail_usage(f"no routing decision {decision_id}")
    typer.echo(
        f"decision {decision_id} for conversation {row.conversation_id} with ruleset {row.ruleset_version}"
    )
    typer.echo("facts: " + json.dumps(row.facts, sort_keys=True))
    stored = row.decision
    if file_ruleset is not None:
        _what_if(file_ruleset, rules, row.facts, stored, default_queue, trace)
        return
    if text is None:
        _fail_usage(
            f"decision {decision_id} was made with ruleset {row.ruleset_version}, which is not stored"
        )
    ruleset = load_ruleset(
        text.encode("utf-8"), f"ruleset {row.ruleset_version}", channels=CHANNEL_IDS
    )
    replayed = _print_decision(ruleset, row.facts, trace).to_dict()
    same = {k: v for k, v in replayed.items() if k != "queue"} == {
        k: v for k, v in stored.items() if k != "queue"
    }
    if same and replayed["queue"] != stored["queue"] and stored["rule"] is None:
        typer.echo(f"(the inbox's default_queue {stored['queue']!r} replaced the default queue)")
    elif replayed != stored:
        typer.echo("replay differs from the stored decision: " + json.dumps(stored))
        raise typer.Exit(1)


def _what_if(
    ruleset: Any,
    path: Path | None,
    facts: dict[str, Any],
    stored: dict[str, Any],
    default_queue: str | None,
    trace: bool,
) -> None:
    """The decision ``ruleset`` (from ``path``) makes for a stored decision's facts, as the
    server would make it (the inbox's ``default_queue`` replacing the default), and each key
    that differs from the stored decision (the ruleset's version always does, so it is not
    compared)."""
    from router.routing import decision_for_inbox

    typer.echo(f"replayed against {path} (ruleset {ruleset.version})")
    if "history." in ruleset.text and not any(k.startswith("history.") for k in facts):
        typer.echo(
            "warning: this file uses history.* facts, which the stored facts lack (the ruleset "
            "of the decision did not use them): tests on them are false",
            err=True,
        )
    raw = _evaluate(ruleset, facts, trace)
    decision = decision_for_inbox(raw, ruleset, default_queue)
    if decision is not raw:
        typer.echo(f"(the inbox's default_queue {default_queue!r} replaces the default queue)")
    replayed = decision.to_dict()
    typer.echo(json.dumps(replayed, indent=2))
    differences = [
        f"  {key}: stored {json.dumps(stored.get(key))}, {path} {json.dumps(replayed[key])}"
        for key in replayed
        if key != "ruleset" and stored.get(key) != replayed[key]
    ]
    if not differences:
        typer.echo("same as the stored decision")
        return
    typer.echo("differs from the stored decision:")
    for line in differences:
        typer.echo(line)
    raise typer.Exit(1)


@rules_app.command("test")
def rules_test(
    rules: Annotated[Path, typer.Argument(help="the rules file")],
    cases: Annotated[Path, typer.Argument(help="the cases file")],
) -> None:
    """Run rule test cases; print each failing case with the difference."""
    ruleset = _load_rules(rules)
    try:
        loaded = load_cases(_read(cases), str(cases))
    except RulesError as exc:
        _print_errors(exc, cases)
    results = run_cases(ruleset, loaded)
    failed = [r for r in results if not r.passed]
    for result in failed:
        typer.echo(
            f"{cases}:{result.case.line}: FAIL {result.case.name}: " + "; ".join(result.differences)
        )
    typer.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


# -- the server and its data -----------------------------------------------------------
def _settings() -> Any:
    from router.exceptions import ConfigError
    from router.settings import load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        _fail_usage(exc.message)


def _with_db(fn: Any, *, announce: bool = False) -> Any:
    """Run ``fn(db)`` (async) against the configured database. ``announce``: a credential
    that ``fn`` ends is announced on the Redis bus when one is configured, so running
    servers close its sockets at once (without Redis they notice within
    ``OMNIROUTE_CREDENTIAL_CHECK_INTERVAL``)."""
    import asyncio

    from adapters.bus import make_bus
    from router.db import Database
    from router.revocation import TOPIC

    settings = _settings()

    async def run() -> Any:
        db = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        redis = announce and settings.redis_url
        bus = make_bus(settings.redis_url, settings.redis_prefix) if redis else None
        await db.start()
        if bus is not None:
            await bus.start()
            db.context["credentials_changed"] = lambda user_id: bus.publish(
                TOPIC, {"user_id": user_id}
            )
        try:
            return await fn(db)
        finally:
            if bus is not None:
                await bus.close()
            await db.close()

    try:
        return asyncio.run(run())
    except OmnirouteError as exc:
        _fail_usage(exc.message)


db_app = typer.Typer(help="The database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the current schema (creates a SQLite file if needed)."""
    from router.migrate import head_revision, upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url)
    except Exception as exc:
        _fail_usage(f"migration failed: {type(exc).__name__}: {exc}")
    typer.echo(f"database at {head_revision()}")


users_app = typer.Typer(help="Users, roles and tokens.", no_args_is_help=True)
app.add_typer(users_app, name="users")


@users_app.command("add")
def users_add(
    name: str,
    role: Annotated[str, typer.Option("--role", help="agent | supervisor | admin")] = "agent",
) -> None:
    """Create a user and print their token (shown once, stored only as a SHA-256 hash)."""
    from router.auth import create_user
    from router.types import Role

    if role not in {r.value for r in Role}:
        _fail_usage(f'unknown role "{role}" (agent | supervisor | admin)')
    _, token = _with_db(lambda db: db.write(create_user, name, role))
    typer.echo(f"user {name} ({role}) created. Token (shown once):\n{token}")


@users_app.command("passwd")
def users_passwd(
    name: str,
    password: Annotated[
        str,
        typer.Option(
            prompt=True, confirmation_prompt=True, hide_input=True, help="at least 10 characters"
        ),
    ],
) -> None:
    """Set a user's password (stored as an argon2 hash); the console sessions signed in
    with the old one end, and their sockets close."""
    from router.auth import set_password

    _with_db(lambda db: db.write(set_password, name, password), announce=True)
    typer.echo(f"password for {name} set")


@users_app.command("rotate")
def users_rotate(name: str) -> None:
    """Issue a new token: the old one, its sockets and the console sessions opened with it
    stop working at once."""
    from router.auth import rotate_token

    token = _with_db(lambda db: db.write(rotate_token, name), announce=True)
    typer.echo(f"new token for {name} (shown once):\n{token}")


@users_app.command("revoke")
def users_revoke(name: str) -> None:
    """Revoke a user: token, console sessions and sockets end at once; an agent goes
    offline and their work returns to its queues."""
    from router.auth import revoke_user

    _with_db(lambda db: db.write(revoke_user, name), announce=True)
    typer.echo(f"{name} revoked")


agents_app = typer.Typer(help="Agents: skills, capacity, phone.", no_args_is_help=True)
app.add_typer(agents_app, name="agents")


@agents_app.command("add")
def agents_add(
    name: str,
    skills: Annotated[str, typer.Option("--skills", help="billing=5,lang_de=3")] = "",
    capacity: Annotated[
        str, typer.Option("--capacity", help="webchat=3,email=5,voice=1,total=6")
    ] = "",
    phone: Annotated[
        str | None, typer.Option("--phone", help="E.164 number or sip:user@host")
    ] = None,
    exclusive_channels: Annotated[
        str, typer.Option("--exclusive-channels", help="e.g. voice")
    ] = "",
    display_name: Annotated[str | None, typer.Option("--display-name")] = None,
) -> None:
    """Make NAME an agent (creating the user if needed; its token is printed once).
    Queue membership comes only from members: in rules.yaml."""
    from sqlalchemy import select

    from router.agents import DEFAULT_CAPACITY, create_agent, parse_capacity, parse_skills
    from router.auth import create_user
    from router.db import Tx
    from router.models import User

    try:
        parsed_skills = parse_skills(skills)
        parsed_capacity = parse_capacity(capacity) if capacity else dict(DEFAULT_CAPACITY)
    except OmnirouteError as exc:
        _fail_usage(exc.message)
    sip = phone if phone and phone.startswith("sip:") else None
    number = phone if phone and not phone.startswith("sip:") else None
    exclusive = [c.strip() for c in exclusive_channels.split(",") if c.strip()]

    def add(tx: Tx) -> tuple[int, str | None]:
        user_id = tx.execute(select(User.id).where(User.name == name)).scalar_one_or_none()
        token = None
        if user_id is None:
            user_id, token = create_user(tx, name, "agent")
        agent_id = create_agent(
            tx,
            user_id,
            display_name or name,
            parsed_skills,
            parsed_capacity,
            phone=number,
            sip=sip,
            exclusive_channels=exclusive,
        )
        return agent_id, token

    agent_id, token = _with_db(lambda db: db.write(add))
    typer.echo(f"agent {name} (#{agent_id}) created")
    if token:
        typer.echo(f"token (shown once):\n{token}")


channels_app = typer.Typer(help="channels.yaml.", no_args_is_help=True)
app.add_typer(channels_app, name="channels")


@channels_app.command("check")
def channels_check(
    path: Annotated[Path, typer.Argument(help="the channels file")],
    rules: Annotated[
        Path | None, typer.Option("--rules", help="check default_queue against this rules file")
    ] = None,
) -> None:
    """Validate channels.yaml and print every error, one per line."""
    from channels import WEBHOOK_APPS
    from router.channels_config import load_channels

    queues = set(_load_rules(rules).queues) if rules is not None else None
    try:
        config = load_channels(_read(path), str(path), queues=queues)
    except RulesError as exc:
        _print_errors(exc, path)
    apps = "".join(
        f", {len(config.apps.get(provider, {}))} {kind.title} apps"
        for provider, kind in WEBHOOK_APPS.items()
    )
    typer.echo(f"ok: {len(config.inboxes)} inboxes{apps}")


@app.command("serve")
def serve() -> None:
    """Serve the API, webhooks and websockets (settings from OMNIROUTE_* variables)."""
    import asyncio
    import logging

    import uvicorn

    from router.app import create_app
    from router.runtime import Runtime

    settings = _settings()
    try:
        settings.require_secret()
    except OmnirouteError as exc:
        _fail_usage(exc.message)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The database writer is a thread that holds the GIL while it runs Python: with the
    # default 5 ms switch interval the event loop (sockets, acks) waits that long behind
    # it. 0.5 ms keeps ingest-to-agent latency low at a small cost in throughput.
    sys.setswitchinterval(0.0005)
    runtime = Runtime(settings)
    try:
        runtime.take_sqlite_lock()
        asyncio.run(runtime.preflight(wait=settings.db_wait))
    except OmnirouteError as exc:
        _fail_usage(exc.message)
    from router.app import DrainingServer

    config = uvicorn.Config(
        create_app(settings, runtime=runtime),
        host=settings.host,
        port=settings.port,
        log_level="info",
        lifespan="on",
        **settings.server_options(),
    )
    DrainingServer(config, runtime).run()


DEMO_AGENTS = (
    ("anna", "billing=8,lang_de=5,lang_en=5", "Anna Schmidt"),
    ("ben", "billing=4,lang_en=5", "Ben Okafor"),
    ("chris", "lang_de=4,lang_en=3", "Chris Meier"),
)


def _demo_environment(var: Path) -> None:
    """Settings for the demo: a SQLite file and the example files, a generated secret."""
    import os
    import secrets

    var.mkdir(parents=True, exist_ok=True)
    secret_file = var / "secret_key"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(48))
        secret_file.chmod(0o600)
    fake_secret = var / "demo_fake_secret"
    if not fake_secret.exists():
        fake_secret.write_text(secrets.token_urlsafe(24))
        fake_secret.chmod(0o600)
    defaults = {
        "OMNIROUTE_DATABASE_URL": f"sqlite:///{var / 'omniroute.db'}",
        "OMNIROUTE_RULES_PATH": "examples/rules.yaml",
        "OMNIROUTE_CHANNELS_PATH": "examples/channels.yaml",
        "OMNIROUTE_DATA_DIR": str(var),
        "OMNIROUTE_SECRET_KEY": secret_file.read_text().strip(),
        "OMNIROUTE_DEMO_FAKE_SECRET": fake_secret.read_text().strip(),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _seed_demo(var: Path) -> list[tuple[str, str, str]]:
    """Create the demo admin and agents once; their tokens are kept in var/demo-tokens.json
    (demo data only: a real deployment never stores tokens)."""
    from sqlalchemy import select

    from router.agents import DEFAULT_CAPACITY, create_agent, parse_skills
    from router.auth import create_user
    from router.db import Tx
    from router.models import User

    tokens_file = var / "demo-tokens.json"
    known: dict[str, dict[str, str]] = (
        json.loads(tokens_file.read_text()) if tokens_file.exists() else {}
    )

    def seed(tx: Tx) -> dict[str, dict[str, str]]:
        created: dict[str, dict[str, str]] = {}
        if tx.execute(select(User.id).where(User.name == "admin")).first() is None:
            _, token = create_user(tx, "admin", "admin")
            created["admin"] = {"role": "admin", "token": token}
        for name, skills, display in DEMO_AGENTS:
            if tx.execute(select(User.id).where(User.name == name)).first() is None:
                user_id, token = create_user(tx, name, "agent")
                create_agent(tx, user_id, display, parse_skills(skills), dict(DEFAULT_CAPACITY))
                created[name] = {"role": "agent", "token": token}
        return created

    known.update(_with_db(lambda db: db.write(seed)))
    tokens_file.write_text(json.dumps(known, indent=2))
    tokens_file.chmod(0o600)
    return [(name, v["role"], v["token"]) for name, v in known.items()]


@app.command("demo")
def demo(
    var: Annotated[
        Path, typer.Option("--var", help="where the demo keeps its database and secrets")
    ] = Path("var"),
    no_serve: Annotated[
        bool, typer.Option("--no-serve", help="prepare everything but do not serve")
    ] = False,
) -> None:
    """Run the demo on SQLite with no other service: migrate, load the examples, seed an admin
    and three agents, print their tokens, serve. (``make run`` runs this.)"""
    from urllib.parse import urlsplit

    from router.migrate import upgrade

    _demo_environment(var.resolve())
    settings = _settings()
    upgrade(settings.database_url)
    accounts = _seed_demo(var.resolve())
    base = settings.public_base_url
    typer.echo("\nomniroute demo")
    typer.echo(f"  customer chat: {base}/demo")
    typer.echo(f"  agent console: {base}/console   (sign in with an agent token below)")
    typer.echo(f"  minimal page:  {base}/demo/agent")
    typer.echo(f"  API docs:      {base}/docs")
    host = urlsplit(base).hostname
    if host in ("127.0.0.1", "localhost"):
        # the console and the widget accept the loopback aliases of their own origin
        alias = base.replace(host, "localhost" if host == "127.0.0.1" else "127.0.0.1", 1)
        typer.echo(f"  (or the same with {alias}: both name this machine)")
    for name, role, token in accounts:
        typer.echo(f"  {role:<6} {name:<6} token: {token}")
    typer.echo(
        f"  fake SMS inbox secret (for signed webhooks): {settings_env('OMNIROUTE_DEMO_FAKE_SECRET')}\n"
    )
    if not no_serve:
        serve()


def settings_env(name: str) -> str:
    import os

    return os.environ.get(name, "")


def main() -> None:  # pragma: no cover - console entry for ``python -m router.cli``
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
