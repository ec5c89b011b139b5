"""Crew emails: invitations, reminders and setup briefings.

Sending follows one rule: an email is written to the mail log (and the assignment marked as
having it) in the same transaction that selects whom to write to, then sent. Two runs at once,
say two cron ``crew remind``, cannot both pick the same assignment: the second one's
transaction starts after the first one's commit and finds the assignment taken.

These commands run from cron every few minutes, so this module works on plain sqlite3 and
never loads the ORM: a run that has nothing to send is over in a blink.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sfcrm.db import Database, db_time, from_db_time
from sfcrm.errors import NotFoundError, ValidationError
from sfcrm.rsvp import binding
from sfcrm.status import CrewStatus

if TYPE_CHECKING:
    from sfcrm.mail import Mailer, SendReport
    from sfcrm.render import Renderer

log = logging.getLogger("sfcrm.crew")

MAX_REMIND_HOURS = 24 * 366  # `crew remind --hours`: a (leap) year ahead at most

INVITATION = "crew_invitation"
REMINDER = "crew_reminder"
BRIEFING = "crew_briefing"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Org:
    name: str
    phone: str | None
    email: str | None


@dataclass
class MailRun:
    """What a bulk send did: emails written and their fate, and whom it passed over and why."""

    queued: list[int] = field(default_factory=list)  # email ids
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (assignment id, reason)
    previews: list[dict[str, Any]] = field(default_factory=list)  # --dry-run
    dry_run: bool = False
    report: SendReport | None = None

    @property
    def failed(self) -> int:
        return len(self.report.failed) if self.report else 0

    @property
    def sent(self) -> int:
        return len(self.report.sent) if self.report else 0


def format_day(day: str) -> str:
    return datetime.fromisoformat(day).strftime("%A %d %B %Y")


# -- what the templates see ----------------------------------------------------------------------


class EventLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def date(self) -> str: ...
    @property
    def time(self) -> str | None: ...
    @property
    def end_time(self) -> str | None: ...
    @property
    def location(self) -> str: ...
    @property
    def details(self) -> str | None: ...


class AssignmentLike(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def notes(self) -> str | None: ...


class PersonLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def email(self) -> str | None: ...
    @property
    def phone(self) -> str: ...


def email_context(
    org: Org, event: EventLike, crew: AssignmentLike, person: PersonLike, **extra: Any
) -> dict[str, Any]:
    """The variables of every crew template (emails and the RSVP pages)."""
    return {
        "person": {"name": person.name, "email": person.email, "phone": person.phone},
        "role": crew.role,
        "notes": crew.notes,
        "event": {
            "name": event.name,
            "date": format_day(event.date),
            "time": event.time,
            "end_time": event.end_time,
            "location": event.location,
            "details": event.details,
        },
        "org": {"name": org.name, "phone": org.phone, "email": org.email},
        **extra,
    }


# -- rows, read with plain SQL ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventFacts:
    id: int
    name: str
    date: str
    time: str | None
    end_time: str | None
    location: str
    details: str | None
    starts_at: datetime
    ends_at: datetime


@dataclass(frozen=True, slots=True)
class AssignmentFacts:
    id: int
    role: str
    notes: str | None
    status: str
    invitation_sent: bool
    invitation_email_id: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PersonFacts:
    id: int
    name: str
    email: str | None
    phone: str


@dataclass(frozen=True, slots=True)
class MailRow:
    crew: AssignmentFacts
    event: EventFacts
    person: PersonFacts


_SELECT = """
    SELECT c.id, c.role, c.notes, c.status, c.invitation_sent, c.invitation_email_id,
           c.created_at, e.id, e.name, e.date, e.time, e.end_time, e.location, e.details,
           e.starts_at, e.ends_at, p.id, p.name, p.email, p.phone
    FROM event_crew c
    JOIN event e ON e.id = c.event_id
    JOIN person p ON p.id = c.person_id
"""


def _select(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> list[MailRow]:
    rows = conn.execute(f"{_SELECT} WHERE {where} ORDER BY e.starts_at, c.id", params)
    return [
        MailRow(
            AssignmentFacts(cid, role, notes, status, bool(sent), email_id, from_db_time(created)),
            EventFacts(
                eid, name, date, time, end, location, details, from_db_time(start),
                from_db_time(stop),
            ),
            PersonFacts(pid, pname, email, phone),
        )
        for (
            cid, role, notes, status, sent, email_id, created, eid, name, date, time, end,
            location, details, start, stop, pid, pname, email, phone,
        ) in rows
    ]  # fmt: skip


def _event_exists(conn: sqlite3.Connection, event_id: int) -> bool:
    return conn.execute("SELECT 1 FROM event WHERE id = ?", (event_id,)).fetchone() is not None


# -- sending ---------------------------------------------------------------------------------


class CrewMail:
    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], datetime],
        mailer: Callable[[], Mailer],
        renderer: Callable[[], Renderer],
        org: Org,
        # (assignment id, its binding, expiry) -> the personal link, if links are on
        rsvp: Callable[[int, str, datetime], str | None] = lambda _id, _bound, _exp: None,
    ) -> None:
        self.db = db
        self.clock = clock
        self._mailer = mailer
        self._renderer = renderer
        self.org = org
        self._rsvp = rsvp

    def invite(
        self,
        *,
        event_id: int | None = None,
        assignment_ids: Sequence[int] = (),
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> MailRun:
        """Email every selected assignment whose invitation has not been sent yet."""
        if (event_id is None) == (not assignment_ids):
            raise ValidationError("give --event or assignment ids (one of the two)")
        if event_id is not None:
            where, params = "c.event_id = ?", [event_id]
        else:
            ids = list(dict.fromkeys(assignment_ids))
            where, params = f"c.id IN ({', '.join('?' * len(ids))})", ids

        def subject(row: MailRow) -> str:
            return f"You are invited to work on: {row.event.name}"

        def extra(row: MailRow) -> dict[str, Any]:
            bound_to = binding(row.event.id, row.person.id, row.crew.created_at)
            return {"rsvp_url": self._rsvp(row.crew.id, bound_to, row.event.ends_at)}

        def wanted(row: MailRow) -> str | None:
            if row.crew.invitation_sent:
                return "invitation already sent"
            if row.crew.invitation_email_id is not None:
                return (
                    f"invitation already written (email {row.crew.invitation_email_id}); "
                    "see `sfcrm mail retry`"
                )
            if row.crew.status in (CrewStatus.DECLINED, CrewStatus.COMPLETED):
                return f"assignment is {row.crew.status}"
            return None

        return self._run(
            where, params, INVITATION, subject, extra, wanted, "invitation_email_id",
            dry_run=dry_run, progress=progress, check_event=event_id,
            expected_ids=assignment_ids, calendar=True,
        )  # fmt: skip

    def remind(
        self,
        *,
        event_id: int | None = None,
        hours: float = 24,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> MailRun:
        """Remind confirmed crew whose event starts within the next ``hours``; never after
        the event has started, and never twice."""
        if hours <= 0:
            raise ValidationError("--hours must be positive", value=f"{hours:g}")
        if not hours <= MAX_REMIND_HOURS:  # also NaN
            raise ValidationError(
                f"--hours must be at most {MAX_REMIND_HOURS} (a year)", value=f"{hours:g}"
            )
        now = self.clock()
        # the event index picks the window; the rest is checked on its few rows
        where = (
            "e.starts_at > ? AND e.starts_at <= ? AND c.status = ? AND c.reminder_sent = 0 "
            "AND c.reminder_email_id IS NULL"
        )
        params: list[Any] = [
            db_time(now), db_time(now + timedelta(hours=hours)), CrewStatus.CONFIRMED,
        ]  # fmt: skip
        if event_id is not None:
            where += " AND c.event_id = ?"
            params.append(event_id)

        def subject(row: MailRow) -> str:
            return f"Reminder: {row.event.name} - {row.event.date}"

        return self._run(
            where, params, REMINDER, subject, lambda _row: {}, lambda _row: None,
            "reminder_email_id", dry_run=dry_run, progress=progress, check_event=event_id,
        )  # fmt: skip

    def brief(
        self,
        event_id: int,
        *,
        again: bool = False,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> MailRun:
        """Send the setup briefing, with the whole confirmed roster, to confirmed crew."""
        where, params = "c.event_id = ? AND c.status = ?", [event_id, CrewStatus.CONFIRMED]
        with self.db.raw_read() as conn:
            if not _event_exists(conn, event_id):
                raise NotFoundError("no such event", value=str(event_id))
            roster_rows = _select(conn, where, params)
            briefed = {
                found[0]
                for found in conn.execute(
                    "SELECT n.assignment_id FROM email_notification n "
                    "JOIN event_crew c ON c.id = n.assignment_id "
                    "WHERE c.event_id = ? AND n.notification_type = ?",
                    (event_id, BRIEFING),
                )
            }
        roster = [
            {"name": r.person.name, "role": r.crew.role, "phone": r.person.phone}
            for r in roster_rows
        ]

        def subject(row: MailRow) -> str:
            return f"Setup Briefing: {row.event.name}"

        def wanted(row: MailRow) -> str | None:
            if row.crew.id in briefed and not again:
                return "briefing already written (use --again to send it once more)"
            return None

        return self._run(
            where, params, BRIEFING, subject, lambda _row: {"roster": roster}, wanted, None,
            dry_run=dry_run, progress=progress, check_event=event_id,
        )  # fmt: skip

    def _run(
        self,
        where: str,
        params: Sequence[Any],
        kind: str,
        subject: Callable[[MailRow], str],
        extra: Callable[[MailRow], dict[str, Any]],
        wanted: Callable[[MailRow], str | None],
        claim_column: str | None,
        *,
        dry_run: bool,
        progress: Progress | None,
        check_event: int | None = None,
        expected_ids: Sequence[int] = (),
        calendar: bool = False,
    ) -> MailRun:
        run = MailRun(dry_run=dry_run)
        mailer = None if dry_run else self._mailer()
        if mailer is not None:
            mailer.check()  # a setting that cannot work fails now, with nothing written
        # One transaction selects, writes the log rows and claims the assignments.
        with self.db.raw_read() if dry_run else self.db.raw_write() as conn:
            if check_event is not None and not _event_exists(conn, check_event):
                raise NotFoundError("no such event", value=str(check_event))
            rows = _select(conn, where, params)
            missing = sorted(set(expected_ids) - {r.crew.id for r in rows})
            if missing:
                raise NotFoundError("no such assignment", value=", ".join(map(str, missing)))
            claims: list[tuple[int, int]] = []
            for row in rows:
                reason = wanted(row)
                if reason is None and not row.person.email:
                    reason = f"{row.person.name} has no email address"
                if reason is not None:
                    run.skipped.append((row.crew.id, reason))
                    continue
                title, text, html = self._compose(row, kind, subject(row), **extra(row))
                if dry_run:
                    run.previews.append(
                        {"assignment_id": row.crew.id, "recipient": row.person.email,
                         "subject": title, "message": text}
                    )  # fmt: skip
                    continue
                assert mailer is not None and row.person.email
                email_id = mailer.queue(
                    conn,
                    recipient=row.person.email,
                    notification_type=kind,
                    subject=title,
                    text=text,
                    html=html,
                    attachments=[self._ics(row)] if calendar else [],
                    person_id=row.person.id,
                    assignment_id=row.crew.id,
                )
                run.queued.append(email_id)
                claims.append((email_id, row.crew.id))
            if claim_column and claims:
                conn.executemany(
                    f"UPDATE event_crew SET {claim_column} = ? WHERE id = ?",  # noqa: S608
                    claims,
                )
        if mailer is not None and run.queued:
            run.report = mailer.send(run.queued, progress=progress)
        return run

    def _compose(
        self, row: MailRow, kind: str, subject: str, **extra: Any
    ) -> tuple[str, str, str | None]:
        renderer = self._renderer()
        context = email_context(self.org, row.event, row.crew, row.person, **extra)
        text = renderer.render(f"{kind}.txt.j2", **context)
        html = (
            renderer.render(f"{kind}.html.j2", **context)
            if renderer.has(f"{kind}.html.j2")
            else None
        )
        return subject, text, html

    def _ics(self, row: MailRow) -> tuple[str, str, bytes]:
        from sfcrm.ics import event_ics

        event = row.event
        description = f"Your role: {row.crew.role}"
        if row.crew.notes:
            description += f"\n{row.crew.notes}"
        if event.details:
            description += f"\n\n{event.details}"
        text = event_ics(
            uid=f"event-{event.id}-crew-{row.crew.id}@sfcrm",
            summary=event.name,
            starts_at=event.starts_at,
            ends_at=event.ends_at,
            location=event.location,
            description=description,
            organizer_email=self.org.email,
            organizer_name=self.org.name,
            now=self.clock(),
        )
        return ("event.ics", "text/calendar; method=PUBLISH", text.encode("utf-8"))
