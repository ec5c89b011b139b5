"""M-Pesa collections: request, resend, status, reconcile, and applying an outcome.

The rules that keep money right live here once, and the CLI, the callback listener and
``reconcile`` all go through them:

- the payment row is written before Daraja is called;
- every callback body is stored before it is acted on;
- :func:`apply_result` applies each push's outcome once, inside one ``BEGIN IMMEDIATE``
  transaction, and the balance moves only with ``balance_applied`` going from false to true;
- a push is never retried blindly: a pending payment is queried before it is pushed again.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from sfcrm.daraja import (
    STILL_PROCESSING,
    DarajaClient,
    PushAccepted,
    QueryResult,
    StkResult,
    parse_stk_callback,
)
from sfcrm.db import Database, db_time, from_db_time, raw_connection
from sfcrm.errors import (
    CallbackFormatError,
    ConflictError,
    DarajaError,
    DarajaRequestError,
    DarajaTimeoutError,
    DarajaUnreachableError,
    DatabaseBusyError,
    NotFoundError,
    SfcrmError,
    ValidationError,
)
from sfcrm.logs import mask_phone
from sfcrm.models import (
    BalanceKind,
    CallbackOutcome,
    DarajaToken,
    MpesaCallback,
    MpesaCheckout,
    MpesaPayment,
    PaymentStatus,
)
from sfcrm.money import format_cents, parse_stk_amount
from sfcrm.people import find_person, printable_line, record_balance_change
from sfcrm.phone import normalise_phone
from sfcrm.reads import payment_json as payment_json  # where the CLI has always found it
from sfcrm.times import iso_in

if TYPE_CHECKING:
    from sfcrm.config import Settings

log = logging.getLogger("sfcrm.payments")

CANCELLED_CODES = frozenset({"1031", "1032"})
# A stored callback in one of these is acted on (again) by process_callback; any other outcome
# is final. The listener's thread and cron's reconcile can reach one row at once: the second
# must report what the first did, not record the row that moved the money as its own duplicate.
ACTIONABLE = (CallbackOutcome.RECEIVED, CallbackOutcome.UNMATCHED, CallbackOutcome.ERROR)
MAX_PURPOSE = 200
DEFAULT_RECONCILE_AGE = timedelta(minutes=2)


# -- JSON views --------------------------------------------------------------------------------


def callback_json(row: MpesaCallback, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "id": row.id,
        "received_at": iso_in(row.received_at, tz),
        "source_addr": row.source_addr,
        "checkout_request_id": row.checkout_request_id,
        "result_code": row.result_code,
        "outcome": row.outcome,
        "detail": row.detail,
        "payment_id": row.payment_id,
        "size": len(row.body),
    }


# -- applying an outcome -----------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    outcome: str  # a CallbackOutcome value
    detail: str
    payment_id: int | None = None


def apply_result(
    target: Session | sqlite3.Connection,
    result: StkResult,
    *,
    source: str,
    trusted: bool,
    now: datetime,
    received_at: datetime | None = None,
) -> Applied:
    """Apply one push outcome inside a write transaction; safe to call again.

    ``target`` is a session of ``Database.write()`` or a connection of
    ``Database.raw_write()``. ``source`` is "callback" or "query". An untrusted "paid"
    (unlisted sender, confirmation by query required, or a success after a recorded failure)
    changes nothing and answers NEEDS_QUERY: the caller confirms it with an STK Push Query and
    applies that instead.
    """
    if isinstance(target, sqlite3.Connection):
        return _apply(
            target, result, source=source, trusted=trusted, now=now, received_at=received_at
        )
    target.flush()
    try:
        return _apply(
            raw_connection(target), result, source=source, trusted=trusted, now=now,
            received_at=received_at,
        )  # fmt: skip
    finally:
        target.expire_all()


# A push (by its CheckoutRequestID) and the payment it belongs to, in one read.
_PUSH_AND_PAYMENT = (
    "SELECT c.id, c.payment_id, c.result_code, c.merchant_request_id, p.status, "
    "p.checkout_request_id, p.amount, p.person_id, p.balance_applied, p.receipt_number "
    "FROM mpesa_checkout AS c JOIN mpesa_payment AS p ON p.id = c.payment_id "
    "WHERE c.checkout_request_id = ?"
)


def _apply(
    conn: sqlite3.Connection,
    result: StkResult,
    *,
    source: str,
    trusted: bool,
    now: datetime,
    stamp: str | None = None,
    received_at: datetime | None = None,
) -> Applied:
    # Plain SQL: this runs for every callback, and the listener must keep up with a burst.
    # Each statement and each index page a transaction touches costs time in its COMMIT.
    cid = result.checkout_request_id
    stamp = stamp or db_time(now)  # now as the columns store it, when the caller has it
    found = conn.execute(_PUSH_AND_PAYMENT, (cid,)).fetchone()
    note = ""
    if found is None:
        candidate = _adoptable(conn, result, received_at or now)
        if candidate is None:
            return Applied(CallbackOutcome.UNMATCHED, "no payment has this CheckoutRequestID")
        if isinstance(candidate, str):
            return Applied(CallbackOutcome.UNMATCHED, candidate)
        pid, rivals = candidate
        note = _adoption_note(rivals)
        if source != "query":
            # Matched by phone and amount only: nothing is written until Daraja confirms this
            # CheckoutRequestID was paid, or a forged callback could take the payment over.
            return Applied(
                CallbackOutcome.NEEDS_QUERY,
                f"paid; {note}, to be confirmed by query",
                pid,
            )
        found = _adopt(conn, result, pid, stamp, note)
    checkout_id, pid, prior, merchant = found[:4]
    status, current, amount, person_id, balance_applied, receipt = found[4:]
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
        _record(conn, checkout_id, result, source, stamp)
        if balance_applied or status in (PaymentStatus.COMPLETED, PaymentStatus.NEEDS_REVIEW):
            return Applied(CallbackOutcome.IGNORED, "payment already settled", pid)
        if current != cid:
            return Applied(CallbackOutcome.IGNORED, "superseded by a newer push", pid)
        new_status = (
            PaymentStatus.CANCELLED
            if result.result_code in CANCELLED_CODES
            else PaymentStatus.FAILED
        )
        conn.execute(
            "UPDATE mpesa_payment SET status = ?, result_code = ?, result_desc = ? WHERE id = ?",
            (new_status, result.result_code, result.result_desc, pid),
        )
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
    _record(conn, checkout_id, result, source, stamp)
    if balance_applied or status == PaymentStatus.NEEDS_REVIEW:
        conn.execute("UPDATE mpesa_payment SET refund_due = 1 WHERE id = ?", (pid,))
        log.warning(
            "payment %s paid twice (checkout %s, receipt %s): refund due",
            pid, cid, result.receipt_number,
        )  # fmt: skip
        return Applied(CallbackOutcome.REFUND, "paid again by another push: refund due", pid)
    receipt = result.receipt_number or receipt
    settled = (merchant, receipt, db_time(result.transaction_date))
    desc = result.result_desc + (f" ({note})" if note else "")
    if current != cid:
        # An older push was paid. Only then is the unique column named: setting it to the
        # value it holds, as in the usual case, would still rewrite its index entry.
        conn.execute("UPDATE mpesa_payment SET checkout_request_id = ? WHERE id = ?", (cid, pid))
    if result.amount is not None and result.amount != Decimal(amount):
        desc = f"paid {result.amount}, but {amount} was asked" + (f" ({note})" if note else "")
        conn.execute(
            "UPDATE mpesa_payment SET status = ?, merchant_request_id = ?, receipt_number = ?, "
            "transaction_date = ?, result_code = '0', result_desc = ? WHERE id = ?",
            (PaymentStatus.NEEDS_REVIEW, *settled, desc, pid),
        )
        log.warning("payment %s needs review: %s", pid, desc)
        return Applied(CallbackOutcome.REVIEW, desc, pid)
    balance = record_balance_change(
        conn, person_id, -amount * 100, kind=BalanceKind.PAYMENT, now=now,
        reason=f"M-Pesa {receipt or 'payment'}", payment_id=pid,
    )  # fmt: skip
    conn.execute(
        "UPDATE mpesa_payment SET status = ?, merchant_request_id = ?, receipt_number = ?, "
        "transaction_date = ?, result_code = '0', result_desc = ?, completed_at = ?, "
        "balance_applied = 1 WHERE id = ?",
        (PaymentStatus.COMPLETED, *settled, desc, stamp, pid),
    )
    # A callback's own log line says it; a query's settlement needs a line of its own.
    level = logging.DEBUG if source == "callback" else logging.INFO
    if log.isEnabledFor(level):
        log.log(
            level,
            "payment %s completed: receipt %s, KES %s, person %s balance now %s (%s)",
            pid, receipt, amount, person_id, format_cents(balance), source,
        )  # fmt: skip
    return Applied(CallbackOutcome.APPLIED, PaymentStatus.COMPLETED, pid)


# A "paid" callback for a CheckoutRequestID no push of ours holds is matched to a push that got
# no answer only when that push was sent around the time the callback came: not after it (with
# some room for clock skew between machines), and not longer before it than a prompt stays on a
# phone and its callback takes to come (Daraja: about a minute and a half, then 3-10 s).
ADOPT_SKEW = timedelta(minutes=5)
ADOPT_WINDOW = timedelta(minutes=15)
# How long an STK prompt can stay on a phone before M-Pesa times it out (1037/1019), with room.
PROMPT_LIFETIME = timedelta(seconds=120)
# A masked PhoneNumber (M-Pesa began masking in 2026) matches only with this many digits shown.
MIN_SHOWN_DIGITS = 6


def _adoptable(
    conn: sqlite3.Connection, result: StkResult, received_at: datetime
) -> tuple[int, int] | str | None:
    """The payment a "paid" result for an unknown CheckoutRequestID belongs to, and how many
    payments it could have belonged to; or why it is left for a person to settle.

    When a push's answer never came back (or the command sending it was stopped), its
    CheckoutRequestID was never stored: the payment has more pushes than recorded checkouts
    (it is ``unknown`` with no checkout, or a later push of it was answered). Its callback
    still carries the amount and (unless M-Pesa masked it) the phone. Payments of one person
    that match both are the same debt: the oldest push is settled first, so each callback
    settles one of them. Payments of several people are never guessed between. A payment
    already paid takes it only when no open one does, and is then flagged for a refund.
    """
    if not result.paid or result.amount is None or result.amount != int(result.amount):
        return None
    if result.phone is None or sum(ch != "*" for ch in result.phone) < MIN_SHOWN_DIGITS:
        return None
    candidates = conn.execute(
        "SELECT p.id, p.phone_number, p.person_id, p.balance_applied FROM mpesa_payment AS p "
        "WHERE p.last_pushed_at BETWEEN ? AND ? AND p.amount = ? "
        "AND p.status IN (?, ?, ?, ?, ?) "
        "AND ((p.status = ? AND p.checkout_request_id IS NULL) OR p.push_count > "
        "(SELECT COUNT(*) FROM mpesa_checkout AS c WHERE c.payment_id = p.id)) "
        "ORDER BY p.balance_applied, p.last_pushed_at, p.id",
        (
            db_time(received_at - ADOPT_WINDOW), db_time(received_at + ADOPT_SKEW),
            int(result.amount), PaymentStatus.UNKNOWN, PaymentStatus.PENDING,
            PaymentStatus.FAILED, PaymentStatus.CANCELLED, PaymentStatus.COMPLETED,
            PaymentStatus.UNKNOWN,
        ),
    ).fetchall()  # fmt: skip
    matches = [(pid, person, paid) for pid, phone, person, paid in candidates
               if _same_phone(phone, result.phone)]  # fmt: skip
    open_ones = [m for m in matches if not m[2]] or matches
    if not open_ones:
        return None
    people = {person for _, person, _ in open_ones}
    if len(people) > 1:
        ids = ", ".join(str(pid) for pid, _, _ in open_ones)
        return (
            f"paid; its phone and amount match unanswered pushes of {len(people)} people "
            f"(payments {ids}): for a person to settle"
        )
    return open_ones[0][0], len(open_ones)


def _adoption_note(rivals: int) -> str:
    if rivals == 1:
        return "matched by phone and amount to a push that got no answer"
    return (
        f"matched by phone and amount to the oldest of {rivals} unanswered pushes of that "
        "amount to that phone"
    )


def _adopt(
    conn: sqlite3.Connection, result: StkResult, pid: int, stamp: str | None, note: str
) -> Any:
    """Give the payment the CheckoutRequestID a query has just confirmed as paid; returns the
    row ``_apply`` reads for a known CheckoutRequestID. A payment already paid only gains the
    push (its result then flags the refund); its own columns stay as they are."""
    conn.execute(
        "INSERT INTO mpesa_checkout (payment_id, checkout_request_id, merchant_request_id, "
        "pushed_at) SELECT id, ?, ?, COALESCE(last_pushed_at, ?) FROM mpesa_payment WHERE id = ?",
        (result.checkout_request_id, result.merchant_request_id, stamp, pid),
    )
    conn.execute(
        "UPDATE mpesa_payment SET checkout_request_id = ?, merchant_request_id = ?, status = ?, "
        "result_desc = ? WHERE id = ? AND NOT balance_applied AND status != ?",
        (
            result.checkout_request_id, result.merchant_request_id, PaymentStatus.PENDING,
            note, pid, PaymentStatus.NEEDS_REVIEW,
        ),
    )  # fmt: skip
    log.info("payment %s takes checkout %s: %s", pid, result.checkout_request_id, note)
    return conn.execute(_PUSH_AND_PAYMENT, (result.checkout_request_id,)).fetchone()


def _settled(payment: MpesaPayment) -> bool:
    """Money moved for this payment (or is held for review): its status must not go back."""
    return payment.balance_applied or payment.status in (
        PaymentStatus.COMPLETED,
        PaymentStatus.NEEDS_REVIEW,
    )


def _same_phone(ours: str, theirs: str | None) -> bool:
    """True when a callback's PhoneNumber can be ours; masked digits (``*``) match any."""
    if theirs is None:
        return False
    if len(theirs) != len(ours):
        return False
    return all(t in ("*", o) for o, t in zip(ours, theirs, strict=True))


def _record(
    conn: sqlite3.Connection, checkout_id: int, result: StkResult, source: str, stamp: str | None
) -> None:
    conn.execute(
        "UPDATE mpesa_checkout SET result_code = ?, result_desc = ?, result_source = ?, "
        "result_at = ?, receipt_number = COALESCE(?, receipt_number), "
        "paid_amount = COALESCE(?, paid_amount) WHERE id = ?",
        (
            result.result_code, result.result_desc, source, stamp,
            result.receipt_number, None if result.amount is None else str(result.amount),
            checkout_id,
        ),
    )  # fmt: skip


def _read_callback(body: bytes) -> StkResult | str:
    """A stored body read as a Daraja callback, or why it is not one."""
    try:
        return parse_stk_callback(body)
    except CallbackFormatError as exc:
        return exc.message


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


def _after_push_hint(pid: int) -> str:
    return (
        "the prompt may be on the phone: do not request or resend it; its callback settles it "
        f"(see `sfcrm mpesa status {pid}`), or `sfcrm mpesa reconcile` does"
    )


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


# -- the token cache, shared by every sfcrm process on this database ----------------------------


class DatabaseTokenCache:
    """Keeps the Daraja token in the database so short CLI runs do not knock each other's out."""

    def __init__(self, db: Database) -> None:
        import threading

        self.db = db
        self._thread_lock = threading.Lock()

    def load(self, key: str) -> tuple[str, datetime] | None:
        with self.db.read() as session:
            row = session.get(DarajaToken, key)
            return (row.access_token, row.expires_at) if row else None

    def store(self, key: str, token: str, expires_at: datetime) -> None:
        from datetime import UTC

        with self.db.write() as session:
            row = session.get(DarajaToken, key) or DarajaToken(
                cache_key=key, access_token=token, expires_at=expires_at, fetched_at=expires_at
            )
            row.access_token = token
            row.expires_at = expires_at
            row.fetched_at = datetime.now(UTC)
            session.add(row)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One token fetch at a time across threads, and across processes where flock exists."""
        with (
            self._thread_lock,
            _file_lock(self.db.path.with_name(self.db.path.name + ".token-lock")),
        ):
            yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: threads are still serialised by the caller
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_daraja_client(
    settings: Settings, db: Database, clock: Callable[[], datetime]
) -> DarajaClient:
    """The client for the configured Daraja; a missing credential fails here, before any call."""
    settings.require(
        "mpesa_consumer_key", "mpesa_consumer_secret", "mpesa_business_short_code", "mpesa_pass_key"
    )
    if settings.mpesa_transaction_type == "CustomerBuyGoodsOnline":
        settings.require("mpesa_till_number")
    import requests

    return DarajaClient(
        settings.daraja_base_url,
        settings.mpesa_consumer_key,
        settings.mpesa_consumer_secret,
        str(settings.mpesa_business_short_code),
        settings.mpesa_pass_key,
        session=requests.Session(),
        timeout=settings.mpesa_timeout,
        clock=clock,
        token_cache=DatabaseTokenCache(db),
        transaction_type=settings.mpesa_transaction_type,
        till_number=settings.mpesa_till_number,
    )


# -- the service -------------------------------------------------------------------------------


@dataclass
class PushReport:
    payment: MpesaPayment
    pushed: bool
    message: str


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


class Payments:
    """Everything the office does with M-Pesa payments. Dependencies are passed in."""

    def __init__(
        self,
        db: Database,
        *,
        callback_url: str | None,
        clock: Callable[[], datetime],
        client_factory: Callable[[], DarajaClient],
        confirm_by_query: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.notify: Callable[[str], None] = notify or (lambda _text: None)
        self.callback_url = callback_url
        self.clock = clock
        self._client_factory = client_factory
        self._client: DarajaClient | None = None
        self.confirm_by_query = confirm_by_query

    @property
    def client(self) -> DarajaClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _require_callback_url(self) -> str:
        if not self.callback_url:
            from sfcrm.errors import ConfigError

            raise ConfigError(
                "MPESA_CALLBACK_URL is not set",
                hint="set MPESA_CALLBACK_URL in the environment or .env to the public URL of "
                "`sfcrm serve-callback`, with a long random secret in its path",
            )
        return self.callback_url

    # -- request ---------------------------------------------------------------------------

    def request(
        self, person_ref: str, amount: str | int, purpose: str, phone: str | None = None
    ) -> MpesaPayment:
        """Write the payment row, then push. Bad input is refused before any row or request."""
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
            with self.db.write() as session:
                row = session.get(MpesaPayment, pid)
                assert row is not None
                if row.status == PaymentStatus.INITIATED:
                    row.status = PaymentStatus.FAILED
                    row.result_code = None
                    row.result_desc = exc.message
                    session.add(row)
            log.warning("payment %s not pushed: %s", pid, exc)
            exc.message = f"payment {pid}: {exc.message}"
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
            self._patiently(pid, partial(self._record_push_error, pid, exc, before, marked))
            log.warning("payment %s push failed: %s", pid, exc)
            exc.message = f"payment {pid}: {exc.message}"
            if isinstance(exc, DarajaTimeoutError):
                exc.hint = _after_push_hint(pid)
            raise
        except SfcrmError as exc:
            # (the token refreshed in the middle of the push could not be stored, say): the
            # payment stays "unknown", which is what it is
            exc.message = f"payment {pid}: {exc.message}"
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
        with self.db.write() as session:
            row = session.get(MpesaPayment, pid)
            assert row is not None
            if _settled(row):
                raise ConflictError(
                    f"payment {pid} is {row.status}; it is never pushed again",
                    hint="request a new payment if more is owed",
                )
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

    def _record_push_error(
        self, pid: int, exc: DarajaError, pushed_before: datetime | None, marked: int
    ) -> None:
        with self.db.write() as session:
            row = session.get(MpesaPayment, pid)
            assert row is not None
            if _settled(row) or row.status != PaymentStatus.UNKNOWN or row.checkout_request_id:
                # a result arrived meanwhile (a callback matched and confirmed): keep it
                return
            if row.push_count != marked:
                return  # a newer push went out meanwhile: the row is about that one
            if not isinstance(exc, DarajaTimeoutError):
                # Daraja refused it, or it never left: no prompt reached the phone, and the
                # push does not count
                row.status = PaymentStatus.FAILED
                row.push_count -= 1
                row.last_pushed_at = pushed_before
            row.result_code = exc.code if not isinstance(exc, DarajaUnreachableError) else None
            row.result_desc = exc.message
            session.add(row)

    def _record_accepted(self, pid: int, accepted: PushAccepted, marked: int) -> None:
        with self.db.write() as session:
            row = session.get(MpesaPayment, pid)
            assert row is not None
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
            if (
                not _settled(row)
                and row.status == PaymentStatus.UNKNOWN
                and (row.push_count == marked)
            ):
                # (when a push was paid meanwhile, this one is only recorded: if it is paid
                # too, its callback flags the refund; when a newer push went out, the row is
                # about that one)
                row.checkout_request_id = accepted.checkout_request_id
                row.merchant_request_id = accepted.merchant_request_id
                row.status = PaymentStatus.PENDING
                row.result_code = None
                row.result_desc = None
                session.add(row)

    def _patiently(self, pid: int, write: Callable[[], None]) -> None:
        """Record what Daraja answered to a push, however long the database stays busy.

        The prompt may be on the phone, so giving up would leave the office guessing; each
        attempt already waits out the busy timeout. A Ctrl-C here leaves the payment
        ``unknown``, which the callback or ``reconcile`` settles.
        """
        told = False
        while True:
            try:
                write()
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
        with self.db.write() as session:
            payment = session.get(MpesaPayment, payment_id)
            if payment is None:
                raise NotFoundError("no such payment", value=str(payment_id))
            if _settled(payment):
                raise ConflictError(
                    f"payment {payment_id} is {payment.status}; it is never pushed again",
                    hint="request a new payment if more is owed",
                )
            if payment.resend_claimed_until and payment.resend_claimed_until > now:
                raise ConflictError(
                    f"payment {payment_id} is being resent by another sfcrm right now"
                )
            if payment.status == PaymentStatus.UNKNOWN and not payment.checkout_request_id:
                self._refuse_unknown(payment, client.timeout, now, force=force)
            payment.resend_claimed_until = now + timedelta(seconds=2 * client.timeout + 30)
            session.add(payment)
        try:
            waiting = self._settle_waiting_callbacks(payment)
            payment = self.get(payment_id)
            if _settled(payment):
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
                with self.db.write() as session:
                    apply_result(
                        session, query_as_result(query), source="query", trusted=True, now=now
                    )
                if query.result_code == "0":
                    settled = self.get(payment_id)
                    return PushReport(settled, False, "already paid: not pushed again")
            log.info("payment %s resend", payment_id)
            pushed = self._push(payment, client, callback_url)
            return PushReport(pushed, True, "STK push sent again")
        finally:
            with self.db.write() as session:
                row = session.get(MpesaPayment, payment_id)
                if row is not None:
                    row.resend_claimed_until = None
                    session.add(row)

    @staticmethod
    def _refuse_unknown(
        payment: MpesaPayment, timeout: float, now: datetime, *, force: bool
    ) -> None:
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

    def _waiting_paid_callbacks(self, payment: MpesaPayment) -> list[tuple[int, str]]:
        """Stored callbacks, not yet settled, that say "paid" and could be this payment's: for
        one of its own pushes, or for a CheckoutRequestID no push of ours holds, with its phone
        and amount, that came after the payment was made."""
        pid = payment.id
        waiting = (*ACTIONABLE, CallbackOutcome.NEEDS_QUERY)
        with self.db.raw_read() as conn:
            rows = conn.execute(
                "SELECT cb.id, cb.outcome, cb.body, c.payment_id FROM mpesa_callback AS cb "  # noqa: S608
                "LEFT JOIN mpesa_checkout AS c ON c.checkout_request_id = cb.checkout_request_id "
                f"WHERE cb.outcome IN ({', '.join('?' * len(waiting))}) "
                "AND (cb.result_code = '0' OR cb.result_code IS NULL) AND cb.received_at >= ? "
                "ORDER BY cb.id",
                (*waiting, db_time(payment.initiated_at - ADOPT_SKEW)),
            ).fetchall()
        found = []
        for callback_id, outcome, body, owner in rows:
            parsed = _read_callback(bytes(body))
            if not isinstance(parsed, StkResult) or not parsed.paid:
                continue
            # (an amount or phone M-Pesa left out or masked could be this payment's too)
            if owner == pid or (
                owner is None
                and parsed.amount in (None, Decimal(payment.amount))
                and (parsed.phone is None or _same_phone(payment.phone_number, parsed.phone))
            ):
                found.append((int(callback_id), str(outcome)))
        return found

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
        with self.db.write() as session:
            row = session.get(MpesaCallback, callback_id)
            if row is None or row.outcome != CallbackOutcome.UNMATCHED:
                return
            row.outcome = outcome
            row.detail = detail
            row.processed_at = self.clock()
            session.add(row)
        log.info("callback %s checked by query: %s (%s)", callback_id, outcome, detail)

    def pending_ids(self) -> list[int]:
        with self.db.read() as session:
            rows = session.exec(
                select(MpesaPayment.id)
                .where(MpesaPayment.status == PaymentStatus.PENDING)
                .order_by(col(MpesaPayment.id))
            ).all()
            return [r for r in rows if r is not None]

    # -- status ----------------------------------------------------------------------------

    def get(self, payment_id: int) -> MpesaPayment:
        with self.db.read() as session:
            payment = session.get(MpesaPayment, payment_id)
            if payment is None:
                raise NotFoundError("no such payment", value=str(payment_id))
            return payment

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
                errors.append(f"payment {pid}: {exc}")
        return errors

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
        with self.db.write() as session:
            waiting = None
            if callback is None:
                waiting = session.exec(
                    select(MpesaCallback)
                    .where(MpesaCallback.checkout_request_id == checkout_request_id)
                    .where(MpesaCallback.outcome == CallbackOutcome.NEEDS_QUERY)
                    .order_by(col(MpesaCallback.id).desc())
                ).first()
                if waiting is not None:
                    callback = parse_stk_callback(waiting.body)
                    callback_id = waiting.id
            applied = apply_result(
                session,
                query_as_result(query, callback),
                source="query",
                trusted=True,
                now=self.clock(),
            )
            if waiting is not None and query.result_code == "0":
                row = session.get(MpesaCallback, callback_id)
                assert row is not None
                row.outcome = applied.outcome
                row.detail = "confirmed by query: " + applied.detail
                row.payment_id = applied.payment_id
                row.processed_at = self.clock()
                session.add(row)
            return applied

    # -- callbacks -------------------------------------------------------------------------

    def store_callback(self, body: bytes, source_addr: str | None, *, trusted: bool) -> int:
        """Keep a raw body without acting on it. Returns the inbox id."""
        with self.db.raw_write() as conn:
            return self._store(conn, body, source_addr, trusted, db_time(self.clock()))

    def _store(
        self,
        conn: sqlite3.Connection,
        body: bytes,
        source_addr: str | None,
        trusted: bool,
        stamp: str | None,
        parsed: StkResult | str | None = None,
    ) -> int:
        # A body already read carries its IDs into the row now, so that acting on it does not
        # move its entry in the checkout_request_id index a second time.
        result = parsed if isinstance(parsed, StkResult) else None
        cursor = conn.execute(
            "INSERT INTO mpesa_callback (received_at, source_addr, body, trusted, outcome, "
            "checkout_request_id, result_code) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                stamp, source_addr, body, trusted, CallbackOutcome.RECEIVED,
                result.checkout_request_id if result else None,
                result.result_code if result else None,
            ),
        )  # fmt: skip
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def receive(
        self, body: bytes, source_addr: str | None, *, trusted: bool
    ) -> tuple[int, Applied]:
        """What the listener does with a POST: store the raw body, then act on it.

        Both happen in one transaction, the body first. If reading or acting fails, that
        transaction is rolled back whole and the body is stored on its own with outcome
        "error", for reconcile to retry: nothing half-done is kept, and when this returns the
        body is on disk either way.
        """
        try:
            # Read before the transaction, so that no lock is held meanwhile; nothing is acted
            # on before the body is stored below.
            parsed = _read_callback(body)
            with self.db.raw_write() as conn:
                now = self.clock()
                stamp = db_time(now)
                callback_id = self._store(conn, body, source_addr, trusted, stamp, parsed)
                return callback_id, self._act(conn, callback_id, parsed, trusted, now, stamp)
        except Exception as exc:
            # Acting failed and took the transaction with it: keep the body on its own, marked
            # for reconcile to try again. If even that fails, the caller answers 503.
            log.exception("callback from %s could not be acted on", source_addr)
            with self.db.raw_write() as conn:
                callback_id = self._store(conn, body, source_addr, trusted, db_time(self.clock()))
                detail = type(exc).__name__
                conn.execute(
                    "UPDATE mpesa_callback SET outcome = ?, detail = ? WHERE id = ?",
                    (CallbackOutcome.ERROR, detail, callback_id),
                )
            return callback_id, Applied(CallbackOutcome.ERROR, detail)

    def process_callback(self, callback_id: int, *, again_if_waiting: bool = False) -> Applied:
        """Act on a stored callback (no network). NEEDS_QUERY asks the caller to confirm it.

        ``again_if_waiting`` also reads a callback already waiting for a query once more: when
        the push it belongs to has just been recorded, it may need no query any longer.
        """
        with self.db.raw_write() as conn:
            row = conn.execute(
                "SELECT body, trusted, outcome, detail, payment_id, checkout_request_id, "
                "received_at FROM mpesa_callback WHERE id = ?",
                (callback_id,),
            ).fetchone()
            if row is None:
                raise NotFoundError("no such callback", value=str(callback_id))
            body, trusted, outcome, detail, payment_id, stored_id, received = row
            if outcome not in ACTIONABLE and not (
                again_if_waiting and outcome == CallbackOutcome.NEEDS_QUERY
            ):
                return Applied(outcome, detail or "", payment_id)
            parsed = _read_callback(bytes(body))
            if isinstance(parsed, StkResult) and stored_id is None:
                # kept without being read (store_callback, or receive's fallback after a failure)
                conn.execute(
                    "UPDATE mpesa_callback SET checkout_request_id = ?, result_code = ? "
                    "WHERE id = ?",
                    (parsed.checkout_request_id, parsed.result_code, callback_id),
                )
            now = self.clock()
            return self._act(
                conn, callback_id, parsed, bool(trusted), now, db_time(now),
                received_at=from_db_time(received),
            )  # fmt: skip

    def _act(
        self,
        conn: sqlite3.Connection,
        callback_id: int,
        parsed: StkResult | str,
        trusted: bool,
        now: datetime,
        stamp: str | None,
        *,
        received_at: datetime | None = None,
    ) -> Applied:
        """Act on a stored callback in the caller's transaction. ``parsed`` is what
        ``_read_callback`` made of its body, whose IDs the row already holds."""
        if isinstance(parsed, str):
            conn.execute(
                "UPDATE mpesa_callback SET outcome = ?, detail = ?, processed_at = ? WHERE id = ?",
                (CallbackOutcome.REJECTED, parsed, stamp, callback_id),
            )
            return Applied(CallbackOutcome.REJECTED, parsed)
        result = parsed
        trusted = trusted and not self.confirm_by_query
        applied = _apply(
            conn, result, source="callback", trusted=trusted, now=now, stamp=stamp,
            received_at=received_at,
        )  # fmt: skip
        conn.execute(
            "UPDATE mpesa_callback SET outcome = ?, detail = ?, payment_id = ?, processed_at = ? "
            "WHERE id = ?",
            (applied.outcome, applied.detail, applied.payment_id, stamp, callback_id),
        )
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
        with self.db.write() as session:
            row = session.get(MpesaCallback, callback_id)
            assert row is not None
            if row.outcome != CallbackOutcome.NEEDS_QUERY:
                return Applied(row.outcome, row.detail or "", row.payment_id)
            applied = apply_result(
                session,
                query_as_result(query, result),
                source="query",
                trusted=True,
                now=self.clock(),
                received_at=received_at,
            )
            query_code = query.result_code
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
            row.outcome = final.outcome
            row.detail = final.detail
            row.payment_id = final.payment_id
            row.processed_at = self.clock()
            session.add(row)
        log.info(
            "callback %s confirmed by query: %s (%s)", callback_id, final.outcome, final.detail
        )
        return final

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
        with self.db.read() as session:
            query = select(MpesaCallback).order_by(col(MpesaCallback.id).desc()).limit(limit)
            if outcome:
                query = query.where(MpesaCallback.outcome == outcome)
            return session.exec(query).all()

    # -- reconcile -------------------------------------------------------------------------

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
                report.errors.append(f"callback {callback_id}: {exc}")
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
                report.errors.append(f"payment {payment.id}: {exc}")
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
                    (
                        (col(MpesaPayment.status) == PaymentStatus.UNKNOWN)
                        & col(MpesaPayment.checkout_request_id).is_(None)
                        & (col(MpesaPayment.last_pushed_at) <= cutoff)
                    )
                    | (
                        (col(MpesaPayment.status) == PaymentStatus.INITIATED)
                        & (col(MpesaPayment.initiated_at) <= cutoff)
                    )
                    | (col(MpesaPayment.status) == PaymentStatus.NEEDS_REVIEW)
                    | col(MpesaPayment.refund_due)
                )
                .order_by(col(MpesaPayment.id))
            ).all()
        for p in rows:
            assert p.id is not None
            if p.refund_due:
                why = "paid twice (by two pushes): a refund is due"
            elif p.status == PaymentStatus.NEEDS_REVIEW:
                why = f"needs review: {p.result_desc}"
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
                    f"check the M-Pesa statement for account SF-{p.id}; "
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
