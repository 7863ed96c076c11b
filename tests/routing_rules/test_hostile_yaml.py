"""Hostile and awkward YAML fails fast with a located error: never a crash, hang or blow-up."""

from __future__ import annotations

import time

import pytest

from routing_rules import RulesError
from routing_rules.yamlsafe import MAX_BYTES, load_yaml, to_python
from tests.routing_rules.helpers import load_ruleset

VALID_TAIL = "queues: {q: {}}\ndefault: {queue: q}\n"

HOSTILE = [
    (
        "anchor",
        "version: 1\nx: &a {queue: q}\n" + VALID_TAIL,
        "2:4: anchors (&name) are not allowed",
    ),
    (
        "alias",
        "version: 1\nqueues: {q: {}}\ndefault: *d\n",
        "3:10: aliases (*name) are not allowed",
    ),
    (
        "billion laughs",
        'a: &a ["lol","lol"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n',
        "1:4: anchors (&name) are not allowed",
    ),
    (
        "python tag",
        "version: !!python/object:os.system echo\n" + VALID_TAIL,
        "1:10: tags (tag:yaml.org,2002:python/object:os.system) are not allowed",
    ),
    (
        "explicit int tag",
        "version: !!int 1\n" + VALID_TAIL,
        "1:10: tags (tag:yaml.org,2002:int) are not allowed",
    ),
    (
        "local tag",
        "version: 1\nqueues: !thing {q: {}}\ndefault: {queue: q}\n",
        "2:9: tags (!thing) are not allowed",
    ),
    (
        "duplicate top key",
        "version: 1\nversion: 1\n" + VALID_TAIL,
        '2:1: duplicate key "version" (first at line 1)',
    ),
    (
        "duplicate nested key",
        "version: 1\nqueues: {q: {}, q: {}}\ndefault: {queue: q}\n",
        '2:17: duplicate key "q" (first at line 2)',
    ),
    (
        "deep flow nesting",
        "version: 1\nx: " + "[" * 200 + "]" * 200 + "\n" + VALID_TAIL,
        "2:43: nesting deeper than 40 levels",
    ),
    (
        "deep block nesting",
        "version: 1\nx:\n" + "".join(" " * (2 * i) + f"k{i}:\n" for i in range(60)) + VALID_TAIL,
        "42:79: nesting deeper than 40 levels",
    ),
    (
        "two documents",
        "version: 1\n---\nversion: 1\n",
        "2:1: YAML syntax: a file holds exactly one YAML document",
    ),
    (
        "syntax",
        "version: 1\nqueues: {q: {}\ndefault: {queue: q}\n",
        "3:1: YAML syntax: expected ',' or '}', but got '<scalar>'",
    ),
    (
        "control character",
        "version: 1\nqueues: {q: {}}\x07\n",
        "2:16: character U+0007 is not allowed in YAML",
    ),
    ("empty", "", "1:1: the file is empty"),
    ("only a comment", "# nothing\n", "1:1: the file is empty"),
    ("complex key", "version: 1\n? [a, b]\n: 1\n" + VALID_TAIL, "2:3: keys must be plain strings"),
    (
        "tab indentation",
        "version: 1\nqueues:\n\tq: {}\n",
        "3:1: YAML syntax: found character '\\t' that cannot start any token",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_hostile_yaml_is_refused_with_location(text: str, expected: str) -> None:
    started = time.perf_counter()
    with pytest.raises(RulesError) as info:
        load_ruleset(text)
    assert [e.format("f")[2:] for e in info.value.errors] == [expected]
    assert time.perf_counter() - started < 5  # fails fast (a generous bound, not a benchmark)


def test_file_over_one_mebibyte_is_refused_before_parsing() -> None:
    text = "version: 1\n" + "#" * MAX_BYTES + "\n"
    with pytest.raises(RulesError) as info:
        load_ruleset(text)
    assert str(info.value) == f"rules.yaml:1:1: file is larger than {MAX_BYTES} bytes"


def test_invalid_utf8_is_located() -> None:
    with pytest.raises(RulesError) as info:
        load_ruleset(b"version: 1\nqueues: {q\xff: {}}\n")
    assert str(info.value) == "rules.yaml:2:11: file is not valid UTF-8"


def test_a_long_flat_file_under_the_limit_loads() -> None:
    rules = "".join(
        f"  - {{id: r{i}, when: {{inbox: i{i}}}, then: {{queue: q}}}}\n" for i in range(5000)
    )
    ruleset = load_ruleset("version: 1\n" + VALID_TAIL + "rules:\n" + rules)
    assert len(ruleset.rules) == 5000


@pytest.mark.parametrize(
    ("plain", "value"),
    [
        ("no", "no"),
        ("yes", "yes"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("08:00", "08:00"),
        ("1_000", "1_000"),
        ("2026-12-25", "2026-12-25"),
        ("0777", 777),
        ("true", True),
        ("False", False),
        ("~", None),
        ("null", None),
        ("1.5", 1.5),
        ("0x1F", 31),
        ("0o17", 15),
        ("-3", -3),
        ("1e3", 1000.0),
        ("'true'", "true"),
        ('"1"', "1"),
    ],
)
def test_yaml_1_2_core_scalar_typing(plain: str, value: object) -> None:
    assert to_python(load_yaml(f"v: {plain}\n")) == {"v": value}
