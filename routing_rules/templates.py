"""Message templates with ``{fact}`` and ``{fact|fallback}`` placeholders.

Rendered by our own code, never ``str.format`` (which would let a template reach
attributes of the objects passed in). ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Template", "parse_template"]


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    text: str
    # Alternating literal text and (fact, fallback) placeholders.
    parts: tuple[str | tuple[str, str | None], ...]

    @property
    def placeholders(self) -> list[str]:
        return [p[0] for p in self.parts if isinstance(p, tuple)]

    def render(self, facts: Mapping[str, Any]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            fact, fallback = part
            value = facts.get(fact)
            if value is None or value == "" or value == []:
                out.append(fallback or "")
            elif isinstance(value, list | tuple):
                out.append(", ".join(str(v) for v in value))
            elif isinstance(value, bool):
                out.append("yes" if value else "no")
            else:
                out.append(str(value))
        return "".join(out)


def parse_template(name: str, text: str) -> Template:
    """Split a template into parts; raise ``ValueError`` for an unbalanced brace."""
    parts: list[str | tuple[str, str | None]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "{" and text.startswith("{{", i):
            literal.append("{")
            i += 2
        elif ch == "}" and text.startswith("}}", i):
            literal.append("}")
            i += 2
        elif ch == "{":
            end = text.find("}", i)
            if end == -1:
                raise ValueError(f'unclosed "{{" at character {i + 1}')
            inner = text[i + 1 : end]
            fact, sep, fallback = inner.partition("|")
            fact = fact.strip()
            if not fact or "{" in inner:
                raise ValueError(f'empty or malformed placeholder "{{{inner}}}"')
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append((fact, fallback if sep else None))
            i = end + 1
        elif ch == "}":
            raise ValueError(f'unmatched "}}" at character {i + 1} (write "}}}}" for a brace)')
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    return Template(name, text, tuple(parts))
