"""The money rules of sfcrm.payments, against the real database and the Daraja emulator over HTTP.

The emulator withholds its callbacks here (``send_callbacks=False``): each test posts the
callback it needs, when it needs it, so "late", "early" and "twice" are exact, not timing luck.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from sqlmodel import col, select
from support import CONSUMER_KEY, CONSUMER_SECRET, Listener, utcnow, wait_for

from sfcrm.config import load_settings
from sfcrm.daraja import PUSH_PATH, QUERY_PATH, DarajaClient, StkResult
from sfcrm.db import Database
from sfcrm.emulator import (
    PAID_DESC,
    SANDBOX_PASSKEY,
    SANDBOX_PHONE,
    SANDBOX_SHORTCODE,
    DarajaEmulator,
    EmulatorSettings,
)
from sfcrm.errors import (
    ConfigError,
    ConflictError,
    DarajaBusyError,
    DarajaTimeoutError,
    DarajaUnreachableError,
    NotFoundError,
    ValidationError,
)
from sfcrm.models import (
    CallbackOutcome,
    MpesaCallback,
    MpesaCheckout,
    MpesaPayment,
    PaymentStatus,
    Person,
)
from sfcrm.payments import (
    Applied,
    DatabaseTokenCache,
    Payments,
    PushReport,
    apply_result,
    build_daraja_client,
)
from sfcrm.people import People

CANCELLING_PHONE = "254700000032"
BROKE_PHONE = "254700000001"
LOCKED_PHONE = "254700000500"
DARAJA_ADDR = "196.201.214.200"
START_BALANCE = 150_000  # cents: person_with_balance owes KES 1500.00
QUICK_TIMEOUT = 0.5  # seconds; the silent Daraja holds a push for 5


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    return EmulatorSettings(callback_delay=0.2, prompt_seconds=1.0, send_callbacks=False)


def slow_emulator(**changes: Any) -> EmulatorSettings:
    """The module's emulator, but a push stays "being processed" far longer than any test."""
    return EmulatorSettings(
        **{"callback_delay": 30, "prompt_seconds": 60, "send_callbacks": False, **changes}
    )


# -- test doubles ------------------------------------------------------------------------------


class RecordingSession(requests.Session):
    """A real requests.Session that notes every request (method, path) before sending it."""

    def __init__(self, before: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.before = before

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        path = urlsplit(str(url)).path
        self.calls.append((str(method), path))
        if self.before is not None:
            self.before(str(method), path)
        return super().request(method, url, *args, **kwargs)

    def paths(self) -> list[str]:
        return [path for _method, path in self.calls]


def make_client(
    base_url: str, db: Database, session: requests.Session, timeout: float = 5
) -> DarajaClient:
    return DarajaClient(
        base_url, CONSUMER_KEY, CONSUMER_SECRET, SANDBOX_SHORTCODE, SANDBOX_PASSKEY,
        session=session, timeout=timeout, clock=utcnow, token_cache=DatabaseTokenCache(db),
    )  # fmt: skip


def payments_with(db: Database, client: DarajaClient) -> Payments:
    return Payments(
        db, callback_url="http://127.0.0.1:9/cb/secret", clock=utcnow,
        client_factory=lambda: client,
    )  # fmt: skip


@pytest.fixture
def http() -> RecordingSession:
    return RecordingSession()


@pytest.fixture
def daraja_client(emulator: DarajaEmulator, db: Database, http: RecordingSession) -> DarajaClient:
    """The shared fixture's client, with every request it makes on record."""
    return make_client(emulator.url, db, http)


class SilentDaraja:
    """A Daraja that takes the connection and never answers in time (bounded by ``hold``).

    The token is answered at once unless ``hold_token``; every push (and query) is held.
    """

    def __init__(self, hold: float = 5.0, *, hold_token: bool = False) -> None:
        self.requests: list[str] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _hold(self) -> None:
                outer.requests.append(self.path.partition("?")[0])
                outer.release.wait(hold)

            def do_GET(self) -> None:
                if hold_token:
                    self._hold()
                    return
                outer.requests.append(self.path.partition("?")[0])
                self._json(200, {"access_token": "silent-token", "expires_in": "3599"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._hold()

            def _json(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def pushes(self) -> int:
        return self.requests.count(PUSH_PATH)

    def __enter__(self) -> SilentDaraja:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def silent_daraja() -> Iterator[SilentDaraja]:
    with SilentDaraja() as running:
        yield running


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- helpers -----------------------------------------------------------------------------------


def callback_body(
    checkout_id: str,
    code: int | str = 0,
    *,
    amount: float = 500,
    receipt: str = "SFA1B2C3D4",
    desc: str | None = None,
) -> bytes:
    stk: dict[str, Any] = {
        "MerchantRequestID": "29115-34620561-1",
        "CheckoutRequestID": checkout_id,
        "ResultCode": code,
        "ResultDesc": desc or (PAID_DESC if str(code) == "0" else "Request cancelled by user"),
    }
    if str(code) == "0":
        stk["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": amount},
                {"Name": "MpesaReceiptNumber", "Value": receipt},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": 20250314102030},
                {"Name": "PhoneNumber", "Value": 254708374149},
            ]
        }
    return json.dumps({"Body": {"stkCallback": stk}}).encode()


def deliver(payments: Payments, body: bytes, *, trusted: bool = True) -> tuple[int, Applied]:
    """What the listener does with one POST: store the raw body, then act on it."""
    callback_id = payments.store_callback(body, DARAJA_ADDR, trusted=trusted)
    return callback_id, payments.process_callback(callback_id)


def id_of(payment: MpesaPayment) -> int:
    assert payment.id is not None
    return payment.id


def balance(db: Database, person_id: int | None) -> int:
    with db.read() as session:
        person = session.get(Person, person_id)
        assert person is not None
        return person.balance_cents


def payment_count(db: Database) -> int:
    with db.read() as session:
        return len(session.exec(select(MpesaPayment)).all())


def checkouts_of(db: Database, payment_id: int | None) -> list[MpesaCheckout]:
    with db.read() as session:
        return list(
            session.exec(
                select(MpesaCheckout)
                .where(MpesaCheckout.payment_id == payment_id)
                .order_by(col(MpesaCheckout.id))
            ).all()
        )


def callback_row(db: Database, callback_id: int) -> MpesaCallback:
    with db.read() as session:
        row = session.get(MpesaCallback, callback_id)
        assert row is not None
        return row


def settled_at_emulator(client: DarajaClient, *checkout_ids: str | None) -> None:
    """Wait until the emulator's query gives a final answer for every push."""
    for checkout_id in checkout_ids:
        assert checkout_id is not None
        wait_for(lambda c=checkout_id: not client.stk_query(c).processing, timeout=10)


def settle(payments: Payments, payment_id: int | None) -> MpesaPayment:
    """Settle a payment by query as soon as the emulator has an outcome for it."""
    assert payment_id is not None
    checkout_id = payments.get(payment_id).checkout_request_id
    assert checkout_id is not None
    wait_for(lambda: payments.settle_by_query(checkout_id) is not None, timeout=10)
    return payments.get(payment_id)


# -- request -----------------------------------------------------------------------------------


def test_request_records_the_push_as_sent_before_daraja_is_called(
    db: Database, emulator: DarajaEmulator, person_with_balance: Person
) -> None:
    seen_at_push: list[list[tuple[Any, ...]]] = []

    def look_at_the_table(method: str, path: str) -> None:
        if path == PUSH_PATH:
            with db.read() as session:  # what any other sfcrm would read now
                rows = session.exec(select(MpesaPayment)).all()
            seen_at_push.append(
                [(p.id, p.status, p.account_reference, p.amount, p.push_count,
                  p.checkout_request_id) for p in rows]
            )  # fmt: skip

    client = make_client(emulator.url, db, RecordingSession(before=look_at_the_table))
    payment = payments_with(db, client).request(str(person_with_balance.id), 500, "Deposit")

    pid = payment.id
    # the row exists and already says "this push may be on the phone": a command stopped now
    # leaves a payment the listener, reconcile and resend all act on
    assert seen_at_push == [[(pid, PaymentStatus.UNKNOWN, f"SF-{pid}", 500, 1, None)]]
    assert payment.status == PaymentStatus.PENDING
    assert payment.checkout_request_id
    assert payment.checkout_request_id.startswith("ws_CO_")
    assert payment.push_count == 1
    assert payment.account_reference == f"SF-{pid}"
    assert payment.last_pushed_at is not None
    assert [c.checkout_request_id for c in checkouts_of(db, pid)] == [payment.checkout_request_id]
    [sent] = emulator.pushes
    assert sent["AccountReference"] == f"SF-{pid}"
    assert sent["Amount"] == 500
    assert sent["PhoneNumber"] == SANDBOX_PHONE
    assert balance(db, person_with_balance.id) == START_BALANCE  # accepted is not paid


def test_request_uses_the_phone_given_instead_of_the_persons(
    payments: Payments, emulator: DarajaEmulator, person_with_balance: Person
) -> None:
    payment = payments.request("achieng@example.com", "1,000", "Crew uniform", phone="0712 345 678")
    assert payment.phone_number == "254712345678"
    assert payment.person_id == person_with_balance.id
    assert payment.amount == 1000
    assert emulator.pushes[0]["PhoneNumber"] == "254712345678"


@pytest.mark.parametrize(
    ("person_ref", "amount", "purpose", "phone", "error"),
    [
        ("1", 0, "Deposit", None, ValidationError),
        ("1", -1, "Deposit", None, ValidationError),
        ("1", "500.5", "Deposit", None, ValidationError),
        ("1", 250_001, "Deposit", None, ValidationError),
        ("1", "abc", "Deposit", None, ValidationError),
        ("1", 500, "Deposit", "255712345678", ValidationError),
        ("1", 500, "Deposit", "2547123", ValidationError),
        ("999", 500, "Deposit", None, NotFoundError),
        ("nobody@example.com", 500, "Deposit", None, NotFoundError),
        ("0799999999", 500, "Deposit", None, NotFoundError),
        ("1", 500, "", None, ValidationError),
        ("1", 500, "  \t ", None, ValidationError),
        ("1", 500, "x" * 201, None, ValidationError),
    ],
    ids=[
        "amount-0", "amount-negative", "amount-cents", "amount-over-limit", "amount-not-a-number",
        "phone-tanzanian", "phone-too-short", "person-unknown-id", "person-unknown-email",
        "person-unknown-phone", "purpose-empty", "purpose-blank", "purpose-too-long",
    ],
)  # fmt: skip
def test_bad_input_leaves_no_row_and_sends_no_request(
    payments: Payments,
    db: Database,
    http: RecordingSession,
    emulator: DarajaEmulator,
    person_with_balance: Person,
    person_ref: str,
    amount: Any,
    purpose: str,
    phone: str | None,
    error: type[Exception],
) -> None:
    assert person_with_balance.id == 1
    with pytest.raises(error):
        payments.request(person_ref, amount, purpose, phone=phone)
    assert payment_count(db) == 0
    assert http.calls == []
    assert emulator.pushes == []
    assert emulator.token_requests == 0


def test_purpose_loses_invisible_format_and_control_characters(
    payments: Payments, emulator: DarajaEmulator, person_with_balance: Person
) -> None:
    # a right-to-left override, a zero-width space, a soft hyphen, an escape sequence, a newline
    typed = "Crew\u202e deposit\u200b\u00ad \x1b[2Jfor\nMombasa"
    payment = payments.request("1", 500, typed)
    assert payment.payment_purpose == "Crew deposit [2Jfor Mombasa"
    assert emulator.pushes[0]["TransactionDesc"].isprintable()


@pytest.mark.parametrize("typed", ["\u200b\u200b", "\u202e \u2066", "\x1b\n"])
def test_purpose_of_only_invisible_characters_is_refused(
    payments: Payments, db: Database, person_with_balance: Person, typed: str
) -> None:
    with pytest.raises(ValidationError, match="purpose must not be empty"):
        payments.request("1", 500, typed)
    assert payment_count(db) == 0


def test_missing_daraja_credentials_leave_no_row(
    db: Database, emulator: DarajaEmulator, person_with_balance: Person
) -> None:
    settings = load_settings(environ={"MPESA_CALLBACK_URL": "https://example.com/cb/x"})
    payments = Payments(
        db, callback_url="https://example.com/cb/x", clock=utcnow,
        client_factory=lambda: build_daraja_client(settings, db, utcnow),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="MPESA_CONSUMER_KEY"):
        payments.request("1", 500, "Deposit")
    assert payment_count(db) == 0
    assert emulator.token_requests == 0


def test_missing_callback_url_leaves_no_row(
    db: Database, daraja_client: DarajaClient, http: RecordingSession, person_with_balance: Person
) -> None:
    payments = Payments(db, callback_url=None, clock=utcnow, client_factory=lambda: daraja_client)
    with pytest.raises(ConfigError, match="MPESA_CALLBACK_URL"):
        payments.request("1", 500, "Deposit")
    assert payment_count(db) == 0
    assert http.calls == []


def test_refused_push_marks_the_payment_failed_with_darajas_reason(
    payments: Payments, db: Database, emulator: DarajaEmulator, person_with_balance: Person
) -> None:
    with pytest.raises(DarajaBusyError, match="Unable to lock subscriber"):
        payments.request("1", 500, "Deposit", phone=LOCKED_PHONE)
    [payment] = payments.find()
    assert payment.status == PaymentStatus.FAILED
    assert payment.result_desc is not None and "Unable to lock subscriber" in payment.result_desc
    assert payment.result_code == "500.001.1001"
    assert payment.checkout_request_id is None
    assert payment.push_count == 0
    assert checkouts_of(db, payment.id) == []
    assert balance(db, person_with_balance.id) == START_BALANCE


def test_unreachable_daraja_marks_the_payment_failed(
    db: Database, person_with_balance: Person
) -> None:
    client = make_client(f"http://127.0.0.1:{closed_port()}", db, requests.Session())
    payments = payments_with(db, client)
    with pytest.raises(DarajaUnreachableError):
        payments.request("1", 500, "Deposit")
    [payment] = payments.find()
    assert payment.status == PaymentStatus.FAILED
    assert payment.result_desc == "Daraja could not be reached"
    assert payment.push_count == 0


def test_push_without_an_answer_in_time_is_unknown_and_never_pushed_again(
    db: Database,
    silent_daraja: SilentDaraja,
    emulator: DarajaEmulator,
    payments: Payments,
    person_with_balance: Person,
) -> None:
    client = make_client(silent_daraja.url, db, requests.Session(), timeout=QUICK_TIMEOUT)
    silent = payments_with(db, client)
    with pytest.raises(DarajaTimeoutError):
        silent.request("1", 500, "Deposit")
    [payment] = silent.find()
    assert payment.status == PaymentStatus.UNKNOWN
    assert payment.push_count == 1
    assert payment.checkout_request_id is None
    assert silent_daraja.pushes() == 1

    report = silent.reconcile(older_than=timedelta(0))
    assert report.unqueryable == [payment.id]
    with pytest.raises(ConflictError, match="unknown outcome"):
        silent.resend(id_of(payment))
    assert silent_daraja.pushes() == 1
    assert silent.get(id_of(payment)).status == PaymentStatus.UNKNOWN
    assert balance(db, person_with_balance.id) == START_BALANCE

    # Minutes later, the operator checked the statement: --force pushes again, here to a
    # Daraja that answers. (Right after the push, the prompt could still be on the phone.)
    with pytest.raises(ConflictError, match="was sent 0 s ago"):
        payments.resend(id_of(payment), force=True)
    push_was_sent_minutes_ago(db, id_of(payment))
    report_forced = payments.resend(id_of(payment), force=True)
    assert report_forced.pushed
    assert report_forced.payment.status == PaymentStatus.PENDING
    assert report_forced.payment.push_count == 2
    assert len(emulator.pushes) == 1


def test_token_fetch_without_an_answer_fails_the_payment_as_never_pushed(
    db: Database, person_with_balance: Person
) -> None:
    with SilentDaraja(hold_token=True) as silent_daraja:
        client = make_client(silent_daraja.url, db, requests.Session(), timeout=QUICK_TIMEOUT)
        payments = payments_with(db, client)
        with pytest.raises(DarajaTimeoutError):
            payments.request("1", 500, "Deposit")
        assert silent_daraja.pushes() == 0
    [payment] = payments.find()
    # No push left this machine, so the prompt cannot be on the phone: not "unknown".
    assert payment.status == PaymentStatus.FAILED
    assert payment.push_count == 0


# -- apply_result ------------------------------------------------------------------------------


def add_payment(db: Database, person: Person, *checkout_ids: str, amount: int = 500) -> int:
    """A pending payment pushed once per checkout id; the last one is its current push."""
    now = utcnow()
    with db.write() as session:
        payment = MpesaPayment(
            person_id=person.id or 0,
            phone_number=person.phone,
            amount=amount,
            payment_purpose="Deposit",
            status=PaymentStatus.PENDING,
            initiated_at=now,
            checkout_request_id=checkout_ids[-1],
            merchant_request_id=f"m-{checkout_ids[-1]}",
            push_count=len(checkout_ids),
            last_pushed_at=now,
        )
        session.add(payment)
        session.flush()
        assert payment.id is not None
        payment.account_reference = f"SF-{payment.id}"
        for checkout_id in checkout_ids:
            session.add(
                MpesaCheckout(
                    payment_id=payment.id,
                    checkout_request_id=checkout_id,
                    merchant_request_id=f"m-{checkout_id}",
                    pushed_at=now,
                )
            )
        return payment.id


def paid(checkout_id: str, amount: str = "500", receipt: str = "SFA1B2C3D4") -> StkResult:
    return StkResult(
        checkout_request_id=checkout_id,
        result_code="0",
        result_desc=PAID_DESC,
        amount=Decimal(amount),
        receipt_number=receipt,
    )


def failed(checkout_id: str, code: str = "1032") -> StkResult:
    return StkResult(checkout_request_id=checkout_id, result_code=code, result_desc="Cancelled")


def apply(
    db: Database, result: StkResult, *, source: str = "callback", trusted: bool = True
) -> Applied:
    with db.write() as session:
        return apply_result(session, result, source=source, trusted=trusted, now=utcnow())


def get_payment(db: Database, payment_id: int) -> MpesaPayment:
    with db.read() as session:
        payment = session.get(MpesaPayment, payment_id)
        assert payment is not None
        return payment


@pytest.mark.parametrize("source", ["callback", "query"])
def test_success_reduces_the_balance_once(
    db: Database, person_with_balance: Person, source: str
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A")
    first = apply(db, paid("ws_CO_A"), source=source)
    assert first == Applied(CallbackOutcome.APPLIED, PaymentStatus.COMPLETED, pid)
    payment = get_payment(db, pid)
    assert payment.status == PaymentStatus.COMPLETED
    assert payment.balance_applied
    assert payment.receipt_number == "SFA1B2C3D4"
    assert payment.completed_at is not None
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


@pytest.mark.parametrize("source", ["callback", "query"])
def test_second_identical_success_is_a_duplicate_and_changes_nothing(
    db: Database, person_with_balance: Person, source: str
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A")
    apply(db, paid("ws_CO_A"))
    again = apply(db, paid("ws_CO_A"), source=source)
    assert again.outcome == CallbackOutcome.DUPLICATE
    assert again.payment_id == pid
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00
    assert get_payment(db, pid).status == PaymentStatus.COMPLETED


@pytest.mark.parametrize("source", ["callback", "query"])
def test_failure_after_success_leaves_the_payment_completed(
    db: Database, person_with_balance: Person, source: str
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A")
    apply(db, paid("ws_CO_A"))
    late = apply(db, failed("ws_CO_A"), source=source)
    assert late.outcome == CallbackOutcome.IGNORED
    payment = get_payment(db, pid)
    assert payment.status == PaymentStatus.COMPLETED
    assert payment.result_code == "0"
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


def test_failure_of_an_older_push_after_success_leaves_the_payment_completed(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A", "ws_CO_B")
    apply(db, paid("ws_CO_B"))
    assert apply(db, failed("ws_CO_A")).outcome == CallbackOutcome.IGNORED
    assert get_payment(db, pid).status == PaymentStatus.COMPLETED


def test_success_after_a_recorded_failure_needs_a_query_when_it_comes_by_callback(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A")
    assert apply(db, failed("ws_CO_A")).outcome == CallbackOutcome.APPLIED
    assert get_payment(db, pid).status == PaymentStatus.CANCELLED
    contradicting = apply(db, paid("ws_CO_A"), source="callback", trusted=True)
    assert contradicting.outcome == CallbackOutcome.NEEDS_QUERY
    payment = get_payment(db, pid)
    assert payment.status == PaymentStatus.CANCELLED
    assert not payment.balance_applied
    assert balance(db, person_with_balance.id) == START_BALANCE


def test_success_after_a_recorded_failure_completes_when_the_query_says_paid(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A")
    apply(db, failed("ws_CO_A", "1037"))
    assert get_payment(db, pid).status == PaymentStatus.FAILED
    confirmed = apply(db, paid("ws_CO_A"), source="query")
    assert confirmed.outcome == CallbackOutcome.APPLIED
    assert get_payment(db, pid).status == PaymentStatus.COMPLETED
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00
    assert checkouts_of(db, pid)[0].result_source == "query"


def test_untrusted_success_changes_nothing_until_a_query_confirms_it(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A")
    assert apply(db, paid("ws_CO_A"), trusted=False).outcome == CallbackOutcome.NEEDS_QUERY
    assert get_payment(db, pid).status == PaymentStatus.PENDING
    assert checkouts_of(db, pid)[0].result_code is None
    assert balance(db, person_with_balance.id) == START_BALANCE


def test_two_paid_pushes_of_one_payment_reduce_once_and_mark_a_refund(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A", "ws_CO_B")
    assert apply(db, paid("ws_CO_A", receipt="SFAAAAAAA1")).outcome == CallbackOutcome.APPLIED
    second = apply(db, paid("ws_CO_B", receipt="SFBBBBBBB2"))
    assert second.outcome == CallbackOutcome.REFUND == "refund_due"
    payment = get_payment(db, pid)
    assert payment.refund_due
    assert payment.status == PaymentStatus.COMPLETED
    assert payment.receipt_number == "SFAAAAAAA1"
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00
    # Both receipts are kept, one per push, for the refund.
    assert [c.receipt_number for c in checkouts_of(db, pid)] == ["SFAAAAAAA1", "SFBBBBBBB2"]


def test_amount_mismatch_needs_review_and_no_later_success_reduces_the_balance(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A", "ws_CO_B")
    review = apply(db, paid("ws_CO_B", amount="5.00"))
    assert review.outcome == CallbackOutcome.REVIEW
    payment = get_payment(db, pid)
    assert payment.status == PaymentStatus.NEEDS_REVIEW
    assert not payment.balance_applied
    assert balance(db, person_with_balance.id) == START_BALANCE

    assert apply(db, paid("ws_CO_B", amount="500.00")).outcome == CallbackOutcome.DUPLICATE
    assert apply(db, paid("ws_CO_B"), source="query").outcome == CallbackOutcome.DUPLICATE
    assert apply(db, paid("ws_CO_A", receipt="SFOTHER001")).outcome == CallbackOutcome.REFUND
    assert get_payment(db, pid).status == PaymentStatus.NEEDS_REVIEW
    assert balance(db, person_with_balance.id) == START_BALANCE


def test_a_paid_of_another_push_with_the_receipt_already_recorded_is_no_second_payment(
    db: Database, person_with_balance: Person
) -> None:
    # One M-Pesa receipt is one transaction: the same receipt on another push of the payment
    # (a payment resolved by hand on its receipt, then its push's callback) is not paid twice.
    pid = add_payment(db, person_with_balance, "ws_CO_A", "ws_CO_B")
    assert apply(db, paid("ws_CO_B", receipt="SFSAME0001")).outcome == CallbackOutcome.APPLIED
    again = apply(db, paid("ws_CO_A", receipt="SFSAME0001"))
    assert again.outcome == CallbackOutcome.DUPLICATE
    assert not get_payment(db, pid).refund_due
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


def test_amount_written_with_decimals_is_not_a_mismatch(
    db: Database, person_with_balance: Person
) -> None:
    add_payment(db, person_with_balance, "ws_CO_A")
    assert apply(db, paid("ws_CO_A", amount="500.00")).outcome == CallbackOutcome.APPLIED


def test_unknown_checkout_is_unmatched(db: Database, person_with_balance: Person) -> None:
    add_payment(db, person_with_balance, "ws_CO_A")
    assert apply(db, paid("ws_CO_NOBODY")) == Applied(
        CallbackOutcome.UNMATCHED, "no payment has this CheckoutRequestID"
    )
    assert balance(db, person_with_balance.id) == START_BALANCE


def test_failure_of_a_superseded_push_leaves_the_payment_pending(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A", "ws_CO_B")
    old = apply(db, failed("ws_CO_A"))
    assert old.outcome == CallbackOutcome.IGNORED
    payment = get_payment(db, pid)
    assert payment.status == PaymentStatus.PENDING
    assert payment.checkout_request_id == "ws_CO_B"
    assert payment.result_code is None
    assert checkouts_of(db, pid)[0].result_code == "1032"  # kept on its own push


def test_late_success_of_a_superseded_push_completes_the_payment(
    db: Database, person_with_balance: Person
) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A", "ws_CO_B")
    assert apply(db, paid("ws_CO_A")).outcome == CallbackOutcome.APPLIED
    payment = get_payment(db, pid)
    assert payment.status == PaymentStatus.COMPLETED
    assert payment.checkout_request_id == "ws_CO_A"
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


def test_still_processing_changes_nothing(db: Database, person_with_balance: Person) -> None:
    pid = add_payment(db, person_with_balance, "ws_CO_A")
    assert apply(db, failed("ws_CO_A", "4999"), source="query").outcome == CallbackOutcome.IGNORED
    assert checkouts_of(db, pid)[0].result_code is None
    assert get_payment(db, pid).status == PaymentStatus.PENDING


# -- callbacks through the inbox ---------------------------------------------------------------


def test_callback_that_beats_the_push_answer_is_applied_once_when_the_answer_is_stored(
    payments: Payments,
    daraja_client: DarajaClient,
    db: Database,
    person_with_balance: Person,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    early: list[tuple[int, Applied]] = []
    real_push = daraja_client.stk_push

    def push_whose_callback_arrives_first(**kwargs: Any) -> Any:
        accepted = real_push(**kwargs)
        body = callback_body(accepted.checkout_request_id, receipt="SFEARLY001")
        early.append(deliver(payments, body))
        return accepted

    monkeypatch.setattr(daraja_client, "stk_push", push_whose_callback_arrives_first)
    payment = payments.request("1", 500, "Deposit")

    [(callback_id, on_arrival)] = early
    # the push is on its way: the callback is matched by phone and amount, to be confirmed
    assert (on_arrival.outcome, on_arrival.payment_id) == (
        CallbackOutcome.NEEDS_QUERY,
        payment.id,
    )
    assert payment.status == PaymentStatus.COMPLETED  # already when request() returns
    assert payment.receipt_number == "SFEARLY001"
    assert payment.push_count == 1
    row = callback_row(db, callback_id)
    assert (row.outcome, row.payment_id) == (CallbackOutcome.APPLIED, payment.id)
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00

    assert payments.replay_callbacks() == 0
    payments.reconcile(older_than=timedelta(0))
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


def test_callback_that_is_not_from_daraja_is_rejected_and_kept(
    payments: Payments, db: Database
) -> None:
    callback_id, applied = deliver(payments, b'{"hello": "world"}')
    assert applied.outcome == CallbackOutcome.REJECTED
    row = callback_row(db, callback_id)
    assert row.body == b'{"hello": "world"}'
    assert row.outcome == CallbackOutcome.REJECTED


@pytest.mark.parametrize(
    "emulator_settings", [EmulatorSettings(callback_delay=0.05, send_callbacks=True)]
)
def test_payment_completes_by_darajas_own_callback_through_the_listener(
    payments: Payments,
    listener: Listener,
    emulator: DarajaEmulator,
    db: Database,
    person_with_balance: Person,
) -> None:
    payment = payments.request("1", 500, "Deposit")
    done = wait_for(lambda: payments.get(id_of(payment)).status == PaymentStatus.COMPLETED)
    assert done
    wait_for(lambda: len(emulator.callbacks_sent) == 1)
    [row] = payments.callbacks()
    assert (row.outcome, row.payment_id) == (CallbackOutcome.APPLIED, payment.id)
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00
    # Daraja sends it again: nothing more happens.
    again = listener.post(emulator.callbacks_sent[0])
    assert again.status_code == 200
    assert payments.callbacks()[0].outcome == CallbackOutcome.DUPLICATE
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


# -- resend ------------------------------------------------------------------------------------


def test_resend_refuses_a_completed_payment_without_calling_daraja(
    payments: Payments,
    http: RecordingSession,
    emulator: DarajaEmulator,
    db: Database,
    person_with_balance: Person,
) -> None:
    payment = payments.request("1", 500, "Deposit")
    deliver(payments, callback_body(payment.checkout_request_id or ""))
    assert payments.get(id_of(payment)).status == PaymentStatus.COMPLETED
    http.calls.clear()
    with pytest.raises(ConflictError, match="completed"):
        payments.resend(id_of(payment))
    with pytest.raises(ConflictError, match="completed"):
        payments.resend(id_of(payment), force=True)
    assert http.calls == []
    assert len(emulator.pushes) == 1
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


def test_resend_refuses_a_payment_in_review(
    payments: Payments,
    http: RecordingSession,
    emulator: DarajaEmulator,
    person_with_balance: Person,
) -> None:
    payment = payments.request("1", 500, "Deposit")
    deliver(payments, callback_body(payment.checkout_request_id or "", amount=50))
    http.calls.clear()
    with pytest.raises(ConflictError, match="needs_review"):
        payments.resend(id_of(payment))
    assert http.calls == []
    assert len(emulator.pushes) == 1


@pytest.mark.parametrize(
    "emulator_settings",
    [slow_emulator(), slow_emulator(pending_as_4999=True)],
    ids=["pending-as-500", "pending-as-4999"],
)
def test_resend_refuses_a_push_still_processing_on_the_phone(
    payments: Payments,
    http: RecordingSession,
    emulator: DarajaEmulator,
    person_with_balance: Person,
) -> None:
    payment = payments.request("1", 500, "Deposit")
    http.calls.clear()
    with pytest.raises(ConflictError, match="still being processed"):
        payments.resend(id_of(payment))
    assert http.paths() == [QUERY_PATH]  # it asked, and did not push
    assert len(emulator.pushes) == 1
    after = payments.get(id_of(payment))
    assert (after.status, after.push_count) == (PaymentStatus.PENDING, 1)
    assert after.resend_claimed_until is None


@pytest.mark.parametrize(
    ("phone", "status"),
    [(CANCELLING_PHONE, PaymentStatus.CANCELLED), (BROKE_PHONE, PaymentStatus.FAILED)],
)
def test_resend_pushes_again_after_a_failed_or_cancelled_push(
    payments: Payments,
    daraja_client: DarajaClient,
    emulator: DarajaEmulator,
    db: Database,
    person_with_balance: Person,
    phone: str,
    status: str,
) -> None:
    first = payments.request("1", 500, "Deposit", phone=phone)
    assert settle(payments, first.id).status == status
    old_checkout = first.checkout_request_id
    assert old_checkout is not None

    report = payments.resend(id_of(first))
    assert report.pushed
    again = report.payment
    assert again.status == PaymentStatus.PENDING
    assert again.push_count == 2
    assert again.checkout_request_id not in (None, old_checkout)
    assert len(emulator.pushes) == 2
    assert [c.checkout_request_id for c in checkouts_of(db, first.id)] == [
        old_checkout,
        again.checkout_request_id,
    ]

    # The first push's own callback arrives late: matched to it, and the new push is untouched.
    code = 1032 if status == PaymentStatus.CANCELLED else 1
    callback_id, late = deliver(payments, callback_body(old_checkout, code))
    assert late.outcome == CallbackOutcome.DUPLICATE
    assert callback_row(db, callback_id).payment_id == first.id
    assert callback_row(db, callback_id).checkout_request_id == old_checkout
    current = payments.get(id_of(first))
    assert current.status == PaymentStatus.PENDING
    assert current.checkout_request_id == again.checkout_request_id


def test_resend_of_a_pending_payment_that_was_paid_settles_it_instead_of_pushing(
    payments: Payments,
    daraja_client: DarajaClient,
    http: RecordingSession,
    emulator: DarajaEmulator,
    db: Database,
    person_with_balance: Person,
) -> None:
    payment = payments.request("1", 500, "Deposit")
    settled_at_emulator(daraja_client, payment.checkout_request_id)
    assert payments.get(id_of(payment)).status == PaymentStatus.PENDING

    report = payments.resend(id_of(payment))
    assert not report.pushed
    assert report.payment.status == PaymentStatus.COMPLETED
    assert report.payment.push_count == 1
    assert len(emulator.pushes) == 1
    assert http.paths().count(PUSH_PATH) == 1
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


@pytest.mark.parametrize("emulator_settings", [slow_emulator()])
def test_ten_resends_at_once_send_exactly_one_push(
    payments: Payments, emulator: DarajaEmulator, person_with_balance: Person
) -> None:
    payment = payments.request("1", 500, "Deposit")
    deliver(payments, callback_body(payment.checkout_request_id or "", 1032))
    assert payments.get(id_of(payment)).status == PaymentStatus.CANCELLED

    start = threading.Barrier(10)
    outcomes: list[PushReport | Exception] = []

    def resend() -> None:
        start.wait()
        try:
            outcomes.append(payments.resend(id_of(payment)))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=resend) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    pushed = [o for o in outcomes if isinstance(o, PushReport) and o.pushed]
    refused = [o for o in outcomes if isinstance(o, ConflictError)]
    assert len(outcomes) == 10
    assert (len(pushed), len(refused)) == (1, 9), outcomes
    assert len(emulator.pushes) == 2
    after = payments.get(id_of(payment))
    assert after.push_count == 2
    assert after.resend_claimed_until is None


def test_resend_refuses_a_payment_whose_second_push_got_no_answer(
    payments: Payments,
    db: Database,
    emulator: DarajaEmulator,
    silent_daraja: SilentDaraja,
    person_with_balance: Person,
) -> None:
    first = payments.request("1", 500, "Deposit", phone=CANCELLING_PHONE)
    assert settle(payments, first.id).status == PaymentStatus.CANCELLED

    silent = payments_with(
        db, make_client(silent_daraja.url, db, requests.Session(), timeout=QUICK_TIMEOUT)
    )
    with pytest.raises(DarajaTimeoutError):
        silent.resend(id_of(first))
    after = payments.get(id_of(first))
    assert (after.status, after.push_count) == (PaymentStatus.UNKNOWN, 2)

    # The second prompt may be on the phone: no push without --force, whoever asks.
    with pytest.raises(ConflictError, match="unknown outcome"):
        payments.resend(id_of(first))
    payments.reconcile(older_than=timedelta(0))
    assert len(emulator.pushes) == 1
    assert silent_daraja.pushes() == 1
    assert payments.get(id_of(first)).status == PaymentStatus.UNKNOWN


def test_resend_of_unknown_payment_is_refused(payments: Payments) -> None:
    with pytest.raises(NotFoundError):
        payments.resend(42)


# -- reconcile ---------------------------------------------------------------------------------


@pytest.fixture
def five_people(people: People) -> list[Person]:
    return [people.add(f"Crew {n}", f"071100000{n}", None, "1000") for n in range(1, 6)]


def test_reconcile_settles_payments_whose_callbacks_never_came(
    payments: Payments,
    listener: Listener,
    daraja_client: DarajaClient,
    emulator: DarajaEmulator,
    db: Database,
    five_people: list[Person],
) -> None:
    requested = [payments.request(str(p.id), 200, "Crew levy") for p in five_people]
    settled_at_emulator(daraja_client, *(p.checkout_request_id for p in requested))
    assert all(payments.get(id_of(p)).status == PaymentStatus.PENDING for p in requested)

    report = payments.reconcile(older_than=timedelta(0))
    assert report.checked == 5
    assert sorted(map(id_of, report.settled)) == sorted(map(id_of, requested))
    assert report.still_pending == report.unqueryable == []
    assert report.errors == []
    for payment in requested:
        assert payments.get(id_of(payment)).status == PaymentStatus.COMPLETED
        assert checkouts_of(db, payment.id)[0].result_source == "query"
    assert [balance(db, p.id) for p in five_people] == [100_000 - 200_00] * 5
    assert len(emulator.pushes) == 5  # reconcile never pushes

    # The lost callbacks turn up after all: each is a duplicate.
    for payment in requested:
        answer = listener.post(callback_body(payment.checkout_request_id or "", amount=200))
        assert answer.status_code == 200
    outcomes = [row.outcome for row in payments.callbacks()]
    assert outcomes == [CallbackOutcome.DUPLICATE] * 5
    assert [balance(db, p.id) for p in five_people] == [100_000 - 200_00] * 5

    second = payments.reconcile(older_than=timedelta(0))
    assert (second.checked, second.settled, second.callbacks_applied) == (0, [], 0)
    assert [balance(db, p.id) for p in five_people] == [100_000 - 200_00] * 5
    assert len(emulator.pushes) == 5


def test_reconcile_leaves_young_and_still_processing_payments_alone(
    payments: Payments, daraja_client: DarajaClient, person_with_balance: Person
) -> None:
    payment = payments.request("1", 500, "Deposit")
    young = payments.reconcile()  # the default waits two minutes before querying
    assert young.checked == 0
    settled_at_emulator(daraja_client, payment.checkout_request_id)
    assert payments.get(id_of(payment)).status == PaymentStatus.PENDING


@pytest.mark.parametrize("emulator_settings", [slow_emulator()])
def test_reconcile_reports_a_push_still_processing_as_pending(
    payments: Payments, person_with_balance: Person
) -> None:
    payment = payments.request("1", 500, "Deposit")
    report = payments.reconcile(older_than=timedelta(0))
    assert (report.checked, report.still_pending, report.settled) == (1, [payment.id], [])


def test_reconcile_confirms_an_untrusted_paid_callback_by_query(
    payments: Payments,
    daraja_client: DarajaClient,
    emulator: DarajaEmulator,
    db: Database,
    person_with_balance: Person,
) -> None:
    payment = payments.request("1", 500, "Deposit")
    settled_at_emulator(daraja_client, payment.checkout_request_id)
    body = callback_body(payment.checkout_request_id or "", receipt="SFCONFIRM1")
    callback_id, applied = deliver(payments, body, trusted=False)
    assert applied.outcome == CallbackOutcome.NEEDS_QUERY
    assert balance(db, person_with_balance.id) == START_BALANCE

    report = payments.reconcile(older_than=timedelta(hours=1))  # no payment is old enough
    assert report.checked == 0
    assert report.callbacks_applied == 1
    row = callback_row(db, callback_id)
    assert row.outcome == CallbackOutcome.APPLIED
    assert row.detail is not None and row.detail.startswith("confirmed by query")
    after = payments.get(id_of(payment))
    assert after.status == PaymentStatus.COMPLETED
    assert after.receipt_number == "SFCONFIRM1"  # the query has none; the callback's is kept
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00

    again = payments.reconcile(older_than=timedelta(0))
    assert (again.checked, again.callbacks_applied) == (0, 0)
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


def test_reconcile_does_not_believe_a_forged_paid_callback(
    payments: Payments, daraja_client: DarajaClient, db: Database, person_with_balance: Person
) -> None:
    payment = payments.request("1", 500, "Deposit", phone=CANCELLING_PHONE)
    settled_at_emulator(daraja_client, payment.checkout_request_id)
    forged = callback_body(payment.checkout_request_id or "", receipt="SFFORGED01")
    callback_id, applied = deliver(payments, forged, trusted=False)
    assert applied.outcome == CallbackOutcome.NEEDS_QUERY

    payments.reconcile(older_than=timedelta(hours=1))
    assert callback_row(db, callback_id).outcome == CallbackOutcome.IGNORED
    after = payments.get(id_of(payment))
    assert after.status == PaymentStatus.CANCELLED
    assert after.receipt_number is None
    assert balance(db, person_with_balance.id) == START_BALANCE


def test_reconcile_confirms_a_paid_callback_that_contradicts_a_recorded_failure(
    payments: Payments, daraja_client: DarajaClient, db: Database, person_with_balance: Person
) -> None:
    payment = payments.request("1", 500, "Deposit")
    checkout_id = payment.checkout_request_id or ""
    deliver(payments, callback_body(checkout_id, 1037, desc="DS timeout"))
    assert payments.get(id_of(payment)).status == PaymentStatus.FAILED
    callback_id, applied = deliver(payments, callback_body(checkout_id))
    assert applied.outcome == CallbackOutcome.NEEDS_QUERY
    settled_at_emulator(daraja_client, checkout_id)  # the emulator's truth: paid

    report = payments.reconcile(older_than=timedelta(hours=1))
    assert report.callbacks_applied == 1
    assert callback_row(db, callback_id).outcome == CallbackOutcome.APPLIED
    assert payments.get(id_of(payment)).status == PaymentStatus.COMPLETED
    assert balance(db, person_with_balance.id) == START_BALANCE - 500_00


# -- a push whose answer was lost --------------------------------------------------------------


def push_was_sent_minutes_ago(db: Database, payment_id: int, minutes: int = 3) -> None:
    with db.write() as session:
        payment = session.get(MpesaPayment, payment_id)
        assert payment is not None and payment.last_pushed_at is not None
        payment.last_pushed_at -= timedelta(minutes=minutes)
        payment.initiated_at -= timedelta(minutes=minutes)
        session.add(payment)


def lose_push_answer(db: Database, payment_id: int) -> str:
    """Make a pushed payment look as if Daraja's answer never arrived; returns its checkout."""
    with db.write() as session:
        payment = session.get(MpesaPayment, payment_id)
        assert payment is not None and payment.checkout_request_id is not None
        checkout_id = payment.checkout_request_id
        for row in session.exec(
            select(MpesaCheckout).where(MpesaCheckout.payment_id == payment_id)
        ).all():
            session.delete(row)
        payment.checkout_request_id = None
        payment.merchant_request_id = None
        payment.status = PaymentStatus.UNKNOWN
        session.add(payment)
    return checkout_id


def test_late_callback_of_a_push_without_answer_settles_it_once_a_query_confirms(
    payments: Payments, db: Database, daraja_client: DarajaClient, person_with_balance: Person
) -> None:
    pushed = payments.request("1", 500, "Deposit")
    checkout_id = lose_push_answer(db, id_of(pushed))
    settled_at_emulator(daraja_client, checkout_id)

    callback_id, applied = deliver(payments, callback_body(checkout_id))
    assert applied.outcome == CallbackOutcome.NEEDS_QUERY  # matched by phone and amount only
    assert balance(db, person_with_balance.id) == START_BALANCE
    # nothing is written before the query: a forged callback could not take the payment over
    assert payments.get(id_of(pushed)).status == PaymentStatus.UNKNOWN
    assert checkouts_of(db, pushed.id) == []

    report = payments.reconcile(older_than=timedelta(0))
    assert [p.status for p in report.settled] == [PaymentStatus.COMPLETED]
    assert payments.get(id_of(pushed)).checkout_request_id == checkout_id
    assert callback_row(db, callback_id).outcome == CallbackOutcome.APPLIED
    assert balance(db, person_with_balance.id) == START_BALANCE - 500 * 100
    # the same callback again changes nothing
    assert deliver(payments, callback_body(checkout_id))[1].outcome == CallbackOutcome.DUPLICATE
    assert balance(db, person_with_balance.id) == START_BALANCE - 500 * 100


def test_late_callbacks_matching_two_unanswered_pushes_settle_them_oldest_first(
    payments: Payments, db: Database, daraja_client: DarajaClient, person_with_balance: Person
) -> None:
    first = payments.request("1", 500, "Deposit")
    second = payments.request("1", 500, "Deposit again")
    second_checkout = lose_push_answer(db, id_of(second))
    first_checkout = lose_push_answer(db, id_of(first))
    settled_at_emulator(daraja_client, first_checkout, second_checkout)

    # the second push's callback comes first: it still settles the oldest payment
    callback_id, applied = deliver(payments, callback_body(second_checkout, receipt="SFSECOND01"))
    assert (applied.outcome, applied.payment_id) == (CallbackOutcome.NEEDS_QUERY, first.id)
    assert balance(db, person_with_balance.id) == START_BALANCE  # not before the query
    assert payments.confirm_callback(callback_id).outcome == CallbackOutcome.APPLIED
    other_id, _ = deliver(payments, callback_body(first_checkout, receipt="SFFIRST001"))
    assert payments.confirm_callback(other_id).outcome == CallbackOutcome.APPLIED

    oldest, newest = payments.get(id_of(first)), payments.get(id_of(second))
    assert (oldest.status, oldest.receipt_number) == (PaymentStatus.COMPLETED, "SFSECOND01")
    assert (newest.status, newest.receipt_number) == (PaymentStatus.COMPLETED, "SFFIRST001")
    assert oldest.result_desc is not None and "oldest of 2" in oldest.result_desc
    assert balance(db, person_with_balance.id) == START_BALANCE - 2 * 500_00


def test_late_callback_with_another_amount_is_not_taken_by_an_unanswered_push(
    payments: Payments, db: Database, person_with_balance: Person
) -> None:
    pushed = payments.request("1", 500, "Deposit")
    checkout_id = lose_push_answer(db, id_of(pushed))
    _, applied = deliver(payments, callback_body(checkout_id, amount=499))
    assert applied.outcome == CallbackOutcome.UNMATCHED
    assert payments.get(id_of(pushed)).status == PaymentStatus.UNKNOWN


def test_a_forged_paid_for_a_push_without_answer_leaves_the_payment_to_its_real_callback(
    payments: Payments, db: Database, daraja_client: DarajaClient, person_with_balance: Person
) -> None:
    pushed = payments.request("1", 500, "Deposit")
    real = lose_push_answer(db, id_of(pushed))
    settled_at_emulator(daraja_client, real)
    _, forged = deliver(payments, callback_body("ws_CO_FORGED"), trusted=False)
    assert forged.outcome == CallbackOutcome.NEEDS_QUERY
    assert payments.get(id_of(pushed)).checkout_request_id is None
    # the real callback still finds the payment, and the query confirms it
    real_id, applied = deliver(payments, callback_body(real))
    assert applied.outcome == CallbackOutcome.NEEDS_QUERY
    assert payments.confirm_callback(real_id).outcome == CallbackOutcome.APPLIED
    assert payments.get(id_of(pushed)).status == PaymentStatus.COMPLETED
    assert balance(db, person_with_balance.id) == START_BALANCE - 500 * 100


def test_a_push_answered_after_an_earlier_push_was_paid_keeps_the_payment_completed(
    payments: Payments,
    db: Database,
    daraja_client: DarajaClient,
    person_with_balance: Person,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = payments.request("1", 500, "Deposit")
    assert first.checkout_request_id is not None
    apply(db, failed(first.checkout_request_id, "1037"))
    original_push = daraja_client.stk_push

    def push_while_the_first_is_confirmed_paid(**kwargs: Any) -> Any:
        assert first.checkout_request_id is not None
        apply(db, paid(first.checkout_request_id), source="query")  # lands mid-push
        return original_push(**kwargs)

    monkeypatch.setattr(daraja_client, "stk_push", push_while_the_first_is_confirmed_paid)
    report = payments.resend(id_of(first))
    assert report.pushed
    after = payments.get(id_of(first))
    assert after.status == PaymentStatus.COMPLETED
    assert after.checkout_request_id == first.checkout_request_id
    assert len(checkouts_of(db, first.id)) == 2  # the second push is still on record
    assert balance(db, person_with_balance.id) == START_BALANCE - 500 * 100


def test_refresh_keeps_the_receipt_of_a_paid_callback_waiting_for_its_query(
    payments: Payments, db: Database, daraja_client: DarajaClient, person_with_balance: Person
) -> None:
    pushed = payments.request("1", 500, "Deposit")
    assert pushed.checkout_request_id is not None
    settled_at_emulator(daraja_client, pushed.checkout_request_id)
    callback_id, applied = deliver(
        payments, callback_body(pushed.checkout_request_id, receipt="SFWAIT0001"), trusted=False
    )
    assert applied.outcome == CallbackOutcome.NEEDS_QUERY

    assert payments.refresh([id_of(pushed)]) == []

    after = payments.get(id_of(pushed))
    assert (after.status, after.receipt_number) == (PaymentStatus.COMPLETED, "SFWAIT0001")
    assert callback_row(db, callback_id).outcome == CallbackOutcome.APPLIED
    assert balance(db, person_with_balance.id) == START_BALANCE - 500 * 100
