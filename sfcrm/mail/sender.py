"""The Mailer: writes emails to the log in the caller's transaction, sends logged ones over one
connection a batch, retries the failed ones, and reads the log back."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property, partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from sfcrm.batch import BatchResult
from sfcrm.db import Database
from sfcrm.errors import ConfigError, NotFoundError, ValidationError
from sfcrm.mail import claims
from sfcrm.mail.backends import Backend
from sfcrm.mail.claims import AUTO, DEFAULT_LEASE, MAYBE_DELIVERED, NAMED, WRITER, Claim, Selection
from sfcrm.mail.errors import SendError, not_sent, one_line
from sfcrm.mail.message import (
    Attachment,
    build_message,
    clean_notification_type,
    clean_subject,
    validate_address,
)
from sfcrm.models import EmailNotification
from sfcrm.times import iso_in

log = logging.getLogger("sfcrm.mail")

Progress = Callable[[int, int], None]
_IN_BATCH = 500  # values per IN (...): SQLite before 3.32 takes at most 999 in one statement
# A run records its sent emails in one statement every so many (or every so long): fewer
# transactions, and a run killed meanwhile leaves at most these few to be named by id.
_RECORD_EVERY = 20
_RECORD_AFTER = timedelta(seconds=1)
_WRITE_EVERY = 250  # emails a statement writes to the log: the built messages wait in memory


@dataclass(frozen=True)
class Outgoing:
    """One email for :meth:`Mailer.queue_all` to write."""

    recipient: str
    notification_type: str
    subject: str
    text: str
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    person_id: int | None = None
    assignment_id: int | None = None


@dataclass
class SendReport:
    """What a send or retry did, by email id. ``outcome`` says what "sent" meant for the
    backend: ``sent`` (SMTP), ``written`` (a file in ``outbox``), ``printed`` (the console)."""

    sent: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)  # why each skipped one was skipped
    outcome: str = "sent"
    outbox: Path | None = None  # where the file backend wrote them

    def skip(self, email_id: int, reason: str) -> None:
        self.skipped.append(email_id)
        self.reasons[email_id] = reason

    @property
    def delivered(self) -> str:
        """The delivered count as the office should read it: "3 sent", or "3 written to
        outbox/" for the file backend (nothing was sent), or "3 printed"."""
        count = len(self.sent)
        if self.outcome == "written" and self.outbox is not None:
            return f"{count} written to {_shown(self.outbox)}/"
        return f"{count} {self.outcome}"

    def fates(self, *, left_alone: str) -> dict[int, tuple[str, str | None]]:
        """Each email's outcome word (``sent``/``written``/``printed``, ``failed``, or
        ``left_alone`` for one skipped) and why, or None when the word says it all."""
        # the folder in full: a script reading it may run from anywhere
        done = f"written to {self.outbox}" if self.outcome == "written" and self.outbox else None
        fates: dict[int, tuple[str, str | None]] = dict.fromkeys(self.sent, (self.outcome, done))
        fates.update((email_id, ("failed", error)) for email_id, error in self.failed)
        fates.update(
            (email_id, (left_alone, self.reasons.get(email_id))) for email_id in self.skipped
        )
        return fates

    @property
    def ids(self) -> list[int]:
        """Every email this report tells of, by id."""
        return sorted({*self.sent, *(email_id for email_id, _ in self.failed), *self.skipped})

    def results(self, assignments: Mapping[int, int | None]) -> BatchResult:
        """A retry's result, one item an email by id (``assignments``: each one's assignment):
        sent (or written, printed), failed, or not retried and why."""
        result = BatchResult(("email_id", "assignment_id"))
        for email_id, (outcome, why) in sorted(self.fates(left_alone="not_retried").items()):
            force = force_command(why, [email_id]) if outcome == "not_retried" and why else None
            if force is not None:
                why = f"{why} — `{force}` to force"
            result.add(outcome, why, email_id=email_id, assignment_id=assignments.get(email_id))
        return result

    def left_alone(self) -> dict[str, list[int]]:
        """The skipped emails grouped by why, in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for email_id in self.skipped:
            groups.setdefault(self.reasons.get(email_id, "skipped"), []).append(email_id)
        return groups


def notification_json(
    n: EmailNotification, tz: ZoneInfo, state: str | None = None
) -> dict[str, Any]:
    return {
        "id": n.id,
        "recipient": n.recipient,
        "person_id": n.person_id,
        "notification_type": n.notification_type,
        "subject": n.subject,
        "state": state,
        "is_sent": n.is_sent,
        "sent_at": iso_in(n.sent_at, tz),
        "failed_attempts": n.failed_attempts,
        "last_error": n.last_error,
    }


class Mailer:
    """Writes emails to the log and sends them. Dependencies are passed in."""

    def __init__(
        self,
        db: Database,
        backend_factory: Callable[[], Backend],
        *,
        sender: str,
        clock: Callable[[], datetime],
        lease: timedelta = DEFAULT_LEASE,
        reply_to: str | None = None,
        kinds: Sequence[str] = (),  # the kinds of email written, for `list`'s filter
    ) -> None:
        self.db = db
        self.kinds = tuple(kinds)
        self._backend_factory = backend_factory
        self.sender = sender
        self.clock = clock
        self.lease = lease
        self.reply_to = reply_to or None
        self._checked = False
        self._spare: Backend | None = None  # the backend check() built, for the next batch

    def __repr__(self) -> str:
        return f"Mailer(db={self.db.where}, sender={self.sender!r})"

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise ValueError("the clock must give aware datetimes")
        return now

    @cached_property
    def envelope_sender(self) -> str:
        """The bare address of DEFAULT_FROM_EMAIL, for SMTP's MAIL FROM (checked once: every
        email of a batch asks for it)."""
        from email.utils import parseaddr

        if "\r" in self.sender or "\n" in self.sender:
            raise ConfigError("DEFAULT_FROM_EMAIL must be one line")
        address = parseaddr(self.sender)[1]
        try:
            return validate_address(address)
        except ValidationError:
            raise ConfigError(
                "DEFAULT_FROM_EMAIL is not a usable address",
                value=self.sender,
                hint="e.g. DEFAULT_FROM_EMAIL='Sound Fusion <office@soundfusion.co.ke>'",
            ) from None

    @cached_property
    def replies_reach_the_office(self) -> bool:
        """Whether replying to an email reaches someone: there is a Reply-To (the office's
        email), or the sender does not look like a no-reply address."""
        from email.utils import parseaddr

        return self.reply_to is not None or not looks_no_reply(parseaddr(self.sender)[1])

    def check(self) -> None:
        """Raise ConfigError now for mail settings that cannot work (DEFAULT_FROM_EMAIL,
        SFCRM_ORG_EMAIL, the backend's), so that a bulk send fails before it writes a single
        email. :meth:`queue` runs it before the first email it writes, whoever calls it."""
        _ = self.envelope_sender
        if self.reply_to is not None:
            try:
                validate_address(self.reply_to)
            except ValidationError:
                raise ConfigError(
                    "SFCRM_ORG_EMAIL is not a usable address",
                    value=self.reply_to,
                    hint="e.g. SFCRM_ORG_EMAIL=bookings@soundfusion.co.ke",
                ) from None
        backend = self._backend_factory()
        try:
            backend.check()
        except BaseException:
            backend.close()
            raise
        self._spare = backend  # built and unused (a backend connects on its first send)
        self._checked = True

    # -- writing ---------------------------------------------------------------------------

    def queue(
        self,
        session: Session,
        *,
        recipient: str,
        notification_type: str,
        subject: str,
        text: str,
        html: str | None = None,
        attachments: Iterable[Attachment] = (),
        person_id: int | None = None,
        assignment_id: int | None = None,
    ) -> int:
        """Write one email to the log inside the caller's write transaction (``session`` from
        :meth:`Database.write`) and return its id; send it later with :meth:`send`. A
        recipient that could add a header is refused (ValidationError)."""
        [email_id] = self.queue_all(
            session,
            [
                Outgoing(
                    recipient=recipient, notification_type=notification_type, subject=subject,
                    text=text, html=html, attachments=tuple(attachments), person_id=person_id,
                    assignment_id=assignment_id,
                )
            ],
        )  # fmt: skip
        return email_id

    def queue_all(self, session: Session, emails: Iterable[Outgoing]) -> list[int]:
        """Write these emails to the log inside the caller's write transaction, one statement
        for every few hundred, and return their ids in order (see :meth:`queue`). Nothing is
        written when one of them is refused (the transaction is the caller's)."""
        if not self._checked:
            self.check()  # a path that forgot to check first still writes nothing it cannot send
        now = self._now()
        domain = self.envelope_sender.rpartition("@")[2]
        ids: list[int] = []
        rows: list[dict[str, Any]] = []
        for email in emails:
            kind = clean_notification_type(email.notification_type)
            mime = build_message(
                sender=self.sender,
                reply_to=self.reply_to,
                recipient=email.recipient,
                subject=email.subject,
                text=email.text,
                html=email.html,
                attachments=email.attachments,
                message_id_domain=domain,
                date=now,
            )
            rows.append(
                {
                    "recipient": email.recipient, "person_id": email.person_id,
                    "assignment_id": email.assignment_id, "notification_type": kind,
                    "subject": clean_subject(email.subject), "message": email.text,
                    "mime": mime, "created_at": now,
                    "claimed_until": now + self.lease,  # held by this run: it sends them next
                }
            )  # fmt: skip
            if len(rows) == _WRITE_EVERY:
                ids.extend(self._write_rows(session, rows))
                rows = []
        ids.extend(self._write_rows(session, rows))
        return ids

    def _write_rows(self, session: Session, rows: list[dict[str, Any]]) -> list[int]:
        # One INSERT for a few hundred, no ORM objects: a batch writes a thousand of these.
        ids = claims.write_all(session, rows)
        for email_id, row in zip(ids, rows, strict=True):
            log.debug(
                "email %s queued: %s to %s", email_id, row["notification_type"], row["recipient"]
            )
        return ids

    # -- sending ---------------------------------------------------------------------------

    def send(self, ids: Sequence[int], *, progress: Progress | None = None) -> SendReport:
        """Send the emails this run just wrote with :meth:`queue`, over one connection; ones
        already sent, being sent or tried by another run are skipped. Failures are logged and
        reported, not raised. Whatever it did not get to try (Ctrl-C, an error) it lets go of,
        so that ``mail retry`` sends it at once."""
        wanted = list(dict.fromkeys(ids))
        try:
            self._check_known(wanted)
            self._settle_interrupted()
        except BaseException:
            self._let_go(wanted)
            raise
        return self._run(wanted, mode=WRITER, max_attempts=0, progress=progress)

    def retry(
        self,
        ids: Sequence[int] | None = None,
        *,
        max_attempts: int = 5,
        progress: Progress | None = None,
    ) -> SendReport:
        """Send failed emails again.

        Without ids: every queued email (written, never tried, its writer gone) and every
        failed one tried fewer than ``max_attempts`` times; the rest of the unsent (permanent
        refusals, ones interrupted mid-send that may have been delivered, ones being sent) are
        reported as skipped, each with why. Named ids are tried even when permanent or
        interrupted; a named one already sent or being sent is skipped; an unknown id raises
        NotFoundError before anything is sent.
        """
        if max_attempts < 1:
            raise ValidationError("max attempts must be at least 1", value=str(max_attempts))
        if ids is not None:
            wanted = list(dict.fromkeys(ids))
            self._check_known(wanted)
            self._settle_interrupted()
            return self._run(wanted, mode=NAMED, max_attempts=max_attempts, progress=progress)
        self._settle_interrupted()
        selection = self._selection(mode=AUTO, max_attempts=max_attempts)
        with self.db.read() as session:
            due, alone = claims.retryable(session, selection)
        report = self._run(due, mode=AUTO, max_attempts=max_attempts, progress=progress)
        for email_id, reason in alone:
            report.skip(email_id, reason)
        report.skipped.sort()
        return report

    def _selection(self, *, mode: str, max_attempts: int) -> Selection:
        return Selection(self._now(), self.lease, mode=mode, max_attempts=max_attempts)

    def _check_known(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        found: set[int | None] = set()
        with self.db.read() as session:
            for start in range(0, len(ids), _IN_BATCH):
                chunk = ids[start : start + _IN_BATCH]
                found.update(
                    session.exec(
                        select(col(EmailNotification.id)).where(
                            col(EmailNotification.id).in_(chunk)
                        )
                    )
                )
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFoundError("no such email", value=", ".join(map(str, missing)))

    def _run(
        self, ids: list[int], *, mode: str, max_attempts: int, progress: Progress | None
    ) -> SendReport:
        report = SendReport()
        total = len(ids)
        if not ids:
            return report
        index = 0
        try:
            envelope = self.envelope_sender
            backend = self._spare or self._backend_factory()  # a bad setting: before any claim
            self._spare = None
        except BaseException:
            self._let_go(ids if mode == WRITER else [])
            raise
        report.outcome = backend.outcome
        report.outbox = backend.outbox
        # Delivered, not yet recorded: recorded with a later claim, a few at a time. Until
        # then each stays claimed, so a run killed meanwhile leaves it "interrupted" (it may
        # have been delivered: sent again only when named), never queued to be sent twice.
        sent: list[Claim] = []
        recorded_at = self._now()
        token = secrets.token_hex(16)  # this run's claims
        renew_at = self._now() + self.lease / 2  # the writer's hold on the rest, renewed
        finished = False
        try:
            for index, email_id in enumerate(ids):
                renew: list[int] = []
                if mode == WRITER and self._now() >= renew_at:
                    renew, renew_at = ids[index + 1 :], self._now() + self.lease / 2
                after: list[Claim] = []
                if len(sent) >= _RECORD_EVERY or self._now() - recorded_at >= _RECORD_AFTER:
                    after, sent, recorded_at = sent, [], self._now()
                claim = self._claim(
                    email_id, mode, max_attempts, token=token, after=after, renew=renew
                )
                if isinstance(claim, str):
                    report.skip(email_id, claim)
                else:
                    try:
                        backend.send(claim.mime, envelope, [claim.recipient], label=str(email_id))
                    except SendError as exc:
                        text = one_line(str(exc))
                        if exc.maybe_delivered:
                            self._record_interrupted(claim, text)
                            report.failed.append((email_id, f"{text}; {MAYBE_DELIVERED}"))
                        else:
                            self._record_failure(claim, text, permanent=exc.permanent)
                            report.failed.append((email_id, text))
                        if exc.stops_batch:
                            rest = ids[index + 1 :]
                            self._fail_rest(rest, text, report, mode, max_attempts)
                            if progress is not None:
                                progress(total, total)
                            break
                    except BaseException as exc:
                        # Ctrl-C or a bug mid-send: record what is known now, then let it go on
                        if backend.may_have_delivered():
                            self._record_interrupted(claim)
                        else:
                            self._record_not_sent(claim, exc)
                        raise
                    else:
                        sent.append(claim)
                        report.sent.append(email_id)
                if progress is not None:
                    progress(index + 1, total)
            finished = True
        finally:
            try:
                if sent:
                    self._record_sent(sent)
            finally:
                backend.close()
                if mode == WRITER and not finished:
                    self._let_go(ids[index:])
        return report

    def _let_go(self, ids: list[int]) -> None:
        """The writer stops early: what it held and did not try is queued for `mail retry`."""
        if not ids:
            return
        try:
            self.db.transaction(partial(claims.let_go, ids=ids))
        except Exception:  # its hold lapses after a lease all the same
            log.exception("could not let go of %d emails; they wait a lease", len(ids))

    def _claim(
        self,
        email_id: int,
        mode: str,
        max_attempts: int,
        *,
        token: str,
        after: list[Claim],
        renew: list[int],
    ) -> Claim | str:
        """Claim an email (committed before its message goes out), in the transaction that
        records the ones sent before it when due, and renews the writer's hold on the rest."""
        selection = self._selection(mode=mode, max_attempts=max_attempts)

        def work(session: Session) -> Claim | str:
            claims.record_all_sent(session, after, selection.now)
            if renew:
                claims.hold(session, renew, selection.now + self.lease)
            return claims.claim(session, email_id, selection, token)

        claim = self.db.transaction(work)
        for done in after:
            _log_sent(done)
        return claim

    def _record_sent(self, sent: list[Claim]) -> None:
        self.db.transaction(partial(claims.record_all_sent, sent=sent, now=self._now()))
        for claim in sent:
            _log_sent(claim)

    def _record_failure(self, claim: Claim, text: str, *, permanent: bool) -> None:
        attempts = self.db.transaction(
            partial(claims.record_failure, claim=claim, text=text, permanent=permanent)
        )
        if attempts is None:
            log.warning("email %s failed after its claim expired: %s", claim.id, text)
            return
        log.warning(
            "email %s failed (%s to %s, attempt %d%s): %s",
            claim.id, claim.notification_type, claim.recipient, attempts,
            ", permanent" if permanent else "", text,
        )  # fmt: skip

    def _record_not_sent(self, claim: Claim, exc: BaseException) -> None:
        """A send that raised before its message went out: an ordinary failure, retried."""
        try:
            self._record_failure(claim, not_sent(exc), permanent=False)
        except Exception:  # the claim's expiry records it in the end, as maybe delivered
            log.exception("email %s: could not record the failure", claim.id)

    def _record_interrupted(self, claim: Claim, detail: str | None = None) -> None:
        try:
            if self.db.transaction(partial(claims.record_interrupted, claim=claim)):
                claims.log_interrupted(claim.id, claim.notification_type, claim.recipient, detail)
        except Exception:  # the claim's expiry records it in the end
            log.exception("email %s: could not record the interruption", claim.id)

    def _fail_rest(
        self, ids: list[int], text: str, report: SendReport, mode: str, max_attempts: int
    ) -> None:
        """The server cannot be used: log the rest of the batch as failed, each counting an
        attempt, without touching ones sent or being sent by another run."""
        if not ids:
            return
        selection = self._selection(mode=mode, max_attempts=max_attempts)

        def fail_all(session: Session) -> list[tuple[int, str | None]]:
            return [(i, claims.fail(session, i, selection, text)) for i in ids]

        outcomes = self.db.transaction(fail_all)
        failed = [email_id for email_id, reason in outcomes if reason is None]
        for email_id, reason in outcomes:
            if reason is not None:
                report.skip(email_id, reason)
            else:
                report.failed.append((email_id, text))
        e = EmailNotification
        logged: dict[int | None, tuple[str, str, int]] = {}
        with self.db.read() as session:
            for start in range(0, len(failed), _IN_BATCH):
                logged.update(
                    (email_id, (kind, recipient, attempts))
                    for email_id, kind, recipient, attempts in session.exec(
                        select(e.id, e.notification_type, e.recipient, e.failed_attempts).where(
                            col(e.id).in_(failed[start : start + _IN_BATCH])
                        )
                    )
                )
        for email_id in failed:
            kind, recipient, attempts = logged[email_id]
            log.warning(
                "email %s failed (%s to %s, attempt %d): %s",
                email_id, kind, recipient, attempts, text,
            )  # fmt: skip

    # -- interrupted sends -----------------------------------------------------------------

    def _settle_interrupted(self) -> None:
        """Log as failed every email whose claim expired without a result. A cheap read first:
        the write lock is taken only when there is something to settle."""
        now = self._now()
        with self.db.read() as session:
            if not claims.any_abandoned(session, now):
                return
        for email_id, kind, recipient in self.db.transaction(
            partial(claims.settle_abandoned, now=now)
        ):
            claims.log_interrupted(email_id, kind, recipient)

    # -- reading ---------------------------------------------------------------------------

    def list(
        self,
        *,
        failed: bool = False,
        unsent: bool = False,
        notification_type: str | None = None,
        since: datetime | None = None,
        limit: int = 200,
    ) -> Sequence[EmailNotification]:
        """Logged emails, newest first (their states: :meth:`states`); ``failed``: not sent
        and tried at least once; ``unsent``: everything not sent, queued and sending too;
        ``notification_type``: one of the kinds this mailer was given, when given any."""
        if notification_type is not None and self.kinds and notification_type not in self.kinds:
            raise ValidationError(
                "unknown email type",
                value=notification_type,
                hint="one of " + ", ".join(self.kinds),
            )
        self._settle_interrupted()
        e = EmailNotification
        query = select(e)
        if failed:
            query = query.where(col(e.is_sent).is_(False), col(e.failed_attempts) > 0)
        if unsent:
            query = query.where(col(e.is_sent).is_(False))
        if notification_type:
            query = query.where(e.notification_type == notification_type)
        if since is not None:
            query = query.where(col(e.created_at) >= since)
        query = query.order_by(col(e.created_at).desc(), col(e.id).desc()).limit(limit)
        with self.db.read() as session:
            return session.exec(query).all()

    def get(self, email_id: int) -> EmailNotification:
        self._settle_interrupted()
        with self.db.read() as session:
            row = session.get(EmailNotification, email_id)
            if row is None:
                raise NotFoundError("no such email", value=str(email_id))
            return row

    def assignments(self, ids: Sequence[int]) -> dict[int, int | None]:
        """The assignment each of these emails was written for (None: not a crew email)."""
        e = EmailNotification
        found: dict[int, int | None] = {}
        with self.db.read() as session:
            for start in range(0, len(ids), _IN_BATCH):
                chunk = list(ids[start : start + _IN_BATCH])
                found.update(
                    (email_id, assignment_id)
                    for email_id, assignment_id in session.exec(
                        select(e.id, e.assignment_id).where(col(e.id).in_(chunk))
                    )
                    if email_id is not None
                )
        return found

    def states(self, ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        """The state and last error of each of these emails (unknown ids left out)."""
        with self.db.read() as session:
            return claims.states(session, ids, self._now())


def force_command(reason: str, ids: list[int]) -> str | None:
    """The command that sends emails a retry left alone for ``reason`` anyway, when naming
    them would (not one being sent, already sent, or superseded: it is never sent)."""
    if reason in (claims.HELD, "already sent", "no such email") or reason.startswith("superseded"):
        return None
    return "sfcrm mail retry " + " ".join(map(str, ids))


def _shown(folder: Path) -> str:
    """A folder as the office would type it: relative to where they are, when inside it."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve())) or "."
    except (ValueError, OSError):
        return str(folder)


def looks_no_reply(address: str) -> bool:
    """An address nobody reads replies to: noreply@, no-reply@, donotreply@, …"""
    local = address.rpartition("@")[0].lower()
    return bool(
        re.fullmatch(
            r"(do[-_.]?not[-_.]?reply|no[-_.]?reply|bounces?|mailer-daemon)"
            r"([-_.+].*)?",
            local,
        )
    )


def _log_sent(claim: Claim) -> None:
    log.info("email %s sent: %s to %s", claim.id, claim.notification_type, claim.recipient)
