"""Timestamps as the contract writes them: ISO 8601 UTC with a `Z`."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_timestamp(seconds: float) -> str:
    """Format seconds since the epoch, e.g. "2026-11-26T03:20:48.123Z"."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
