"""Blob stores: where attachment bytes live (the database keeps only their keys)."""

from __future__ import annotations

from adapters.blobs.local import LocalBlobs

__all__ = ["LocalBlobs"]
