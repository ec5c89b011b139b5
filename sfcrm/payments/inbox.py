"""The callback inbox: every body posted to the callback path is stored before it is acted on,
then acted on once; a "paid" that needs it is confirmed by an STK Push Query.

The listener's threads (of one or of several ``serve-callback`` processes), cron's
``reconcile`` and a ``resend`` can reach one stored callback at once: each locks the callback
row before acting on it, and reports what the first one did instead of recording the row that
moved the money as its own duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any

from sqlalchemy import Connection, Executable, bindparam, insert, or_, update
from sqlmodel import Session, col, select

from sfcrm.daraja import StkResult, parse_stk_callback
from sfcrm.errors import CallbackFormatError, DarajaRequestError, NotFoundError, ValidationError
from sfcrm.models import CallbackOutcome, MpesaCallback, MpesaCheckout, MpesaPayment
from sfcrm.payments.base import PaymentsBase
from sfcrm.payments.outcome import ADOPT_SKEW, Applied, apply_result, query_as_result, same_phone

log = logging.getLogger("sfcrm.payments")

# A stored callback in one of these is acted on (again) by process_callback; any other outcome
# is final.
ACTIONABLE = (CallbackOutcome.RECEIVED, CallbackOutcome.UNMATCHED, CallbackOutcome.ERROR)


def _read_callback(body: bytes) -> StkResult | str:
    """A stored body read as a Daraja callback, or why it is not one."""
    try:
        return parse_stk_callback(body)
    except CallbackFormatError as exc:
        return exc.message


@cache
def _statements() -> tuple[Executable, Executable]:
    """Built once, on first use: storing a callback, and marking what acting on it came to."""
    return insert(MpesaCallback), update(MpesaCallback).where(
        col(MpesaCallback.id) == bindparam("callback_id")
    )


def _store(
    conn: Connection,
    body: bytes,
    source_addr: str | None,
    trusted: bool,
    now: datetime,
    parsed: StkResult | str | None = None,
    *,
    outcome: str = CallbackOutcome.RECEIVED,
    detail: str | None = None,
) -> int:
    # A body already read carries its IDs into the row now, so that acting on it does not
    # move its entry in the checkout_request_id index a second time.
    result = parsed if isinstance(parsed, StkResult) else None
    inserted = conn.execute(
        _statements()[0],
        {
            "received_at": now,
            "source_addr": source_addr,
            "body": body,
            "trusted": trusted,
            "outcome": outcome,
            "detail": detail,
            "checkout_request_id": result.checkout_request_id if result else None,
            "result_code": result.result_code if result else None,
        },
    )
    key = inserted.inserted_primary_key
    assert key is not None
    return int(key[0])


def _mark(conn: Connection, callback_id: int, applied: Applied, now: datetime) -> None:
    """Record what acting on a stored callback came to."""
    conn.execute(
        _statements()[1],
        {
            "callback_id": callback_id,
            "outcome": applied.outcome,
            "detail": applied.detail,
            "payment_id": applied.payment_id,
            "processed_at": now,
        },
    )


def _locked_callback(session: Session, callback_id: int) -> MpesaCallback:
    row = session.get(MpesaCallback, callback_id, with_for_update=True)
    if row is None:
        raise NotFoundError("no such callback", value=str(callback_id))
    return row


class Inbox(PaymentsBase):
    def store_callback(self, body: bytes, source_addr: str | None, *, trusted: bool) -> int:
        """Keep a raw body without acting on it. Returns the inbox id."""
        with self.db.write() as session:
            return _store(session.connection(), body, source_addr, trusted, self.clock())

    def receive(
        self, body: bytes, source_addr: str | None, *, trusted: bool
    ) -> tuple[int, Applied]:
        """What the listener does with a POST: store the raw body, then act on it.

        Both happen in one transaction, the body first. If reading or acting fails, that
        transaction is rolled back whole and the body is stored on its own with outcome
        "error", for reconcile to retry: nothing half-done is kept, and when this returns the
        body is stored either way.
        """
        try:
            # Read before the transaction, so that no lock is held meanwhile; nothing is acted
            # on before the body is stored below.
            parsed = _read_callback(body)

            def store_and_act(session: Session) -> tuple[int, Applied]:
                now = self.clock()
                callback_id = _store(session.connection(), body, source_addr, trusted, now, parsed)
                return callback_id, self._act(session, callback_id, parsed, trusted, now)

            return self.db.transaction(store_and_act)
        except Exception as exc:
            # Acting failed and took the transaction with it: keep the body on its own, marked
            # for reconcile to try again. If even that fails, the caller answers 503.
            log.exception("callback from %s could not be acted on", source_addr)
            detail = type(exc).__name__
            with self.db.write() as session:
                callback_id = _store(
                    session.connection(), body, source_addr, trusted, self.clock(),
                    outcome=CallbackOutcome.ERROR, detail=detail,
                )  # fmt: skip
            return callback_id, Applied(CallbackOutcome.ERROR, detail)

    def process_callback(self, callback_id: int, *, again_if_waiting: bool = False) -> Applied:
        """Act on a stored callback (no network). NEEDS_QUERY asks the caller to confirm it.

        ``again_if_waiting`` also reads a callback already waiting for a query once more: when
        the push it belongs to has just been recorded, it may need no query any longer.
        """

        def act(session: Session) -> Applied:
            row = _locked_callback(session, callback_id)
            if row.outcome not in ACTIONABLE and not (
                again_if_waiting and row.outcome == CallbackOutcome.NEEDS_QUERY
            ):
                return Applied(row.outcome, row.detail or "", row.payment_id)
            parsed = _read_callback(row.body)
            if isinstance(parsed, StkResult) and row.checkout_request_id is None:
                # kept without being read (store_callback, or receive's fallback after a failure)
                row.checkout_request_id = parsed.checkout_request_id
                row.result_code = parsed.result_code
                session.add(row)
            return self._act(
                session, callback_id, parsed, row.trusted, self.clock(),
                received_at=row.received_at,
            )  # fmt: skip

        return self.db.transaction(act)

    def _act(
        self,
        session: Session,
        callback_id: int,
        parsed: StkResult | str,
        trusted: bool,
        now: datetime,
        *,
        received_at: datetime | None = None,
    ) -> Applied:
        """Act on a stored callback in the caller's transaction. ``parsed`` is what
        ``_read_callback`` made of its body, whose IDs the row already holds."""
        if isinstance(parsed, str):
            rejected = Applied(CallbackOutcome.REJECTED, parsed)
            _mark(session.connection(), callback_id, rejected, now)
            return rejected
        result = parsed
        applied = apply_result(
            session, result, source="callback", trusted=trusted and not self.confirm_by_query,
            now=now, received_at=received_at,
        )  # fmt: skip
        _mark(session.connection(), callback_id, applied, now)
        log.info(
            "callback %s for %s code %s: %s, payment %s %s",
            callback_id, result.checkout_request_id, result.result_code, applied.outcome,
            applied.payment_id, applied.detail,
        )  # fmt: skip
        return applied

    def confirm_callback(self, callback_id: int) -> Applied:
        """Settle a NEEDS_QUERY callback with an STK Push Query (network).

        The verdict is applied and the row marked in one transaction, and only while the row
        still waits: the listener's worker and reconcile may confirm one row at the same time,
        and the one that moved the money must stay recorded as the one that did.
        """
        with self.db.read() as session:
            row = session.get(MpesaCallback, callback_id)
            if row is None:
                raise NotFoundError("no such callback", value=str(callback_id))
            if row.outcome != CallbackOutcome.NEEDS_QUERY:
                return Applied(row.outcome, row.detail or "", row.payment_id)
            body = row.body
            received_at = row.received_at
        result = parse_stk_callback(body)
        query = self.client.stk_query(result.checkout_request_id)
        if query.processing:
            return Applied(CallbackOutcome.NEEDS_QUERY, "Daraja is still processing it")
        query_code = query.result_code

        def record(session: Session) -> tuple[Applied, bool]:
            row = _locked_callback(session, callback_id)
            if row.outcome != CallbackOutcome.NEEDS_QUERY:
                return Applied(row.outcome, row.detail or "", row.payment_id), False
            now = self.clock()
            applied = apply_result(
                session, query_as_result(query, result), source="query", trusted=True, now=now,
                received_at=received_at,
            )  # fmt: skip
            if query_code == "0" and applied.outcome == CallbackOutcome.UNMATCHED:
                # Paid, says Daraja, but no payment of ours can take it (yet): it stays in the
                # inbox, where reconcile and resend keep looking for its payment.
                final = Applied(
                    CallbackOutcome.UNMATCHED,
                    "confirmed paid by query, but no payment matches it",
                    None,
                )
            elif query_code == "0":
                final = Applied(
                    applied.outcome, "confirmed by query: " + applied.detail, applied.payment_id
                )
            else:
                final = Applied(
                    CallbackOutcome.IGNORED,
                    f"query says {query_code}: the 'paid' was not confirmed",
                    applied.payment_id,
                )
            _mark(session.connection(), callback_id, final, now)
            return final, True

        final, changed = self.db.transaction(record)
        if changed:
            log.info(
                "callback %s confirmed by query: %s (%s)", callback_id, final.outcome, final.detail
            )
        return final

    def settle_by_query(
        self, checkout_request_id: str, callback: StkResult | None = None
    ) -> Applied | None:
        """Query one push and apply its verdict; None while Daraja still processes it.

        A "paid" callback for this push waiting for its confirmation lends the verdict its
        amount (checked against the request) and receipt, and is marked as applied with it.
        """
        query = self.client.stk_query(checkout_request_id)
        if query.processing:
            return None

        def record(session: Session) -> Applied:
            lent, waiting = callback, None
            if callback is None:
                waiting = session.exec(
                    select(MpesaCallback)
                    .where(MpesaCallback.checkout_request_id == checkout_request_id)
                    .where(MpesaCallback.outcome == CallbackOutcome.NEEDS_QUERY)
                    .order_by(col(MpesaCallback.id).desc())
                    .with_for_update()
                ).first()
            waiting_id = None if waiting is None else waiting.id
            if waiting is not None:
                lent = parse_stk_callback(waiting.body)
            now = self.clock()
            applied = apply_result(
                session, query_as_result(query, lent), source="query", trusted=True, now=now
            )
            if waiting_id is not None and query.result_code == "0":
                confirmed = Applied(
                    applied.outcome, "confirmed by query: " + applied.detail, applied.payment_id
                )
                _mark(session.connection(), waiting_id, confirmed, now)
            return applied

        return self.db.transaction(record)

    def replay_callbacks(self, checkout_request_id: str | None = None) -> int:
        """Act on stored callbacks not yet applied (no network); returns how many changed."""
        # For a push just recorded, a callback waiting for a query because it came first (and
        # was matched by phone and amount only) is read again: now its push is known.
        again = checkout_request_id is not None
        outcomes = (*ACTIONABLE, CallbackOutcome.NEEDS_QUERY) if again else ACTIONABLE
        with self.db.read() as session:
            query = select(MpesaCallback.id).where(col(MpesaCallback.outcome).in_(outcomes))
            if checkout_request_id is not None:
                query = query.where(MpesaCallback.checkout_request_id == checkout_request_id)
            ids = [i for i in session.exec(query.order_by(col(MpesaCallback.id))).all() if i]
        changed = 0
        for callback_id in ids:
            try:
                applied = self.process_callback(callback_id, again_if_waiting=again)
            except Exception:
                # One bad row must not hold up the others; it stays for a person to look at.
                log.exception("stored callback %s could not be applied", callback_id)
                continue
            if applied.outcome != CallbackOutcome.UNMATCHED:
                changed += 1
        return changed

    def callbacks(self, *, outcome: str | None = None, limit: int = 50) -> Sequence[MpesaCallback]:
        """Stored callbacks, newest first; ``outcome`` one of :attr:`CallbackOutcome.ALL`."""
        if outcome is not None and outcome not in CallbackOutcome.ALL:
            raise ValidationError(
                "unknown outcome", value=outcome, hint="one of " + ", ".join(CallbackOutcome.ALL)
            )
        with self.db.read() as session:
            query = select(MpesaCallback).order_by(col(MpesaCallback.id).desc()).limit(limit)
            if outcome:
                query = query.where(MpesaCallback.outcome == outcome)
            return session.exec(query).all()

    # -- "paid" callbacks a payment may be waiting for ---------------------------------------

    def _waiting_paid_callbacks(self, payment: MpesaPayment) -> list[tuple[int, str]]:
        """Stored callbacks, not yet settled, that say "paid" and could be this payment's: for
        one of its own pushes, or for a CheckoutRequestID no push of ours holds, with its phone
        and amount, that came after the payment was made."""
        waiting = (*ACTIONABLE, CallbackOutcome.NEEDS_QUERY)
        with self.db.read() as session:
            rows = session.execute(
                select(
                    col(MpesaCallback.id),
                    col(MpesaCallback.outcome),
                    col(MpesaCallback.body),
                    col(MpesaCheckout.payment_id).label("owner"),
                )
                .outerjoin(
                    MpesaCheckout,
                    col(MpesaCheckout.checkout_request_id)
                    == col(MpesaCallback.checkout_request_id),
                )
                .where(
                    col(MpesaCallback.outcome).in_(waiting),
                    or_(
                        col(MpesaCallback.result_code) == "0",
                        col(MpesaCallback.result_code).is_(None),
                    ),
                    col(MpesaCallback.received_at) >= payment.initiated_at - ADOPT_SKEW,
                )
                .order_by(col(MpesaCallback.id))
            ).all()
        return [(row.id, row.outcome) for row in rows if _may_be_for(payment, row)]

    def _check_unmatched(self, callback_id: int) -> None:
        """Ask Daraja about a stored "paid" that no payment takes: one Daraja never issued is
        rejected and one it says was not paid is ignored, so a forged callback cannot hold up
        resends; one it confirms stays, waiting for a person."""
        with self.db.read() as session:
            row = session.get(MpesaCallback, callback_id)
            if row is None or row.outcome != CallbackOutcome.UNMATCHED:
                return
            result = parse_stk_callback(row.body)
        try:
            query = self.client.stk_query(result.checkout_request_id)
        except DarajaRequestError:
            outcome, detail = (
                CallbackOutcome.REJECTED,
                "Daraja knows no such CheckoutRequestID: not a real payment",
            )
        else:
            if query.processing:
                return
            if query.result_code == "0":
                outcome, detail = (
                    CallbackOutcome.UNMATCHED,
                    "confirmed paid by query, but no payment matches it",
                )
            else:
                outcome, detail = (
                    CallbackOutcome.IGNORED,
                    f"query says {query.result_code}: the 'paid' was not confirmed",
                )

        def record(session: Session) -> bool:
            row = session.get(MpesaCallback, callback_id, with_for_update=True)
            if row is None or row.outcome != CallbackOutcome.UNMATCHED:
                return False
            _mark(
                session.connection(),
                callback_id,
                Applied(outcome, detail, row.payment_id),
                self.clock(),
            )
            return True

        if self.db.transaction(record):
            log.info("callback %s checked by query: %s (%s)", callback_id, outcome, detail)


def _may_be_for(payment: MpesaPayment, row: Any) -> bool:
    """A stored callback (with the payment its push belongs to, if any) is a "paid" that could
    be this payment's: for one of its pushes, or for no push of ours with its amount and phone
    (an amount or phone M-Pesa left out or masked could be this payment's too)."""
    parsed = _read_callback(bytes(row.body))
    if not isinstance(parsed, StkResult) or not parsed.paid:
        return False
    if row.owner is not None:
        return bool(row.owner == payment.id)
    return parsed.amount in (None, Decimal(payment.amount)) and (
        parsed.phone is None or same_phone(payment.phone_number, parsed.phone)
    )
