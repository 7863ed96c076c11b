"""The one typed registry of routing facts.

A fact is a named, typed value known about a conversation when it is routed
(``channel``, ``contact.vip``, ``message.text``...). Rules may only test registered
facts, templates may only use registered facts as placeholders, and every later
feature adds its facts here, so ``rules check`` knows them all.

The rules language knows no channels of its own: the values of the ``channel`` fact are
the deployment's channel ids, which the caller hands to :func:`builtin_facts` (through
``load_ruleset(..., channels=...)``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "MATCH_LIMIT",
    "Fact",
    "FactRegistry",
    "FactType",
    "builtin_facts",
    "flatten_facts",
    "fold",
    "is_number",
    "parse_time",
]

MATCH_LIMIT = 10_000  # "matches" looks at this many characters, so text can never stall routing


class FactType(StrEnum):
    STRING = "string"
    ENUM = "enum"
    BOOL = "bool"
    NUMBER = "number"
    LIST = "list"  # list of strings
    TIME = "time"  # RFC 3339 timestamp with offset


@dataclass(frozen=True, slots=True)
class Fact:
    name: str
    type: FactType
    doc: str
    values: tuple[str, ...] = ()  # allowed values of an enum fact

    @property
    def is_text(self) -> bool:
        return self.type in (FactType.STRING, FactType.ENUM)


class FactRegistry:
    """Facts by name; ``contact.<attr>`` facts come from a ruleset's ``attributes:``."""

    def __init__(self, facts: Iterable[Fact]) -> None:
        self._facts: dict[str, Fact] = {}
        for fact in facts:
            self.register(fact)

    def register(self, fact: Fact) -> None:
        if fact.name in self._facts:
            raise ValueError(f"fact {fact.name} is already registered")
        self._facts[fact.name] = fact

    def with_attributes(self, attributes: Mapping[str, FactType]) -> FactRegistry:
        extended = FactRegistry(self._facts.values())
        for name, kind in attributes.items():
            extended.register(Fact(f"contact.{name}", kind, f"custom contact attribute {name}"))
        return extended

    def get(self, name: str) -> Fact | None:
        return self._facts.get(name)

    def names(self) -> list[str]:
        return list(self._facts)

    def __iter__(self) -> Any:
        return iter(self._facts.values())

    def __contains__(self, name: object) -> bool:
        return name in self._facts


_S, _B, _N = FactType.STRING, FactType.BOOL, FactType.NUMBER


# every fact but ``channel``, whose values the caller supplies
_FACTS = (
    Fact("inbox", _S, "the inbox slug from channels.yaml"),
    Fact("contact.name", _S, "the contact's display name"),
    Fact("contact.email", _S, "the contact's email address (verified or not)"),
    Fact("contact.phone", _S, "the contact's phone number in E.164"),
    Fact("contact.language", _S, "the contact's ISO 639-1 language, like de"),
    Fact("contact.tier", _S, "the contact's service tier"),
    Fact("contact.vip", _B, "whether the contact is a VIP"),
    Fact("message.text", _S, "the text of the message that opened (or reopened) the conversation"),
    Fact("message.subject", _S, "the email subject"),
    Fact("message.language", _S, "the message's language as set by the channel or widget"),
    Fact("ivr.choice", _S, "the key(s) a caller pressed in the phone inbox's IVR menu"),
    Fact("conversation.tags", FactType.LIST, "tags already on the conversation"),
    Fact("conversation.reopened", _B, "true when a resolved conversation is being reopened"),
    Fact("time", FactType.TIME, "when the conversation is routed (RFC 3339 with offset)"),
    Fact(
        "history.conversations",
        _N,
        "how many earlier conversations the contact had, on any channel",
    ),
    Fact("history.last_queue", _S, "the queue of the contact's latest earlier conversation"),
    Fact(
        "history.last_agent",
        _S,
        "the agent (user name) of the contact's latest earlier conversation that had one",
    ),
    Fact(
        "history.last_csat",
        _N,
        "the contact's latest CSAT answer (1-5), missing when they never answered",
    ),
    Fact(
        "history.open_elsewhere",
        _N,
        "how many of the contact's conversations are open on other channels",
    ),
)


def builtin_facts(channels: Iterable[str]) -> FactRegistry:
    """The registered facts; ``channels`` are the values the ``channel`` fact may take."""
    values = tuple(channels)
    if not values:
        raise ValueError("the channel fact needs at least one channel id")
    return FactRegistry(
        [Fact("channel", FactType.ENUM, "the channel the customer used", values), *_FACTS]
    )


def fold(text: str) -> str:
    """Caseless, normalization-insensitive form used by string comparisons."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_time(value: object) -> datetime | None:
    """An aware datetime from a datetime or RFC 3339 string; ``None`` if naive or invalid."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None and value.utcoffset() is not None else None
    if not isinstance(value, str) or len(value) < 16 or value[10] not in "Tt ":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def flatten_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Accept ``{"contact": {"vip": true}}`` as well as ``{"contact.vip": true}``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Mapping[str, Any]) -> None:
        for key, item in value.items():
            name = f"{prefix}{key}"
            if isinstance(item, Mapping):
                walk(f"{name}.", item)
            else:
                flat[name] = item

    walk("", facts)
    return flat
