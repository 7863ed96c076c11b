"""What ``omniroute serve`` refuses to start with: placeholder secrets and weak keys.

The values shipped in ``deploy/`` (and the fake channel's built-in default) are public: a
server running with them accepts forged webhooks and sessions. ``OMNIROUTE_SECRET_KEY``
signs sessions, thread tokens and Message-IDs, so it must also look random. Every problem
names the setting, never its value.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, SecretStr

from channels import WEBHOOK_APPS
from router.channels_config import ChannelsConfig
from router.settings import Settings

__all__ = ["KEY_MIN_BITS", "KEY_MIN_DISTINCT", "PLACEHOLDERS", "secret_problems", "weak_key"]

#: Exact values shipped in deploy/omniroute.env and docker-compose.yml, and built-in defaults.
PLACEHOLDERS = frozenset(
    {
        "change-me-to-48-random-characters-0123456789abcdef",  # deploy/omniroute.env
        "change-me-too",  # deploy/omniroute.env, OMNIROUTE_DEMO_FAKE_SECRET
        "fake-secret",  # the fake channel's default secret
    }
)
# Words that mark a value someone was meant to replace.
_MARKERS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "replace_me")
#: A key's characters must carry this many bits by their frequencies (Shannon entropy times
#: length): 32 random hex digits (128 bits) always do, 46 characters of mostly "x" don't.
KEY_MIN_BITS = 80
KEY_MIN_DISTINCT = 8


def is_placeholder(value: str) -> bool:
    folded = value.strip().lower()
    return folded in PLACEHOLDERS or any(marker in folded for marker in _MARKERS)


def weak_key(value: str) -> str | None:
    """Why ``value`` is not a usable secret key, or None (the value is never quoted)."""
    if is_placeholder(value):
        return "is a placeholder shipped with omniroute: generate a random one"
    if len(value) < 32:
        return "must be at least 32 characters"
    counts = Counter(value)
    if len(counts) < KEY_MIN_DISTINCT:
        return f"has too few distinct characters (fewer than {KEY_MIN_DISTINCT}): not random"
    for period in range(1, len(value) // 2 + 1):
        if all(value[i] == value[i + period] for i in range(len(value) - period)):
            return "repeats a short pattern: not random"
    bits = -sum(n * math.log2(n / len(value)) for n in counts.values())
    if bits < KEY_MIN_BITS:
        return (
            f"has too little entropy (about {bits:.0f} bits, at least {KEY_MIN_BITS}): not random"
        )
    return None


def _secrets(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(path, secret) for every SecretStr in a channels.yaml model, however nested."""
    if isinstance(value, SecretStr):
        yield where, value.get_secret_value()
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secrets(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _secrets(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _secrets(item, f"{where}[{i}]")


def secret_problems(settings: Settings, channels: ChannelsConfig | None) -> list[str]:
    """Every placeholder or weak secret ``serve`` must refuse, each naming its setting."""
    problems: list[str] = []
    if settings.secret_key is not None:
        reason = weak_key(settings.secret_key.get_secret_value())
        if reason:
            problems.append(f"OMNIROUTE_SECRET_KEY: {reason}")
    if channels is not None:
        where = settings.channels_path
        found = [*_secrets(channels.inboxes, "inboxes")]
        for provider, kind in WEBHOOK_APPS.items():
            found.extend(_secrets(channels.apps.get(provider, {}), kind.section))
        for path, value in found:
            if is_placeholder(value):
                problems.append(
                    f"{where}: {path}: is a placeholder shipped with omniroute: set the real secret"
                )
    return problems
