"""Stored times shown to people: every column holds UTC, shown in SFCRM_TIMEZONE."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo


def iso_in(value: datetime | None, tz: ZoneInfo) -> str | None:
    """A stored UTC time as local ISO text, to the second."""
    return value.astimezone(tz).isoformat(timespec="seconds") if value else None
