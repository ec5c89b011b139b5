"""The state of a logged email and its moves, each a short statement in the caller's
transaction (no SMTP call ever runs inside one).

    written ──▶ sending (held by the run that wrote it, a lease at a time)
       │           └─ the run ends, or its hold lapses, without trying it ─▶ queued
       └──claim──▶ claimed ──▶ sent
                      │ ├────▶ failed       (retried by `mail retry`)
                      │ ├────▶ refused      (a 5xx refusal: retried only when named)
                      │ └────▶ interrupted  (it may have been delivered: only when named)
                      └─ the claim expires without a result ─▶ interrupted

The states are :meth:`EmailNotification.state`. A sender claims an email before it hands the
message to the server, and a claim is taken only from an email no other sender holds: the claim
locks the row and skips one another sender has locked (``SKIP LOCKED`` on PostgreSQL; SQLite's
write lock holds the whole file), so two runs at once never deliver one email twice.

The run that writes an email holds it from the start (``claimed_until`` with no token), so
``mail retry`` knows the writer is still at work; only that run takes an email so held
(:attr:`Selection.writer`), and only one nobody has tried. The run renews its hold while it
sends and lets go of what it did not send when it ends, even on Ctrl-C; when it is killed, its
hold lapses after a lease.

These run once or twice per email sent, so each statement is built once, on the table, with
bound parameters, and runs on the session's own connection (in its transaction): building a
statement and going through the ORM's execute cost more than running it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Integer,
    Row,
    Select,
    String,
    Update,
    and_,
    bindparam,
    insert,
    or_,
    select,
    update,
)
from sqlmodel import Session

from sfcrm.crew import note_emails_sent
from sfcrm.models import INTERRUPTED, EmailNotification, EmailState, UTCDateTime, table

log = logging.getLogger("sfcrm.mail")

MAYBE_DELIVERED = "it may have been delivered, so it is sent again only when named by id"
DEFAULT_LEASE = timedelta(minutes=10)
HELD = "being sent by another sfcrm right now"

T = table(EmailNotification)
_EMAIL = bindparam("email_id", type_=Integer)
_NOW = bindparam("now", type_=UTCDateTime)
_STATE = EmailNotification.state(_NOW)

NAMED, AUTO, WRITER = "named", "auto", "writer"


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
    """Which emails a run may send at ``now``.

    ``mode``: a run given ids (``named``) sends any that is neither sent nor held by a sender;
    ``mail retry`` without ids (``auto``) sends the queued ones and the failed ones tried fewer
    than ``max_attempts`` times; the run that wrote the emails (``writer``) sends those nobody
    has tried, its own hold on them notwithstanding.
    """

    now: datetime
    lease: timedelta = DEFAULT_LEASE
    mode: str = NAMED
    max_attempts: int = 0

    @property
    def params(self) -> dict[str, Any]:
        """The values of the rules' parameters."""
        return {"now": self.now, "max_attempts": self.max_attempts}


# -- the rules -------------------------------------------------------------------------------


@functools.cache
def _sendable(mode: str) -> ColumnElement[bool]:
    """The condition of an email a run in ``mode`` may send now (never a superseded one)."""
    free = and_(T.c.claim_token.is_(None), T.c.superseded_at.is_(None))
    if mode == WRITER:
        return and_(free, T.c.is_sent.is_(False), T.c.failed_attempts == 0)
    if mode == AUTO:
        return and_(
            free,
            or_(
                _STATE == EmailState.QUEUED,
                and_(
                    _STATE == EmailState.FAILED,
                    T.c.failed_attempts < bindparam("max_attempts", type_=Integer),
                ),
            ),
        )
    return and_(free, _STATE.not_in([EmailState.SENT, EmailState.SENDING]))


def left_alone(state: str, attempts: int, error: str | None, selection: Selection) -> str | None:
    """Why a run does not send an email in ``state`` (None: it may). Reasons are the same for
    like emails, so a summary can group them."""
    if state == EmailState.SENT:
        return "already sent"
    if state == EmailState.SENDING:
        return HELD
    if state == EmailState.SUPERSEDED:
        return error or "superseded"
    if selection.mode == WRITER:
        return None if attempts == 0 else "already tried by another sfcrm; see `sfcrm mail list`"
    if selection.mode != AUTO:
        return None
    if state == EmailState.REFUSED:
        code = re.search(r"\b5\d\d\b", error or "")
        return f"permanent refusal ({code.group()})" if code else "permanent refusal"
    if state == EmailState.INTERRUPTED:
        return "interrupted mid-send, it may have been delivered"
    if state == EmailState.FAILED and attempts >= selection.max_attempts:
        return f"tried {selection.max_attempts} times already (--max-attempts)"
    return None


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
def _take_statement(mode: str, move: str, returning: bool = False) -> Update:
    free = select(T.c.id).where(T.c.id == _EMAIL).with_for_update(skip_locked=True)
    taken = update(T).where(T.c.id.in_(free), _sendable(mode)).values(_MOVES[move])
    return taken.returning(*_MESSAGE) if returning else taken


_MESSAGE = (T.c.mime, T.c.recipient, T.c.notification_type, T.c.assignment_id)


@functools.cache
def _state_statement() -> Select[Any]:
    return (
        select(
            _STATE,
            T.c.failed_attempts,
            T.c.last_error,
            T.c.notification_type,
            T.c.recipient,
            T.c.claim_token.is_not(None),
        )
        .where(T.c.id == _EMAIL)
        .with_for_update(skip_locked=True)
    )


# the writer's hold: on an email nobody has claimed or tried
_HOLD = and_(
    T.c.claim_token.is_(None),
    T.c.claimed_until.is_not(None),
    T.c.is_sent.is_(False),
    T.c.failed_attempts == 0,
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
        "write_all": insert(T).returning(T.c.id, sort_by_parameter_order=True),
        "exists": select(T.c.id).where(T.c.id == _EMAIL),
        "message": select(T.c.mime, T.c.recipient, T.c.notification_type, T.c.assignment_id).where(
            T.c.id == _EMAIL
        ),
        "sent_mine": update(T).where(mine).values(sent),
        "held": select(T.c.id, T.c.claim_token)
        .where(T.c.id.in_(bindparam("ids", expanding=True)), T.c.is_sent.is_(False))
        .with_for_update(),
        "sent_all_mine": update(T)
        .where(
            T.c.id.in_(bindparam("ids", expanding=True)),
            T.c.claim_token == bindparam("token"),
            T.c.is_sent.is_(False),
        )
        .values(sent),
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
        "unsent": select(T.c.id, _STATE, T.c.failed_attempts, T.c.last_error)
        .where(T.c.is_sent.is_(False))
        .order_by(T.c.id),
        "renew": update(T)
        .where(T.c.id.in_(bindparam("ids", expanding=True)), _HOLD)
        .values(claimed_until=bindparam("until", type_=UTCDateTime)),
        "let_go": update(T)
        .where(T.c.id.in_(bindparam("ids", expanding=True)), _HOLD)
        .values(claimed_until=None),
    }


def _run(session: Session, name: str, **params: Any) -> Any:
    return session.connection().execute(_statements()[name], params)


# -- reading ---------------------------------------------------------------------------------


def retryable(session: Session, selection: Selection) -> tuple[list[int], list[tuple[int, str]]]:
    """For a retry without ids: every email it may send, oldest first, and every other unsent
    one with why it is left alone."""
    due: list[int] = []
    alone: list[tuple[int, str]] = []
    for email_id, state, attempts, error in _run(session, "unsent", now=selection.now):
        reason = left_alone(state, attempts, error, selection)
        if reason is None:
            due.append(email_id)
        else:
            alone.append((email_id, reason))
    return due, alone


def states(
    session: Session, ids: Sequence[int], now: datetime
) -> dict[int, tuple[str, str | None]]:
    """The state and last error of each of these emails."""
    found: dict[int, tuple[str, str | None]] = {}
    query = select(T.c.id, EmailNotification.state(now), T.c.last_error)
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        for email_id, state, error in session.connection().execute(query.where(T.c.id.in_(chunk))):
            found[email_id] = (state, error)
    return found


def any_abandoned(session: Session, now: datetime) -> bool:
    """Whether some claim expired without a result (a cheap read before settling them)."""
    return _run(session, "any_abandoned", now=now).first() is not None


# -- the moves -------------------------------------------------------------------------------


def write_all(session: Session, rows: Sequence[dict[str, Any]]) -> list[int]:
    """New emails in the log, in the caller's transaction and one statement (held by their
    writer when ``claimed_until`` is given): their ids, in order."""
    if not rows:
        return []
    written = session.connection().execute(
        _statements()["write_all"], [{**_QUEUED, **row} for row in rows]
    )
    return [email_id for (email_id,) in written]


def hold(session: Session, ids: Sequence[int], until: datetime) -> None:
    """The writer renews its hold on the emails of its batch it has not tried yet."""
    for start in range(0, len(ids), 500):
        _run(session, "renew", ids=list(ids[start : start + 500]), until=until)


def let_go(session: Session, ids: Sequence[int]) -> None:
    """The writer ends: the emails it held and did not try become queued, for `mail retry`."""
    for start in range(0, len(ids), 500):
        _run(session, "let_go", ids=list(ids[start : start + 500]))


def claim(session: Session, email_id: int, selection: Selection, token: str) -> Claim | str:
    """Hold the email for one lease under ``token``; why not, when it may not be sent now."""
    until = selection.now + selection.lease
    # the claim and the message in one statement where the engine can (one round trip)
    returning = session.connection().dialect.update_returning
    taken = _take(
        session, email_id, selection, "claim", returning=returning, until=until, token=token
    )
    if isinstance(taken, str):
        return taken
    found: Any = taken or _run(session, "message", email_id=email_id).one()
    mime, recipient, kind, assignment_id = found
    return Claim(email_id, token, mime, recipient, kind, assignment_id)


def fail(session: Session, email_id: int, selection: Selection, text: str) -> str | None:
    """Log an email as failed without trying it (the server cannot be used): None, or why it
    was left as it is (sent, or held by another sender)."""
    taken = _take(session, email_id, selection, "fail", error=text, permanent=False)
    return taken if isinstance(taken, str) else None


def record_all_sent(session: Session, sent: Sequence[Claim], now: datetime) -> None:
    """The server took each of these messages: sent, whatever became of each claim meanwhile,
    and the assignments they were written for are told. Two statements for the lot when every
    claim still holds: a run records its sent emails a few at a time."""
    noted: list[Claim] = []
    for start in range(0, len(sent), 500):
        chunk = sent[start : start + 500]
        held = {
            (email_id, token)
            for email_id, token in _run(session, "held", ids=[c.id for c in chunk])
        }
        mine = [c for c in chunk if (c.id, c.token) in held]
        for token in {c.token for c in mine}:
            ids = [c.id for c in mine if c.token == token]
            _run(session, "sent_all_mine", ids=ids, token=token, sent_at=now)
        noted.extend(mine)
        for claim in chunk:
            if (claim.id, claim.token) in held:
                continue
            if _run(session, "sent", email_id=claim.id, sent_at=now).rowcount:
                log.warning("email %s: its claim expired while sending; logged as sent", claim.id)
                noted.append(claim)
    told = [(c.assignment_id, c.notification_type, c.id) for c in noted if c.assignment_id]
    note_emails_sent(session, told, now)


def supersede(
    session: Session,
    assignment_ids: Sequence[int],
    kinds: Sequence[str],
    reason: str,
    now: datetime,
) -> list[tuple[int, int, str]]:
    """The unsent emails of these kinds written for these assignments say what is no longer
    true (``reason``: "superseded by ..."): they are never sent. Only those that surely did
    not go out: one a sender is sending, or that was interrupted mid-send, may have been
    delivered, and is left as it is. (email id, assignment id, kind) of each superseded."""
    found: list[tuple[int, int, str]] = []
    for start in range(0, len(assignment_ids), 500):
        chunk = list(assignment_ids[start : start + 500])
        found.extend(
            (email_id, assignment_id, kind)
            for email_id, assignment_id, kind in session.connection().execute(
                select(T.c.id, T.c.assignment_id, T.c.notification_type)
                .where(
                    T.c.assignment_id.in_(chunk),
                    T.c.notification_type.in_(list(kinds)),
                    T.c.is_sent.is_(False),
                    T.c.superseded_at.is_(None),
                    T.c.claim_token.is_(None),
                    T.c.last_error.is_distinct_from(INTERRUPTED),
                )
                .order_by(T.c.id)
                .with_for_update()
            )
        )
    ids = [email_id for email_id, _, _ in found]
    for start in range(0, len(ids), 500):
        session.connection().execute(
            update(T)
            .where(T.c.id.in_(ids[start : start + 500]))
            .values(superseded_at=now, last_error=reason, claimed_until=None)
        )
    for email_id, _, kind in found:
        log.info("email %s (%s): %s", email_id, kind, reason)
    return found


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
    session: Session,
    email_id: int,
    selection: Selection,
    move: str,
    *,
    returning: bool = False,
    **values: Any,
) -> str | Row[Any] | None:
    """Make ``move`` on an email the selection may send now: None (or, ``returning``, the
    email's message, recipient, kind and assignment), or why it may not.

    One statement when it may; when not, the reason is read with the same conditions. A claim
    that expired without a result is settled first (interrupted), then judged again.
    """
    params = {**selection.params, **values, "email_id": email_id}
    statement = _take_statement(selection.mode, move, returning)
    for _ in range(3):
        result = session.connection().execute(statement, params)
        if returning:
            row = result.first()
            if row is not None:
                return row
        elif result.rowcount:
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
        .execute(_state_statement(), {**selection.params, "email_id": email_id})
        .first()
    )
    if found is None:
        exists = _run(session, "exists", email_id=email_id).first() is not None
        return HELD if exists else "no such email"
    state, attempts, error, kind, recipient, claimed = found
    if claimed and state == EmailState.INTERRUPTED:  # its claim lapsed without a result
        _run(session, "interrupt", email_id=email_id)
        log_interrupted(email_id, kind, recipient)
        return None
    return left_alone(state, attempts, error, selection)
