"""The event crew CRM: who works which event in which role, and the one writer of the
``event_crew`` table. Their emails are written and sent by :mod:`sfcrm.crewmail`, which tells
this module what became of them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Integer, Update, and_, bindparam, or_, update
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import Select

from sfcrm import audit
from sfcrm.db import Database
from sfcrm.errors import ClashError, ConflictError, NotFoundError, ValidationError
from sfcrm.events import _one_line, next_sequence
from sfcrm.models import (
    CrewStatus,
    EmailNotification,
    Event,
    EventCrew,
    Person,
    UTCDateTime,
    table,
)
from sfcrm.people import find_person, search_condition
from sfcrm.rsvp import binding
from sfcrm.times import iso_in

log = logging.getLogger("sfcrm.crew")

# The kinds of crew email (``email_notification.notification_type``)
INVITATION = "crew_invitation"
REMINDER = "crew_reminder"
BRIEFING = "crew_briefing"
CHANGE = "crew_change"  # the event's time or place changed
CANCELLATION = "crew_cancellation"  # the event was cancelled
REMOVAL = "crew_removed"  # taken off the event
PAGE_LINK = "crew_link"  # a crew member's own page link (`crew link --email`)
KINDS = (INVITATION, REMINDER, BRIEFING, CHANGE, CANCELLATION, REMOVAL, PAGE_LINK)

# The assignment's columns that follow an email of each kind: the email written (set when it
# is queued, so two runs at once cannot both queue one), then sent and when.
_WRITTEN = {INVITATION: "invitation_email_id", REMINDER: "reminder_email_id"}
_SENT = {
    INVITATION: ("invitation_sent", "invitation_sent_at"),
    REMINDER: ("reminder_sent", "reminder_sent_at"),
}


@dataclass(frozen=True)
class Org:
    name: str
    phone: str | None
    email: str | None


@dataclass(frozen=True)
class CrewRow:
    """One assignment with its event and person, read together in one select."""

    crew: EventCrew
    event: Event
    person: Person

    @property
    def binding(self) -> str:
        """What this assignment's RSVP links are bound to (see :mod:`sfcrm.rsvp`)."""
        return binding(self.crew.event_id, self.crew.person_id, self.crew.created_at)

    def json(self, tz: ZoneInfo) -> dict[str, Any]:
        c = self.crew
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
            "invitation_sent_at": iso_in(c.invitation_sent_at, tz),
            "reminder_sent": c.reminder_sent,
            "reminder_sent_at": iso_in(c.reminder_sent_at, tz),
            "notes": c.notes,
        }


def format_day(day: str) -> str:
    return datetime.fromisoformat(day).strftime("%A %d %B %Y")


def template_context(org: Org, row: CrewRow, **extra: Any) -> dict[str, Any]:
    """The variables of every crew template (emails and the RSVP pages)."""
    person, event = row.person, row.event
    return {
        "person": {"name": person.name, "email": person.email, "phone": person.phone},
        "role": row.crew.role,
        "notes": row.crew.notes,
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


def crew_select() -> Select[EventCrew, Event, Person]:
    """Assignments joined to their event and person: the rows of :class:`CrewRow`."""
    return (
        select(EventCrew, Event, Person)
        .join(Event, col(Event.id) == col(EventCrew.event_id))
        .join(Person, col(Person.id) == col(EventCrew.person_id))
    )


def crew_rows(session: Session, query: Select[EventCrew, Event, Person]) -> list[CrewRow]:
    return [CrewRow(c, e, p) for c, e, p in session.exec(query).all()]


def note_emails_written(session: Session, kind: str, written: Sequence[tuple[int, int]]) -> None:
    """Each (assignment id, email id): the assignment's email of this kind is written, in the
    transaction that wrote it. Kinds an assignment does not keep (briefings) change nothing."""
    if kind in _WRITTEN and written:
        session.exec(
            _written_statement(kind),
            params=[{"assignment": a, "email": e} for a, e in written],
        )


def note_emails_sent(session: Session, sent: Sequence[tuple[int, str, int]], now: datetime) -> None:
    """Each (assignment id, kind, email id) went out at ``now``: each assignment is marked only
    when it is still the email the assignment keeps (an old reminder sent late, written before
    the event moved and its reminders were re-armed, leaves the new one due). One statement a
    kind, each built once, on the table."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for assignment_id, kind, email_id in sent:
        if kind in _SENT:
            by_kind.setdefault(kind, []).append(
                {"assignment": assignment_id, "email": email_id, "at": now}
            )
    for kind, params in by_kind.items():
        session.connection().execute(_sent_statement(kind), params)


def forget_superseded(session: Session, superseded: Sequence[tuple[int, int, str]]) -> set[int]:
    """Each (email id, assignment id, kind) superseded: an assignment whose invitation or
    reminder it was no longer has one written (so a new one can be). Returns the assignments
    whose unsent invitation it was."""
    c = table(EventCrew).c
    uninvited: set[int] = set()
    for email_id, assignment_id, kind in superseded:
        if kind not in _WRITTEN:
            continue
        column = c[_WRITTEN[kind]]
        moved = session.connection().execute(
            update(table(EventCrew))
            .where(c.id == assignment_id, column == email_id)
            .values({column: None})
        )
        if moved.rowcount and kind == INVITATION:
            uninvited.add(assignment_id)
    return uninvited


@functools.cache
def _written_statement(kind: str) -> Update:
    c = table(EventCrew).c
    return (
        update(table(EventCrew))
        .where(c.id == bindparam("assignment"))
        .values({_WRITTEN[kind]: bindparam("email", type_=Integer)})
    )


@functools.cache
def _sent_statement(kind: str) -> Update:
    c = table(EventCrew).c
    flag, at = _SENT[kind]
    return (
        update(table(EventCrew))
        .where(c.id == bindparam("assignment"))
        .where(c[_WRITTEN[kind]] == bindparam("email", type_=Integer))
        .values({flag: True, at: bindparam("at", type_=UTCDateTime)})
    )


def clashing_with(event: Event) -> ColumnElement[bool]:
    """An assignment (of the rows selected) that holds its person's time on another event,
    not cancelled, that overlaps ``event``: the one rule of what clashes."""
    return and_(
        col(EventCrew.status).in_(CrewStatus.BOOKED),
        col(Event.id) != event.id,
        col(Event.cancelled_at).is_(None),
        col(Event.starts_at) < event.ends_at,
        col(Event.ends_at) > event.starts_at,
    )


def confirmed_clashes(session: Session, event: Event) -> list[tuple[CrewRow, CrewRow]]:
    """Each confirmed crew member of ``event`` booked on another event at its time: (their
    assignment on ``event``, the other assignment)."""
    mine = crew_rows(
        session,
        crew_select()
        .where(EventCrew.event_id == event.id, EventCrew.status == CrewStatus.CONFIRMED)
        .order_by(col(EventCrew.id)),
    )
    if not mine:
        return []
    by_person = {row.person.id: row for row in mine}
    others = crew_rows(
        session,
        crew_select()
        .where(col(EventCrew.person_id).in_(list(by_person)))
        .where(clashing_with(event))
        .order_by(col(EventCrew.person_id), col(Event.starts_at)),
    )
    return [(by_person[other.person.id], other) for other in others]


def answer_refusal(crew: EventCrew, event: Event) -> str | None:
    """Why the crew member can no longer answer (cancelled, removed), or None."""
    if event.cancelled_at is not None or crew.status == CrewStatus.CANCELLED:
        return f"{event.name} was cancelled"
    if crew.status == CrewStatus.REMOVED:
        return f"the crew member was removed from {event.name}"
    return None


def rearm_reminders(session: Session, event_id: int) -> None:
    """The event's time or place changed: its crew are reminded again, of the new one."""
    c = table(EventCrew).c
    session.execute(
        update(table(EventCrew))
        .where(c.event_id == event_id)
        .where(or_(c.reminder_sent.is_(True), c.reminder_email_id.is_not(None)))
        .values(reminder_sent=False, reminder_sent_at=None, reminder_email_id=None)
    )


def cancel_assignments(session: Session, event_id: int) -> None:
    """The event is cancelled: every assignment still on it is too."""
    c = table(EventCrew).c
    session.execute(
        update(table(EventCrew))
        .where(c.event_id == event_id, c.status != CrewStatus.REMOVED)
        .values(status=CrewStatus.CANCELLED)
    )


def remove_assignment(session: Session, assignment_id: int, now: datetime) -> CrewRow:
    """Take the assignment off its event (the row stays: emails point at it), with its audit
    entry; returns it as it was before."""
    crew = session.get(EventCrew, assignment_id, with_for_update=True)
    if crew is None:
        raise NotFoundError("no such assignment", value=str(assignment_id))
    event, person = session.get(Event, crew.event_id), session.get(Person, crew.person_id)
    assert event is not None and person is not None
    if crew.status in (CrewStatus.COMPLETED, *CrewStatus.CLOSED):
        raise ConflictError(
            f"assignment {assignment_id} is {crew.status}",
            hint="only an invited, confirmed or declined one can be removed",
        )
    before = EventCrew.model_validate(crew.model_dump())
    crew.status = CrewStatus.REMOVED
    session.add(crew)
    next_sequence(session, event)  # the removed one's calendar cancellation supersedes all
    audit.record(
        session,
        "assignment.remove",
        now=now,
        changes={"status": (before.status, crew.status)},
        person_id=crew.person_id,
        event_id=crew.event_id,
        assignment_id=assignment_id,
    )
    return CrewRow(before, event, person)


def _revive(
    session: Session,
    crew: EventCrew,
    event: Event,
    role: str,
    notes: str | None,
    now: datetime,
    past: bool = False,
) -> EventCrew:
    """A removed assignment put back on its event: invited afresh (its old RSVP links stay
    dead), under the same calendar entry, whose next update supersedes the cancellation; or,
    ``past``, recorded as having worked it."""
    status = crew.status
    crew.sqlmodel_update(
        {"status": CrewStatus.CONFIRMED if past else CrewStatus.INVITED, "role": role,
         "notes": notes, "created_at": now,
         "invitation_sent": False, "invitation_sent_at": None, "invitation_email_id": None,
         "reminder_sent": False, "reminder_sent_at": None, "reminder_email_id": None,
         "responded_at": now if past else None}
    )  # fmt: skip
    session.add(crew)
    next_sequence(session, event)
    audit.record(
        session,
        "assignment.revive",
        now=now,
        changes={"status": (status, crew.status)},
        person_id=crew.person_id,
        event_id=crew.event_id,
        assignment_id=crew.id,
    )
    session.flush()
    return crew


def _locked_assignment(
    session: Session, assignment_id: int, bound_to: str | None
) -> tuple[EventCrew, Event]:
    """The assignment (locked) and its event; with ``bound_to`` (a link's binding) only if the
    row at that id is still the assignment the link was made for."""
    crew = session.get(EventCrew, assignment_id, with_for_update=True)
    if crew is None or (
        bound_to is not None and binding(crew.event_id, crew.person_id, crew.created_at) != bound_to
    ):
        raise NotFoundError("no such assignment", value=str(assignment_id))
    event = session.get(Event, crew.event_id)
    assert event is not None
    return crew, event


class Crew:
    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], datetime],
        tz: ZoneInfo,
        org: Org,
    ) -> None:
        self.db = db
        self.clock = clock
        self.tz = tz
        self.org = org

    # -- assignments -----------------------------------------------------------------------

    def assign(
        self,
        event_id: int,
        person_ref: str,
        role: str,
        *,
        notes: str | None = None,
        allow_overlap: bool = False,
        past: bool = False,
    ) -> CrewRow:
        """Put a person on an event in a role: invited. An event that is over takes only
        ``past`` assignments (recording who worked it): confirmed at once, never invited, so
        that :meth:`complete` records their attendance."""
        from sfcrm.events import clean_details

        role_text = _one_line(role, "role", 80)
        notes_text = clean_details(notes)
        with self.db.write() as session:
            # Locked: a cancellation at the same moment either sees this assignment (and
            # cancels it with the rest) or has cancelled the event before it is read here.
            event = session.get(Event, event_id, with_for_update=True)
            if event is None:
                raise NotFoundError("no such event", value=str(event_id))
            if event.cancelled_at is not None:
                raise ConflictError(f"{event.name} is cancelled", value=f"event {event_id}")
            now = self.clock()
            over = event.ends_at <= now
            if over and not past:
                raise ConflictError(
                    f"{event.name} is over", value=f"event {event_id}",
                    hint="add --past to record who worked it (they are never invited)",
                )  # fmt: skip
            if past and not over:
                raise ValidationError(
                    f"{event.name} is not over: --past records who worked an event that took"
                    " place", value=f"event {event_id}", hint="leave out --past to invite them",
                )  # fmt: skip
            person = find_person(session, person_ref)
            # One assignment of a person at a time: the duplicate and overlap checks below
            # must see any other being written for them (PostgreSQL has no file lock).
            session.refresh(person, with_for_update=True)
            if person.archived_at is not None:
                raise ConflictError(
                    f"{person.name} is archived and cannot be put on an event",
                    value=f"person {person.id}",
                    hint=f"`sfcrm people unarchive {person.id}` first, if they are back",
                )
            existing = session.exec(
                select(EventCrew).where(
                    EventCrew.event_id == event_id, EventCrew.person_id == person.id
                )
            ).first()
            if existing is not None and existing.status == CrewStatus.REMOVED:
                if not allow_overlap:
                    self._refuse_clash(session, person, event)
                existing = _revive(session, existing, event, role_text, notes_text, now, past)
                log.info("assignment %s: %s back on event %s", existing.id, person.id, event_id)
                return CrewRow(existing, event, person)
            if existing is not None:
                raise ConflictError(
                    f"{person.name} is already on {event.name} as {existing.role}",
                    value=f"assignment {existing.id}",
                )
            if not allow_overlap:
                self._refuse_clash(session, person, event)
            assert person.id is not None
            crew = EventCrew(
                event_id=event_id,
                person_id=person.id,
                role=role_text,
                notes=notes_text,
                created_at=now,
                # (recorded after the event: they worked it, and were never asked)
                status=CrewStatus.CONFIRMED if past else CrewStatus.INVITED,
                responded_at=now if past else None,
            )
            session.add(crew)
            session.flush()
        log.info("assignment %s: %s on event %s as %s", crew.id, person.id, event_id, role_text)
        return CrewRow(crew, event, person)

    def edit(
        self,
        assignment_id: int,
        *,
        role: str | None = None,
        notes: str | None = None,
        remove_notes: bool = False,
    ) -> tuple[CrewRow, dict[str, tuple[Any, Any]]]:
        """Correct an assignment's role or notes (None keeps them; ``remove_notes`` clears
        them), checked as at ``assign``. No email is sent. Returns the assignment and what
        changed, which goes to the audit log in the same transaction."""
        from sfcrm.events import clean_details

        if role is None and notes is None and not remove_notes:
            raise ValidationError("nothing to change", hint="give --role, --notes or --no-notes")
        if notes is not None and remove_notes:
            raise ValidationError("give --notes or --no-notes, not both")
        wanted: dict[str, str | None] = {}
        if role is not None:
            wanted["role"] = _one_line(role, "role", 80)
        if remove_notes:
            wanted["notes"] = None
        elif notes is not None:
            wanted["notes"] = clean_details(notes)
            if wanted["notes"] is None:
                raise ValidationError("notes must not be empty", hint="--no-notes removes them")
        with self.db.write() as session:
            crew = session.get(EventCrew, assignment_id, with_for_update=True)
            if crew is None:
                raise NotFoundError("no such assignment", value=str(assignment_id))
            changes = audit.changed({k: getattr(crew, k) for k in wanted}, wanted)
            if changes:
                for what, (_before, after) in changes.items():
                    setattr(crew, what, after)
                session.add(crew)
                session.flush()
                audit.record(
                    session, "assignment.edit", now=self.clock(), changes=changes,
                    assignment_id=crew.id, event_id=crew.event_id, person_id=crew.person_id,
                )  # fmt: skip
                log.info("assignment %s edited: %s", assignment_id, ", ".join(changes))
        return self.get(assignment_id), changes

    def _refuse_clash(self, session: Session, person: Person, event: Event) -> None:
        clash = self._clash(session, person, event)
        if clash is not None:
            when = f"{clash.date}" + (f" {clash.time}" if clash.time else "")
            raise ClashError(
                f"{person.name} is already on {clash.name} (event {clash.id}, {when}),"
                f" which overlaps {event.name} (event {event.id})",
                other={"id": clash.id, "name": clash.name, "date": format_day(clash.date),
                       "time": clash.time},
                hint="use --allow-overlap if that is intended",
            )  # fmt: skip

    def _clash(self, session: Session, person: Person, event: Event) -> Event | None:
        return session.exec(
            select(Event)
            .join(EventCrew, col(EventCrew.event_id) == col(Event.id))
            .where(EventCrew.person_id == person.id)
            .where(clashing_with(event))
            .order_by(col(Event.starts_at))
        ).first()

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
        query = crew_select().order_by(col(Event.starts_at), col(EventCrew.id)).limit(limit)
        if event_id is not None:
            query = query.where(EventCrew.event_id == event_id)
        if status is not None:
            query = query.where(EventCrew.status == status)
        if search:
            texts = (Person.name, Person.email, Event.name, EventCrew.role)
            query = query.where(search_condition(search, *texts, phone=Person.phone))
        with self.db.read() as session:
            if event_id is not None and session.get(Event, event_id) is None:
                raise NotFoundError("no such event", value=str(event_id))
            return crew_rows(session, query)

    def get(self, assignment_id: int) -> CrewRow:
        with self.db.read() as session:
            rows = crew_rows(session, crew_select().where(col(EventCrew.id) == assignment_id))
        if not rows:
            raise NotFoundError("no such assignment", value=str(assignment_id))
        return rows[0]

    def respond(
        self,
        assignment_id: int,
        answer: str,
        *,
        via: str = "office",
        bound_to: str | None = None,
        allow_overlap: bool = False,
    ) -> CrewRow:
        """Record a confirm or decline. Allowed until the event ends; completed is final.
        A declined assignment confirmed again is refused (:class:`ClashError`) when the
        person has since been booked on an overlapping event, unless ``allow_overlap``.
        With ``bound_to`` (an RSVP link's binding), only if the row at that id is still the
        assignment the link was made for."""
        target = {"confirm": CrewStatus.CONFIRMED, "decline": CrewStatus.DECLINED}.get(answer)
        if target is None:
            raise ValidationError("answer must be confirm or decline", value=answer)
        with self.db.write() as session:
            crew, event = _locked_assignment(session, assignment_id, bound_to)
            if crew.status == CrewStatus.COMPLETED:
                raise ConflictError(f"assignment {assignment_id} is already completed")
            refusal = answer_refusal(crew, event)
            if refusal is not None:
                raise ConflictError(refusal, value=f"assignment {assignment_id}")
            if event.ends_at <= self.clock():
                raise ConflictError(f"{event.name} is over; the answer can no longer change")
            if crew.status == CrewStatus.DECLINED and target == CrewStatus.CONFIRMED:
                person = session.get(Person, crew.person_id, with_for_update=True)
                assert person is not None
                if not allow_overlap:
                    self._refuse_clash(session, person, event)
            if crew.status != target:
                changes = audit.changed({"status": crew.status}, {"status": target})
                crew.status = target
                crew.responded_at = self.clock()
                session.add(crew)
                session.flush()
                audit.record(
                    session, f"assignment.{answer}", now=crew.responded_at, changes=changes,
                    reason=via, assignment_id=crew.id, event_id=crew.event_id,
                    person_id=crew.person_id,
                )  # fmt: skip
                log.info("assignment %s %s (%s)", assignment_id, target, via)
        return self.get(assignment_id)

    def check_in(
        self, assignment_id: int, *, via: str = "office", bound_to: str | None = None
    ) -> CrewRow:
        """Record that a confirmed crew member has arrived: from two hours before the call
        time to the event's end; once (a second check-in keeps the first time)."""
        from sfcrm.portal import CHECKIN_OPENS

        with self.db.write() as session:
            crew, event = _locked_assignment(session, assignment_id, bound_to)
            now = self.clock()
            refusal = answer_refusal(crew, event)
            if refusal is None and crew.status != CrewStatus.CONFIRMED:
                refusal = f"only confirmed crew check in; this assignment is {crew.status}"
            if refusal is not None:
                raise ConflictError(refusal, value=f"assignment {assignment_id}")
            opens = event.starts_at - CHECKIN_OPENS
            if now < opens:
                raise ConflictError(
                    f"check-in for {event.name} opens two hours before the call time",
                    value=iso_in(opens, self.tz),
                )
            if now >= event.ends_at:
                raise ConflictError(
                    f"{event.name} is over",
                    hint=f"record attendance with `sfcrm crew complete --event {event.id}`",
                )
            if crew.checked_in_at is None:
                crew.checked_in_at = now
                session.add(crew)
                session.flush()
                audit.record(
                    session, "assignment.check_in", now=now, reason=via,
                    assignment_id=crew.id, event_id=crew.event_id, person_id=crew.person_id,
                )  # fmt: skip
                log.info("assignment %s checked in (%s)", assignment_id, via)
        return self.get(assignment_id)

    def invitation_carries(self, assignment_id: int, text: str) -> bool:
        """Whether the invitation the mail log holds for this assignment contains ``text``
        (a link, say). An assignment that took a deleted one's id has its own invitation,
        or none."""
        with self.db.read() as session:
            message = session.exec(
                select(EmailNotification.message)
                .join(EventCrew, col(EventCrew.invitation_email_id) == col(EmailNotification.id))
                .where(EventCrew.id == assignment_id)
            ).first()
        return message is not None and text in message

    def complete(
        self, event_id: int, *, no_show: Sequence[int] = (), everyone: bool = False
    ) -> tuple[list[CrewRow], list[CrewRow]]:
        """After the event, record who worked it: the ``no_show`` assignments did not turn up;
        every other confirmed crew member who checked in is completed. When nobody on the event
        checked in (check-in unused), or with ``everyone``, the rest are completed too;
        otherwise they stay confirmed, to be named by a later run. Returns the assignments
        changed, and those left confirmed (not checked in)."""
        wanted = set(no_show)
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
                select(EventCrew).where(EventCrew.event_id == event_id).with_for_update()
            ).all()
            by_id = {c.id: c for c in crews}
            for assignment_id in sorted(wanted):
                crew = by_id.get(assignment_id)
                if crew is None:
                    raise NotFoundError(
                        f"assignment {assignment_id} is not on {event.name}",
                        value=f"event {event_id}", hint=f"see `sfcrm crew list --event {event_id}`",
                    )  # fmt: skip
                if crew.status not in (CrewStatus.CONFIRMED, CrewStatus.NO_SHOW):
                    raise ConflictError(
                        f"assignment {assignment_id} is {crew.status}: only confirmed crew can"
                        " be marked as not turning up", value=f"event {event_id}",
                    )  # fmt: skip
            checked_in_used = any(c.checked_in_at is not None for c in crews)
            changed: list[int] = []
            left: list[int] = []
            now = self.clock()
            for crew in crews:
                if crew.status != CrewStatus.CONFIRMED:
                    continue
                assert crew.id is not None
                if crew.id in wanted:
                    crew.status = CrewStatus.NO_SHOW
                    audit.record(
                        session, "assignment.no_show", now=now,
                        changes={"status": (CrewStatus.CONFIRMED, CrewStatus.NO_SHOW)},
                        assignment_id=crew.id, event_id=event_id, person_id=crew.person_id,
                    )  # fmt: skip
                elif crew.checked_in_at is not None or everyone or not checked_in_used:
                    crew.status = CrewStatus.COMPLETED
                else:
                    left.append(crew.id)
                    continue
                session.add(crew)
                changed.append(crew.id)
        log.info("event %s: %s crew recorded, %s not checked in", event_id, len(changed), len(left))
        return [self.get(i) for i in changed], [self.get(i) for i in left]

    def assignments_of(self, person_ref: str) -> tuple[Person, dict[str, list[CrewRow]]]:
        """A crew member's own view: pending invitations, confirmed, completed, declined."""
        with self.db.read() as session:
            person = find_person(session, person_ref)
            rows = crew_rows(
                session,
                crew_select()
                .where(EventCrew.person_id == person.id)
                .order_by(col(Event.starts_at), col(EventCrew.id)),
            )
        groups: dict[str, list[CrewRow]] = {
            "pending": [], "confirmed": [], "completed": [], "declined": [], "no_show": [],
        }  # fmt: skip
        key = {CrewStatus.INVITED: "pending"}
        for row in rows:
            if row.crew.status not in CrewStatus.CLOSED:  # no longer theirs
                groups[key.get(row.crew.status, row.crew.status)].append(row)
        return person, groups

    # -- email -----------------------------------------------------------------------------

    def context(self, row: CrewRow, **extra: Any) -> dict[str, Any]:
        """What the crew templates see, for the RSVP pages."""
        return template_context(self.org, row, **extra)
