"""A crew member's calendar feed (``/crew/me/<token>/calendar.ics``): every event they are on,
built with the ``icalendar`` package through :mod:`sfcrm.ics`, which builds the emails'
entries with the same checks.

Each assignment is one VEVENT with the UID of its invitation's attachment
(``event-<event id>-crew-<assignment id>@sfcrm``), so a calendar holding both shows it once.
STATUS is TENTATIVE while invited, CONFIRMED once confirmed (and after the event), CANCELLED for
a declined assignment, a cancelled event or a crew member taken off it. SEQUENCE is the event's
(raised by each change crew are told of) plus the assignment's changes in the audit log (each
answer, check-in, edit or removal), so the feed's entry is never older than an email's and
grows with every change.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

PRODID = "-//Sound Fusion//sfcrm crew feed//EN"
HISTORY = timedelta(days=180)  # past events kept in the feed

_STATUS = {
    "invited": "TENTATIVE",
    "confirmed": "CONFIRMED",
    "completed": "CONFIRMED",
    "no_show": "CONFIRMED",
    "declined": "CANCELLED",
    "cancelled": "CANCELLED",
    "removed": "CANCELLED",
}


def sequence_of(event_sequence: int, changes: int) -> int:
    """The event's SEQUENCE (what its emails carry) plus each change of the assignment since
    (an answer, a check-in, an edit, a removal): never lower than an email's, and higher
    after every change."""
    return event_sequence + changes


def assignment_changes(session: Any, assignment_ids: list[int]) -> dict[int, int]:
    """How many changes the audit log holds for each assignment."""
    from sqlalchemy import func
    from sqlmodel import col, select

    from sfcrm.models import AuditEntry

    if not assignment_ids:
        return {}
    rows = session.exec(
        select(AuditEntry.assignment_id, func.count())
        .where(col(AuditEntry.assignment_id).in_(assignment_ids))
        .group_by(col(AuditEntry.assignment_id))
    ).all()
    return {int(a): int(n) for a, n in rows if a is not None}


def person_feed(session: Any, person: Any, org: Any, now: datetime) -> bytes:
    """The person's feed as iCalendar bytes (CRLF lines, folded at 75 octets)."""
    import icalendar
    from sqlmodel import col

    from sfcrm.crew import crew_rows, crew_select
    from sfcrm.ics import entry_description, entry_uid, feed_entry
    from sfcrm.models import Event, EventCrew

    rows = crew_rows(
        session,
        crew_select()
        .where(EventCrew.person_id == person.id)
        .where(col(Event.ends_at) > now - HISTORY)
        .order_by(col(Event.starts_at), col(EventCrew.id)),
    )
    changes = assignment_changes(session, [r.crew.id for r in rows if r.crew.id is not None])
    calendar = icalendar.Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("method", "PUBLISH")
    calendar.add("x-wr-calname", f"{org.name}: {person.name}")
    calendar.add("refresh-interval", timedelta(hours=1), parameters={"VALUE": "DURATION"})
    calendar.add("x-published-ttl", "PT1H")
    for row in rows:
        crew, event = row.crew, row.event
        status = "CANCELLED" if event.cancelled_at is not None else _STATUS.get(crew.status)
        if status is None:
            continue
        assert event.id is not None and crew.id is not None  # read from the tables
        entry = feed_entry(
            uid=entry_uid(event.id, crew.id),
            summary=event.name,
            starts_at=event.starts_at,
            ends_at=event.ends_at,
            location=event.location,
            description=entry_description(crew.role, crew.notes, event.details),
            organizer_email=org.email,
            organizer_name=org.name,
            now=now,
            sequence=sequence_of(event.sequence, changes.get(crew.id, 0)),
            status=status,
        )
        calendar.add_component(entry)
    data: bytes = calendar.to_ical()
    return data
