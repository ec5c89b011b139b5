"""Events: what Sound Fusion works, when and where.

Dates and times are typed as wall-clock in SFCRM_TIMEZONE and kept as typed; the UTC moments
``starts_at``/``ends_at`` are derived once, so overlap and reminder queries follow an index.
An event without a time starts at midnight; without an end time it lasts to the end of its day
(so two events on one date without times overlap); an end time earlier than the start time
means the event runs past midnight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date as Date
from datetime import datetime, timedelta
from datetime import time as Time
from typing import Any
from zoneinfo import ZoneInfo

from sqlmodel import col, select

from sfcrm.db import Database
from sfcrm.errors import NotFoundError, ValidationError
from sfcrm.models import Event

MAX_TEXT = 200
MAX_DETAILS = 4000
# Every date typed (an event's, `mail list --since`) lies here: far enough from the ends of
# Python's calendar that its UTC moment, and the next day, exist in every time zone.
FIRST_DATE = Date(1900, 1, 1)
LAST_DATE = Date(2999, 12, 31)


def event_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "name": event.name,
        "date": event.date,
        "time": event.time,
        "end_time": event.end_time,
        "location": event.location,
        "details": event.details,
    }


def _one_line(text: str, what: str, limit: int = MAX_TEXT) -> str:
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if not cleaned:
        raise ValidationError(f"{what} must not be empty")
    if len(cleaned) > limit:
        raise ValidationError(f"{what} is longer than {limit} characters")
    return cleaned


def clean_details(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    # Keep line breaks (they are instructions), drop other control characters.
    cleaned = "".join(ch for ch in text.replace("\r\n", "\n") if ch == "\n" or ch.isprintable())
    if len(cleaned) > MAX_DETAILS:
        raise ValidationError(f"details are longer than {MAX_DETAILS} characters")
    return cleaned.strip()


def parse_date(text: str) -> Date:
    try:
        day = Date.fromisoformat(text.strip())
    except ValueError:
        raise ValidationError("date must be YYYY-MM-DD", value=text) from None
    if not FIRST_DATE <= day <= LAST_DATE:
        raise ValidationError(
            f"date must be from {FIRST_DATE.isoformat()} to {LAST_DATE.isoformat()}", value=text
        )
    return day


def parse_time(text: str | None, what: str = "time") -> Time | None:
    if text is None or not text.strip():
        return None
    try:
        parsed = datetime.strptime(text.strip(), "%H:%M")
    except ValueError:
        raise ValidationError(f"{what} must be HH:MM (24-hour)", value=text) from None
    return parsed.time()


def event_span(
    day: Date, start: Time | None, end: Time | None, tz: ZoneInfo
) -> tuple[datetime, datetime]:
    """The event's (start, end) as aware datetimes."""
    starts = datetime.combine(day, start or Time(0, 0), tzinfo=tz)
    if end is None:
        ends = datetime.combine(day + timedelta(days=1), Time(0, 0), tzinfo=tz)
    else:
        ends = datetime.combine(day, end, tzinfo=tz)
        if ends <= starts:
            ends += timedelta(days=1)
    return starts, ends


class Events:
    def __init__(self, db: Database, clock: Callable[[], datetime], tz: ZoneInfo) -> None:
        self.db = db
        self.clock = clock
        self.tz = tz

    def add(
        self,
        name: str,
        date: str,
        location: str,
        *,
        time: str | None = None,
        end_time: str | None = None,
        details: str | None = None,
    ) -> Event:
        day = parse_date(date)
        start = parse_time(time)
        end = parse_time(end_time, "end time")
        if end is not None and start is None:
            raise ValidationError("an end time needs a start time (--time)")
        starts, ends = event_span(day, start, end, self.tz)
        event = Event(
            name=_one_line(name, "name"),
            date=day.isoformat(),
            time=start.strftime("%H:%M") if start else None,
            end_time=end.strftime("%H:%M") if end else None,
            location=_one_line(location, "location"),
            details=clean_details(details),
            starts_at=starts,
            ends_at=ends,
            created_at=self.clock(),
        )
        with self.db.write() as session:
            session.add(event)
            session.flush()
        return event

    def get(self, event_id: int) -> Event:
        with self.db.read() as session:
            event = session.get(Event, event_id)
            if event is None:
                raise NotFoundError("no such event", value=str(event_id))
            return event

    def find(self, *, upcoming: bool = False, limit: int = 200) -> Sequence[Event]:
        with self.db.read() as session:
            query = select(Event).order_by(col(Event.starts_at), col(Event.id)).limit(limit)
            if upcoming:
                query = query.where(col(Event.ends_at) > self.clock())
            return session.exec(query).all()
