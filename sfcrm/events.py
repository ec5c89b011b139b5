"""Events: what Sound Fusion works, when and where.

Dates and times are typed as wall-clock in SFCRM_TIMEZONE and kept as typed; the UTC moments
``starts_at``/``ends_at`` are derived once, so overlap and reminder queries follow an index.
An event without a time starts at midnight; without an end time it lasts to the end of its day
(so two events on one date without times overlap); an end time earlier than the start time
means the event runs past midnight.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date as Date
from datetime import datetime, timedelta
from datetime import time as Time
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import update
from sqlmodel import Session, col, select

from sfcrm import audit
from sfcrm.db import Database
from sfcrm.errors import ConflictError, NotFoundError, ValidationError
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
        "cancelled": event.cancelled_at is not None,
        "cancel_reason": event.cancel_reason,
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


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)


def parse_date(text: str) -> Date:
    """A date as typed for every date option: ``YYYY-MM-DD`` exactly (not the other forms ISO
    allows, 20261212 or 2026-W50-1, which read as typos)."""
    try:
        if not _DATE.fullmatch(text.strip()):
            raise ValueError(text)
        day = Date.fromisoformat(text.strip())
    except ValueError:
        raise ValidationError(
            "date must be YYYY-MM-DD", value=text, hint="e.g. 2026-12-05: four-digit year, "
            "two-digit month and day, with dashes"
        ) from None  # fmt: skip
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


# What crew are told of when it changes: the event's time and place.
RESCHEDULING = ("date", "time", "end_time", "location")
_EDITABLE = ("name", "date", "time", "end_time", "location", "details")


def _fields(event: Event) -> dict[str, str | None]:
    return {name: getattr(event, name) for name in _EDITABLE}


@dataclass(frozen=True)
class EventChanges:
    """What ``events edit`` was asked to change, checked as ``events add`` checks it. A field
    left None stays as it is; an empty ``time``, ``end_time`` or ``details`` clears it."""

    tz: ZoneInfo
    name: str | None = None
    date: Date | None = None
    time: Time | None = None
    clear_time: bool = False
    end_time: Time | None = None
    clear_end_time: bool = False
    location: str | None = None
    details: str | None = None
    clear_details: bool = False
    past: bool = False  # the event may be moved to a time already over (recording history)

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.name,
                self.date,
                self.time,
                self.clear_time,
                self.end_time,
                self.clear_end_time,
                self.location,
                self.details,
                self.clear_details,
            )
        )

    def apply(self, event: Event) -> dict[str, tuple[str | None, str | None]]:
        """Change ``event`` (its UTC moments too); return each field changed as (before,
        after)."""
        before = _fields(event)
        start = self.time or (None if self.clear_time else parse_time(event.time))
        # clearing the start time clears the end time with it
        keep_end = not (self.clear_end_time or self.clear_time)
        end = self.end_time or (parse_time(event.end_time, "end time") if keep_end else None)
        if end is not None and start is None:
            raise ValidationError("an end time needs a start time (--time)")
        day = self.date or Date.fromisoformat(event.date)
        event.starts_at, event.ends_at = event_span(day, start, end, self.tz)
        event.date = day.isoformat()
        event.time = start.strftime("%H:%M") if start else None
        event.end_time = end.strftime("%H:%M") if end else None
        event.name = self.name or event.name
        event.location = self.location or event.location
        if self.details is not None or self.clear_details:
            event.details = self.details
        return audit.changed(before, _fields(event))


@dataclass
class EventEdit:
    """An event as changed: each field's (before, after), and whether crew are to be told."""

    event: Event
    changes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    @property
    def rescheduled(self) -> bool:
        """Its time or place changed: what crew are told of."""
        return any(name in self.changes for name in RESCHEDULING)


def locked_event(session: Session, event_id: int) -> Event:
    event = session.get(Event, event_id, with_for_update=True)
    if event is None:
        raise NotFoundError("no such event", value=str(event_id))
    return event


def next_sequence(session: Session, event: Event) -> int:
    """Raise the event's calendar SEQUENCE (crew are about to be sent an update) and return it:
    one statement, so two changes at once never raise it to the same number."""
    session.execute(
        update(Event)
        .where(col(Event.id) == event.id)
        .values(sequence=col(Event.sequence) + 1)
        .execution_options(synchronize_session=False)
    )
    session.refresh(event, ["sequence"])
    return event.sequence


def edit_event(session: Session, event_id: int, changes: EventChanges, now: datetime) -> EventEdit:
    """Change the event in the caller's write transaction, with its audit entry; a change of
    time or place raises its calendar SEQUENCE."""
    event = locked_event(session, event_id)
    if event.cancelled_at is not None:
        raise ConflictError(
            f"{event.name} is cancelled",
            value=f"event {event_id}",
            hint="a cancelled event cannot be changed",
        )
    edit = EventEdit(event, changes.apply(event))
    moved = any(name in edit.changes for name in ("date", "time", "end_time"))
    if moved and not changes.past:
        refuse_past(event, now)
    if edit.changes:
        if edit.rescheduled:
            next_sequence(session, event)
        session.add(event)
        audit.record(session, "event.edit", now=now, changes=edit.changes, event_id=event_id)
    return edit


def refuse_past(event: Event, now: datetime) -> None:
    """An event is put at a time already over only when asked to (``--past``): a date typed in
    the past is far more often a typo than history being recorded."""
    if event.ends_at <= now:
        raise ValidationError(
            f"{event.name} would be over already", value=event.date + (
                f" {event.time}" if event.time else ""),
            hint="check the date; add --past to record an event that took place",
        )  # fmt: skip


def cancel_event(session: Session, event_id: int, reason: str | None, now: datetime) -> Event:
    """Mark the event cancelled in the caller's write transaction, with its audit entry."""
    event = locked_event(session, event_id)
    if event.cancelled_at is not None:
        raise ConflictError(f"{event.name} is already cancelled", value=f"event {event_id}")
    if event.ends_at <= now:
        raise ConflictError(
            f"{event.name} is over",
            value=f"event {event_id}",
            hint="an event that took place cannot be cancelled",
        )
    event.cancelled_at, event.cancel_reason = now, reason
    next_sequence(session, event)
    session.add(event)
    audit.record(
        session,
        "event.cancel",
        now=now,
        reason=reason,
        event_id=event_id,
        changes={"cancelled": (False, True)},
    )
    return event


def clean_reason(text: str | None) -> str | None:
    return None if text is None or not text.strip() else _one_line(text, "reason", MAX_TEXT)


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
        past: bool = False,
    ) -> Event:
        """Add an event; one already over is refused unless ``past`` (recording history)."""
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
        if not past:
            refuse_past(event, self.clock())
        with self.db.write() as session:
            session.add(event)
            session.flush()
        return event

    def changes(
        self,
        *,
        name: str | None = None,
        date: str | None = None,
        time: str | None = None,
        end_time: str | None = None,
        location: str | None = None,
        details: str | None = None,
        past: bool = False,
    ) -> EventChanges:
        """The changes asked for, checked as :meth:`add` checks them (``""`` clears a time or
        the details; ``past`` allows moving the event to a time already over); apply them
        with :meth:`sfcrm.crewmail.CrewMail.edit_event`."""
        changes = EventChanges(
            self.tz,
            name=None if name is None else _one_line(name, "name"),
            date=None if date is None else parse_date(date),
            time=parse_time(time),
            clear_time=time is not None and not time.strip(),
            end_time=parse_time(end_time, "end time"),
            clear_end_time=end_time is not None and not end_time.strip(),
            location=None if location is None else _one_line(location, "location"),
            details=clean_details(details),
            clear_details=details is not None and not details.strip(),
            past=past,
        )
        if changes.empty:
            raise ValidationError(
                "nothing to change",
                hint="give --name, --date, --time, --end-time, --location or --details",
            )
        return changes

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
