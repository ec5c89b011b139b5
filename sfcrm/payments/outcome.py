"""Applying one push's outcome (from a callback or a query) to its payment, once; and matching
a "paid" for a CheckoutRequestID no push of ours holds to the push that never got its answer.

Everything here runs inside the caller's write transaction, on a session. Each callback comes
through :func:`apply_result`, so it is a handful of single statements built from the models, and
it locks what it reads (``with_for_update``): on PostgreSQL a second writer of the same push
waits, then reads what the first one wrote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import Connection, Executable, Row, bindparam, func, insert, or_, select, update
from sqlmodel import Session, col

from sfcrm.daraja import STILL_PROCESSING, QueryResult, StkResult
from sfcrm.ledger import change_balance
from sfcrm.models import BalanceKind, CallbackOutcome, MpesaCheckout, MpesaPayment, PaymentStatus
from sfcrm.money import format_cents
from sfcrm.payments.base import inserting_unique

log = logging.getLogger("sfcrm.payments")

CANCELLED_CODES = frozenset({"1031", "1032"})

# A "paid" callback for a CheckoutRequestID no push of ours holds is matched to a push that got
# no answer only when that push was sent around the time the callback came: not after it (with
# some room for clock skew between machines), and not longer before it than a prompt stays on a
# phone and its callback takes to come (Daraja: about a minute and a half, then 3-10 s).
ADOPT_SKEW = timedelta(minutes=5)
ADOPT_WINDOW = timedelta(minutes=15)
# A masked PhoneNumber (M-Pesa began masking in 2026) matches only with this many digits shown.
MIN_SHOWN_DIGITS = 6


@dataclass(frozen=True)
class Applied:
    outcome: str  # a CallbackOutcome value
    detail: str
    payment_id: int | None = None


def apply_result(
    session: Session,
    result: StkResult,
    *,
    source: str,
    trusted: bool,
    now: datetime,
    received_at: datetime | None = None,
) -> Applied:
    """Apply one push outcome inside a write transaction (``Database.write()`` or
    ``Database.transaction()``); safe to call again.

    ``source`` is "callback" or "query". An untrusted "paid" (unlisted sender, confirmation by
    query required, or a success after a recorded failure) changes nothing and answers
    NEEDS_QUERY: the caller confirms it with an STK Push Query and applies that instead.
    ``received_at`` is when a callback came, for matching it to a push that got no answer.
    """
    session.flush()  # what the session holds is written first, then read again after
    try:
        return _apply(session, result, source=source, trusted=trusted, now=now,
                      received_at=received_at)  # fmt: skip
    finally:
        session.expire_all()


def _apply(
    session: Session,
    result: StkResult,
    *,
    source: str,
    trusted: bool,
    now: datetime,
    received_at: datetime | None,
) -> Applied:
    # Prepared statements on the session's connection: this runs for every callback, and the
    # listener must keep up with a burst.
    conn = session.connection()
    cid = result.checkout_request_id
    found = _push_and_payment(conn, cid)
    note = ""
    if found is None:
        if not _adoptable_result(result):
            return Applied(CallbackOutcome.UNMATCHED, "no payment has this CheckoutRequestID")
        candidate = _adoptable(session, result, received_at or now)
        # Read again: another writer may have taken this push while the candidates' locks
        # were awaited (PostgreSQL); this one then acts on what that one wrote.
        found = _push_and_payment(conn, cid)
        if found is None:
            if candidate is None:
                return Applied(CallbackOutcome.UNMATCHED, "no payment has this CheckoutRequestID")
            if isinstance(candidate, str):
                return Applied(CallbackOutcome.UNMATCHED, candidate)
            note = _adoption_note(candidate.rivals)
            if source != "query":
                # Matched by phone and amount only: nothing is written until Daraja confirms
                # this CheckoutRequestID was paid, or a forged callback could take it over.
                return Applied(
                    CallbackOutcome.NEEDS_QUERY,
                    f"paid; {note}, to be confirmed by query",
                    candidate.payment_id,
                )
            found = _adopt(session, result, candidate, note)
    pid: int = found.payment_id
    prior: str | None = found.prior
    if result.result_code == STILL_PROCESSING:
        return Applied(CallbackOutcome.IGNORED, "still processing", pid)

    if not result.paid:
        if prior is not None:
            same = prior == result.result_code
            return Applied(
                CallbackOutcome.DUPLICATE if same else CallbackOutcome.IGNORED,
                "same outcome already recorded" if same else f"outcome {prior} already recorded",
                pid,
            )
        _record(conn, found.checkout_id, result, source, now)
        if found.settled:
            return Applied(CallbackOutcome.IGNORED, "payment already settled", pid)
        if found.current != cid:
            return Applied(CallbackOutcome.IGNORED, "superseded by a newer push", pid)
        new_status = (
            PaymentStatus.CANCELLED
            if result.result_code in CANCELLED_CODES
            else PaymentStatus.FAILED
        )
        _update_payment(
            conn, pid,
            status=new_status, result_code=result.result_code, result_desc=result.result_desc,
            settled_by=source,
        )  # fmt: skip
        log.info(
            "payment %s %s: code %s %s (%s)",
            pid, new_status, result.result_code, result.result_desc, source,
        )  # fmt: skip
        return Applied(CallbackOutcome.APPLIED, new_status, pid)

    # a "paid" outcome
    if prior == "0":
        return Applied(CallbackOutcome.DUPLICATE, "already recorded as paid", pid)
    if source != "query" and (not trusted or prior is not None):
        why = "sender not trusted" if prior is None else f"outcome {prior} recorded before"
        return Applied(CallbackOutcome.NEEDS_QUERY, f"paid; to be confirmed by query ({why})", pid)
    _record(conn, found.checkout_id, result, source, now)
    if found.settled and result.receipt_number and result.receipt_number == found.receipt_number:
        # the very M-Pesa transaction that settled it (a push resolved by hand on its receipt
        # before its callback came): paid once, not twice
        return Applied(CallbackOutcome.DUPLICATE, "its receipt is already recorded", pid)
    if found.settled:
        _update_payment(conn, pid, refund_due=True)
        log.warning(
            "payment %s paid twice (checkout %s, receipt %s): refund due",
            pid, cid, result.receipt_number,
        )  # fmt: skip
        return Applied(CallbackOutcome.REFUND, "paid again by another push: refund due", pid)
    receipt = result.receipt_number or found.receipt_number
    amount: int = found.amount
    paid: dict[str, Any] = {
        "merchant_request_id": found.merchant_request_id,
        "receipt_number": receipt,
        "transaction_date": result.transaction_date,
        "result_code": "0",
        "settled_by": source,
    }
    if found.current != cid:
        # An older push was paid. Only then is the unique column named: setting it to the
        # value it holds, as in the usual case, would still rewrite its index entry.
        paid["checkout_request_id"] = cid
    suffix = f" ({note})" if note else ""
    if result.amount is not None and result.amount != Decimal(amount):
        desc = f"paid {result.amount}, but {amount} was asked{suffix}"
        _update_payment(conn, pid, status=PaymentStatus.NEEDS_REVIEW, result_desc=desc, **paid)
        log.warning("payment %s needs review: %s", pid, desc)
        return Applied(CallbackOutcome.REVIEW, desc, pid)
    entry = change_balance(
        session, found.person_id, -amount * 100, kind=BalanceKind.PAYMENT, now=now,
        reason=f"M-Pesa {receipt or 'payment'}", payment_id=pid,
    )  # fmt: skip
    _update_payment(
        conn, pid,
        status=PaymentStatus.COMPLETED, result_desc=result.result_desc + suffix,
        completed_at=now, balance_applied=True, **paid,
    )  # fmt: skip
    # A callback's own log line says it; a query's settlement needs a line of its own.
    level = logging.DEBUG if source == "callback" else logging.INFO
    if log.isEnabledFor(level):
        log.log(
            level,
            "payment %s completed: receipt %s, KES %s, person %s balance now %s (%s)",
            pid, receipt, amount, found.person_id, format_cents(entry.balance_after_cents),
            source,
        )  # fmt: skip
    return Applied(CallbackOutcome.APPLIED, PaymentStatus.COMPLETED, pid)


class _Statements(NamedTuple):
    push_and_payment: Executable
    update_payment: Executable
    update_checkout: Executable


@cache
def _statements() -> _Statements:
    """Built once, on first use; the columns an update sets are the keys it is given."""
    push_and_payment: Executable = (
        select(
            col(MpesaCheckout.id).label("checkout_id"),
            col(MpesaCheckout.payment_id),
            col(MpesaCheckout.result_code).label("prior"),
            col(MpesaCheckout.merchant_request_id),
            col(MpesaPayment.checkout_request_id).label("current"),
            col(MpesaPayment.amount),
            col(MpesaPayment.person_id),
            col(MpesaPayment.receipt_number),
            MpesaPayment.settled.label("settled"),
        )
        .join(MpesaPayment, col(MpesaPayment.id) == col(MpesaCheckout.payment_id))
        .where(col(MpesaCheckout.checkout_request_id) == bindparam("checkout_request_id"))
        .with_for_update()
    )
    return _Statements(
        push_and_payment=push_and_payment,
        update_payment=update(MpesaPayment).where(col(MpesaPayment.id) == bindparam("payment_id")),
        update_checkout=update(MpesaCheckout).where(
            col(MpesaCheckout.id) == bindparam("checkout_id")
        ),
    )


def _push_and_payment(conn: Connection, checkout_request_id: str) -> Row[Any] | None:
    """A push (by its CheckoutRequestID) and what ``apply_result`` needs of its payment, in one
    read that locks both rows."""
    return conn.execute(
        _statements().push_and_payment, {"checkout_request_id": checkout_request_id}
    ).one_or_none()


def _update_payment(conn: Connection, payment_id: int, **values: Any) -> None:
    conn.execute(_statements().update_payment, {"payment_id": payment_id, **values})


def _record(
    conn: Connection, checkout_id: int, result: StkResult, source: str, now: datetime
) -> None:
    """Write a push's outcome on the push itself; a receipt or amount once known stays."""
    values: dict[str, Any] = {
        "result_code": result.result_code,
        "result_desc": result.result_desc,
        "result_source": source,
        "result_at": now,
    }
    if result.receipt_number is not None:
        values["receipt_number"] = result.receipt_number
    if result.amount is not None:
        values["paid_amount"] = str(result.amount)
    conn.execute(_statements().update_checkout, {"checkout_id": checkout_id, **values})


# -- a "paid" for a push whose answer never came -----------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    payment_id: int
    pushed_at: datetime
    rivals: int  # how many payments it could have belonged to


def _adoptable_result(result: StkResult) -> bool:
    """A result that can be matched by phone and amount: a "paid" of whole shillings that shows
    enough of the phone number."""
    if not result.paid or result.amount is None or result.amount != int(result.amount):
        return False
    return result.phone is not None and sum(ch != "*" for ch in result.phone) >= MIN_SHOWN_DIGITS


def _adoptable(
    session: Session, result: StkResult, received_at: datetime
) -> _Candidate | str | None:
    """The payment a "paid" result for an unknown CheckoutRequestID belongs to, and how many
    payments it could have belonged to; or why it is left for a person to settle.

    When a push's answer never came back (or the command sending it was stopped), its
    CheckoutRequestID was never stored: the payment has more pushes than recorded checkouts
    (it is ``unknown`` with no checkout, or a later push of it was answered). Its callback
    still carries the amount and (unless M-Pesa masked it) the phone. Payments of one person
    that match both are the same debt: the oldest push is settled first, so each callback
    settles one of them. Payments of several people are never guessed between. A payment
    already paid takes it only when no open one does, and is then flagged for a refund.
    The candidates are locked until the caller's transaction ends.
    """
    assert result.amount is not None
    recorded = (
        select(func.count())
        .select_from(MpesaCheckout)
        .where(col(MpesaCheckout.payment_id) == col(MpesaPayment.id))
        .scalar_subquery()
    )
    candidates = session.execute(
        select(
            col(MpesaPayment.id),
            col(MpesaPayment.phone_number),
            col(MpesaPayment.person_id),
            col(MpesaPayment.balance_applied),
            col(MpesaPayment.last_pushed_at),
        )
        .where(
            col(MpesaPayment.last_pushed_at).between(
                received_at - ADOPT_WINDOW, received_at + ADOPT_SKEW
            ),
            col(MpesaPayment.amount) == int(result.amount),
            col(MpesaPayment.status).in_(
                (
                    PaymentStatus.UNKNOWN,
                    PaymentStatus.PENDING,
                    PaymentStatus.FAILED,
                    PaymentStatus.CANCELLED,
                    PaymentStatus.COMPLETED,
                )
            ),
            or_(MpesaPayment.unanswered, col(MpesaPayment.push_count) > recorded),
        )
        .order_by(
            col(MpesaPayment.balance_applied),
            col(MpesaPayment.last_pushed_at),
            col(MpesaPayment.id),
        )
        .with_for_update(of=MpesaPayment)
    ).all()
    matches = [row for row in candidates if same_phone(row.phone_number, result.phone)]
    open_ones = [row for row in matches if not row.balance_applied] or matches
    if not open_ones:
        return None
    people = {row.person_id for row in open_ones}
    if len(people) > 1:
        ids = ", ".join(str(row.id) for row in open_ones)
        return (
            f"paid; its phone and amount match unanswered pushes of {len(people)} people "
            f"(payments {ids}): for a person to settle"
        )
    oldest = open_ones[0]
    return _Candidate(oldest.id, oldest.last_pushed_at, len(open_ones))


def _adoption_note(rivals: int) -> str:
    if rivals == 1:
        return "matched by phone and amount to a push that got no answer"
    return (
        f"matched by phone and amount to the oldest of {rivals} unanswered pushes of that "
        "amount to that phone"
    )


def _adopt(session: Session, result: StkResult, candidate: _Candidate, note: str) -> Row[Any]:
    """Give the payment the CheckoutRequestID a query has just confirmed as paid; returns the
    row ``apply_result`` reads for a known CheckoutRequestID. A payment already paid only gains
    the push (its result then flags the refund); its own columns stay as they are."""
    pid = candidate.payment_id
    with inserting_unique():  # (its own push's answer may be recording it right now)
        session.execute(
            insert(MpesaCheckout).values(
                payment_id=pid,
                checkout_request_id=result.checkout_request_id,
                merchant_request_id=result.merchant_request_id,
                pushed_at=candidate.pushed_at,
            )
        )
    session.execute(
        update(MpesaPayment)
        .where(col(MpesaPayment.id) == pid, ~MpesaPayment.settled)
        .values(
            checkout_request_id=result.checkout_request_id,
            merchant_request_id=result.merchant_request_id,
            status=PaymentStatus.PENDING,
            result_desc=note,
        )
    )
    log.info("payment %s takes checkout %s: %s", pid, result.checkout_request_id, note)
    found = _push_and_payment(session.connection(), result.checkout_request_id)
    assert found is not None  # just written, in this transaction
    return found


def same_phone(ours: str, theirs: str | None) -> bool:
    """True when a callback's PhoneNumber can be ours; masked digits (``*``) match any."""
    if theirs is None:
        return False
    if len(theirs) != len(ours):
        return False
    return all(t in ("*", o) for o, t in zip(ours, theirs, strict=True))


def query_as_result(query: QueryResult, callback: StkResult | None = None) -> StkResult:
    """A query's verdict, keeping the receipt and amount a callback brought (a query has none)."""
    assert query.result_code is not None
    if callback is not None and query.result_code == "0":
        return StkResult(
            checkout_request_id=query.checkout_request_id,
            result_code="0",
            result_desc=query.result_desc,
            merchant_request_id=callback.merchant_request_id,
            amount=callback.amount,
            receipt_number=callback.receipt_number,
            transaction_date=callback.transaction_date,
            phone=callback.phone,
        )
    return StkResult(query.checkout_request_id, query.result_code, query.result_desc)
