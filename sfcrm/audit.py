"""The audit log: every correction, cancellation and resolution, written by the change itself.

A change calls :func:`record` inside its own write transaction, so the entry and the change are
kept or lost together. Each entry says what changed (before and after), when, by whom (the OS
user and host of the machine that ran sfcrm) and why, when a reason was given.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any

from sqlmodel import Session, col, select

from sfcrm.db import Database
from sfcrm.models import AuditEntry

Changes = Mapping[str, tuple[Any, Any]]  # field -> (before, after)


@cache
def actor() -> str:
    """Who is making changes: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container), no login
        user = "unknown"
    return f"{user}@{socket.gethostname() or 'unknown'}"


def changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields whose value differs, each as (before, after)."""
    return {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}


def record(
    session: Session,
    action: str,
    *,
    now: datetime,
    changes: Changes | None = None,
    reason: str | None = None,
    person_id: int | None = None,
    event_id: int | None = None,
    assignment_id: int | None = None,
    payment_id: int | None = None,
) -> AuditEntry:
    """Write one entry in the caller's write transaction."""
    entry = AuditEntry(
        at=now,
        actor=actor(),
        action=action,
        person_id=person_id,
        event_id=event_id,
        assignment_id=assignment_id,
        payment_id=payment_id,
        changes=_encode(changes) if changes else None,
        reason=reason,
    )
    session.add(entry)
    session.flush()
    return entry


def _encode(changes: Changes) -> str:
    return json.dumps(
        {k: [_plain(before), _plain(after)] for k, (before, after) in changes.items()},
        ensure_ascii=False,
        sort_keys=True,
    )


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def entry_json(entry: AuditEntry, tz: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": entry.at.astimezone(tz).isoformat(timespec="seconds"),
        "actor": entry.actor,
        "action": entry.action,
        "person_id": entry.person_id,
        "event_id": entry.event_id,
        "assignment_id": entry.assignment_id,
        "payment_id": entry.payment_id,
        "changes": json.loads(entry.changes) if entry.changes else {},
        "reason": entry.reason,
    }


class History:
    """Reading the audit log."""

    def __init__(self, db: Database, clock: Callable[[], datetime]) -> None:
        self.db = db
        self.clock = clock

    def find(
        self,
        *,
        person_id: int | None = None,
        event_id: int | None = None,
        payment_id: int | None = None,
        limit: int = 200,
    ) -> Sequence[AuditEntry]:
        """The newest entries first, about this person, event or payment (all given must
        match)."""
        query = select(AuditEntry)
        if person_id is not None:
            query = query.where(col(AuditEntry.person_id) == person_id)
        if event_id is not None:
            query = query.where(col(AuditEntry.event_id) == event_id)
        if payment_id is not None:
            query = query.where(col(AuditEntry.payment_id) == payment_id)
        query = query.order_by(col(AuditEntry.at).desc(), col(AuditEntry.id).desc()).limit(limit)
        with self.db.read() as session:
            return session.exec(query).all()
