"""An event as an iCalendar (RFC 5545) entry, attached to crew emails, built with `icalendar`.

The library escapes text values (``\\ ; ,`` and line breaks), quotes parameters, folds lines
within 75 octets without cutting a UTF-8 character in two and ends them in CRLF. Before it
does, line breaks of every kind become one ``\\n`` and other control characters a space, so
nothing typed into an event's name, location or notes can end a property and start another.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from icalendar import Calendar, Event

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


def entry_uid(event_id: int, assignment_id: int) -> str:
    """The UID of an assignment's calendar entry, in its emails and its person's feed alike,
    so a calendar holding both shows it once."""
    return f"event-{event_id}-crew-{assignment_id}@sfcrm"


def entry_description(role: str, notes: str | None, details: str | None) -> str:
    """What an assignment's calendar entry says: the role, the notes, the event's details."""
    description = f"Your role: {role}"
    if notes:
        description += f"\n{notes}"
    if details:
        description += f"\n\n{details}"
    return description


def feed_entry(
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
    sequence: int,
    status: str,
) -> Event:
    """One VEVENT of a calendar feed, checked and cleaned as an email's entry is, with its
    ``status`` (TENTATIVE, CONFIRMED or CANCELLED); a cancelled one holds no time."""
    from icalendar import Event, vText

    event = Event()
    _own(event, uid=uid, description=description, now=now)
    _shared(event, summary=summary, starts_at=starts_at, ends_at=ends_at, location=location,
            organizer_email=organizer_email, organizer_name=organizer_name,
            sequence=int(sequence), cancelled=status == "CANCELLED")  # fmt: skip
    event["STATUS"] = vText(status)
    if status == "CANCELLED":
        event["TRANSP"] = vText("TRANSPARENT")
    return event


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
    it holds with one of a higher SEQUENCE, so a change or cancellation updates it in place.

    The text of :func:`event_calendar`'s calendar, written by the library in two pieces: the
    lines all the crew of an event share, once per event (a batch sends a thousand of them),
    and each member's own (UID, DTSTAMP, DESCRIPTION), for each.
    """
    from icalendar import Event
    from icalendar.parser import Contentlines

    head, tail = _shared_text(
        summary, _utc(starts_at), _utc(ends_at), location, organizer_email, organizer_name,
        int(sequence), cancelled,
    )  # fmt: skip
    own = Event()
    _own(own, uid=uid, description=description, now=now)
    lines = own.content_lines()[1:-2]  # without BEGIN:VEVENT, END:VEVENT and the last line end
    written: bytes = Contentlines(lines).to_ical()  # type: ignore[no-untyped-call]
    return head + written.decode("utf-8") + tail


@functools.lru_cache(maxsize=64)
def _shared_text(
    summary: str,
    starts_at: datetime,
    ends_at: datetime,
    location: str,
    organizer_email: str | None,
    organizer_name: str | None,
    sequence: int,
    cancelled: bool,
) -> tuple[str, str]:
    """The calendar's shared lines, split after ``BEGIN:VEVENT``, where a member's own go."""
    from icalendar import Event

    event = Event()
    calendar = _calendar(event, cancelled=cancelled)
    _shared(event, summary=summary, starts_at=starts_at, ends_at=ends_at, location=location,
            organizer_email=organizer_email, organizer_name=organizer_name, sequence=sequence,
            cancelled=cancelled)  # fmt: skip
    written: bytes = calendar.to_ical()
    head, marker, tail = written.decode("utf-8").partition("BEGIN:VEVENT\r\n")
    assert marker, "the calendar has its event"
    return head + marker, tail


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
    """The calendar :func:`event_ics` writes out, as the library's object, built in one go."""
    from icalendar import Event

    event = Event()
    calendar = _calendar(event, cancelled=cancelled)
    _own(event, uid=uid, description=description, now=now)
    _shared(event, summary=summary, starts_at=starts_at, ends_at=ends_at, location=location,
            organizer_email=organizer_email, organizer_name=organizer_name,
            sequence=int(sequence), cancelled=cancelled)  # fmt: skip
    return calendar


# Each property is given as the library's value type: what ``add`` would infer, without
# inferring it again for every entry of a batch.


def _calendar(event: Event, *, cancelled: bool) -> Calendar:
    from icalendar import Calendar, vText

    calendar = Calendar()
    calendar["PRODID"] = vText(PRODID)
    calendar["VERSION"] = vText("2.0")
    calendar["CALSCALE"] = vText("GREGORIAN")
    calendar["METHOD"] = vText("CANCEL" if cancelled else "PUBLISH")
    calendar.add_component(event)
    return calendar


def _own(event: Event, *, uid: str, description: str, now: datetime) -> None:
    """What differs between two crew members' entries of one event."""
    from icalendar import vDDDTypes, vText

    event["UID"] = vText(_text(uid))
    event["DTSTAMP"] = vDDDTypes(_utc(now))
    event["DESCRIPTION"] = vText(_text(description))


def _shared(
    event: Event,
    *,
    summary: str,
    starts_at: datetime,
    ends_at: datetime,
    location: str,
    organizer_email: str | None,
    organizer_name: str | None,
    sequence: int,
    cancelled: bool,
) -> None:
    """What the entry of every crew member of one event says."""
    from icalendar import vCalAddress, vDDDTypes, vInt, vText

    event["SEQUENCE"] = vInt(sequence)
    event["DTSTART"] = vDDDTypes(_utc(starts_at))
    event["DTEND"] = vDDDTypes(_utc(ends_at))
    event["SUMMARY"] = vText(_text(summary))
    event["LOCATION"] = vText(_text(location))
    address = _uri(organizer_email or "")
    if address:
        organizer = vCalAddress(f"mailto:{address}")
        if organizer_name:
            organizer.params["CN"] = _param(organizer_name)
        event["ORGANIZER"] = organizer
    event["STATUS"] = vText("CANCELLED" if cancelled else "CONFIRMED")
    event["TRANSP"] = vText("OPAQUE")
