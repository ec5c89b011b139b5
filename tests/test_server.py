"""The callback listener: CallbackApp called directly as WSGI, and over a real socket (waitress).

The emulator withholds its own callbacks here (``send_callbacks=False``), so every callback a
test sees is one it posted itself; pushes still get real CheckoutRequestIDs, and the emulator's
STK Push Query still answers with the outcome of the paying phone.
"""

from __future__ import annotations

import io
import json
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from support import (
    Listener,
    paid_callback,
    read_answer,
    status_of,
    wait_for,
)

from sfcrm.daraja import DarajaClient
from sfcrm.db import Database
from sfcrm.emulator import EmulatorSettings
from sfcrm.models import MpesaCallback, MpesaCheckout, MpesaPayment, Person
from sfcrm.payments import Payments
from sfcrm.server import CallbackApp, ConfirmWorker

SECRET_PATH = "/cb/Zq8vN1bT5xW2yR7uK4mP0aHc"
SAFARICOM = "196.201.214.200"
CANCELLING_PHONE = "254700000032"  # the emulator's customer who cancels the prompt
ACCEPTED = {"ResultCode": 0, "ResultDesc": "Accepted"}
RECEIPT = "TH3AB7XY9K"

# Safaricom's reordered success sample (daraja-samples/callback-success-reordered.json),
# verbatim; the CheckoutRequestID is swapped for a real one before posting.
SAMPLE_ID = b"ws_CO_05082025135929114669533"
SUCCESS_SAMPLE = b"""{
  "Body": {
    "stkCallback": {
      "MerchantRequestID": "7071-4170-a0e4-8345632bad442139",
      "CheckoutRequestID": "ws_CO_05082025135929114669533",
      "ResultCode": 0,
      "ResultDesc": "The service request is processed successfully.",
      "CallbackMetadata": {
        "Item": [
          {"Name": "PhoneNumber", "Value": 254114669532},
          {"Name": "Amount", "Value": 500},
          {"Name": "Balance", "Value": "{Amount={CurrencyCode=KES, MinimumAmount=8900, \
BasicAmount=89.00}}"},
          {"Name": "TransactionDate", "Value": 20250803135929},
          {"Name": "MpesaReceiptNumber", "Value": "TH3AB7XY9K"}
        ]
      }
    }
  }
}
"""


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    # Settled at once, callbacks withheld: the tests post every callback themselves.
    return EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=False)


# -- callback bodies ---------------------------------------------------------------------------


def unpaid_callback(checkout_id: str, code: int | str, desc: str) -> dict[str, Any]:
    return {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-34620561-1",
                "CheckoutRequestID": checkout_id,
                "ResultCode": code,
                "ResultDesc": desc,
            }
        }
    }


def cancelled_callback(checkout_id: str) -> dict[str, Any]:
    return unpaid_callback(checkout_id, 1032, "Request cancelled by user")


def unreachable_callback(checkout_id: str) -> dict[str, Any]:
    return unpaid_callback(checkout_id, 1037, "DS timeout user cannot be reached")


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# -- calling the app directly ------------------------------------------------------------------


class RecordingWorker(ConfirmWorker):
    """Keeps what the app hands over for confirmation, and confirms nothing."""

    def __init__(self, payments: Payments) -> None:
        super().__init__(payments)
        self.submitted: list[int] = []

    def submit(self, callback_id: int) -> None:
        self.submitted.append(callback_id)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def environ(
    body: bytes = b"",
    *,
    path: str = SECRET_PATH,
    method: str = "POST",
    content_length: str | None = "auto",
    remote_addr: str = "127.0.0.1",
    **http_headers: str,
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": remote_addr,
        "CONTENT_TYPE": "application/json",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if content_length == "auto":
        env["CONTENT_LENGTH"] = str(len(body))
    elif content_length is not None:
        env["CONTENT_LENGTH"] = content_length
    for name, value in http_headers.items():
        env["HTTP_" + name.upper()] = value
    return env


def call(app: CallbackApp, env: dict[str, Any]) -> Reply:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(headers)

    body = b"".join(app(env, start_response))
    return Reply(seen["status"], seen["headers"], body)


def post(app: CallbackApp, body: bytes | dict[str, Any], **options: Any) -> Reply:
    raw = encode(body) if isinstance(body, dict) else body
    return call(app, environ(raw, **options))


@pytest.fixture
def worker(payments: Payments) -> RecordingWorker:
    return RecordingWorker(payments)


@pytest.fixture
def make_app(payments: Payments, worker: RecordingWorker) -> Iterator[Callable[..., CallbackApp]]:
    """CallbackApp on the secret path with options; its threads stop before the database
    closes."""
    made: list[CallbackApp] = []

    def make(**options: Any) -> CallbackApp:
        made.append(CallbackApp(payments, callback_path=SECRET_PATH, worker=worker, **options))
        return made[-1]

    yield make
    for app in made:
        app.stop()


@pytest.fixture
def app(make_app: Callable[..., CallbackApp]) -> CallbackApp:
    return make_app()


# -- state -------------------------------------------------------------------------------------


@pytest.fixture
def pending_payment(payments: Payments, person_with_balance: Person) -> MpesaPayment:
    payment = payments.request(str(person_with_balance.id), 500, "Crew deposit")
    assert payment.status == "pending" and payment.checkout_request_id
    return payment


@pytest.fixture
def cancelling_payment(payments: Payments, person_with_balance: Person) -> MpesaPayment:
    """A push whose customer cancels: the emulator's query answers 1032 for it."""
    payment = payments.request(
        str(person_with_balance.id), 500, "Crew deposit", phone=CANCELLING_PHONE
    )
    assert payment.status == "pending" and payment.checkout_request_id
    return payment


def cid(payment: MpesaPayment) -> str:
    assert payment.checkout_request_id is not None
    return payment.checkout_request_id


def balance(db: Database, person_id: int | None) -> int:
    with db.read() as session:
        person = session.get(Person, person_id)
        assert person is not None
        return person.balance_cents


def payment_now(payments: Payments, payment: MpesaPayment) -> MpesaPayment:
    assert payment.id is not None
    return payments.get(payment.id)


def callback_rows(db: Database) -> list[MpesaCallback]:
    from sqlmodel import col, select

    with db.read() as session:
        return list(session.exec(select(MpesaCallback).order_by(col(MpesaCallback.id))).all())


def only_callback(db: Database) -> MpesaCallback:
    rows = callback_rows(db)
    assert len(rows) == 1, [(r.id, r.outcome) for r in rows]
    return rows[0]


def row_counts(db: Database) -> dict[str, int]:
    from sqlalchemy import func, select
    from sqlmodel import SQLModel

    with db.read() as session:
        return {
            table.name: session.execute(select(func.count()).select_from(table)).scalar_one()
            for table in SQLModel.metadata.sorted_tables
        }


def wait_until_settled(client: DarajaClient, checkout_id: str) -> None:
    """The emulator's query knows the outcome (so a confirmation by query is not 'pending')."""
    wait_for(lambda: not client.stk_query(checkout_id).processing, timeout=5)


def outcome_of(db: Database, callback_id: int | None) -> str | None:
    with db.read() as session:
        row = session.get(MpesaCallback, callback_id)
        return row.outcome if row else None


# -- success -----------------------------------------------------------------------------------


def test_success_callback_over_socket_completes_payment_and_stores_raw_body(
    listener: Listener,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    # Odd formatting on purpose: what is stored must be the bytes sent, not a re-encoding.
    raw = json.dumps(paid_callback(cid(pending_payment)), indent=3).encode() + b"\n\n"
    before = datetime.now(UTC)

    answer = listener.post(raw)

    after = datetime.now(UTC)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == ACCEPTED
    paid = payment_now(payments, pending_payment)
    assert paid.status == "completed"
    assert paid.receipt_number == RECEIPT
    assert paid.balance_applied
    assert balance(db, person_with_balance.id) == 100_000
    row = only_callback(db)
    assert row.body == raw
    assert before <= row.received_at <= after
    assert row.source_addr == "127.0.0.1"
    assert row.trusted
    assert row.outcome == "applied"
    assert row.checkout_request_id == cid(pending_payment)
    assert row.payment_id == pending_payment.id


def test_safaricom_sample_called_directly_is_stored_byte_for_byte_and_applied(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    raw = SUCCESS_SAMPLE.replace(SAMPLE_ID, cid(pending_payment).encode())

    reply = post(app, raw, remote_addr="10.1.2.3")

    assert reply.status == 200
    assert reply.json() == ACCEPTED
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert payment_now(payments, pending_payment).status == "completed"
    assert balance(db, person_with_balance.id) == 100_000
    row = only_callback(db)
    assert row.body == raw
    assert row.source_addr == "10.1.2.3"
    assert row.outcome == "applied"


# -- duplicates --------------------------------------------------------------------------------


def test_same_callback_posted_twenty_times_reduces_balance_once(
    listener: Listener,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    raw = encode(paid_callback(cid(pending_payment)))

    answers = [listener.post(raw) for _ in range(20)]

    assert [a.status_code for a in answers] == [200] * 20
    assert all(a.json() == ACCEPTED for a in answers)
    assert balance(db, person_with_balance.id) == 100_000
    assert payment_now(payments, pending_payment).status == "completed"
    rows = callback_rows(db)
    assert len(rows) == 20
    assert all(r.body == raw for r in rows)
    assert [r.outcome for r in rows] == ["applied"] + ["duplicate"] * 19


def test_same_callback_from_twenty_threads_at_once_reduces_balance_once(
    listener: Listener,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    raw = encode(paid_callback(cid(pending_payment)))
    start = threading.Barrier(20)

    def send(_: int) -> int:
        start.wait(timeout=5)
        return listener.post(raw).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(send, range(20)))

    assert statuses == [200] * 20
    assert balance(db, person_with_balance.id) == 100_000
    rows = callback_rows(db)
    assert len(rows) == 20
    assert all(r.body == raw for r in rows)
    outcomes = sorted(r.outcome for r in rows)
    assert outcomes == ["applied"] + ["duplicate"] * 19


# -- routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/cb",
        "/cb/",
        SECRET_PATH[:-1],
        SECRET_PATH + "x",
        SECRET_PATH.upper(),
        SECRET_PATH + "/more",
        "/x" + SECRET_PATH,
        "/cb/" + "A" * 24,
    ],
)
def test_wrong_path_called_directly_is_404_and_writes_nothing(
    app: CallbackApp, pending_payment: MpesaPayment, db: Database, path: str
) -> None:
    before = row_counts(db)

    reply = post(app, paid_callback(cid(pending_payment)), path=path)

    assert reply.status == 404
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == {"error": "not found"}
    assert row_counts(db) == before


def test_wrong_path_over_socket_is_404_and_writes_nothing(
    listener: Listener,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    before = row_counts(db)
    body = paid_callback(cid(pending_payment))

    wrong = [listener.base + "/cb/guess", listener.url + "x", listener.url[:-1], listener.base]
    statuses = [requests.post(url, json=body, timeout=5).status_code for url in wrong]
    got = requests.get(listener.base + "/cb/guess", timeout=5)

    assert statuses == [404] * len(wrong)
    assert got.status_code == 404  # not 405: a wrong path does not learn the method
    assert row_counts(db) == before
    assert before["mpesa_payment"] == 1 and before["person"] == 1
    assert balance(db, person_with_balance.id) == 150_000


def test_secret_path_with_trailing_slash_is_accepted(
    app: CallbackApp, payments: Payments, pending_payment: MpesaPayment
) -> None:
    reply = post(app, paid_callback(cid(pending_payment)), path=SECRET_PATH + "/")

    assert reply.status == 200
    assert payment_now(payments, pending_payment).status == "completed"


def test_secret_path_with_trailing_slash_is_accepted_over_socket(
    listener: Listener, payments: Payments, pending_payment: MpesaPayment
) -> None:
    answer = requests.post(listener.url + "/", json=paid_callback(cid(pending_payment)), timeout=5)

    assert answer.status_code == 200
    assert answer.json() == ACCEPTED
    assert payment_now(payments, pending_payment).status == "completed"


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_on_secret_path_are_405_with_allow_post(
    app: CallbackApp, db: Database, method: str
) -> None:
    reply = call(app, environ(b"", method=method))

    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    assert callback_rows(db) == []


def test_get_on_secret_path_over_socket_is_405_with_allow_post(
    listener: Listener, db: Database
) -> None:
    answer = requests.get(listener.url, timeout=5)

    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST"
    assert callback_rows(db) == []


# -- malformed bodies --------------------------------------------------------------------------

MALFORMED = {
    "empty": b"",
    "invalid-json": b'{"Body": {"stkCallback": ',
    "invalid-utf8": b'{"Body": {"stkCallback": {"CheckoutRequestID": "\xff\xfe"}}}',
    "nan": b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": NaN}}}',
    "deep-nesting": b"[" * 10_000 + b"]" * 10_000,
    "deep-objects": b'{"a":' * 10_000 + b"0" + b"}" * 10_000,  # 60,001 bytes
    "missing-checkout-id": encode(
        {"Body": {"stkCallback": {"MerchantRequestID": "m", "ResultCode": 0, "ResultDesc": "ok"}}}
    ),
    "top-level-list": encode([paid_callback("ws_CO_1")]),  # type: ignore[list-item]
    "no-result-code": encode(
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultDesc": "ok"}}}
    ),
    "boolean-result-code": encode(unpaid_callback("ws_CO_1", True, "ok")),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_body_called_directly_is_400_stored_as_rejected(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
    raw: bytes,
) -> None:
    reply = post(app, raw)

    assert reply.status == 400
    assert reply.headers["Content-Type"] == "application/json"
    doc = reply.json()
    assert doc["ResultCode"] == 1
    assert doc["ResultDesc"].startswith("Rejected: ")
    row = only_callback(db)
    assert row.body == raw
    assert row.outcome == "rejected"
    assert row.detail
    assert balance(db, person_with_balance.id) == 150_000
    assert payment_now(payments, pending_payment).status == "pending"


def test_malformed_bodies_over_socket_are_400_and_listener_keeps_working(
    listener: Listener,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    for name, raw in MALFORMED.items():
        answer = listener.post(raw)
        assert answer.status_code == 400, name
        assert answer.json()["ResultCode"] == 1, name

    rows = callback_rows(db)
    assert [r.body for r in rows] == list(MALFORMED.values())
    assert {r.outcome for r in rows} == {"rejected"}
    assert balance(db, person_with_balance.id) == 150_000

    answer = listener.post(paid_callback(cid(pending_payment)))

    assert answer.status_code == 200
    assert payment_now(payments, pending_payment).status == "completed"
    assert balance(db, person_with_balance.id) == 100_000


def test_bad_content_length_called_directly_is_400_not_500(app: CallbackApp) -> None:
    for declared in ["abc", "-1", "1" * 5000]:
        reply = call(app, environ(b"{}", content_length=declared))
        assert reply.status == 400, declared


# -- size limit --------------------------------------------------------------------------------


def test_body_over_max_body_called_directly_is_413_and_never_read(
    make_app: Callable[..., CallbackApp], db: Database
) -> None:
    app = make_app(max_body=1024)
    env = environ(b"x" * 2000)

    reply = call(app, env)

    assert reply.status == 413
    assert reply.json()["ResultCode"] == 1
    assert env["wsgi.input"].tell() == 0
    assert callback_rows(db) == []


def test_body_without_length_over_max_body_called_directly_is_413(
    make_app: Callable[..., CallbackApp], db: Database
) -> None:
    app = make_app(max_body=1024)
    env = environ(b"x" * 2000, content_length=None)

    reply = call(app, env)

    assert reply.status == 413
    assert env["wsgi.input"].tell() <= 1025  # at most one byte past the limit is read
    assert callback_rows(db) == []


def test_body_of_exactly_max_body_called_directly_is_accepted(
    make_app: Callable[..., CallbackApp], pending_payment: MpesaPayment
) -> None:
    app = make_app(max_body=1024)
    raw = encode(paid_callback(cid(pending_payment))).ljust(1024)

    assert call(app, environ(raw)).status == 200
    assert call(app, environ(raw, content_length=None)).status == 200


def test_body_over_max_body_over_socket_is_413_and_nothing_stored(
    open_listener: Callable[..., Listener], db: Database
) -> None:
    small = open_listener(max_body=1024)

    answer = small.post(b"{" + b" " * 1998 + b"}")

    assert answer.status_code == 413
    assert callback_rows(db) == []


def test_body_of_exactly_max_body_over_socket_is_accepted(
    open_listener: Callable[..., Listener],
    payments: Payments,
    pending_payment: MpesaPayment,
    db: Database,
) -> None:
    # Regression: waitress refuses a body whose length *equals* max_request_body_size, while
    # the app takes up to max_body bytes; a 1024-byte callback got 413 at max_body=1024.
    small = open_listener(max_body=1024)
    raw = encode(paid_callback(cid(pending_payment))).ljust(1024)

    answer = small.post(raw)

    assert answer.status_code == 200
    assert only_callback(db).body == raw
    assert payment_now(payments, pending_payment).status == "completed"


def test_chunked_body_over_max_body_over_socket_is_413(
    open_listener: Callable[..., Listener], db: Database
) -> None:
    small = open_listener(max_body=1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 100

    answer = requests.post(small.url, data=chunks(), timeout=5)

    assert answer.status_code == 413
    assert callback_rows(db) == []


def test_chunked_callback_under_max_body_over_socket_is_applied(
    listener: Listener, payments: Payments, pending_payment: MpesaPayment, db: Database
) -> None:
    raw = encode(paid_callback(cid(pending_payment)))

    answer = requests.post(listener.url, data=iter([raw[:100], raw[100:]]), timeout=5)

    assert answer.status_code == 200
    assert only_callback(db).body == raw
    assert payment_now(payments, pending_payment).status == "completed"


def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with suppress(OSError):  # the server may answer and close before all is sent
            sock.sendall(request)
        return read_answer(sock, time.monotonic() + timeout)


def test_declared_100_mib_body_sent_short_is_413_at_once(listener: Listener, db: Database) -> None:
    request = (
        f"POST {listener.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
    ).encode() + b'{"Body": '
    started = time.monotonic()

    response = raw_exchange(listener.server.effective_port, request)

    assert time.monotonic() - started < 2
    assert status_of(response) == 413
    assert callback_rows(db) == []


# -- unknown CheckoutRequestID -----------------------------------------------------------------


def test_unknown_checkout_id_is_kept_and_applied_once_when_payment_appears(
    listener: Listener, payments: Payments, person_with_balance: Person, db: Database
) -> None:
    checkout_id = "ws_CO_01012026120000000123456789"

    answer = listener.post(paid_callback(checkout_id))

    assert answer.status_code == 200
    assert answer.json() == ACCEPTED
    row = only_callback(db)
    assert row.outcome == "unmatched"
    assert row.checkout_request_id == checkout_id
    assert payments.replay_callbacks() == 0  # still nothing to match it with

    now = datetime.now(UTC)
    with db.write() as session:
        payment = MpesaPayment(
            person_id=person_with_balance.id,
            phone_number="254708374149",
            amount=500,
            payment_purpose="Crew deposit",
            status="pending",
            checkout_request_id=checkout_id,
            initiated_at=now,
            last_pushed_at=now,
            push_count=1,
        )
        session.add(payment)
        session.flush()
        assert payment.id is not None
        session.add(
            MpesaCheckout(payment_id=payment.id, checkout_request_id=checkout_id, pushed_at=now)
        )

    assert payments.replay_callbacks() == 1
    assert payments.replay_callbacks() == 0

    assert payments.get(payment.id).status == "completed"
    assert payments.get(payment.id).receipt_number == RECEIPT
    assert balance(db, person_with_balance.id) == 100_000
    row = only_callback(db)
    assert row.outcome == "applied"
    assert row.payment_id == payment.id


# -- failures ----------------------------------------------------------------------------------


def test_cancelled_callback_cancels_payment_and_keeps_code_and_text(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    reply = post(app, cancelled_callback(cid(pending_payment)))

    assert reply.status == 200
    assert reply.json() == ACCEPTED
    cancelled = payment_now(payments, pending_payment)
    assert cancelled.status == "cancelled"
    assert cancelled.result_code == "1032"
    assert cancelled.result_desc == "Request cancelled by user"
    assert not cancelled.balance_applied
    assert balance(db, person_with_balance.id) == 150_000
    assert only_callback(db).outcome == "applied"


def test_string_result_code_fails_payment(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    body = unpaid_callback(cid(pending_payment), "SFC_IC0003", "The operator does not exist.")

    reply = post(app, body)

    assert reply.status == 200
    failed = payment_now(payments, pending_payment)
    assert failed.status == "failed"
    assert failed.result_code == "SFC_IC0003"
    assert failed.result_desc == "The operator does not exist."
    assert balance(db, person_with_balance.id) == 150_000
    assert only_callback(db).result_code == "SFC_IC0003"


# -- amounts -----------------------------------------------------------------------------------


def test_callback_paying_less_than_asked_needs_review_and_moves_no_balance(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    reply = post(app, paid_callback(cid(pending_payment), amount=1))

    assert reply.status == 200
    review = payment_now(payments, pending_payment)
    assert review.status == "needs_review"
    assert not review.balance_applied
    assert review.receipt_number == RECEIPT
    assert balance(db, person_with_balance.id) == 150_000
    assert only_callback(db).outcome == "needs_review"


@pytest.mark.parametrize("amount_json", ["500", "500.0", "500.00", '"500.00"', "5E+2"])
def test_callback_amount_written_any_way_daraja_writes_500_completes(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
    amount_json: str,
) -> None:
    raw = (
        json.dumps(paid_callback(cid(pending_payment), amount="@AMOUNT@"))
        .replace('"@AMOUNT@"', amount_json)
        .encode()
    )
    assert amount_json.encode() in raw

    reply = post(app, raw)

    assert reply.status == 200
    assert payment_now(payments, pending_payment).status == "completed"
    assert balance(db, person_with_balance.id) == 100_000


# -- out of order ------------------------------------------------------------------------------


def test_cancel_arriving_after_paid_leaves_payment_completed(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    assert post(app, paid_callback(cid(pending_payment))).status == 200

    reply = post(app, cancelled_callback(cid(pending_payment)))

    assert reply.status == 200
    completed = payment_now(payments, pending_payment)
    assert completed.status == "completed"
    assert completed.result_code == "0"
    assert balance(db, person_with_balance.id) == 100_000
    assert [r.outcome for r in callback_rows(db)] == ["applied", "ignored"]


def test_paid_after_unreachable_waits_for_query_then_completes(
    app: CallbackApp,
    worker: RecordingWorker,
    payments: Payments,
    daraja_client: DarajaClient,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    assert post(app, unreachable_callback(cid(pending_payment))).status == 200
    assert payment_now(payments, pending_payment).status == "failed"

    reply = post(app, paid_callback(cid(pending_payment)))

    assert reply.status == 200
    paid_row = callback_rows(db)[-1]
    assert paid_row.outcome == "needs_query"
    assert worker.submitted == [paid_row.id]
    assert payment_now(payments, pending_payment).status == "failed"
    assert balance(db, person_with_balance.id) == 150_000

    wait_until_settled(daraja_client, cid(pending_payment))
    confirmed = payments.confirm_callback(paid_row.id or 0)

    assert confirmed.outcome == "applied"
    completed = payment_now(payments, pending_payment)
    assert completed.status == "completed"
    assert completed.receipt_number == RECEIPT  # the query has none; the callback's is kept
    assert balance(db, person_with_balance.id) == 100_000
    assert outcome_of(db, paid_row.id) == "applied"


def test_paid_after_unreachable_over_socket_is_completed_by_confirm_worker(
    listener: Listener,
    payments: Payments,
    daraja_client: DarajaClient,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    wait_until_settled(daraja_client, cid(pending_payment))
    assert listener.post(unreachable_callback(cid(pending_payment))).status_code == 200

    answer = listener.post(paid_callback(cid(pending_payment)))

    assert answer.status_code == 200
    assert answer.json() == ACCEPTED
    wait_for(lambda: payment_now(payments, pending_payment).status == "completed", timeout=5)
    assert balance(db, person_with_balance.id) == 100_000
    paid_row = callback_rows(db)[-1]
    wait_for(lambda: outcome_of(db, paid_row.id) == "applied", timeout=5)
    assert (callback_rows(db)[-1].detail or "").startswith("confirmed by query")


# -- allowlist and proxies ---------------------------------------------------------------------


def test_paid_from_outside_allowlist_moves_nothing_until_query_confirms(
    payments: Payments,
    make_app: Callable[..., CallbackApp],
    worker: RecordingWorker,
    daraja_client: DarajaClient,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    app = make_app(allowlist=[SAFARICOM])

    reply = post(app, paid_callback(cid(pending_payment)), remote_addr="127.0.0.1")

    assert reply.status == 200
    row = only_callback(db)
    assert row.outcome == "needs_query"
    assert not row.trusted
    assert worker.submitted == [row.id]
    assert payment_now(payments, pending_payment).status == "pending"
    assert balance(db, person_with_balance.id) == 150_000

    wait_until_settled(daraja_client, cid(pending_payment))
    payments.confirm_callback(row.id or 0)

    assert payment_now(payments, pending_payment).status == "completed"
    assert balance(db, person_with_balance.id) == 100_000


def test_paid_from_allowlisted_address_is_applied_at_once(
    make_app: Callable[..., CallbackApp],
    worker: RecordingWorker,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    app = make_app(allowlist=["196.201.214.0/24"])

    reply = post(app, paid_callback(cid(pending_payment)), remote_addr=SAFARICOM)

    assert reply.status == 200
    assert worker.submitted == []
    assert only_callback(db).trusted
    assert balance(db, person_with_balance.id) == 100_000


def test_fake_paid_from_outside_allowlist_over_socket_never_moves_balance(
    open_listener: Callable[..., Listener],
    payments: Payments,
    daraja_client: DarajaClient,
    cancelling_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    guarded = open_listener(allowlist=[SAFARICOM])
    wait_until_settled(daraja_client, cid(cancelling_payment))

    answer = guarded.post(paid_callback(cid(cancelling_payment)))

    assert answer.status_code == 200
    row = only_callback(db)
    assert row.source_addr == "127.0.0.1"
    assert not row.trusted
    wait_for(lambda: outcome_of(db, row.id) == "ignored", timeout=5)
    assert balance(db, person_with_balance.id) == 150_000
    settled = payment_now(payments, cancelling_payment)
    assert settled.status == "cancelled"
    assert settled.result_code == "1032"
    assert not settled.balance_applied


def test_forwarded_for_from_trusted_proxy_is_the_source(
    open_listener: Callable[..., Listener],
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    proxied = open_listener(allowlist=[SAFARICOM], trusted_proxies=["127.0.0.1"])

    answer = proxied.post(
        paid_callback(cid(pending_payment)), headers={"X-Forwarded-For": SAFARICOM}
    )

    assert answer.status_code == 200
    row = only_callback(db)
    assert row.source_addr == SAFARICOM
    assert row.trusted
    assert row.outcome == "applied"
    assert payment_now(payments, pending_payment).status == "completed"
    assert balance(db, person_with_balance.id) == 100_000


def test_forwarded_for_from_untrusted_peer_is_ignored(
    open_listener: Callable[..., Listener],
    payments: Payments,
    daraja_client: DarajaClient,
    cancelling_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    guarded = open_listener(allowlist=[SAFARICOM])
    wait_until_settled(daraja_client, cid(cancelling_payment))

    answer = guarded.post(
        paid_callback(cid(cancelling_payment)), headers={"X-Forwarded-For": SAFARICOM}
    )

    assert answer.status_code == 200
    row = only_callback(db)
    assert row.source_addr == "127.0.0.1"
    assert not row.trusted
    wait_for(lambda: outcome_of(db, row.id) == "ignored", timeout=5)
    assert balance(db, person_with_balance.id) == 150_000


@pytest.mark.parametrize(
    ("peer", "forwarded", "proxies", "source", "trusted"),
    [
        ("127.0.0.1", SAFARICOM, ["127.0.0.1"], SAFARICOM, True),
        ("127.0.0.1", f"10.9.9.9, {SAFARICOM}", ["127.0.0.1"], SAFARICOM, True),
        # a client cannot vouch for itself by writing Safaricom's address first
        ("127.0.0.1", f"{SAFARICOM}, 10.9.9.9", ["127.0.0.1"], "10.9.9.9", False),
        ("127.0.0.1", f"{SAFARICOM}, 10.0.0.2", ["127.0.0.1", "10.0.0.0/8"], SAFARICOM, True),
        ("10.1.1.1", SAFARICOM, ["127.0.0.1"], "10.1.1.1", False),
        ("127.0.0.1", "not-an-address", ["127.0.0.1"], "not-an-address", False),
        ("127.0.0.1", " , ,", ["127.0.0.1"], "127.0.0.1", False),
    ],
)
def test_source_address_is_read_from_forwarded_for_only_behind_trusted_proxy(
    make_app: Callable[..., CallbackApp],
    db: Database,
    peer: str,
    forwarded: str,
    proxies: list[str],
    source: str,
    trusted: bool,
) -> None:
    app = make_app(allowlist=[SAFARICOM], trusted_proxies=proxies)
    body = cancelled_callback("ws_CO_unknown")

    reply = post(app, body, remote_addr=peer, x_forwarded_for=forwarded)

    assert reply.status == 200
    row = only_callback(db)
    assert row.source_addr == source
    assert row.trusted is trusted


# -- robustness --------------------------------------------------------------------------------


def _fuzz_requests(path: str, checkout_id: str) -> list[bytes]:
    """About 200 requests no honest Daraja sends: odd bodies, headers, methods and paths."""
    rng = random.Random(20260315)
    good = paid_callback(checkout_id)
    weird: list[Any] = [
        None, True, False, 0, -1, 10**40, 1.5, "", " ", "0", "abc", "\u0000", "\ud800",
        "x" * 5000, [], {}, [1, 2], {"Value": 1}, "NaN", "Infinity", "1e999999999", "-500",
        "00010101000000", 99999999999999, "SFC_IC0003",
    ]  # fmt: skip

    def mutate(*keys: str | int, value: Any) -> bytes:
        doc = json.loads(json.dumps(good))
        target = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        return json.dumps(doc).encode()

    bodies: list[bytes] = [
        b"", b"{", b"null", b"0", b'"text"', b"[]", b"{}", b"\x00" * 64, rng.randbytes(300),
        encode(good)[:150], b"\xef\xbb\xbf" + encode(good), json.dumps(good).encode("utf-16"),
        b"[" * 20_000 + b"]" * 20_000, b'{"Body": {"stkCallback": "x"}}', b"1" * 5000,
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "a\\u0000b", "ResultCode": 1}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "%s", "ResultCode": 1}}}' % (b"x" * 3000),
        b'{"Body": 1, "Body": {"stkCallback": {"CheckoutRequestID": "dup", "ResultCode": 0}}}',
    ]  # fmt: skip
    for _ in range(40):  # the real thing with a few bytes flipped, cut or doubled
        mangled = bytearray(encode(good))
        for _ in range(rng.randint(1, 4)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        cut = rng.randrange(len(mangled))
        bodies.append(bytes(mangled[:cut] + mangled[cut:] * rng.randint(1, 2)))
    stk = ("Body", "stkCallback")
    for field in ["ResultCode", "CheckoutRequestID", "MerchantRequestID", "ResultDesc"]:
        for value in rng.sample(weird, 6):
            bodies.append(mutate(*stk, field, value=value))
    for value in weird:
        bodies.append(mutate(*stk, "CallbackMetadata", value=value))
        bodies.append(mutate(*stk, "CallbackMetadata", "Item", value=value))
    for index in range(5):  # Amount, receipt, Balance, TransactionDate, PhoneNumber
        for value in rng.sample(weird, 5):
            bodies.append(mutate(*stk, "CallbackMetadata", "Item", index, "Value", value=value))

    def http(
        body: bytes,
        *,
        method: str = "POST",
        target: str = path,
        headers: dict[str, str] | None = None,
        length: bool = True,
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if length:
            all_headers.setdefault("Content-Length", str(len(body)))
        lines += [f"{name}: {value}" for name, value in all_headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    valid = encode(good)
    requests_: list[bytes] = [http(body) for body in bodies]
    requests_ += [
        http(valid, method=m) for m in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO", "post"]
    ]
    requests_ += [
        http(valid, target=t)
        for t in [
            "/", "*", path + "%00", path + "%ff", path + "/../x", "/cb/%2e%2e/" + path,
            "http://evil.example" + path, path + "?a=1&b=%zz", "/" + "a" * 8000, path + "//",
            path + "%C3%A9",
        ]
    ]  # fmt: skip
    header_sets: list[dict[str, str]] = [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/json; charset=latin-1"},
        {"Content-Length": "abc"},
        {"Content-Length": "-1"},
        {"Content-Length": "+5"},
        {"Content-Length": "1" * 400},
        {"X-Forwarded-For": "::::,,,," * 50},
        {"X-Forwarded-For": ", ".join(f"10.0.{i % 250}.{i % 200}" for i in range(500))},
        {"X-Forwarded-For": "196.201.214.200\u00e9"},
        {"Expect": "100-continue"},
        {"X-Long": "v" * 20_000},
        {"Content-Encoding": "gzip"},
        {"Host": ""},
    ]
    requests_ += [http(valid, headers=h) for h in header_sets]
    chunked = {"Transfer-Encoding": "chunked"}
    requests_ += [
        http(b"zz\r\nabc\r\n0\r\n\r\n", headers=chunked, length=False),
        http(b"2\r\nab\r\nX\r\n\r\n", headers=chunked, length=False),
        http(b"0\r\n\r\n", headers=chunked, length=False),
        http(b"%x\r\n" % len(valid) + valid + b"\r\n0\r\n\r\n", headers=chunked, length=False),
        http(valid + b"\r\n", headers={**chunked, "Content-Length": str(len(valid))}, length=False),
        b"GARBAGE\r\n\r\n",
        b"POST " + path.encode() + b" HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"POST " + path.encode() + b" HTTP/9.9\r\nContent-Length: 2\r\n\r\n{}",
        b"POST " + path.encode() + b" HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
    ]
    return requests_


def test_nothing_a_client_sends_gets_a_5xx_and_listener_keeps_working(
    listener: Listener,
    payments: Payments,
    person_with_balance: Person,
    db: Database,
) -> None:
    target = payments.request(str(person_with_balance.id), 500, "Crew deposit")
    last = payments.request(str(person_with_balance.id), 300, "Crew deposit")
    port = listener.server.effective_port
    fuzz = _fuzz_requests(listener.path, cid(target))
    assert len(fuzz) >= 190

    statuses = [status_of(raw_exchange(port, request)) for request in fuzz]

    assert None not in statuses
    bad = [(i, s) for i, s in enumerate(statuses) if s is not None and s >= 500]
    assert bad == []

    started = time.monotonic()
    answer = listener.post(paid_callback(cid(last), amount=300))

    assert answer.status_code == 200
    assert time.monotonic() - started < 1
    assert payment_now(payments, last).status == "completed"


def test_failure_acting_on_stored_callback_still_answers_200_and_replay_applies_it(
    listener: Listener,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(payments, "_act", broken)
    raw = encode(paid_callback(cid(pending_payment)))

    answer = listener.post(raw)

    assert answer.status_code == 200
    assert answer.json() == ACCEPTED
    row = only_callback(db)
    assert row.body == raw
    assert row.outcome == "error"
    assert row.detail == "RuntimeError"
    assert payment_now(payments, pending_payment).status == "pending"
    assert balance(db, person_with_balance.id) == 150_000

    monkeypatch.undo()
    assert payments.replay_callbacks() == 1

    assert only_callback(db).outcome == "applied"
    assert payment_now(payments, pending_payment).status == "completed"
    assert balance(db, person_with_balance.id) == 100_000


def test_failure_storing_callback_answers_503_so_daraja_may_resend(
    app: CallbackApp, payments: Payments, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(body: bytes, source_addr: str | None, *, trusted: bool) -> Any:
        raise RuntimeError("database gone")

    monkeypatch.setattr(payments, "receive", broken)

    reply = post(app, paid_callback("ws_CO_1"))

    assert reply.status == 503
    assert reply.json()["ResultCode"] == 1


# -- bugs outside server.py (these fail until fixed there) -------------------------------------


def test_result_code_with_lone_surrogate_is_rejected_not_stuck_in_error(
    app: CallbackApp, payments: Payments, db: Database
) -> None:
    # JSON "\ud800" decodes to a str SQLite cannot store: acting on the row raised
    # UnicodeEncodeError, the row stayed "error", and every replay_callbacks() (so every
    # reconcile) raised again on it.
    raw = b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_9", "ResultCode": "\\ud800"}}}'

    reply = post(app, raw)

    assert reply.status == 400
    assert only_callback(db).outcome == "rejected"
    payments.replay_callbacks()


def test_result_desc_with_lone_surrogate_still_cancels_payment(
    app: CallbackApp, payments: Payments, pending_payment: MpesaPayment, db: Database
) -> None:
    body = unpaid_callback(cid(pending_payment), 1032, "cancelled \ud800")
    raw = json.dumps(body).encode()  # ensure_ascii keeps it as the escape \ud800
    assert b"\\ud800" in raw

    reply = post(app, raw)

    assert reply.status == 200
    assert only_callback(db).outcome == "applied"
    assert payment_now(payments, pending_payment).status == "cancelled"


def test_paid_callback_with_year_one_transaction_date_completes_payment(
    app: CallbackApp,
    payments: Payments,
    pending_payment: MpesaPayment,
    person_with_balance: Person,
    db: Database,
) -> None:
    # 00010101000000 parses as 0001-01-01 Nairobi time, which is before datetime.min in UTC:
    # storing it raised OverflowError and the paid callback was stuck as "error".
    body = paid_callback(cid(pending_payment))
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][3]["Value"] = "00010101000000"

    reply = post(app, body)

    assert reply.status == 200
    assert only_callback(db).outcome == "applied"
    assert balance(db, person_with_balance.id) == 100_000


def test_replay_goes_on_past_a_stored_callback_that_keeps_failing(
    listener: Listener,
    payments: Payments,
    person_with_balance: Person,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One row that cannot be acted on must not block every later one (reconcile replays all).
    first = payments.request(str(person_with_balance.id), 500, "Crew deposit")
    second = payments.request(str(person_with_balance.id), 300, "Crew deposit")
    act = payments.process_callback

    def broken(*args: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(payments, "_act", broken)
    assert listener.post(paid_callback(cid(first))).status_code == 200
    assert listener.post(paid_callback(cid(second), amount=300)).status_code == 200
    stuck, later = callback_rows(db)
    assert (stuck.outcome, later.outcome) == ("error", "error")

    def still_broken_for_first(callback_id: int, **options: Any) -> Any:
        if callback_id == stuck.id:
            raise RuntimeError("still on fire")
        return act(callback_id, **options)

    monkeypatch.undo()
    monkeypatch.setattr(payments, "process_callback", still_broken_for_first)
    payments.replay_callbacks()

    assert payment_now(payments, second).status == "completed"
    assert outcome_of(db, later.id) == "applied"
    assert outcome_of(db, stuck.id) == "error"


# -- WAL checkpoints after a burst ---------------------------------------------------------------


def _file_only_count(path: Any) -> int:
    """Callbacks in the database file itself, ignoring what is still only in the WAL."""
    with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM mpesa_callback").fetchone()[0])


def test_checkpointer_copies_stored_callbacks_into_the_file_then_goes_idle(
    db: Database, payments: Payments, db_path: Path
) -> None:
    from sfcrm.server import WalCheckpointer

    # the one pooled connection this thread's writes go through
    with db.write() as session:
        conn = session.connection()
        conn.exec_driver_sql("PRAGMA wal_autocheckpoint = 0")  # only the checkpointer copies
    with db.read() as session:
        session.connection().exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    payments.store_callback(b'{"Body": {}}', "127.0.0.1", trusted=True)
    assert _file_only_count(db.path) == 0  # stored, but only in the write-ahead log so far

    checkpointer = WalCheckpointer(db.checkpoint, delay=0.01, idle=0.2)
    checkpointer.poke()

    wait_for(lambda: _file_only_count(db.path) == 1, timeout=5)
    wait_for(lambda: checkpointer._thread is None, timeout=5)  # idle: the thread has ended


def test_checkpointer_that_fails_warns_once_and_leaves_checkpoints_to_sqlite(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sfcrm.server import WalCheckpointer

    tries: list[float] = []

    def refused() -> None:
        tries.append(time.monotonic())
        raise OSError("disk I/O error")

    checkpointer = WalCheckpointer(refused, delay=0.01, idle=5.0)
    checkpointer.poke()
    wait_for(lambda: tries and checkpointer._thread is None, timeout=5)
    checkpointer.poke()  # broken for good: no thread, no second try

    assert checkpointer._thread is None
    assert len(tries) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "sfcrm.listener"] == [
        "checkpoints left to SQLite: disk I/O error"
    ]


def test_stopped_checkpointer_waits_for_the_checkpoint_under_way_and_starts_no_other() -> None:
    from sfcrm.server import WalCheckpointer

    started, release = threading.Event(), threading.Event()
    done: list[float] = []

    def slow() -> None:
        started.set()
        release.wait(5)
        done.append(time.monotonic())

    checkpointer = WalCheckpointer(slow, delay=0.01, idle=5.0)
    checkpointer.poke()
    assert started.wait(5)
    stopping = threading.Thread(target=checkpointer.stop)
    stopping.start()
    stopping.join(0.2)
    assert stopping.is_alive()  # the database must not close under that checkpoint
    release.set()
    stopping.join(5)

    assert not stopping.is_alive()
    assert len(done) == 1
    checkpointer.poke()
    assert checkpointer._thread is None


def test_listener_on_sqlite_checkpoints_through_the_database(
    payments: Payments, app: CallbackApp, pending_payment: MpesaPayment, db_path: Path
) -> None:
    checkpoints: list[float] = []
    assert app.checkpointer is not None
    assert app.checkpointer.checkpoint == payments.db.checkpoint
    app.checkpointer.checkpoint = lambda: checkpoints.append(time.monotonic())

    assert post(app, paid_callback(cid(pending_payment))).status == 200

    wait_for(lambda: checkpoints, timeout=5)


def test_listener_on_an_engine_without_a_write_ahead_log_makes_no_checkpointer(
    payments: Payments,
    make_app: Callable[..., CallbackApp],
    pending_payment: MpesaPayment,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Database, "dialect", property(lambda self: "postgresql"))
    app = make_app()

    assert app.checkpointer is None
    assert post(app, paid_callback(cid(pending_payment))).status == 200
    assert payment_now(payments, pending_payment).status == "completed"


def test_no_module_of_the_listener_opens_sqlite_itself() -> None:
    import ast

    import sfcrm.server

    imports: dict[str, list[str]] = {}
    for module in sorted(Path(sfcrm.server.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            imports.setdefault(module.name, []).extend(names)
    assert "callbacks.py" in imports
    assert {name: found for name, found in imports.items() if "sqlite3" in found} == {}
