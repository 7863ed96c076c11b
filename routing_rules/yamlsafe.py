"""A safe, marked YAML loader for files admins edit.

Why not ``yaml.safe_load``: it forgets where each value came from (so errors cannot
point at a line), applies YAML 1.1 implicit typing (``no`` becomes ``False`` and
``08:00`` becomes 480), silently keeps the last of two duplicate keys, expands aliases
(the "billion laughs" attack) and recurses without bound. Here we compose nodes with
PyYAML's low-level parser and no implicit resolvers, refuse anchors, aliases and tags,
limit size and depth, and type plain scalars by the YAML 1.2 core schema ourselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from routing_rules.errors import LocatedError, RulesError

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MapNode",
    "Node",
    "ScalarNode",
    "SeqNode",
    "load_yaml",
    "to_python",
]

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 40

# YAML 1.2 core schema, applied to plain (unquoted) scalars only.
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_SPECIAL_FLOAT = re.compile(r"^(?:[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


@dataclass(slots=True)
class Node:
    line: int
    col: int


@dataclass(slots=True)
class ScalarNode(Node):
    value: Any
    text: str = ""
    plain: bool = True


@dataclass(slots=True)
class SeqNode(Node):
    items: list[Node] = field(default_factory=list)


@dataclass(slots=True)
class MapNode(Node):
    items: list[tuple[ScalarNode, Node]] = field(default_factory=list)

    def keys(self) -> list[str]:
        return [k.text for k, _ in self.items]

    def get(self, key: str) -> Node | None:
        for k, v in self.items:
            if k.text == key:
                return v
        return None

    def key_node(self, key: str) -> ScalarNode | None:
        for k, _ in self.items:
            if k.text == key:
                return k
        return None

    def __iter__(self) -> Iterator[tuple[ScalarNode, Node]]:
        return iter(self.items)


def _plain_value(text: str) -> Any:
    if _NULL.match(text):
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _INT10.match(text):
        return int(text)
    if _INT8.match(text):
        return int(text[2:], 8)
    if _INT16.match(text):
        return int(text[2:], 16)
    if _FLOAT.match(text):
        return float(text)
    if _SPECIAL_FLOAT.match(text):
        low = text.lower().lstrip("+")
        return math.nan if "nan" in low else (-math.inf if low.startswith("-") else math.inf)
    return text


class _Refused(Exception):
    def __init__(self, mark: Any, message: str) -> None:
        self.mark = mark
        self.message = message


class _Loader(Reader, Scanner, Parser, Composer, BaseResolver):
    """PyYAML's pipeline with no implicit resolvers and hard refusals."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        BaseResolver.__init__(self)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise _Refused(event.start_mark, "aliases (*name) are not allowed")
        if getattr(event, "anchor", None) is not None:
            raise _Refused(event.start_mark, "anchors (&name) are not allowed")
        if isinstance(event, ScalarEvent | CollectionStartEvent) and event.tag is not None:
            raise _Refused(event.start_mark, f"tags ({event.tag}) are not allowed")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(event.start_mark, f"nesting deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _convert(node: yaml.Node, errors: list[LocatedError]) -> Node:
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    if isinstance(node, yaml.ScalarNode):
        plain = node.style is None
        value = _plain_value(node.value) if plain else node.value
        return ScalarNode(line, col, value, node.value, plain)
    if isinstance(node, yaml.SequenceNode):
        return SeqNode(line, col, [_convert(item, errors) for item in node.value])
    assert isinstance(node, yaml.MappingNode)
    out = MapNode(line, col)
    seen: dict[str, ScalarNode] = {}
    for key_node, value_node in node.value:
        key = _convert(key_node, errors)
        if not isinstance(key, ScalarNode):
            errors.append(LocatedError(key.line, key.col, "", "keys must be plain strings"))
            continue
        if key.text in seen:
            first = seen[key.text]
            errors.append(
                LocatedError(
                    key.line,
                    key.col,
                    "",
                    f'duplicate key "{key.text}" (first at line {first.line})',
                )
            )
            continue
        seen[key.text] = key
        out.items.append((key, _convert(value_node, errors)))
    return out


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise RulesError([LocatedError(line, col, "", "file is not valid UTF-8")]) from None


def load_yaml(data: bytes | str, source: str = "rules.yaml") -> Node:
    """Parse one YAML document into marked nodes, or raise :class:`RulesError`."""
    size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
    if size > MAX_BYTES:
        raise RulesError([LocatedError(1, 1, "", f"file is larger than {MAX_BYTES} bytes")], source)
    try:
        text = _decode(data)
    except RulesError as exc:
        raise RulesError(exc.errors, source) from None
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
    except _Refused as exc:
        raise RulesError(
            [LocatedError(exc.mark.line + 1, exc.mark.column + 1, "", exc.message)], source
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if problem == "but found another document":
            problem = "a file holds exactly one YAML document"
        raise RulesError([LocatedError(line, col, "", f"YAML syntax: {problem}")], source) from None
    except yaml.reader.ReaderError as exc:  # control characters and the like
        before = text[: exc.position]
        line = before.count("\n") + 1
        col = exc.position - (before.rfind("\n") + 1) + 1
        message = f"character U+{exc.character:04X} is not allowed in YAML"
        raise RulesError([LocatedError(line, col, "", message)], source) from None
    except yaml.YAMLError as exc:
        raise RulesError([LocatedError(1, 1, "", f"YAML: {exc}")], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        raise RulesError([LocatedError(1, 1, "", "the file is empty")], source)
    errors: list[LocatedError] = []
    node = _convert(root, errors)
    if errors:
        raise RulesError(errors, source)
    return node


def to_python(node: Node) -> Any:
    """Plain Python values from marked nodes (for data files such as rule test cases)."""
    if isinstance(node, ScalarNode):
        return node.value
    if isinstance(node, SeqNode):
        return [to_python(item) for item in node.items]
    assert isinstance(node, MapNode)
    return {key.text: to_python(value) for key, value in node.items}
