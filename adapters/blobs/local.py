"""Attachment bytes in a local directory, content-addressed (``sha256/<2>/<62>``).

The same bytes stored twice are one file, written once; a write goes to a temporary file
that is fsynced and renamed, so a crash never leaves a half-written blob under its key.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["LocalBlobs"]


class LocalBlobs:
    def __init__(self, directory: Path, *, max_size: int = 50 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_size = max_size

    def _path(self, key: str) -> Path:
        kind, _, digest = key.partition(":")
        if (
            kind != "sha256"
            or len(digest) != 64
            or not all(c in "0123456789abcdef" for c in digest)
        ):
            raise KeyError(f"not a blob key: {key!r}")
        return self.directory / "sha256" / digest[:2] / digest[2:]

    def _put(self, data: bytes) -> str:
        key = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self._path(key)
        if path.exists():
            return key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    async def put(self, data: bytes, content_type: str, filename: str | None = None) -> str:
        """Store ``data``; returns its key. Larger than ``max_size``: ValueError."""
        if len(data) > self.max_size:
            raise ValueError(f"attachment of {len(data)} bytes is over the {self.max_size} limit")
        return await asyncio.to_thread(self._put, data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._path(key).read_bytes)

    async def delete(self, key: str) -> bool:
        """Remove a blob (a data-protection erasure); False when it was not there."""
        path = self._path(key)

        def remove() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            return True

        return await asyncio.to_thread(remove)
