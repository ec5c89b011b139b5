"""The event crew CRM: who works which event in which role, and the emails around it.

Sending follows one rule: an email is written to the mail log (and the assignment marked as
having it) in the same transaction that selects whom to write to, then sent. Two runs at once,
say two cron ``crew remind``, cannot both pick the same assignment: the second one's
transaction starts after the first one's commit and finds the assignment taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from sfcrm.db import Database, raw_connection
from sfcrm.errors import ConflictError, NotFoundError, ValidationError
from sfcrm.events import _one_line
from sfcrm.models import CrewStatus, EmailNotification, Event, EventCrew, Person
from sfcrm.people import find_person

if TYPE_CHECKING:
    from sfcrm.mail import Mailer, SendReport
    from sfcrm.render import Renderer

log = logging.getLogger("sfcrm.crew")

INVITATION = "crew_invitation"
REMINDER = "crew_reminder"
BRIEFING = "crew_briefing"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Org:
    name: str
    phone: str | None
    email: str | None


@dataclass(frozen=True)
class CrewRow:
    crew: EventCrew
    event: Event
    person: Person

    def json(self, tz: ZoneInfo) -> dict[str, Any]:
        c = self.crew

        def iso(value: datetime | None) -> str | None:
            return value.astimezone(tz).isoformat(timespec="seconds") if value else None

        return {
            "id": c.id,
            "event_id": c.event_id,
            "event": self.event.name,
            "person_id": c.person_id,
            "name": self.person.name,
            "email": self.person.email,
            "role": c.role,
            "status": c.status,
            "invitation_sent": c.invitation_sent,
            "invitation_sent_at": iso(c.invitation_sent_at),
            "reminder_sent": c.reminder_sent,
            "reminder_sent_at": iso(c.reminder_sent_at),
            "notes": c.notes,
        }


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


class Crew:
    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], datetime],
        tz: ZoneInfo,
        mailer: Callable[[], Mailer],
        renderer: Callable[[], Renderer],
        org: Org,
        rsvp: Callable[[int, datetime], str | None] = lambda _id, _exp: None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.tz = tz
        self._mailer = mailer
        self._renderer = renderer
        self.org = org
        self._rsvp = rsvp

    # -- assignments -----------------------------------------------------------------------

    def assign(
        self,
        event_id: int,
        person_ref: str,
        role: str,
        *,
        notes: str | None = None,
        allow_overlap: bool = False,
    ) -> CrewRow:
        from sfcrm.events import clean_details

        role_text = _one_line(role, "role", 80)
        notes_text = clean_details(notes)
        with self.db.write() as session:
            event = session.get(Event, event_id)
            if event is None:
                raise NotFoundError("no such event", value=str(event_id))
            person = find_person(session, person_ref)
            existing = session.exec(
                select(EventCrew).where(
                    EventCrew.event_id == event_id, EventCrew.person_id == person.id
                )
            ).first()
            if existing is not None:
                raise ConflictError(
                    f"{person.name} is already on {event.name} as {existing.role}",
                    value=f"assignment {existing.id}",
                )
            if not allow_overlap:
                clash = self._clash(session, person, event)
                if clash is not None:
                    raise ConflictError(
                        f"{person.name} is already on {clash.name} ({clash.date}"
                        + (f" {clash.time}" if clash.time else "")
                        + f"), which overlaps {event.name}",
                        value=f"event {clash.id}",
                        hint="use --allow-overlap if that is intended",
                    )
            assert person.id is not None
            crew = EventCrew(
                event_id=event_id,
                person_id=person.id,
                role=role_text,
                notes=notes_text,
                created_at=self.clock(),
            )
            session.add(crew)
            session.flush()
        log.info("assignment %s: %s on event %s as %s", crew.id, person.id, event_id, role_text)
        return CrewRow(crew, event, person)

    def _clash(self, session: Session, person: Person, event: Event) -> Event | None:
        return session.exec(
            select(Event)
            .join(EventCrew, col(EventCrew.event_id) == col(Event.id))
            .where(EventCrew.person_id == person.id)
            .where(col(EventCrew.status) != CrewStatus.DECLINED)
            .where(col(Event.id) != event.id)
            .where(col(Event.starts_at) < event.ends_at)
            .where(col(Event.ends_at) > event.starts_at)
            .order_by(col(Event.starts_at))
        ).first()

    def _rows(self, session: Session, query: Any) -> list[CrewRow]:
        return [CrewRow(c, e, p) for c, e, p in session.exec(query).all()]

    def _base(self) -> Any:
        return (
            select(EventCrew, Event, Person)
            .join(Event, col(Event.id) == col(EventCrew.event_id))
            .join(Person, col(Person.id) == col(EventCrew.person_id))
        )

    def find(
        self,
        *,
        event_id: int | None = None,
        status: str | None = None,
        search: str | None = None,
        limit: int = 500,
    ) -> list[CrewRow]:
        if status is not None and status not in CrewStatus.ALL:
            raise ValidationError(
                "unknown status", value=status, hint="one of " + ", ".join(CrewStatus.ALL)
            )
        query = self._base().order_by(col(Event.starts_at), col(EventCrew.id)).limit(limit)
        if event_id is not None:
            query = query.where(EventCrew.event_id == event_id)
        if status is not None:
            query = query.where(EventCrew.status == status)
        if search:
            pattern = f"%{search.lower()}%"
            query = query.where(
                or_(
                    func.lower(Person.name).like(pattern),
                    func.lower(Person.email).like(pattern),
                    func.lower(Event.name).like(pattern),
                    func.lower(EventCrew.role).like(pattern),
                )
            )
        with self.db.read() as session:
            if event_id is not None and session.get(Event, event_id) is None:
                raise NotFoundError("no such event", value=str(event_id))
            return self._rows(session, query)

    def get(self, assignment_id: int) -> CrewRow:
        with self.db.read() as session:
            rows = self._rows(session, self._base().where(EventCrew.id == assignment_id))
        if not rows:
            raise NotFoundError("no such assignment", value=str(assignment_id))
        return rows[0]

    def respond(self, assignment_id: int, answer: str, *, via: str = "office") -> CrewRow:
        """Record a confirm or decline. Allowed until the event ends; completed is final."""
        target = {"confirm": CrewStatus.CONFIRMED, "decline": CrewStatus.DECLINED}.get(answer)
        if target is None:
            raise ValidationError("answer must be confirm or decline", value=answer)
        with self.db.write() as session:
            crew = session.get(EventCrew, assignment_id)
            if crew is None:
                raise NotFoundError("no such assignment", value=str(assignment_id))
            event = session.get(Event, crew.event_id)
            assert event is not None
            if crew.status == CrewStatus.COMPLETED:
                raise ConflictError(f"assignment {assignment_id} is already completed")
            if event.ends_at <= self.clock():
                raise ConflictError(f"{event.name} is over; the answer can no longer change")
            if crew.status != target:
                crew.status = target
                crew.responded_at = self.clock()
                session.add(crew)
                log.info("assignment %s %s (%s)", assignment_id, target, via)
        return self.get(assignment_id)

    def complete(self, event_id: int) -> list[CrewRow]:
        """After the event: every confirmed crew member becomes completed."""
        with self.db.write() as session:
            event = session.get(Event, event_id)
            if event is None:
                raise NotFoundError("no such event", value=str(event_id))
            if event.ends_at > self.clock():
                raise ConflictError(
                    f"{event.name} has not ended yet",
                    hint="mark crew completed after the event",
                )
            crews = session.exec(
                select(EventCrew).where(
                    EventCrew.event_id == event_id, EventCrew.status == CrewStatus.CONFIRMED
                )
            ).all()
            for crew in crews:
                crew.status = CrewStatus.COMPLETED
                session.add(crew)
            ids = [c.id for c in crews]
        log.info("event %s: %s crew completed", event_id, len(ids))
        return [self.get(i) for i in ids if i is not None]

    def assignments_of(self, person_ref: str) -> tuple[Person, dict[str, list[CrewRow]]]:
        """A crew member's own view: pending invitations, confirmed, completed, declined."""
        with self.db.read() as session:
            person = find_person(session, person_ref)
            rows = self._rows(
                session,
                self._base()
                .where(EventCrew.person_id == person.id)
                .order_by(col(Event.starts_at), col(EventCrew.id)),
            )
        groups: dict[str, list[CrewRow]] = {
            "pending": [], "confirmed": [], "completed": [], "declined": [],
        }  # fmt: skip
        key = {CrewStatus.INVITED: "pending"}
        for row in rows:
            groups[key.get(row.crew.status, row.crew.status)].append(row)
        return person, groups

    # -- email -----------------------------------------------------------------------------

    def context(self, row: CrewRow, **extra: Any) -> dict[str, Any]:
        event, crew, person = row.event, row.crew, row.person
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
            "org": {"name": self.org.name, "phone": self.org.phone, "email": self.org.email},
            **extra,
        }

    def _compose(
        self, row: CrewRow, kind: str, subject: str, **extra: Any
    ) -> tuple[str, str, str | None]:
        renderer = self._renderer()
        context = self.context(row, **extra)
        text = renderer.render(f"{kind}.txt.j2", **context)
        html = (
            renderer.render(f"{kind}.html.j2", **context)
            if renderer.has(f"{kind}.html.j2")
            else None
        )
        return subject, text, html

    def _ics(self, row: CrewRow) -> tuple[str, str, bytes]:
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

    def _select(self, session: Session, query: Any) -> list[CrewRow]:
        return self._rows(session, query.order_by(col(Event.starts_at), col(EventCrew.id)))

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
        query = self._base()
        if event_id is not None:
            query = query.where(EventCrew.event_id == event_id)
        else:
            query = query.where(col(EventCrew.id).in_(list(assignment_ids)))

        def subject(row: CrewRow) -> str:
            return f"You are invited to work on: {row.event.name}"

        def extra(row: CrewRow) -> dict[str, Any]:
            assert row.crew.id is not None
            return {"rsvp_url": self._rsvp(row.crew.id, row.event.ends_at)}

        def wanted(row: CrewRow) -> str | None:
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
            query, INVITATION, subject, extra, wanted, "invitation_email_id",
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
        now = self.clock()
        query = (
            self._base()
            .where(EventCrew.status == CrewStatus.CONFIRMED)
            .where(col(EventCrew.reminder_sent).is_(False))
            .where(col(EventCrew.reminder_email_id).is_(None))
            .where(col(Event.starts_at) > now)
            .where(col(Event.starts_at) <= now + timedelta(hours=hours))
        )
        if event_id is not None:
            query = query.where(EventCrew.event_id == event_id)

        def subject(row: CrewRow) -> str:
            return f"Reminder: {row.event.name} - {row.event.date}"

        return self._run(
            query, REMINDER, subject, lambda _row: {}, lambda _row: None, "reminder_email_id",
            dry_run=dry_run, progress=progress, check_event=event_id,
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
        query = (
            self._base()
            .where(EventCrew.event_id == event_id)
            .where(EventCrew.status == CrewStatus.CONFIRMED)
        )
        with self.db.read() as session:
            if session.get(Event, event_id) is None:
                raise NotFoundError("no such event", value=str(event_id))
            roster_rows = self._select(session, query)
            briefed = set(
                session.exec(
                    select(EmailNotification.assignment_id).where(
                        EmailNotification.notification_type == BRIEFING,
                        col(EmailNotification.assignment_id).in_([r.crew.id for r in roster_rows]),
                    )
                ).all()
            )
        roster = [
            {"name": r.person.name, "role": r.crew.role, "phone": r.person.phone}
            for r in roster_rows
        ]

        def subject(row: CrewRow) -> str:
            return f"Setup Briefing: {row.event.name}"

        def wanted(row: CrewRow) -> str | None:
            if row.crew.id in briefed and not again:
                return "briefing already written (use --again to send it once more)"
            return None

        return self._run(
            query, BRIEFING, subject, lambda _row: {"roster": roster}, wanted, None,
            dry_run=dry_run, progress=progress, check_event=event_id,
        )  # fmt: skip

    def _run(
        self,
        query: Any,
        kind: str,
        subject: Callable[[CrewRow], str],
        extra: Callable[[CrewRow], dict[str, Any]],
        wanted: Callable[[CrewRow], str | None],
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
        # One transaction selects, writes the log rows and claims the assignments.
        with self.db.read() if dry_run else self.db.write() as session:
            if check_event is not None and session.get(Event, check_event) is None:
                raise NotFoundError("no such event", value=str(check_event))
            rows = self._select(session, query)
            missing = sorted(set(expected_ids) - {r.crew.id for r in rows if r.crew.id})
            if missing:
                raise NotFoundError("no such assignment", value=", ".join(map(str, missing)))
            claims: list[tuple[int, int]] = []
            for row in rows:
                assert row.crew.id is not None
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
                    session,
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
                # the assignments are taken in this transaction (plain SQL: one statement)
                raw_connection(session).executemany(
                    f"UPDATE event_crew SET {claim_column} = ? WHERE id = ?",  # noqa: S608
                    claims,
                )
        if mailer is not None and run.queued:
            run.report = mailer.send(run.queued, progress=progress)
        return run
