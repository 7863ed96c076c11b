"""``omniroute rules check | explain | test``: output and exit codes (0 ok, 1 errors, 2 usage/I/O)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from router.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "rules.yaml"
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_check_ok() -> None:
    assert run("rules", "check", str(EXAMPLE)) == (0, "ok: 7 rules, 5 queues\n", "")


def test_check_prints_every_error_sorted_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "version: 1\nqueues: {q: {}}\nrules:\n  - id: a\n    when: {any: [{channel: {match: sms}}]}\n"
        "    then: {queue: nope}\ndefault: {queue: q}\n"
    )
    code, out, _ = run("rules", "check", str(bad))
    assert code == 1
    assert out.splitlines() == [
        f'{bad}:5:29: rules[0].when.any[0]: unknown operator "match" (did you mean "matches"?)',
        f'{bad}:6:19: rules[0].then.queue: unknown queue "nope"',
    ]


def test_check_missing_file_is_exit_2(tmp_path: Path) -> None:
    code, _, err = run("rules", "check", str(tmp_path / "absent.yaml"))
    assert code == 2
    assert err.startswith(f"error: cannot read {tmp_path / 'absent.yaml'}")


def test_usage_error_is_exit_2() -> None:
    assert run("rules", "check")[0] == 2
    assert run("rules", "frobnicate")[0] == 2


def test_explain_prints_the_decision_and_trace(tmp_path: Path) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps(
            {
                "channel": "email",
                "message": {"text": "money back"},
                "time": "2026-11-25T22:00:00+01:00",
                "chanel": 1,
            }
        )
    )
    code, out, err = run("rules", "explain", str(EXAMPLE), "--facts", str(facts), "--trace")
    assert code == 0
    lines = out.splitlines()
    assert (
        lines[0]
        == "rule vip: no: rules[0].when.all[0]: contact.vip = true is false (contact.vip is missing)"
    )
    assert lines[2] == "rule refund: matched"
    decision = json.loads("\n".join(lines[3:]))
    assert (
        decision["rule"] == "refund"
        and decision["queue"] == "billing"
        and decision["reply"] == "refund_ack"
    )
    assert set(decision) == {
        "rule",
        "queue",
        "priority",
        "skills",
        "tags",
        "reply",
        "agent",
        "ruleset",
    }
    assert 'warning: unknown fact "chanel" (did you mean "channel"?)' in err


def test_explain_bad_facts_file_is_exit_2(tmp_path: Path) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text("{not json")
    code, _, err = run("rules", "explain", str(EXAMPLE), "--facts", str(facts))
    assert code == 2 and "invalid JSON" in err
    facts.write_text("[1, 2]")
    assert run("rules", "explain", str(EXAMPLE), "--facts", str(facts))[0] == 2


def test_test_command_reports_failures_with_differences(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "- {name: ok, facts: {channel: voice, contact: {vip: true}}, expect: {rule: vip}}\n"
        "- {name: wrong, facts: {channel: sms}, expect: {queue: billing, rule: null}}\n"
    )
    code, out, _ = run("rules", "test", str(EXAMPLE), str(cases))
    assert code == 1
    assert out.splitlines() == [
        f'{cases}:2: FAIL wrong: queue: expected "billing", got "general"',
        "1 passed, 1 failed",
    ]


def test_test_command_passes_on_the_shipped_cases() -> None:
    code, out, _ = run("rules", "test", str(EXAMPLE), str(ROOT / "examples" / "rules-cases.yaml"))
    assert code == 0 and out.endswith(" passed, 0 failed\n")


def test_malformed_cases_file_is_located(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("- {name: x, facts: {}, expect: {queu: general}}\n")
    code, out, _ = run("rules", "test", str(EXAMPLE), str(cases))
    assert (code, out.strip()) == (
        1,
        f'{cases}:1:33: [0].expect: unknown decision key "queu" (did you mean "queue"?)',
    )


def test_console_script_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "rules", "check", str(EXAMPLE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "ok: 7 rules, 5 queues\n")
