"""Settling by hand what no callback or query can: ``resolve`` and ``refund_done``.

A payment whose outcome stayed ``unknown``, one still ``pending`` long after its prompt, one in
``needs_review`` (paid, but not the amount asked) has no way out on its own; a payment paid twice
(``refund_due``) waits for a refund the office makes outside sfcrm. The office settles each here,
with a reason, and every resolution goes to the audit log in the transaction that makes it.

Daraja is asked first (STK Push Query, outside any transaction) about every push of the payment
whose outcome is not recorded: a resolution that Daraja contradicts is refused, and so is one
Daraja cannot be asked about. The balance moves at most once, through the ledger.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlmodel import Session, col, select

from sfcrm import audit
from sfcrm.daraja import QueryResult, StkResult
from sfcrm.errors import ConflictError, DarajaError, ValidationError
from sfcrm.ledger import change_balance
from sfcrm.models import (
    BalanceKind,
    CallbackOutcome,
    MpesaCheckout,
    MpesaPayment,
    PaymentStatus,
    Person,
)
from sfcrm.money import format_cents
from sfcrm.payments.inbox import Inbox
from sfcrm.payments.outcome import apply_result
from sfcrm.payments.pushes import PROMPT_LIFETIME, _locked_payment
from sfcrm.people import printable_line

log = logging.getLogger("sfcrm.payments")

RESOLVED_AS = (PaymentStatus.COMPLETED, PaymentStatus.FAILED, PaymentStatus.CANCELLED)
# M-Pesa receipt numbers, as on the statement and the customer's SMS: TH3AB7XY9K
_RECEIPT = re.compile(r"[A-Z0-9]{10}")
MAX_REASON = 500


@dataclass(frozen=True)
class Resolution:
    payment: MpesaPayment
    before: str  # the status it had
    credited_cents: int | None  # what was taken off the person's balance, if anything
    balance_after_cents: int | None
    daraja: str  # what Daraja was asked and said, for the operator


def _reason(text: str) -> str:
    why = printable_line(text)
    if not why:
        raise ValidationError(
            "a reason is needed", hint="say why, e.g. --reason 'receipt seen on the statement'"
        )
    if len(why) > MAX_REASON:
        raise ValidationError(f"the reason is longer than {MAX_REASON} characters")
    return why


def _receipt(text: str) -> str:
    receipt = text.strip().upper()
    if not _RECEIPT.fullmatch(receipt):
        raise ValidationError(
            "not an M-Pesa receipt number",
            value=text,
            hint="10 letters and digits, as on the M-Pesa statement or the customer's SMS "
            "(e.g. TH3AB7XY9K)",
        )
    return receipt


def _paid_cents(push: MpesaCheckout | None) -> int:
    """What the customer actually paid, as the push's callback said, in cents."""
    try:
        paid = Decimal(push.paid_amount) if push is not None and push.paid_amount else None
    except InvalidOperation:
        paid = None
    if paid is None or paid <= 0 or (paid * 100) != (paid * 100).to_integral_value():
        raise ConflictError(
            "the amount actually paid is not known for this payment; not resolved",
            hint="resolve it without --accept-paid-amount, and correct the balance with "
            "`sfcrm people credit` or `sfcrm people charge`",
        )
    return int(paid * 100)


class Resolve(Inbox):
    def resolve(
        self,
        payment_id: int,
        *,
        outcome: str,
        reason: str,
        receipt: str | None = None,
        accept_paid_amount: bool = False,
    ) -> Resolution:
        """Settle a payment by hand as ``completed`` (the balance moves once), ``failed`` or
        ``cancelled`` (no money moves).

        Resolvable: ``unknown`` or ``pending`` once its prompt is over, ``needs_review``, and a
        payment flagged ``refund_due`` whose money has not moved. ``accept_paid_amount`` (for
        ``needs_review``) credits what was actually paid instead of the amount asked.
        """
        if outcome not in RESOLVED_AS:
            raise ValidationError(
                "a payment is resolved as completed, failed or cancelled", value=outcome
            )
        why = _reason(reason)
        given = _receipt(receipt) if receipt is not None else None
        completing = outcome == PaymentStatus.COMPLETED
        if not completing and (given or accept_paid_amount):
            raise ValidationError("--receipt and --accept-paid-amount go with --as completed")
        payment = self.get(payment_id)
        if accept_paid_amount and payment.status != PaymentStatus.NEEDS_REVIEW:
            raise ValidationError(
                "--accept-paid-amount is for a payment in needs_review",
                value=f"payment {payment_id} is {payment.status}",
            )
        self._check_resolvable(payment)
        if completing:
            given = self._receipt_to_use(payment, given)
        pushes = self._pushes(payment_id)
        daraja, paid_push = self._ask_daraja(payment, pushes, outcome)
        before = payment.status
        expected = (payment.status, payment.push_count)

        def write(session: Session) -> Resolution:
            now = self.clock()
            row = _locked_payment(session, payment_id)
            if (row.status, row.push_count) != expected or row.balance_applied:
                raise ConflictError(
                    f"payment {payment_id} changed while Daraja was asked (now {row.status}); "
                    "not resolved",
                    hint=f"see `sfcrm mpesa status {payment_id}` and try again if still needed",
                )
            was = _audited(row, None)
            credited: int | None = None
            balance_after: int | None = None
            if completing:
                assert given is not None
                _refuse_used_receipt(session, payment_id, given)
                if paid_push is not None and row.status != PaymentStatus.NEEDS_REVIEW:
                    # Daraja says this push was paid: its outcome is applied as a query's is,
                    # so a late callback of it is a duplicate, never a second payment.
                    applied = apply_result(
                        session,
                        StkResult(paid_push, "0", "paid; resolved by hand", receipt_number=given),
                        source="query", trusted=True, now=now,
                    )  # fmt: skip
                    if applied.outcome != CallbackOutcome.APPLIED:
                        raise ConflictError(
                            f"payment {payment_id} could not be completed: {applied.detail}"
                        )
                    row = _locked_payment(session, payment_id)
                    credited = row.amount * 100
                else:
                    credited = (
                        _paid_cents(_paid_push_of(pushes, row))
                        if accept_paid_amount
                        else row.amount * 100
                    )
                    entry = change_balance(
                        session, row.person_id, -credited, kind=BalanceKind.PAYMENT, now=now,
                        reason=f"M-Pesa {given} (resolved by hand)", payment_id=payment_id,
                    )  # fmt: skip
                    balance_after = entry.balance_after_cents
                    row.balance_applied = True
                    row.completed_at = now
                row.receipt_number = given
            row.status = outcome
            row.settled_by = "manual"
            row.resolved_at = now
            row.resolution = why
            session.add(row)
            session.flush()
            audit.record(
                session, "payment.resolve", now=now,
                changes=audit.changed(was, _audited(row, credited)), reason=why,
                payment_id=payment_id, person_id=row.person_id,
            )  # fmt: skip
            if balance_after is None and credited is not None:
                person = session.get(Person, row.person_id)
                balance_after = person.balance_cents if person is not None else None
            return Resolution(row, before, credited, balance_after, daraja)

        resolution = self.db.transaction(write)
        log.info(
            "payment %s resolved by hand: %s -> %s, receipt %s, credited %s (%s)",
            payment_id, before, outcome, resolution.payment.receipt_number,
            None if resolution.credited_cents is None else format_cents(resolution.credited_cents),
            daraja,
        )  # fmt: skip
        return resolution

    def refund_done(self, payment_id: int, *, reason: str) -> MpesaPayment:
        """Record that the refund of a payment paid twice was made outside sfcrm: the flag is
        cleared (``refund_done_at`` keeps when), and the audit log says who and why."""
        why = _reason(reason)

        def write(session: Session) -> MpesaPayment:
            now = self.clock()
            row = _locked_payment(session, payment_id)
            if not row.refund_due:
                done = ""
                if row.refund_done_at is not None:
                    done = f"; its refund was recorded on {row.refund_done_at:%Y-%m-%d %H:%M} UTC"
                raise ConflictError(
                    f"no refund is due for payment {payment_id}{done}",
                    hint=f"`sfcrm mpesa status {payment_id}` shows it",
                )
            was = {"refund_due": True, "refund_done_at": row.refund_done_at}
            row.refund_due = False
            row.refund_done_at = now
            session.add(row)
            session.flush()
            audit.record(
                session, "payment.refund_done", now=now,
                changes=audit.changed(was, {"refund_due": False, "refund_done_at": now}),
                reason=why, payment_id=payment_id, person_id=row.person_id,
            )  # fmt: skip
            return row

        payment = self.db.transaction(write)
        log.info("payment %s: refund made outside sfcrm recorded (%s)", payment_id, why)
        return payment

    # -- the checks --------------------------------------------------------------------------

    def _check_resolvable(self, payment: MpesaPayment) -> None:
        pid = payment.id
        if payment.balance_applied:
            hint = (
                f"a refund is due: `sfcrm mpesa refund-done {pid} --reason ...` once it is made"
                if payment.refund_due
                else f"`sfcrm mpesa status {pid}` shows how it was settled"
            )
            raise ConflictError(
                f"payment {pid} is {payment.status} and its money moved already; not resolved",
                hint=hint,
            )
        if payment.status == PaymentStatus.NEEDS_REVIEW:
            return
        if payment.status not in PaymentStatus.OPEN:
            raise ConflictError(
                f"payment {pid} is {payment.status}; only a payment whose outcome is unknown, "
                "one pending past its prompt, or one in review is resolved by hand",
                hint="request a new payment if more is owed"
                if payment.status in (PaymentStatus.FAILED, PaymentStatus.CANCELLED)
                else f"see `sfcrm mpesa status {pid}`",
            )
        sent = payment.last_pushed_at or payment.initiated_at
        now = self.clock()
        if sent + timedelta(seconds=self.client.timeout) + PROMPT_LIFETIME > now:
            ago = max(0, int((now - sent).total_seconds()))
            raise ConflictError(
                f"payment {pid} was pushed {ago} s ago; its prompt may still be on the phone, "
                "so it is not resolved yet",
                hint=f"wait for its callback (`sfcrm mpesa status {pid}`) or resolve it in a "
                "few minutes",
            )

    def _receipt_to_use(self, payment: MpesaPayment, given: str | None) -> str:
        known = payment.receipt_number
        if given is None and known is None:
            raise ValidationError(
                "--receipt is needed to resolve a payment as completed",
                hint="the M-Pesa receipt number from the statement (account "
                f"{payment.account_reference or f'SF-{payment.id}'}) or the customer's SMS",
            )
        if given is not None and known is not None and given != known:
            raise ConflictError(
                f"payment {payment.id} was paid with receipt {known}, not {given}; not resolved",
                hint="leave out --receipt to use the one Daraja sent",
            )
        receipt = given or known
        assert receipt is not None
        return receipt

    def _pushes(self, payment_id: int) -> list[MpesaCheckout]:
        with self.db.read() as session:
            return list(
                session.exec(
                    select(MpesaCheckout)
                    .where(col(MpesaCheckout.payment_id) == payment_id)
                    .order_by(col(MpesaCheckout.id))
                ).all()
            )

    def _ask_daraja(
        self, payment: MpesaPayment, pushes: list[MpesaCheckout], outcome: str
    ) -> tuple[str, str | None]:
        """Ask Daraja about the payment's pushes (network, no transaction); returns what it
        said, for the operator, and the CheckoutRequestID of a push it says was paid.

        Refuses what Daraja contradicts, and anything while Daraja cannot be asked or is still
        processing a push. A payment in review is known to be paid: it is asked about (for a
        completion) only to be sure Daraja agrees.
        """
        pid = payment.id
        if payment.status == PaymentStatus.NEEDS_REVIEW:
            known_paid = _paid_push_of(pushes, payment)
            if outcome != PaymentStatus.COMPLETED or known_paid is None:
                return "not asked: Daraja's callback said it was paid", None
            asking = [known_paid.checkout_request_id]
        else:
            asking = [p.checkout_request_id for p in pushes if p.result_code is None]
            current = payment.checkout_request_id
            if current and current not in asking:
                asking.append(current)
        if not asking:
            return "not asked: no push of this payment has a CheckoutRequestID", None
        verdicts: dict[str, QueryResult] = {}
        for checkout_id in asking:
            try:
                verdicts[checkout_id] = self.client.stk_query(checkout_id)
            except DarajaError as exc:
                exc.message = (
                    f"payment {pid} is not resolved: Daraja could not be asked about its push "
                    f"{checkout_id}: {exc.message}"
                )
                exc.hint = (
                    "nothing was changed; resolve it once Daraja answers (a resolution is "
                    "never guessed)"
                )
                raise
        for checkout_id, verdict in verdicts.items():
            if verdict.processing:
                raise ConflictError(
                    f"Daraja is still processing push {checkout_id} of payment {pid}; not resolved",
                    hint="wait a minute: its callback or `sfcrm mpesa reconcile` may settle it",
                )
        paid = [cid for cid, verdict in verdicts.items() if verdict.result_code == "0"]
        said = "; ".join(
            f"push {cid}: {v.result_code} {v.result_desc}".strip() for cid, v in verdicts.items()
        )
        if outcome == PaymentStatus.COMPLETED:
            if paid:
                return f"Daraja says paid ({said})", paid[0]
            current = payment.checkout_request_id
            refuted = verdicts.get(current) if current else None
            if payment.status == PaymentStatus.NEEDS_REVIEW:
                refuted = verdicts[asking[0]]
            if refuted is not None:
                verdict = refuted
                raise ConflictError(
                    f"Daraja says payment {pid} was not paid ({verdict.result_code} "
                    f"{verdict.result_desc}); not resolved as completed",
                    hint=f"check the M-Pesa statement for account SF-{pid}; if it was paid "
                    f"another way, `sfcrm mpesa resolve {pid} --as failed` and "
                    "`sfcrm people credit`",
                )
            # the last push's CheckoutRequestID never came back: Daraja cannot be asked about
            # it, and the receipt the office saw is what settles it
            return f"last push not askable; earlier pushes not paid ({said})", None
        if paid:
            raise ConflictError(
                f"Daraja says push {paid[0]} of payment {pid} was paid; not resolved as {outcome}",
                hint=f"`sfcrm mpesa resolve {pid} --as completed --receipt R --reason ...`",
            )
        return f"Daraja says not paid ({said})", None


def _paid_push_of(pushes: list[MpesaCheckout], payment: MpesaPayment) -> MpesaCheckout | None:
    """The push Daraja said was paid: the payment's current one, else the latest paid."""
    paid = [p for p in pushes if p.result_code == "0"]
    for push in paid:
        if push.checkout_request_id == payment.checkout_request_id:
            return push
    return paid[-1] if paid else None


def _refuse_used_receipt(session: Session, payment_id: int, receipt: str) -> None:
    """One M-Pesa transaction settles one payment: a receipt another payment holds is refused."""
    other = session.exec(
        select(MpesaPayment.id).where(
            col(MpesaPayment.receipt_number) == receipt, col(MpesaPayment.id) != payment_id
        )
    ).first()
    if other is None:
        other = session.exec(
            select(MpesaCheckout.payment_id).where(
                col(MpesaCheckout.receipt_number) == receipt,
                col(MpesaCheckout.payment_id) != payment_id,
            )
        ).first()
    if other is not None:
        raise ConflictError(
            f"receipt {receipt} already belongs to payment {other}; not resolved",
            hint=f"see `sfcrm mpesa status {other}`",
        )


def _audited(payment: MpesaPayment, credited: int | None) -> dict[str, Any]:
    return {
        "status": payment.status,
        "receipt_number": payment.receipt_number,
        "balance_applied": payment.balance_applied,
        "amount_credited": None if credited is None else format_cents(credited),
        "settled_by": payment.settled_by,
        "resolved_at": payment.resolved_at,
    }
