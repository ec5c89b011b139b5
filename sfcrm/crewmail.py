"""Crew emails: invitations, reminders and setup briefings, and the changes crew are told of
(an event changed or cancelled, a crew member taken off it).

Sending follows one rule: an email is written to the mail log (and the assignment marked as
having it) in the same transaction that selects whom to write to, then sent. Two runs at once,
say two cron ``crew remind``, cannot both pick the same assignment: the selection locks the
assignments it picks (SQLite's write lock holds the whole file; on PostgreSQL a reminder run
skips the ones another run holds, and an invitation or briefing waits for it), so the second
run finds each one taken. A change crew are told of is made in the transaction that writes
their emails, and they are sent once it is committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement
from sqlmodel import Session, col, select

from sfcrm import crew
from sfcrm.batch import BatchResult
from sfcrm.crew import (
    BRIEFING,
    CANCELLATION,
    CHANGE,
    INVITATION,
    REMINDER,
    REMOVAL,
    CrewRow,
    Org,
    crew_rows,
    crew_select,
    format_day,
    note_emails_written,
    template_context,
)
from sfcrm.db import Database
from sfcrm.errors import ConflictError, NotFoundError, ValidationError
from sfcrm.events import EventChanges, cancel_event, edit_event
from sfcrm.models import EmailNotification, Event, EventCrew
from sfcrm.status import CrewStatus
from sfcrm.times import iso_in

if TYPE_CHECKING:
    from sfcrm.mail import Attachment, Mailer, SendReport
    from sfcrm.render import Renderer

__all__ = [
    "BRIEFING", "CANCELLATION", "CHANGE", "INVITATION", "MAX_REMIND_HOURS", "REMINDER", "REMOVAL",
    "CrewMail", "EventNotice", "MailRun", "Org",
]  # fmt: skip

log = logging.getLogger("sfcrm.crew")

# The emails that carry the crew member's own page link as well as the assignment's one
_CARRY_PAGE = (INVITATION, REMINDER, BRIEFING)

MAX_REMIND_HOURS = 24 * 366  # `crew remind --hours`: a (leap) year ahead at most

Progress = Callable[[int, int], None]

# The crew emails a change of the event makes untrue when they are not sent yet: they carry
# its old time, place or roster, so they are superseded (never sent) rather than sent late.
STALE = (INVITATION, REMINDER, BRIEFING, CHANGE)


@dataclass
class MailRun:
    """What a bulk send did: emails written and their fate, and whom it passed over and why."""

    queued: list[int] = field(default_factory=list)  # email ids
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (assignment id, reason)
    previews: list[dict[str, Any]] = field(default_factory=list)  # --dry-run
    dry_run: bool = False
    report: SendReport | None = None
    assignments: dict[int, int] = field(default_factory=dict)  # email id -> its assignment

    def results(self) -> BatchResult:
        """One item an assignment: the emails written (or, in a dry run, that would be), in
        the order written, then the assignments passed over."""
        result = BatchResult(("assignment_id",))
        for preview in self.previews:
            result.add(
                "would_send",
                f"to {preview['recipient']}: {preview['subject']}",
                assignment_id=preview["assignment_id"],
            )
        fates = self.report.fates(left_alone="not_sent") if self.report else {}
        for email_id in self.queued:
            outcome, why = fates.get(
                email_id, ("queued", "not tried yet: `sfcrm mail retry` sends it")
            )
            result.add(
                outcome, why, assignment_id=self.assignments.get(email_id), email_id=email_id
            )
        for assignment_id, reason in self.skipped:
            result.add("skipped", reason, assignment_id=assignment_id)
        return result

    @property
    def failed(self) -> int:
        return len(self.report.failed) if self.report else 0

    @property
    def sent(self) -> int:
        return len(self.report.sent) if self.report else 0


@dataclass
class EventNotice:
    """A change to an event or its crew, and what the crew were told of it."""

    event: Event
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    # (the crew member's assignment on this event, their other one it overlaps)
    clashes: list[tuple[CrewRow, CrewRow]] = field(default_factory=list)
    assignment: CrewRow | None = None  # the one removed
    told: MailRun | None = None  # None: nobody was to be told (or --quiet)
    quiet: bool = False


@dataclass(frozen=True)
class _Plan:
    """What one kind of crew email says to each selected assignment, and whom it passes over."""

    subject: Callable[[CrewRow], str]
    refusal: Callable[[CrewRow], str | None] = lambda _row: None
    variables: Callable[[CrewRow], dict[str, Any]] = lambda _row: {}
    # the calendar entry attached: none, the event's, or its cancellation
    calendar: str | None = None  # "publish" | "cancel"


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
        # (session, person id, whether a key may be made now) -> their own page's link
        page: Callable[[Session, int, bool], str | None] = lambda _s, _id, _make: None,
        tz: ZoneInfo = ZoneInfo("UTC"),  # SFCRM_TIMEZONE, for the times emails are told of
    ) -> None:
        self.db = db
        self.tz = tz
        self.clock = clock
        self._mailer = mailer
        self._renderer = renderer
        self.org = org
        self._rsvp = rsvp
        self._page = page

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
        chosen = (
            col(EventCrew.event_id) == event_id
            if event_id is not None
            else col(EventCrew.id).in_(list(dict.fromkeys(assignment_ids)))
        )

        return self._run(
            INVITATION, chosen, self._invitation, dry_run=dry_run, progress=progress,
            check_event=event_id, expected_ids=assignment_ids,
        )  # fmt: skip

    def _invitation(self, session: Session, rows: list[CrewRow]) -> _Plan:
        ids = [r.crew.invitation_email_id for r in rows]
        now = self.clock()
        written = _email_states(session, ids, now)
        return _Plan(
            subject=lambda row: f"You are invited to work on: {row.event.name}",
            refusal=lambda row: (
                "the event is over"
                if row.event.ends_at <= now
                else row.crew.invitation_refusal(written.get(row.crew.invitation_email_id or 0))
            ),
            variables=lambda row: {"rsvp_url": self._rsvp_of(row)},
            calendar="publish",
        )

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
        chosen = (
            (col(Event.starts_at) > now)
            & (col(Event.starts_at) <= now + timedelta(hours=hours))
            & EventCrew.awaiting_reminder()
            & col(Event.cancelled_at).is_(None)
        )
        if event_id is not None:
            chosen = chosen & (col(EventCrew.event_id) == event_id)

        def plan(_session: Session, _rows: list[CrewRow]) -> _Plan:
            return _Plan(subject=lambda row: f"Reminder: {row.event.name} - {row.event.date}")

        return self._run(
            REMINDER, chosen, plan, dry_run=dry_run, progress=progress, check_event=event_id,
            skip_held=True,
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
        chosen = (
            (col(EventCrew.event_id) == event_id)
            & (col(EventCrew.status) == CrewStatus.CONFIRMED)
            & col(Event.cancelled_at).is_(None)
        )

        def plan(session: Session, rows: list[CrewRow]) -> _Plan:
            briefed = set() if again else _briefed(session, event_id)
            roster = [
                {"name": r.person.name, "role": r.crew.role, "phone": r.person.phone} for r in rows
            ]
            return _Plan(
                subject=lambda row: f"Setup Briefing: {row.event.name}",
                refusal=lambda row: (
                    "briefing already written (use --again to send it once more)"
                    if row.crew.id in briefed
                    else None
                ),
                variables=lambda _row: {"roster": roster},
            )

        return self._run(
            BRIEFING, chosen, plan, dry_run=dry_run, progress=progress, check_event=event_id
        )

    def _run(
        self,
        kind: str,
        chosen: ColumnElement[bool],
        plan: Callable[[Session, list[CrewRow]], _Plan],
        *,
        dry_run: bool,
        progress: Progress | None,
        check_event: int | None = None,
        expected_ids: Sequence[int] = (),
        skip_held: bool = False,
    ) -> MailRun:
        mailer = None if dry_run else self._mailer()
        if mailer is not None:
            mailer.check()  # a setting that cannot work fails now, with nothing written
        query = crew_select().where(chosen).order_by(col(Event.starts_at), col(EventCrew.id))
        if not dry_run:
            # The assignments are claimed in this transaction: lock them (a reminder run skips
            # ones another run holds; the others wait for it and see what it wrote).
            query = query.with_for_update(of=EventCrew, skip_locked=skip_held)

        def write(session: Session) -> MailRun:
            run = MailRun(dry_run=dry_run)
            if check_event is not None:
                _refuse_cancelled(session, check_event, kind, self.clock())
            rows = crew_rows(session, query)
            missing = sorted(set(expected_ids) - {_id(r) for r in rows})
            if missing:
                raise NotFoundError("no such assignment", value=", ".join(map(str, missing)))
            self._write(session, mailer, kind, rows, plan(session, rows), run)
            return run

        if dry_run:
            with self.db.read() as session:
                run = write(session)
        else:
            # One transaction selects, writes the log rows and claims the assignments.
            run = self.db.transaction(write)
        if mailer is not None and run.queued:
            run.report = mailer.send(run.queued, progress=progress)
        return run

    def _write(
        self,
        session: Session,
        mailer: Mailer | None,
        kind: str,
        rows: list[CrewRow],
        told: _Plan,
        run: MailRun,
    ) -> None:
        """Write the emails of ``kind`` to ``rows`` in the caller's transaction (previews
        without a mailer), noting whom it passes over and why."""
        from sfcrm.mail import Outgoing

        outgoing: list[Outgoing] = []
        for row in rows:
            reason = told.refusal(row)
            if reason is None and row.person.archived_at is not None:
                reason = f"{row.person.name} is archived"
            if reason is None and not row.person.email:
                reason = f"{row.person.name} has no email address"
            if reason is not None:
                run.skipped.append((_id(row), reason))
                continue
            page_url = (
                self._page(session, row.person.id, mailer is not None)
                if kind in _CARRY_PAGE and row.person.id is not None
                else None
            )
            title, text, html = self._compose(
                row, kind, told.subject(row), page_url=page_url, **told.variables(row)
            )
            if mailer is None:
                run.previews.append(
                    {"assignment_id": row.crew.id, "recipient": row.person.email,
                     "subject": title, "message": text}
                )  # fmt: skip
                continue
            assert row.person.email
            outgoing.append(
                Outgoing(
                    recipient=row.person.email,
                    notification_type=kind,
                    subject=title,
                    text=text,
                    html=html,
                    attachments=(self._ics(row, cancel=told.calendar == "cancel"),)
                    if told.calendar
                    else (),
                    person_id=row.person.id,
                    assignment_id=_id(row),
                )
            )
        if mailer is None or not outgoing:
            return
        # one INSERT for the whole batch, in this transaction
        ids = mailer.queue_all(session, outgoing)
        written: list[tuple[int, int]] = []
        for email_id, email in zip(ids, outgoing, strict=True):
            assert email.assignment_id is not None
            run.queued.append(email_id)
            run.assignments[email_id] = email.assignment_id
            written.append((email.assignment_id, email_id))
        note_emails_written(session, kind, written)

    # -- changes the crew are told of --------------------------------------------------------

    def edit_event(
        self, event_id: int, changes: EventChanges, *, quiet: bool = False
    ) -> EventNotice:
        """Change an event. A change of its date, time or place re-arms its reminders, names
        the confirmed crew it now clashes for, and (unless ``quiet``) emails every invited or
        confirmed crew member the new details with an updated calendar entry."""

        def work(session: Session, mailer: Mailer | None) -> EventNotice:
            edit = edit_event(session, event_id, changes, self.clock())
            notice = EventNotice(edit.event, edit.changes, quiet=quiet)
            if not edit.rescheduled:
                return notice
            crew.rearm_reminders(session, event_id)
            # what was written before and not sent carries the old time or place
            uninvited = self._supersede(session, _assignments_of(session, event_id), "change")
            notice.clashes = crew.confirmed_clashes(session, edit.event)
            if not quiet:
                was = {name: before for name, (before, _after) in edit.changes.items()}
                plan = _Plan(
                    subject=lambda row: f"Changed: {row.event.name} - now {row.event.date}",
                    refusal=self._notice_refusal,
                    variables=lambda row: {
                        "was": _shown_before(was),
                        "rsvp_url": self._rsvp_of(row),
                    },
                    calendar="publish",
                )
                rows = self._locked_rows(session, col(EventCrew.event_id) == event_id)
                notice.told = MailRun()
                told = [r for r in rows if _id(r) not in uninvited]
                self._write(session, mailer, CHANGE, told, plan, notice.told)
                # an invitation never sent is written afresh, with the new time and place
                again = [r for r in rows if _id(r) in uninvited]
                if again:
                    invitation = self._invitation(session, again)
                    self._write(session, mailer, INVITATION, again, invitation, notice.told)
            return notice

        return self._change(work, quiet)

    def cancel_event(
        self, event_id: int, *, reason: str | None = None, quiet: bool = False
    ) -> EventNotice:
        """Cancel an event and every assignment on it; unless ``quiet``, email every invited
        or confirmed crew member a cancellation that removes it from their calendar."""
        from sfcrm.events import clean_reason

        why = clean_reason(reason)

        def work(session: Session, mailer: Mailer | None) -> EventNotice:
            event = cancel_event(session, event_id, why, self.clock())
            notice = EventNotice(event, {"cancelled": (False, True)}, quiet=quiet)
            # what was written and not sent never goes: then whoever never got an invitation
            # is not told of a cancellation either
            self._supersede(session, _assignments_of(session, event_id), "cancellation")
            if not quiet:
                # told as they were before the cancellation (whom it reaches)
                rows = self._locked_rows(session, col(EventCrew.event_id) == event_id)
                plan = _Plan(
                    subject=lambda row: f"Cancelled: {row.event.name} - {row.event.date}",
                    refusal=self._notice_refusal,
                    calendar="cancel",
                )
                notice.told = MailRun()
                self._write(session, mailer, CANCELLATION, rows, plan, notice.told)
            crew.cancel_assignments(session, event_id)
            return notice

        return self._change(work, quiet)

    def remove(self, assignment_id: int, *, quiet: bool = False) -> EventNotice:
        """Take a crew member off their event; unless ``quiet``, one who was invited is told
        by email, with a cancellation of their calendar entry."""

        def work(session: Session, mailer: Mailer | None) -> EventNotice:
            # (an invitation never sent is not sent now, and then there is nobody to tell)
            self._supersede(session, [assignment_id], "removal")
            before = crew.remove_assignment(session, assignment_id, self.clock())
            notice = EventNotice(before.event, quiet=quiet, assignment=before)
            notice.changes = {"status": (before.crew.status, CrewStatus.REMOVED)}
            if not quiet:
                plan = _Plan(
                    subject=lambda row: f"No longer needed: {row.event.name} - {row.event.date}",
                    refusal=self._notice_refusal,
                    calendar="cancel",
                )
                notice.told = MailRun()
                self._write(session, mailer, REMOVAL, [before], plan, notice.told)
            return notice

        return self._change(work, quiet)

    def _change(
        self, work: Callable[[Session, Mailer | None], EventNotice], quiet: bool
    ) -> EventNotice:
        """One transaction makes the change and writes the emails it calls for; they are
        sent once it is committed."""
        mailer = None if quiet else self._mailer()
        if mailer is not None:
            mailer.check()  # a setting that cannot work fails now, with nothing changed
        notice = self.db.transaction(lambda session: work(session, mailer))
        if mailer is not None and notice.told is not None and notice.told.queued:
            notice.told.report = mailer.send(notice.told.queued)
        return notice

    def _locked_rows(self, session: Session, chosen: ColumnElement[bool]) -> list[CrewRow]:
        query = crew_select().where(chosen).order_by(col(EventCrew.id))
        # as they are now, not as loaded earlier in the transaction (an email superseded)
        query = query.with_for_update(of=EventCrew).execution_options(populate_existing=True)
        return crew_rows(session, query)

    def _supersede(self, session: Session, assignment_ids: Sequence[int], by: str) -> set[int]:
        """The unsent crew emails of these assignments that ``by`` (a change, a cancellation, a
        removal) makes untrue are never sent; the assignments whose unsent invitation it was."""
        from sfcrm.mail.claims import supersede

        now = self.clock()
        why = f"superseded by the {by} of {iso_in(now, self.tz)}"
        return crew.forget_superseded(session, supersede(session, assignment_ids, STALE, why, now))

    def _notice_refusal(self, row: CrewRow) -> str | None:
        if row.event.ends_at <= self.clock():
            return "the event is over"
        return row.crew.notice_refusal()

    def _rsvp_of(self, row: CrewRow) -> str | None:
        return self._rsvp(_id(row), row.binding, row.event.ends_at)

    def _compose(
        self, row: CrewRow, kind: str, subject: str, **extra: Any
    ) -> tuple[str, str, str | None]:
        renderer = self._renderer()
        # replies reach the office (a Reply-To, or a sender people can answer): say so or not
        replies = self._mailer().replies_reach_the_office
        context = template_context(self.org, row, replies=replies, **extra)
        text = renderer.render(f"{kind}.txt.j2", **context)
        html = (
            renderer.render(f"{kind}.html.j2", **context)
            if renderer.has(f"{kind}.html.j2")
            else None
        )
        return subject, text, html

    def _ics(self, row: CrewRow, *, cancel: bool = False) -> Attachment:
        from sfcrm.ics import entry_description, entry_uid, event_ics

        event = row.event
        assert event.id is not None
        text = event_ics(
            uid=entry_uid(event.id, _id(row)),
            summary=event.name,
            starts_at=event.starts_at,
            ends_at=event.ends_at,
            location=event.location,
            description=entry_description(row.crew.role, row.crew.notes, event.details),
            organizer_email=self.org.email,
            organizer_name=self.org.name,
            now=self.clock(),
            sequence=event.sequence,
            cancelled=cancel,
        )
        method = "CANCEL" if cancel else "PUBLISH"
        return ("event.ics", f"text/calendar; method={method}", text.encode("utf-8"))


def _id(row: CrewRow) -> int:
    assert row.crew.id is not None  # read from the table
    return row.crew.id


def _email_states(
    session: Session, ids: Sequence[int | None], now: datetime
) -> dict[int, tuple[str, str | None]]:
    """The state and last error of the emails already written (for the reasons told)."""
    from sfcrm.mail.claims import states

    return states(session, [i for i in ids if i is not None], now)


def _refuse_cancelled(session: Session, event_id: int, kind: str, now: datetime) -> None:
    """An event named for a bulk send exists; a briefing is refused for a cancelled one, an
    invitation or a briefing for one that is over (its crew may be recorded there: --past)."""
    event = session.get(Event, event_id)
    if event is None:
        raise NotFoundError("no such event", value=str(event_id))
    if event.cancelled_at is not None and kind == BRIEFING:
        raise ConflictError(f"{event.name} is cancelled", value=f"event {event_id}",
                            hint="no briefing goes out for a cancelled event")  # fmt: skip
    if kind in (INVITATION, BRIEFING) and event.ends_at <= now:
        what = "invitation" if kind == INVITATION else "briefing"
        raise ConflictError(f"{event.name} is over", value=f"event {event_id}",
                            hint=f"no {what} goes out for an event that took place")  # fmt: skip


def _shown_before(was: dict[str, Any]) -> dict[str, Any]:
    """What a changed event was, as its templates show it."""
    shown = {name: was.get(name) for name in ("date", "time", "end_time", "location")}
    if shown["date"]:
        shown["date"] = format_day(shown["date"])
    return shown


def _assignments_of(session: Session, event_id: int) -> list[int]:
    ids = session.exec(select(EventCrew.id).where(EventCrew.event_id == event_id)).all()
    return [i for i in ids if i is not None]


def _briefed(session: Session, event_id: int) -> set[int]:
    """The assignments of the event a briefing was ever written for."""
    n = EmailNotification
    return {
        assignment_id
        for assignment_id in session.exec(
            select(n.assignment_id)
            .join(EventCrew, col(EventCrew.id) == col(n.assignment_id))
            .where(EventCrew.event_id == event_id, n.notification_type == BRIEFING)
            .where(col(n.superseded_at).is_(None))
        )
        if assignment_id is not None
    }
