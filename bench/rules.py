"""Rules engine: microseconds per evaluation, compiled engine vs. a naive loop, same run.

The baseline is the reference evaluator: a plain loop over the rules in order calling
per-condition functions. Both evaluate the same generated facts against the same generated
rulesets (shaped like real ones: most rules pin an inbox and channel, some test text with
regexes, a few apply everywhere). Targets: >= 3x at 100 rules, >= 10x at 1,000 rules.

    python bench/rules.py            # full run
    python bench/rules.py --smoke    # seconds; run by `make test` so the bench never rots
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from channels.base import CHANNEL_IDS
from routing_rules import evaluate, load_ruleset, reference_evaluate
from routing_rules.model import Ruleset

CHANNELS = list(CHANNEL_IDS)
WORDS = [
    "refund",
    "invoice",
    "password",
    "delivery",
    "cancel",
    "upgrade",
    "broken",
    "login",
    "quote",
    "hello",
]
TIERS = ["free", "pro", "gold", "platinum"]
TARGETS = {100: 3.0, 1000: 10.0}


def generate_rules(n: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    inboxes = [f"inbox{i}" for i in range(max(5, n // 20))]
    lines = [
        "version: 1",
        "attributes: {lifetime_value: number}",
        "hours: {office: {timezone: Europe/Berlin, weekly: {mon-fri: ['08:00-18:00']}}}",
        "queues: {general: {}, billing: {skills: {billing: 3}}, tech: {}, sales: {}}",
        "rules:",
    ]
    for i in range(n):
        kind = rng.random()
        queue = rng.choice(["billing", "tech", "sales", "general"])
        word = rng.choice(WORDS)
        if kind < 0.70:
            when = (
                f"{{inbox: {rng.choice(inboxes)}, channel: {rng.choice(CHANNELS)}, "
                f"message.text: {{matches: '(?i){word}|{rng.choice(WORDS)}'}}}}"
            )
        elif kind < 0.85:
            chans = rng.sample(CHANNELS, 2)
            when = (
                f"{{channel: {{in: [{chans[0]}, {chans[1]}]}}, contact.tier: {rng.choice(TIERS)}, "
                f"contact.lifetime_value: {{gte: {rng.randint(100, 10000)}}}}}"
            )
        elif kind < 0.95:
            when = f"{{any: [{{message.text: {{contains: {word}-{i}}}}}, {{conversation.tags: {{contains: t{i}}}}}]}}"
        else:
            when = (
                f"{{not: {{time: {{within: office}}}}, message.subject: {{contains: {word}-{i}}}}}"
            )
        lines.append(
            f"  - {{id: r{i}, order: {rng.randint(0, 3)}, when: {when}, then: {{queue: {queue}}}}}"
        )
    lines.append("default: {queue: general}")
    return "\n".join(lines) + "\n"


def generate_facts(count: int, n_rules: int, seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    inboxes = [f"inbox{i}" for i in range(max(5, n_rules // 20) + 3)]
    return [
        {
            "channel": rng.choice(CHANNELS),
            "inbox": rng.choice(inboxes),
            "message.text": " ".join(rng.choices(WORDS, k=8)) + " " + "x" * rng.randint(0, 400),
            "message.subject": rng.choice(WORDS),
            "contact.tier": rng.choice(TIERS),
            "contact.lifetime_value": rng.randint(0, 12000),
            "conversation.tags": [f"t{rng.randint(0, n_rules)}"],
            "time": "2026-11-25T20:00:00+01:00",
        }
        for _ in range(count)
    ]


def per_eval_us(
    fn: Callable[[dict[str, Any], Ruleset], Any],
    facts: list[dict[str, Any]],
    ruleset: Ruleset,
    budget_s: float,
) -> float:
    """Best of three rounds over the facts, each round at least ``budget_s``/3 long."""
    best = float("inf")
    for _ in range(3):
        done, started = 0, time.perf_counter()
        while True:
            for f in facts:
                fn(f, ruleset)
            done += len(facts)
            elapsed = time.perf_counter() - started
            if elapsed >= budget_s / 3:
                break
        best = min(best, elapsed / done * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks the bench runs")
    args = parser.parse_args(argv)
    sizes = [10, 100] if args.smoke else [10, 100, 1000]
    budget = 0.05 if args.smoke else 2.0
    print(f"{'rules':>6} {'naive us/eval':>14} {'engine us/eval':>15} {'ratio':>7}  target")
    failed = False
    for n in sizes:
        ruleset = load_ruleset(generate_rules(n), channels=CHANNEL_IDS)
        facts = generate_facts(200 if args.smoke else 1000, n)
        mismatches = sum(evaluate(f, ruleset) != reference_evaluate(f, ruleset) for f in facts)
        if mismatches:
            print(f"ERROR: engine and reference disagree on {mismatches} of {len(facts)} facts")
            return 1
        naive = per_eval_us(reference_evaluate, facts, ruleset, budget)
        engine = per_eval_us(evaluate, facts, ruleset, budget)
        ratio = naive / engine
        target = TARGETS.get(n)
        verdict = (
            ""
            if target is None
            else (f">= {target:.0f}x " + ("met" if ratio >= target else "MISSED"))
        )
        failed |= target is not None and ratio < target and not args.smoke
        print(f"{n:>6} {naive:>14.1f} {engine:>15.1f} {ratio:>6.1f}x  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
