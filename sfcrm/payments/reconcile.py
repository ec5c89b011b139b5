"""Settling what is left open: stored callbacks first, then stale pushes by STK Push Query;
and naming, with the reason, every payment no query can settle."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_
from sqlmodel import col, select

from sfcrm.errors import DarajaError
from sfcrm.models import CallbackOutcome, MpesaCallback, MpesaPayment, PaymentStatus
from sfcrm.payments.inbox import Inbox
from sfcrm.wording import about

log = logging.getLogger("sfcrm.payments")

DEFAULT_RECONCILE_AGE = timedelta(minutes=2)


@dataclass
class ReconcileReport:
    checked: int = 0
    settled: list[MpesaPayment] = field(default_factory=list)
    still_pending: list[int] = field(default_factory=list)
    callbacks_applied: int = 0
    unqueryable: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # every payment left unsettled, with why, and every "paid" callback no payment has taken
    unsettled: list[tuple[int, str]] = field(default_factory=list)
    unmatched_paid: list[int] = field(default_factory=list)


class Reconcile(Inbox):
    def refresh(self, payment_ids: Sequence[int]) -> list[str]:
        """Ask Daraja about the given payments that are still open; returns errors."""
        errors: list[str] = []
        for pid in payment_ids:
            payment = self.get(pid)
            if payment.status not in PaymentStatus.OPEN or not payment.checkout_request_id:
                continue
            try:
                self.settle_by_query(payment.checkout_request_id)
            except DarajaError as exc:
                errors.append(about(f"payment {pid}", str(exc)))
        return errors

    def reconcile(self, older_than: timedelta = DEFAULT_RECONCILE_AGE) -> ReconcileReport:
        """Settle everything left open: stored callbacks first, then stale pushes by query.

        Every payment it could not settle is listed with the reason, and so is every "paid"
        callback no payment has taken: nothing waits unseen.
        """
        report = ReconcileReport()
        with self.db.read() as session:
            open_before = [
                i
                for i in session.exec(
                    select(MpesaPayment.id).where(col(MpesaPayment.status).in_(PaymentStatus.OPEN))
                ).all()
                if i is not None
            ]
        report.callbacks_applied = self.replay_callbacks()
        with self.db.read() as session:
            waiting = session.exec(
                select(MpesaCallback.id).where(MpesaCallback.outcome == CallbackOutcome.NEEDS_QUERY)
            ).all()
        for callback_id in waiting:
            assert callback_id is not None
            try:
                if self.confirm_callback(callback_id).outcome != CallbackOutcome.NEEDS_QUERY:
                    report.callbacks_applied += 1
            except DarajaError as exc:
                report.errors.append(about(f"callback {callback_id}", str(exc)))
        now = self.clock()
        cutoff = now - older_than
        with self.db.read() as session:
            stale = session.exec(
                select(MpesaPayment)
                .where(col(MpesaPayment.status).in_(PaymentStatus.OPEN))
                .where(col(MpesaPayment.last_pushed_at) <= cutoff)
                .order_by(col(MpesaPayment.id))
            ).all()
        for payment in stale:
            assert payment.id is not None
            if not payment.checkout_request_id:
                report.unqueryable.append(payment.id)
                continue
            report.checked += 1
            try:
                applied = self.settle_by_query(payment.checkout_request_id)
            except DarajaError as exc:
                report.errors.append(about(f"payment {payment.id}", str(exc)))
                report.unsettled.append((payment.id, f"Daraja could not be asked: {exc}"))
                continue
            if applied is None:
                report.still_pending.append(payment.id)
                report.unsettled.append((payment.id, "Daraja is still processing it"))
        # Settled by a query or by a stored callback, whichever came first.
        for payment_id in open_before:
            after = self.get(payment_id)
            if after.status not in PaymentStatus.OPEN:
                report.settled.append(after)
        report.unsettled.extend(self._needing_a_person(cutoff))
        report.unsettled.sort()
        report.unmatched_paid = self._unmatched_paid()
        log.info(
            "reconcile: %s checked, %s settled, %s still pending, %s not settled, "
            "%s callbacks applied, %s paid callbacks unmatched, %s errors",
            report.checked, len(report.settled), len(report.still_pending),
            len(report.unsettled), report.callbacks_applied, len(report.unmatched_paid),
            len(report.errors),
        )  # fmt: skip
        return report

    def _needing_a_person(self, cutoff: datetime) -> list[tuple[int, str]]:
        """Payments no query can settle, with what the office can do about each."""
        found: list[tuple[int, str]] = []
        with self.db.read() as session:
            rows = session.exec(
                select(MpesaPayment)
                .where(
                    or_(
                        MpesaPayment.unanswered & (col(MpesaPayment.last_pushed_at) <= cutoff),
                        (col(MpesaPayment.status) == PaymentStatus.INITIATED)
                        & (col(MpesaPayment.initiated_at) <= cutoff),
                        col(MpesaPayment.status) == PaymentStatus.NEEDS_REVIEW,
                        col(MpesaPayment.refund_due),
                    )
                )
                .order_by(col(MpesaPayment.id))
            ).all()
        for p in rows:
            assert p.id is not None
            if p.refund_due:
                why = (
                    "paid twice (by two pushes): a refund is due; once it is made, "
                    f"`sfcrm mpesa refund-done {p.id} --reason ...`"
                )
            elif p.status == PaymentStatus.NEEDS_REVIEW:
                why = (
                    f"needs review: {p.result_desc}; `sfcrm mpesa resolve {p.id} --as completed "
                    "[--accept-paid-amount] --reason ...` settles it"
                )
            elif p.status == PaymentStatus.INITIATED:
                why = (
                    "never pushed (the command stopped before the push); "
                    f"`sfcrm mpesa resend {p.id}` pushes it"
                )
            elif waiting := self._waiting_paid_callbacks(p):
                why = (
                    "pushed, but Daraja's answer never came; 'paid' callback "
                    f"{', '.join(str(i) for i, _ in waiting)} could be its and was not matched: "
                    "see `sfcrm mpesa callbacks --unmatched` and the M-Pesa statement for "
                    f"account SF-{p.id}"
                )
            else:
                why = (
                    "pushed, but Daraja's answer never came and no 'paid' callback matches it: "
                    f"check the M-Pesa statement for account SF-{p.id}; if it was paid, "
                    f"`sfcrm mpesa resolve {p.id} --as completed --receipt R --reason ...`; "
                    f"`sfcrm mpesa resend {p.id} --force` only if it was not paid"
                )
            found.append((p.id, why))
        return found

    def _unmatched_paid(self) -> list[int]:
        """Stored "paid" callbacks that no payment has taken."""
        with self.db.read() as session:
            return [
                i
                for i in session.exec(
                    select(MpesaCallback.id)
                    .where(MpesaCallback.outcome == CallbackOutcome.UNMATCHED)
                    .where(MpesaCallback.result_code == "0")
                    .order_by(col(MpesaCallback.id))
                ).all()
                if i is not None
            ]
