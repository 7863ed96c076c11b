"""Located errors: every problem in an admin-edited file points at its line and column."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LocatedError", "RulesError", "did_you_mean", "format_errors"]


@dataclass(frozen=True, order=True, slots=True)
class LocatedError:
    """One problem in a file: 1-based ``line`` and ``col`` of the offending node."""

    line: int
    col: int
    where: str
    message: str

    def format(self, path: str) -> str:
        where = f" {self.where}:" if self.where else ""
        return f"{path}:{self.line}:{self.col}:{where} {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"line": self.line, "col": self.col, "where": self.where, "message": self.message}


class RulesError(Exception):
    """Raised when a file does not load; ``errors`` holds every problem found, sorted."""

    def __init__(self, errors: Iterable[LocatedError], source: str = "rules.yaml") -> None:
        self.errors = sorted(set(errors))
        self.source = source
        super().__init__(format_errors(self.errors, source))


def format_errors(errors: Iterable[LocatedError], path: str) -> str:
    return "\n".join(e.format(path) for e in sorted(errors))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean "x"?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
