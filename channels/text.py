"""Text as channels with a length limit send it: in parts."""

from __future__ import annotations

import unicodedata

__all__ = ["split_text"]


def _joins(char: str) -> bool:
    return unicodedata.combining(char) != 0 or char in "\u200d\ufe0e\ufe0f"


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in parts of at most ``limit`` characters, broken at a newline or space in the
    second half of a part when there is one (whitespace at the break is dropped)."""
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = -1
        for separator in ("\n", " "):
            cut = rest.rfind(separator, limit // 2, limit + 1)
            if cut > 0:
                break
        if cut > 0:
            head, rest = rest[:cut], rest[cut + 1 :]
        else:
            cut = limit
            # Do not cut between a character and its combining mark or emoji joiner.
            while cut > limit // 2 and _joins(rest[cut]):
                cut -= 1
            head, rest = rest[:cut], rest[cut:]
        head = head.rstrip()
        rest = rest.lstrip()
        if head:
            parts.append(head)
    if rest or not parts:
        parts.append(rest)
    return parts
