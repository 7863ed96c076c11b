"""Thread tokens: ``[#<conversation id>-<8 hex HMAC>]`` in outbound subjects (email).

A reply that keeps the token in its subject is matched to its conversation even when its
client dropped ``In-Reply-To``/``References``. The HMAC makes tokens unguessable: a stranger
cannot write into someone else's conversation by typing ``[#42-...]``; and even a valid
token only joins when the core also accepts the sender (see ``router.pipeline``).
"""

from __future__ import annotations

import hashlib
import hmac
import re

__all__ = ["TOKEN", "thread_token", "token_conversation"]

TOKEN = re.compile(r"\[#(\d{1,18})-([0-9a-f]{8})\]")


def _mac(secret: bytes, conversation_id: int) -> str:
    return hmac.new(secret, f"conversation:{conversation_id}".encode(), hashlib.sha256).hexdigest()[
        :8
    ]


def thread_token(secret: bytes, conversation_id: int) -> str:
    return f"[#{conversation_id}-{_mac(secret, conversation_id)}]"


def token_conversation(secret: bytes, text: str | None) -> int | None:
    """The conversation a valid token in ``text`` names, else None (checked in constant time)."""
    for match in TOKEN.finditer(text or ""):
        conversation_id = int(match.group(1))
        if hmac.compare_digest(match.group(2), _mac(secret, conversation_id)):
            return conversation_id
    return None
