"""Asking a customer to pay: ``request`` writes the payment and pushes the STK prompt once;
``resend`` pushes it again only when Daraja confirms the last push did not complete.

A push is recorded as sent before it is sent, and Daraja's answer is recorded after, each in a
transaction of its own: nothing holds the database while Daraja is asked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import update
from sqlmodel import Session, col, select

from sfcrm.daraja import DarajaClient, PushAccepted
from sfcrm.errors import (
    ConflictError,
    DarajaError,
    DarajaTimeoutError,
    DarajaUnreachableError,
    DatabaseBusyError,
    NotFoundError,
    SfcrmError,
    ValidationError,
)
from sfcrm.logs import mask_phone
from sfcrm.models import CallbackOutcome, MpesaCheckout, MpesaPayment, PaymentStatus, Person
from sfcrm.money import balance_words, format_cents, parse_stk_amount
from sfcrm.payments.base import inserting_unique
from sfcrm.payments.inbox import Inbox
from sfcrm.payments.outcome import apply_result, query_as_result
from sfcrm.people import find_person, printable_line
from sfcrm.phone import normalise_phone
from sfcrm.wording import about

log = logging.getLogger("sfcrm.payments")

MAX_PURPOSE = 200
# How long an STK prompt can stay on a phone before M-Pesa times it out (1037/1019), with room.
PROMPT_LIFETIME = timedelta(seconds=120)


@dataclass
class PushReport:
    payment: MpesaPayment
    pushed: bool
    message: str


class PushInterrupted(KeyboardInterrupt):
    """Ctrl-C while a push was on its way: the payment is ``unknown``, not lost."""

    def __init__(self, payment_id: int) -> None:
        self.payment_id = payment_id
        self.message = (
            f"Interrupted: payment {payment_id}'s push may have reached the phone. Do not push "
            f"again; `sfcrm mpesa status {payment_id}` shows it once its callback comes, and "
            "`sfcrm mpesa reconcile` settles it otherwise."
        )
        super().__init__(self.message)


def _after_push_hint(pid: int) -> str:
    return (
        "the prompt may be on the phone: do not request or resend it; its callback settles it "
        f"(see `sfcrm mpesa status {pid}`), or `sfcrm mpesa reconcile` does"
    )


def _never_again(payment: MpesaPayment) -> ConflictError:
    how = " (resolved by hand)" if payment.resolved_at is not None else ""
    return ConflictError(
        f"payment {payment.id} is {payment.status}{how}; it is never pushed again",
        hint="request a new payment if more is owed",
    )


def _refuse_archived(person: Person) -> None:
    if person.archived_at is not None:
        raise ConflictError(
            f"{person.name} (person {person.id}) is archived; an archived person is never asked "
            "for money",
            hint=f"`sfcrm people unarchive {person.id}` first if they really owe it",
        )


def _more_than_owed(person: Person, shillings: int) -> ValidationError:
    cents = person.balance_cents
    return ValidationError(
        f"KES {shillings} is more than {person.name} owes",
        value=balance_words(cents) if cents < 0 else f"KES {format_cents(cents)}",
        hint="add --allow-credit to ask for it anyway (what is paid over becomes their credit)",
    )


def _locked_payment(session: Session, payment_id: int) -> MpesaPayment:
    payment = session.get(MpesaPayment, payment_id, with_for_update=True)
    if payment is None:
        raise NotFoundError("no such payment", value=str(payment_id))
    return payment


def _waiting_callback_error(pid: int, waiting: list[tuple[int, str]]) -> ConflictError:
    ids = ", ".join(str(callback_id) for callback_id, _ in waiting)
    if any(outcome == CallbackOutcome.NEEDS_QUERY for _, outcome in waiting):
        return ConflictError(
            f"a 'paid' callback that may be payment {pid}'s waits for Daraja to confirm it "
            f"(callback {ids}); not pushed again",
            hint="`sfcrm mpesa reconcile` confirms it; `sfcrm mpesa callbacks` lists it",
        )
    return ConflictError(
        f"a 'paid' callback no payment has taken has payment {pid}'s phone and amount "
        f"(callback {ids}); not pushed again",
        hint="the customer may have paid an earlier prompt: see `sfcrm mpesa callbacks "
        "--unmatched` and the M-Pesa statement",
    )


class Pushes(Inbox):
    # -- request ---------------------------------------------------------------------------

    def request(
        self,
        person_ref: str,
        amount: str | int,
        purpose: str,
        phone: str | None = None,
        *,
        allow_credit: bool = False,
    ) -> MpesaPayment:
        """Write the payment row, then push. Bad input is refused before any row or request.

        Asking for more than the person owes is refused unless ``allow_credit`` (the rest is
        then their credit, and ``notify`` says so); an archived person is never asked.
        """
        shillings = parse_stk_amount(amount)
        purpose_text = printable_line(purpose)
        if not purpose_text:
            raise ValidationError("purpose must not be empty")
        if len(purpose_text) > MAX_PURPOSE:
            raise ValidationError(f"purpose is longer than {MAX_PURPOSE} characters")
        number = normalise_phone(phone) if phone else None
        callback_url = self._require_callback_url()
        client = self.client  # missing credentials fail here, before the row exists
        with self.db.write() as session:
            person = find_person(session, person_ref)
            assert person.id is not None
            _refuse_archived(person)
            if shillings * 100 > person.balance_cents:
                if not allow_credit:
                    raise _more_than_owed(person, shillings)
                over = _more_than_owed(person, shillings)
                self.notify(f"Note: {over}; what is paid over it becomes their credit.")
            payment = MpesaPayment(
                person_id=person.id,
                phone_number=number or person.phone,
                amount=shillings,
                payment_purpose=purpose_text,
                status=PaymentStatus.INITIATED,
                initiated_at=self.clock(),
            )
            session.add(payment)
            session.flush()
            payment.account_reference = f"SF-{payment.id}"
            session.add(payment)
        log.info(
            "payment %s initiated: person %s, KES %s, phone %s, purpose %r",
            payment.id, payment.person_id, shillings, mask_phone(payment.phone_number),
            purpose_text,
        )  # fmt: skip
        return self._push(payment, client, callback_url)

    def _push(self, payment: MpesaPayment, client: DarajaClient, callback_url: str) -> MpesaPayment:
        """Push once. The push is recorded as sent before it is sent, so whatever stops this
        command (Ctrl-C, kill -9, a sleeping laptop) leaves the payment ``unknown``: a state that
        the listener, ``reconcile`` and ``resend`` all act on, never one they ignore."""
        pid = payment.id
        assert pid is not None
        try:
            client.token()  # a token that never came proves the push was never sent
            before = self._mark_sending(pid, payment.push_count)
            marked = payment.push_count + 1
        except DatabaseBusyError as exc:
            exc.message = f"payment {pid} was not pushed: {exc.message}"
            exc.hint = f"`sfcrm mpesa resend {pid}` pushes it once the other write is done"
            raise
        except DarajaError as exc:
            self.db.transaction(partial(_fail_unpushed, pid, exc))
            log.warning("payment %s not pushed: %s", pid, exc)
            exc.message = about(f"payment {pid}", exc.message)
            raise
        try:
            accepted = client.stk_push(
                phone=payment.phone_number,
                amount=payment.amount,
                callback_url=callback_url,
                account_reference=payment.account_reference or f"SF-{pid}",
                transaction_desc=payment.payment_purpose,
            )
        except DarajaError as exc:
            self._patiently(pid, partial(_record_push_error, pid, exc, before, marked))
            log.warning("payment %s push failed: %s", pid, exc)
            exc.message = about(f"payment {pid}", exc.message)
            if isinstance(exc, DarajaTimeoutError):
                exc.hint = _after_push_hint(pid)
            raise
        except SfcrmError as exc:
            # (the token refreshed in the middle of the push could not be stored, say): the
            # payment stays "unknown", which is what it is
            exc.message = about(f"payment {pid}", exc.message)
            exc.hint = _after_push_hint(pid)
            raise
        except KeyboardInterrupt:
            raise PushInterrupted(pid) from None
        log.info("payment %s pushed: checkout %s", pid, accepted.checkout_request_id)
        self._patiently(pid, partial(self._record_accepted, pid, accepted, marked))
        # The callback can beat the push's own answer: apply any that is already waiting.
        self.replay_callbacks(accepted.checkout_request_id)
        return self.get(pid)

    def _mark_sending(self, pid: int, seen_pushes: int) -> datetime | None:
        """Record that a push is about to be sent. Until its answer is recorded the payment is
        ``unknown`` with no CheckoutRequestID: a "paid" callback for it is matched by phone and
        amount (and confirmed by query), and ``resend`` will not push over it.

        ``seen_pushes`` is the push count the caller decided on: another sfcrm that pushed
        since (a resend while this request waited for its token) wins, and this one stops."""

        def mark(session: Session) -> datetime | None:
            row = _locked_payment(session, pid)
            if row.settled:
                raise _never_again(row)
            if row.push_count != seen_pushes:
                raise ConflictError(
                    f"payment {pid} was pushed by another sfcrm meanwhile; not pushed again",
                    hint=f"see `sfcrm mpesa status {pid}`",
                )
            before = row.last_pushed_at
            row.status = PaymentStatus.UNKNOWN
            row.push_count += 1
            row.last_pushed_at = self.clock()
            # An older push's CheckoutRequestID stays in mpesa_checkout, where its callback
            # still finds it; the payment's own column is for this push's once Daraja answers.
            row.checkout_request_id = None
            row.merchant_request_id = None
            row.result_code = None
            row.result_desc = "push sent; Daraja's answer not recorded yet"
            session.add(row)
            return before

        return self.db.transaction(mark)

    def _record_accepted(
        self, pid: int, accepted: PushAccepted, marked: int, session: Session
    ) -> None:
        row = _locked_payment(session, pid)
        known = session.exec(
            select(MpesaCheckout).where(
                MpesaCheckout.checkout_request_id == accepted.checkout_request_id
            )
        ).first()
        if known is not None and known.payment_id != pid:
            # Its callback came first and settled another unanswered push of the same
            # person, phone and amount (the oldest): this payment keeps waiting for that
            # push's callback instead, and says so.
            row.result_desc = (
                f"its push was paid and settled payment {known.payment_id} of the same "
                "person, phone and amount"
            )
            session.add(row)
            log.warning(
                "payment %s: its push %s settled payment %s", pid,
                accepted.checkout_request_id, known.payment_id,
            )  # fmt: skip
            return
        if known is None:
            # (already there when its callback came first and was matched by phone and
            # amount, then confirmed by query)
            session.add(
                MpesaCheckout(
                    payment_id=pid,
                    checkout_request_id=accepted.checkout_request_id,
                    merchant_request_id=accepted.merchant_request_id,
                    pushed_at=row.last_pushed_at or self.clock(),
                )
            )
            with inserting_unique():
                session.flush()
        if not row.settled and row.status == PaymentStatus.UNKNOWN and row.push_count == marked:
            # (when a push was paid meanwhile, this one is only recorded: if it is paid
            # too, its callback flags the refund; when a newer push went out, the row is
            # about that one)
            row.checkout_request_id = accepted.checkout_request_id
            row.merchant_request_id = accepted.merchant_request_id
            row.status = PaymentStatus.PENDING
            row.result_code = None
            row.result_desc = None
            session.add(row)

    def _patiently(self, pid: int, write: Callable[[Session], None]) -> None:
        """Record what Daraja answered to a push, however long the database stays busy.

        The prompt may be on the phone, so giving up would leave the office guessing; each
        attempt already waits out the busy timeout. A Ctrl-C here leaves the payment
        ``unknown``, which the callback or ``reconcile`` settles.
        """
        told = False
        while True:
            try:
                self.db.transaction(write)
                return
            except DatabaseBusyError:
                if not told:
                    self.notify(
                        f"payment {pid}: the database is busy; still waiting to record Daraja's "
                        "answer to the push (do not push again)"
                    )
                    told = True
                log.warning("payment %s: database busy, recording the push's answer again", pid)
            except KeyboardInterrupt:
                raise PushInterrupted(pid) from None
            except SfcrmError as exc:
                exc.message = (
                    f"payment {pid} was pushed, but its answer could not be recorded: {exc.message}"
                )
                exc.hint = _after_push_hint(pid)
                raise

    # -- resend ----------------------------------------------------------------------------

    def resend(self, payment_id: int, *, force: bool = False) -> PushReport:
        """Push a payment again, only when Daraja confirms the last push did not complete.

        Never while a push may still be on the phone, and never while a stored "paid" callback
        that could be this payment's waits: that one is settled first (by query).
        ``force`` only pushes over a last push whose outcome stayed unknown.
        """
        callback_url = self._require_callback_url()
        client = self.client
        now = self.clock()

        def claim(session: Session) -> MpesaPayment:
            payment = _locked_payment(session, payment_id)
            if payment.settled or payment.resolved_at is not None:
                raise _never_again(payment)
            person = session.get(Person, payment.person_id)
            if person is not None:
                _refuse_archived(person)
            if payment.resend_claimed_until and payment.resend_claimed_until > now:
                raise ConflictError(
                    f"payment {payment_id} is being resent by another sfcrm right now"
                )
            if payment.unanswered:
                _refuse_unknown(payment, client.timeout, now, force=force)
            payment.resend_claimed_until = now + timedelta(seconds=2 * client.timeout + 30)
            session.add(payment)
            return payment

        payment = self.db.transaction(claim)
        try:
            waiting = self._settle_waiting_callbacks(payment)
            payment = self.get(payment_id)
            if payment.settled:
                return PushReport(payment, False, "already paid: not pushed again")
            if waiting:
                raise _waiting_callback_error(payment_id, waiting)
            if payment.checkout_request_id and payment.status in PaymentStatus.OPEN:
                query = client.stk_query(payment.checkout_request_id)
                if query.processing:
                    raise ConflictError(
                        f"payment {payment_id} is still being processed on the phone; "
                        "not pushed again",
                        hint="wait a minute and check with `sfcrm mpesa status --refresh`",
                    )
                verdict = query_as_result(query)
                self.db.transaction(
                    lambda session: apply_result(
                        session, verdict, source="query", trusted=True, now=now
                    )
                )
                if query.result_code == "0":
                    settled = self.get(payment_id)
                    return PushReport(settled, False, "already paid: not pushed again")
            log.info("payment %s resend", payment_id)
            pushed = self._push(payment, client, callback_url)
            return PushReport(pushed, True, "STK push sent again")
        finally:
            with self.db.write() as session:
                session.execute(
                    update(MpesaPayment)
                    .where(col(MpesaPayment.id) == payment_id)
                    .values(resend_claimed_until=None)
                )

    def _settle_waiting_callbacks(self, payment: MpesaPayment) -> list[tuple[int, str]]:
        """Act on every stored "paid" callback that could be this payment's, confirming by
        query where needed; returns those still waiting (Daraja still processing them, or out
        of reach)."""
        for callback_id, outcome in self._waiting_paid_callbacks(payment):
            try:
                if outcome != CallbackOutcome.NEEDS_QUERY:
                    outcome = self.process_callback(callback_id).outcome
                if outcome == CallbackOutcome.NEEDS_QUERY:
                    outcome = self.confirm_callback(callback_id).outcome
                if outcome == CallbackOutcome.UNMATCHED:
                    self._check_unmatched(callback_id)
            except DarajaError as exc:
                log.warning("callback %s could not be confirmed: %s", callback_id, exc)
        return self._waiting_paid_callbacks(payment)


def _fail_unpushed(pid: int, exc: DarajaError, session: Session) -> None:
    """No token came, so no push was sent: the payment failed, and nothing is on the phone."""
    row = _locked_payment(session, pid)
    if row.status == PaymentStatus.INITIATED:
        row.status = PaymentStatus.FAILED
        row.result_code = None
        row.result_desc = exc.message
        session.add(row)


def _record_push_error(
    pid: int, exc: DarajaError, pushed_before: datetime | None, marked: int, session: Session
) -> None:
    row = _locked_payment(session, pid)
    if row.settled or not row.unanswered:
        # a result arrived meanwhile (a callback matched and confirmed): keep it
        return
    if row.push_count != marked:
        return  # a newer push went out meanwhile: the row is about that one
    if not isinstance(exc, DarajaTimeoutError):
        # Daraja refused it, or it never left: no prompt reached the phone, and the push does
        # not count
        row.status = PaymentStatus.FAILED
        row.push_count -= 1
        row.last_pushed_at = pushed_before
    row.result_code = exc.code if not isinstance(exc, DarajaUnreachableError) else None
    row.result_desc = exc.message
    session.add(row)


def _refuse_unknown(payment: MpesaPayment, timeout: float, now: datetime, *, force: bool) -> None:
    """A push whose answer never came may be on the phone: a second prompt could charge the
    customer twice."""
    pid = payment.id
    sent = payment.last_pushed_at or payment.initiated_at
    if sent + timedelta(seconds=timeout) + PROMPT_LIFETIME > now:
        ago = max(0, int((now - sent).total_seconds()))
        raise ConflictError(
            f"the last push of payment {pid} has an unknown outcome and was sent {ago} s "
            "ago; not pushed again",
            hint=f"the prompt may still be on the phone: wait for its callback "
            f"(`sfcrm mpesa status {pid}`)",
        )
    if not force:
        raise ConflictError(
            f"the last push of payment {pid} has an unknown outcome",
            hint=f"the prompt may have reached the phone: check `sfcrm mpesa status {pid}` "
            f"and the M-Pesa statement (account SF-{pid}); use --force only if it was "
            "not paid and the customer asks for a new prompt",
        )
