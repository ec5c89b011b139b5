"""Staffing: the headcount each event needs per role, the roles still short, and who could
fill one.

Roles are free text typed by the office ("Sound Engineer"), so a need and an assignment are of
the same role when their words match ignoring case and spacing ("sound  engineer" is "Sound
Engineer"). The headcount is set with ``events needs``; an event with no need set for a role its
crew are on shows that role as needing nobody more.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from sfcrm import audit
from sfcrm.crew import clashing_with
from sfcrm.db import Database
from sfcrm.errors import ConflictError, NotFoundError, ValidationError
from sfcrm.events import _one_line, locked_event
from sfcrm.models import CrewStatus, Event, EventCrew, Person, RoleNeed
from sfcrm.times import iso_in

MAX_HEADCOUNT = 500  # people in one role of one event: more is a typo
MAX_DAYS = 366
_SPEC = re.compile(r"\s*(?P<role>.*?)\s*=\s*(?P<count>[0-9]+)\s*")


def role_key(role: str) -> str:
    """The role as compared: its words, case-folded ("Sound  engineer" is "Sound Engineer")."""
    return " ".join(role.split()).casefold()


def parse_needs(specs: Iterable[str]) -> dict[str, tuple[str, int]]:
    """``["Sound Engineer=2", "Stagehand=4"]`` as {role key: (role as typed, headcount)}.

    A headcount of 0 takes the need off the event. The same role twice is refused (which one
    was meant?), as is anything that is not ``ROLE=N``.
    """
    wanted: dict[str, tuple[str, int]] = {}
    for spec in specs:
        match = _SPEC.fullmatch(spec)
        if match is None or not match["role"]:
            raise ValidationError(
                "a need is written ROLE=COUNT",
                value=spec,
                hint='for example "Sound Engineer=2" "Stagehand=4" (0 removes a role)',
            )
        role = _one_line(match["role"], "role", 80)
        count = int(match["count"])
        if count > MAX_HEADCOUNT:
            raise ValidationError(
                f"a role's headcount is at most {MAX_HEADCOUNT}", value=spec.strip()
            )
        if role_key(role) in wanted:
            raise ValidationError("the same role is given twice", value=role)
        wanted[role_key(role)] = (role, count)
    if not wanted:
        raise ValidationError("give at least one ROLE=COUNT", hint='"Sound Engineer=2"')
    return wanted


@dataclass(frozen=True)
class RoleCount:
    """One role of one event: how many are needed, asked and not answered yet, confirmed."""

    role: str
    needed: int
    invited: int  # invited and not answered yet
    confirmed: int  # confirmed, or completed after the event

    @property
    def missing(self) -> int:
        return max(self.needed - self.confirmed, 0)

    def json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "needed": self.needed,
            "invited": self.invited,
            "confirmed": self.confirmed,
            "missing": self.missing,
        }

    def shown(self) -> str:
        """``Sound Engineer: 1/2 confirmed, 1 invited``"""
        asked = f", {self.invited} invited" if self.invited else ""
        return f"{self.role}: {self.confirmed}/{self.needed} confirmed{asked}"


def role_counts(session: Session, event_ids: Sequence[int]) -> dict[int, list[RoleCount]]:
    """Each event's roles (those with a need, then those its crew are on), in that order."""
    if not event_ids:
        return {}
    needs = session.exec(
        select(RoleNeed)
        .where(col(RoleNeed.event_id).in_(event_ids))
        .order_by(col(RoleNeed.event_id), col(RoleNeed.id))
    ).all()
    crew = session.exec(
        select(EventCrew.event_id, EventCrew.role, EventCrew.status).where(
            col(EventCrew.event_id).in_(event_ids)
        )
    ).all()
    names: dict[int, dict[str, str]] = defaultdict(dict)  # event -> key -> role as shown
    needed: dict[tuple[int, str], int] = {}
    for need in needs:
        names[need.event_id][role_key(need.role)] = need.role
        needed[need.event_id, role_key(need.role)] = need.count
    invited: Counter[tuple[int, str]] = Counter()
    confirmed: Counter[tuple[int, str]] = Counter()
    for event_id, role, status in crew:
        key = role_key(role)
        if status == CrewStatus.INVITED:
            invited[event_id, key] += 1
        elif status in (CrewStatus.CONFIRMED, CrewStatus.COMPLETED):
            confirmed[event_id, key] += 1
        else:
            continue  # declined, removed, cancelled: not part of the event's crew
        names[event_id].setdefault(key, role)
    return {
        event_id: [
            RoleCount(
                role,
                needed.get((event_id, key), 0),
                invited[event_id, key],
                confirmed[event_id, key],
            )
            for key, role in names[event_id].items()
        ]
        for event_id in event_ids
        if names.get(event_id)
    }


@dataclass(frozen=True)
class Gap:
    """An upcoming event with at least one role short."""

    event: Event
    roles: list[RoleCount]  # only the roles still short
    starts_in: timedelta

    def json(self, tz: ZoneInfo) -> dict[str, Any]:
        e = self.event
        return {
            "event_id": e.id,
            "name": e.name,
            "date": e.date,
            "time": e.time,
            "starts_at": iso_in(e.starts_at, tz),
            "starts_in_hours": round(self.starts_in.total_seconds() / 3600, 1),
            "roles": [r.json() for r in self.roles],
        }


def starts_in_text(delta: timedelta) -> str:
    """``3 days``, ``5 h``, ``under an hour``, ``started``: how long until an event."""
    hours = delta.total_seconds() / 3600
    if hours <= 0:
        return "started"
    if hours < 1:
        return "under an hour"
    if hours < 48:
        return f"{int(hours)} h"
    return f"{int(hours // 24)} days"


@dataclass(frozen=True)
class Suggestion:
    """Someone free to fill a role, with the record they are ranked by."""

    person: Person
    in_role: int  # events completed in this role
    completed: int  # events completed in any role
    no_shows: int
    invited_elsewhere: list[Event]  # invitations not answered yet for events at the same time

    @property
    def reliability(self) -> float | None:
        """Completed over completed and no-shows; None with no record yet."""
        total = self.completed + self.no_shows
        return None if total == 0 else self.completed / total

    def json(self) -> dict[str, Any]:
        p = self.person
        return {
            "person_id": p.id,
            "name": p.name,
            "phone": p.phone,
            "email": p.email,
            "in_role": self.in_role,
            "completed": self.completed,
            "no_shows": self.no_shows,
            "reliability": None if self.reliability is None else round(self.reliability, 2),
            "invited_elsewhere": [{"event_id": e.id, "name": e.name} for e in
                                  self.invited_elsewhere],
        }  # fmt: skip


class Staffing:
    def __init__(self, db: Database, clock: Callable[[], datetime], tz: ZoneInfo) -> None:
        self.db = db
        self.clock = clock
        self.tz = tz

    def set_needs(self, event_id: int, specs: Iterable[str]) -> tuple[Event, list[RoleCount]]:
        """Set (or change, or with 0 remove) the headcount of each role given; the other roles'
        needs stay. The change goes to the audit log in the same transaction."""
        wanted = parse_needs(specs)
        with self.db.write() as session:
            event = locked_event(session, event_id)
            if event.cancelled_at is not None:
                raise ConflictError(f"{event.name} is cancelled", value=f"event {event_id}")
            if event.ends_at <= self.clock():
                raise ConflictError(f"{event.name} is over", value=f"event {event_id}")
            existing = {
                role_key(n.role): n
                for n in session.exec(select(RoleNeed).where(RoleNeed.event_id == event_id))
            }
            before: dict[str, int] = {}
            after: dict[str, int] = {}
            for key, (role, count) in wanted.items():
                need = existing.get(key)
                if need is not None and need.count == count and need.role == role:
                    continue
                before[role] = need.count if need is not None else 0
                after[role] = count
                if need is None and count:
                    session.add(RoleNeed(event_id=event_id, role=role, count=count))
                elif need is not None and count:
                    need.role, need.count = role, count
                    session.add(need)
                elif need is not None:
                    session.delete(need)
            if after:
                session.flush()
                audit.record(
                    session, "event.needs", now=self.clock(),
                    changes=audit.changed(before, after), event_id=event_id,
                )  # fmt: skip
            counts = role_counts(session, [event_id]).get(event_id, [])
        return event, counts

    def roles(self, event_ids: Sequence[int]) -> dict[int, list[RoleCount]]:
        with self.db.read() as session:
            return role_counts(session, event_ids)

    def gaps(self, days: int) -> list[Gap]:
        """Every event not cancelled, not over and starting within ``days``, that has a role
        with fewer confirmed than needed; soonest first."""
        if not 1 <= days <= MAX_DAYS:
            raise ValidationError(f"--days is 1 to {MAX_DAYS}", value=str(days))
        now = self.clock()
        with self.db.read() as session:
            events = session.exec(
                select(Event)
                .where(col(Event.cancelled_at).is_(None))
                .where(col(Event.ends_at) > now)
                .where(col(Event.starts_at) < now + timedelta(days=days))
                .where(col(Event.id).in_(select(RoleNeed.event_id)))
                .order_by(col(Event.starts_at), col(Event.id))
            ).all()
            counts = role_counts(session, [e.id for e in events if e.id is not None])
        gaps = []
        for event in events:
            short = [r for r in counts.get(event.id or 0, []) if r.missing]
            if short:
                gaps.append(Gap(event, short, event.starts_at - now))
        return gaps

    def suggest(
        self, event_id: int, role: str, *, limit: int = 10
    ) -> tuple[Event, list[Suggestion]]:
        """People who could fill ``role`` on the event: not archived, not on it already, with
        no confirmed event at that time; those who worked the role most, then those who turn up
        most reliably, first."""
        key = role_key(_one_line(role, "role", 80))
        with self.db.read() as session:
            event = session.get(Event, event_id)
            if event is None:
                raise NotFoundError("no such event", value=str(event_id))
            if event.cancelled_at is not None:
                raise ConflictError(f"{event.name} is cancelled", value=f"event {event_id}")
            on_event = select(EventCrew.person_id).where(
                EventCrew.event_id == event_id, EventCrew.status != CrewStatus.REMOVED
            )
            at_same_time = (
                select(EventCrew.person_id, Event)
                .join(Event, col(Event.id) == col(EventCrew.event_id))
                .where(clashing_with(event))
                .where(col(Event.id) != event_id)
            )
            busy = {
                pid
                for pid, _ in session.exec(
                    at_same_time.where(
                        col(EventCrew.status).in_((CrewStatus.CONFIRMED, CrewStatus.COMPLETED))
                    )
                )
            }
            invited: dict[int, list[Event]] = defaultdict(list)
            for pid, other in session.exec(
                at_same_time.where(EventCrew.status == CrewStatus.INVITED)
            ):
                invited[pid].append(other)
            people = session.exec(
                select(Person)
                .where(col(Person.archived_at).is_(None))
                .where(col(Person.id).not_in(on_event))
            ).all()
            history = session.exec(
                select(EventCrew.person_id, EventCrew.role, EventCrew.status).where(
                    col(EventCrew.status).in_((CrewStatus.COMPLETED, CrewStatus.NO_SHOW))
                )
            ).all()
        in_role: Counter[int] = Counter()
        completed: Counter[int] = Counter()
        no_shows: Counter[int] = Counter()
        for pid, worked, status in history:
            if status == CrewStatus.COMPLETED:
                completed[pid] += 1
                in_role[pid] += role_key(worked) == key
            else:
                no_shows[pid] += 1
        found = [
            Suggestion(p, in_role[p.id], completed[p.id], no_shows[p.id], invited[p.id])
            for p in people
            if p.id is not None and p.id not in busy
        ]
        found.sort(
            key=lambda s: (
                -s.in_role,
                -(s.reliability if s.reliability is not None else 0.5),
                -s.completed,
                len(s.invited_elsewhere),
                s.person.name.casefold(),
                s.person.id or 0,
            )
        )
        return event, found[:limit]
