"""An event as an iCalendar (RFC 5545) entry, attached to crew emails, built with `icalendar`.

The library escapes text values (``\\ ; ,`` and line breaks), quotes parameters, folds lines at
75 octets without cutting a UTF-8 character in two and ends them in CRLF. Before it does, line
breaks of every kind become one ``\\n`` and other control characters a space, so nothing typed
into an event's name, location or notes can end a property and start another.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from icalendar import Calendar

PRODID = "-//Sound Fusion//sfcrm//EN"

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # every control character but TAB and LF
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _text(value: str) -> str:
    """A TEXT value as the library gets it: one kind of line break, no other control."""
    return _CONTROL.sub(" ", _LINE_BREAK.sub("\n", value))


def _param(value: str) -> str:
    """A parameter value on one line, without a DQUOTE (as a quoted-string must be)."""
    cleaned = _CONTROL.sub(" ", _LINE_BREAK.sub(" ", value))
    return cleaned.replace("\t", " ").replace('"', "'")


def _uri(value: str) -> str:
    """An address for a URI value: no whitespace, controls or characters that end a line."""
    return re.sub(r"[\x00-\x20\x7f\"<>\\]", "", value)


def _utc(moment: datetime) -> datetime:
    """The moment in UTC, so the entry carries ``...Z`` times; a naive one is refused."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to the calendar")
    return moment.astimezone(UTC)


def event_ics(
    *,
    uid: str,
    summary: str,
    starts_at: datetime,
    ends_at: datetime,
    location: str,
    description: str,
    organizer_email: str | None,
    organizer_name: str | None,
    now: datetime,
    sequence: int = 0,
    cancelled: bool = False,
) -> str:
    """A VCALENDAR with one VEVENT, times in UTC: ``METHOD:PUBLISH``, or with ``cancelled``
    ``METHOD:CANCEL`` and ``STATUS:CANCELLED``. A calendar replaces the entry of the same UID
    it holds with one of a higher SEQUENCE, so a change or cancellation updates it in place."""
    calendar = event_calendar(
        uid=uid, summary=summary, starts_at=starts_at, ends_at=ends_at, location=location,
        description=description, organizer_email=organizer_email,
        organizer_name=organizer_name, now=now, sequence=sequence, cancelled=cancelled,
    )  # fmt: skip
    written: bytes = calendar.to_ical()
    return written.decode("utf-8")


def event_calendar(
    *,
    uid: str,
    summary: str,
    starts_at: datetime,
    ends_at: datetime,
    location: str,
    description: str,
    organizer_email: str | None,
    organizer_name: str | None,
    now: datetime,
    sequence: int = 0,
    cancelled: bool = False,
) -> Calendar:
    """The calendar :func:`event_ics` writes out, as the library's object."""
    from icalendar import Calendar, Event, vCalAddress

    starts, ends, stamp = _utc(starts_at), _utc(ends_at), _utc(now)
    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("method", "CANCEL" if cancelled else "PUBLISH")
    event = Event()
    event.add("uid", _text(uid))
    event.add("sequence", int(sequence))
    event.add("dtstamp", stamp)
    event.add("dtstart", starts)
    event.add("dtend", ends)
    event.add("summary", _text(summary))
    event.add("location", _text(location))
    event.add("description", _text(description))
    address = _uri(organizer_email or "")
    if address:
        organizer = vCalAddress(f"mailto:{address}")
        if organizer_name:
            organizer.params["CN"] = _param(organizer_name)
        event.add("organizer", organizer)
    event.add("status", "CANCELLED" if cancelled else "CONFIRMED")
    event.add("transp", "OPAQUE")
    calendar.add_component(event)
    return calendar
