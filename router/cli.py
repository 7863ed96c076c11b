"""The ``omniroute`` command line.

Exit codes: 0 success, 1 the input has errors (each printed as
``PATH:LINE:COL: where: message``), 2 usage or I/O errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

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
        return load_ruleset(_read(path), str(path))
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
    rules: Annotated[Path, typer.Argument(help="the rules file")],
    facts: Annotated[Path, typer.Option("--facts", help="a JSON object of facts")],
    trace: Annotated[bool, typer.Option("--trace", help="show each rule tried")] = False,
) -> None:
    """Print the Decision JSON for some facts (``--trace``: why each rule did or did not match)."""
    ruleset = _load_rules(rules)
    try:
        given = json.loads(_read(facts))
    except json.JSONDecodeError as exc:
        _fail_usage(f"{facts}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}")
    if not isinstance(given, dict):
        _fail_usage(f"{facts}: facts must be a JSON object")
    for warning in _fact_warnings(given, ruleset):
        typer.echo(f"warning: {warning}", err=True)
    steps: list[TraceStep] = []
    decision = reference_evaluate(given, ruleset, steps)
    engine_decision = ruleset.engine.evaluate(given)
    assert engine_decision == decision, "engine and reference disagree: please report this"
    if trace:
        for step in steps:
            outcome = "matched" if step.matched else f"no: {step.reason}"
            typer.echo(f"rule {step.rule}: {outcome}")
        if not any(s.matched for s in steps):
            typer.echo("no rule matched: default")
    typer.echo(json.dumps(decision.to_dict(), indent=2))


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


def main() -> None:  # pragma: no cover - console entry for ``python -m router.cli``
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
