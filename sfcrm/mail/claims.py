"""The state of a logged email and its moves, each a short statement in the caller's
transaction (no SMTP call ever runs inside one).

    queued ──claim──▶ claimed ──▶ sent
                         │ ├────▶ failed       (retried by `mail retry`)
                         │ ├────▶ permanent    (a 5xx refusal: retried only when named)
                         │ └────▶ interrupted  (it may have been delivered: only when named)
                         └─ the claim expires without a result ─▶ interrupted

A sender claims an email before it hands the message to the server, and a claim is taken only
from an email no other sender holds: the claim locks the row and skips one another sender has
locked (``SKIP LOCKED`` on PostgreSQL; SQLite's write lock holds the whole file), so two runs
at once never deliver one email twice.

These run once or twice per email sent, so each statement is built once, on the table, with
bound parameters, and runs on the session's own connection (in its transaction): building a
statement and going through the ORM's execute cost more than running it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Integer,
    Select,
    String,
    Update,
    and_,
    bindparam,
    insert,
    not_,
    or_,
    select,
    update,
)
from sqlmodel import Session

from sfcrm.crew import note_email_sent
from sfcrm.models import EmailNotification, UTCDateTime, table

log = logging.getLogger("sfcrm.mail")

INTERRUPTED = "interrupted while sending; it may have been delivered"
MAYBE_DELIVERED = "it may have been delivered, so it is sent again only when named by id"
DEFAULT_LEASE = timedelta(minutes=10)
HELD = "being sent by another sfcrm right now"

T = table(EmailNotification)
_EMAIL = bindparam("email_id", type_=Integer)
_NOW = bindparam("now", type_=UTCDateTime)


@dataclass(frozen=True)
class Claim:
    """An email a sender holds, with what it needs to send it."""

    id: int
    token: str
    mime: bytes
    recipient: str
    notification_type: str
    assignment_id: int | None = None


@dataclass(frozen=True)
class Selection:
    """Which emails a run may send at ``now``. A run given ids (``auto`` off) sends any that is
    neither sent nor held by another sender; ``mail retry`` without ids (``auto``) leaves out
    permanent refusals, interrupted sends, ones tried ``max_attempts`` times and ones whose
    first sender may still be at work (written less than a lease ago, never tried)."""

    now: datetime
    lease: timedelta = DEFAULT_LEASE
    auto: bool = False
    max_attempts: int = 0

    @property
    def params(self) -> dict[str, Any]:
        """The values of the rules' parameters."""
        return {"now": self.now, "fresh": self.now - self.lease, "max_attempts": self.max_attempts}


# -- the rules -------------------------------------------------------------------------------


def _in_use() -> list[tuple[ColumnElement[bool], str]]:
    """What keeps any run from sending an email, each with the reason told."""
    return [(T.c.is_sent.is_(True), "already sent"), (EmailNotification.held(_NOW), HELD)]


@functools.cache
def _left_alone(auto: bool) -> list[tuple[ColumnElement[bool], str]]:
    """What keeps a retry without ids (``auto``) from sending an email."""
    if not auto:
        return []
    fresh = bindparam("fresh", type_=UTCDateTime)
    return [
        (T.c.permanent_failure.is_(True), "refused for good by the server; name its id to retry"),
        (
            T.c.last_error.is_not_distinct_from(INTERRUPTED),
            "interrupted while sending, it may have been delivered; name its id to retry",
        ),
        (
            T.c.failed_attempts >= bindparam("max_attempts", type_=Integer),
            "gave up after {attempts} attempts",
        ),
        (and_(T.c.failed_attempts == 0, T.c.created_at >= fresh), "not failed"),
    ]


@functools.cache
def _sendable(auto: bool) -> ColumnElement[bool]:
    """The condition of an email a run may send now."""
    refused = [rule for rule, _ in _in_use() + _left_alone(auto)]
    return and_(T.c.claim_token.is_(None), not_(or_(*refused)))


# -- the statements ----------------------------------------------------------------------------

_QUEUED = {"is_sent": False, "failed_attempts": 0, "permanent_failure": False}
_FAILURE = {
    "failed_attempts": T.c.failed_attempts + 1,
    "last_error": bindparam("error", type_=String),
    "permanent_failure": bindparam("permanent", type_=Boolean),
    "claimed_until": None,
    "claim_token": None,
}
_MOVES: dict[str, dict[str, Any]] = {
    "claim": {
        "claimed_until": bindparam("until", type_=UTCDateTime),
        "claim_token": bindparam("token", type_=String),
    },
    "fail": _FAILURE,
}


@functools.cache
def _take_statement(auto: bool, move: str) -> Update:
    free = select(T.c.id).where(T.c.id == _EMAIL).with_for_update(skip_locked=True)
    return update(T).where(T.c.id.in_(free), _sendable(auto)).values(_MOVES[move])


@functools.cache
def _state_statement(auto: bool) -> Select[Any]:
    rules = [rule for rule, _ in _in_use() + _left_alone(auto)]
    return (
        select(
            T.c.failed_attempts,
            T.c.notification_type,
            T.c.recipient,
            T.c.claim_token.is_not(None),
            *rules,
        )
        .where(T.c.id == _EMAIL)
        .with_for_update(skip_locked=True)
    )


@functools.cache
def _statements() -> dict[str, Any]:
    mine = and_(T.c.id == _EMAIL, T.c.claim_token == bindparam("token"), T.c.is_sent.is_(False))
    interrupted = {**_FAILURE, "last_error": INTERRUPTED, "permanent_failure": False}
    sent = {
        "is_sent": True,
        "sent_at": bindparam("sent_at", type_=UTCDateTime),
        "last_error": None,
        "permanent_failure": False,
        "claimed_until": None,
        "claim_token": None,
    }
    return {
        "write": insert(T),
        "exists": select(T.c.id).where(T.c.id == _EMAIL),
        "message": select(T.c.mime, T.c.recipient, T.c.notification_type, T.c.assignment_id).where(
            T.c.id == _EMAIL
        ),
        "sent_mine": update(T).where(mine).values(sent),
        "sent": update(T).where(T.c.id == _EMAIL).values(sent),
        "attempts": select(T.c.failed_attempts).where(T.c.id == _EMAIL),
        "release_failed": update(T).where(mine).values(_FAILURE),
        "release_interrupted": update(T).where(mine).values(interrupted),
        "interrupt": update(T).where(T.c.id == _EMAIL).values(interrupted),
        "interrupt_all": update(T)
        .where(T.c.id.in_(bindparam("ids", expanding=True)))
        .values(interrupted),
        "any_abandoned": select(T.c.id).where(EmailNotification.abandoned(_NOW)).limit(1),
        "abandoned": select(T.c.id, T.c.notification_type, T.c.recipient)
        .where(EmailNotification.abandoned(_NOW))
        .order_by(T.c.id)
        .with_for_update(skip_locked=True),
        "retryable": select(T.c.id).where(_sendable(True)).order_by(T.c.id),
    }


def _run(session: Session, name: str, **params: Any) -> Any:
    return session.connection().execute(_statements()[name], params)


# -- reading ---------------------------------------------------------------------------------


def retryable_ids(session: Session, selection: Selection) -> list[int]:
    """Every email a retry without ids may send, oldest first."""
    return list(_run(session, "retryable", **selection.params).scalars())


def any_abandoned(session: Session, now: datetime) -> bool:
    """Whether some claim expired without a result (a cheap read before settling them)."""
    return _run(session, "any_abandoned", now=now).first() is not None


# -- the moves -------------------------------------------------------------------------------


def write(session: Session, **columns: Any) -> int:
    """A new email in the log (queued), in the caller's transaction; its id."""
    written = session.connection().execute(_statements()["write"], {**_QUEUED, **columns})
    key = written.inserted_primary_key
    assert key is not None
    email_id: int = key[0]
    return email_id


def claim(session: Session, email_id: int, selection: Selection, token: str) -> Claim | str:
    """Hold the email for one lease under ``token``; why not, when it may not be sent now."""
    until = selection.now + selection.lease
    reason = _take(session, email_id, selection, "claim", until=until, token=token)
    if reason is not None:
        return reason
    mime, recipient, kind, assignment_id = _run(session, "message", email_id=email_id).one()
    return Claim(email_id, token, mime, recipient, kind, assignment_id)


def fail(session: Session, email_id: int, selection: Selection, text: str) -> str | None:
    """Log an email as failed without trying it (the server cannot be used): None, or why it
    was left as it is (sent, or held by another sender)."""
    return _take(session, email_id, selection, "fail", error=text, permanent=False)


def record_sent(session: Session, claim: Claim, now: datetime) -> None:
    """The server took the message: sent, whatever became of the claim meanwhile, and the
    assignment it was written for is told."""
    mine = _run(session, "sent_mine", email_id=claim.id, token=claim.token, sent_at=now)
    if not mine.rowcount:
        if not _run(session, "sent", email_id=claim.id, sent_at=now).rowcount:
            return
        log.warning("email %s: its claim expired while sending; logged as sent", claim.id)
    if claim.assignment_id is not None:
        note_email_sent(session, claim.assignment_id, claim.notification_type, now)


def record_failure(session: Session, claim: Claim, text: str, *, permanent: bool) -> int | None:
    """The server refused it, or could not be reached: the attempts so far, or None when the
    claim had expired meanwhile (the email's state is then left to whoever settled it)."""
    moved = _run(
        session, "release_failed",
        email_id=claim.id, token=claim.token, error=text, permanent=permanent,
    )  # fmt: skip
    if not moved.rowcount:
        return None
    attempts: int = _run(session, "attempts", email_id=claim.id).scalar_one()
    return attempts


def record_interrupted(session: Session, claim: Claim) -> bool:
    """The send stopped after the message may have gone out: interrupted. False when the claim
    had expired meanwhile."""
    moved = _run(session, "release_interrupted", email_id=claim.id, token=claim.token)
    return bool(moved.rowcount)


def settle_abandoned(session: Session, now: datetime) -> Sequence[tuple[int, str, str]]:
    """Every claim that expired without a result becomes interrupted; (id, type, recipient)
    of each, for the log."""
    found: Sequence[tuple[int, str, str]] = _run(session, "abandoned", now=now).all()
    ids = [email_id for email_id, _, _ in found]
    for start in range(0, len(ids), 500):  # SQLite before 3.32 takes 999 values a statement
        _run(session, "interrupt_all", ids=ids[start : start + 500])
    return found


def log_interrupted(email_id: int, kind: str, recipient: str, detail: str | None = None) -> None:
    log.warning(
        "email %s (%s to %s): %s%s", email_id, kind, recipient, INTERRUPTED,
        f" ({detail})" if detail else "",
    )  # fmt: skip


def _take(
    session: Session, email_id: int, selection: Selection, move: str, **values: Any
) -> str | None:
    """Make ``move`` on an email the selection may send now: None, or why it may not.

    One statement when it may; when not, the reason is read with the same conditions. A claim
    that expired without a result is settled first (interrupted), then judged again.
    """
    params = {**selection.params, **values, "email_id": email_id}
    for _ in range(3):
        if session.connection().execute(_take_statement(selection.auto, move), params).rowcount:
            return None
        reason = _refusal(session, email_id, selection)
        if reason is not None:
            return reason
    return HELD  # it changed under us each time: another sender is at it


def _refusal(session: Session, email_id: int, selection: Selection) -> str | None:
    """Why the selection may not send this email now; None once an expired claim on it was
    settled (or it changed meanwhile), so that it is judged again."""
    found = (
        session.connection()
        .execute(_state_statement(selection.auto), {**selection.params, "email_id": email_id})
        .first()
    )
    if found is None:
        exists = _run(session, "exists", email_id=email_id).first() is not None
        return HELD if exists else "no such email"
    in_use, left_alone = _in_use(), _left_alone(selection.auto)
    hits: list[bool]
    attempts, kind, recipient, claimed, *hits = found
    for (_, reason), hit in zip(in_use, hits[: len(in_use)], strict=True):
        if hit:
            return reason
    if claimed:
        _run(session, "interrupt", email_id=email_id)
        log_interrupted(email_id, kind, recipient)
        return None
    for (_, reason), hit in zip(left_alone, hits[len(in_use) :], strict=True):
        if hit:
            return reason.format(attempts=attempts)
    return None
