"""Settling payments by hand (`mpesa resolve`, `mpesa refund-done`), how a payment was settled,
and the money rules of `mpesa request` (credit, archived people).

Over the real CLI, on both engines, against the tests' fake Daraja over real HTTP: its query
answer is switched per test, and it posts no callback of its own; callbacks a test needs go
through the listener's own entry (``Payments.receive``).
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from fake_daraja import FakeDaraja, callback_body
from sqlmodel import col, select
from support import daraja_env, run, run_json, services_for, utcnow

from sfcrm.db import Database
from sfcrm.errors import ConflictError
from sfcrm.models import (
    BalanceEntry,
    CallbackOutcome,
    MpesaCheckout,
    MpesaPayment,
    PaymentStatus,
    Person,
)
from sfcrm.payments import Payments

DARAJA_ADDR = "196.201.214.200"
PHONE = "254708374149"


@pytest.fixture
def office(
    fake: FakeDaraja, database_url: str, db: Database, monkeypatch: pytest.MonkeyPatch
) -> Payments:
    """An office whose Daraja is the fake (no callbacks of its own); the CLI sees the same."""
    env = daraja_env(fake.url, f"http://127.0.0.1:9/cb/{secrets.token_urlsafe(16)}", timeout=5)
    for name, value in {**env, "SFCRM_DATABASE_URL": database_url}.items():
        monkeypatch.setenv(name, value)
    return services_for(database_url, db, **env).payments


@pytest.fixture
def owes_1500(office: Payments) -> dict[str, Any]:
    doc: dict[str, Any] = run_json(
        "people", "add", "--name", "Wanjiru", "--phone", "0708374149", "--balance", "1500"
    )
    return doc


def balance(db: Database, person_id: int = 1) -> str:
    with db.read() as session:
        person = session.get(Person, person_id)
        assert person is not None
        return f"{person.balance_cents / 100:.2f}"


def ledger_entries(db: Database, payment_id: int) -> list[BalanceEntry]:
    with db.read() as session:
        return list(
            session.exec(select(BalanceEntry).where(BalanceEntry.payment_id == payment_id)).all()
        )


def pushed_long_ago(db: Database, payment_id: int, minutes: int = 10) -> None:
    """The payment's prompt is long over (pushed ``minutes`` ago)."""
    with db.write() as session:
        payment = session.get(MpesaPayment, payment_id)
        assert payment is not None and payment.last_pushed_at is not None
        payment.last_pushed_at -= timedelta(minutes=minutes)
        payment.initiated_at -= timedelta(minutes=minutes)
        session.add(payment)


def lose_push_answer(db: Database, payment_id: int) -> None:
    """As if Daraja's answer to the push never came: ``unknown``, no CheckoutRequestID."""
    with db.write() as session:
        payment = session.get(MpesaPayment, payment_id)
        assert payment is not None
        for row in session.exec(
            select(MpesaCheckout).where(MpesaCheckout.payment_id == payment_id)
        ).all():
            session.delete(row)
        payment.checkout_request_id = None
        payment.merchant_request_id = None
        payment.status = PaymentStatus.UNKNOWN
        session.add(payment)


def request(amount: str = "500") -> int:
    doc = run_json("mpesa", "request", "--person", "1", "--amount", amount, "--purpose", "Deposit")
    return int(doc["payment_id"])


def stale_pending(db: Database, amount: str = "500") -> int:
    pid = request(amount)
    pushed_long_ago(db, pid)
    return pid


def history(payment_id: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = run_json("history", "--payment", str(payment_id))
    return entries


def deliver(office: Payments, body: bytes) -> str:
    """A callback as the listener takes it; returns what acting on it came to."""
    return office.receive(body, DARAJA_ADDR, trusted=True)[1].outcome


def not_settled(pid: int) -> list[str]:
    doc = run_json("mpesa", "reconcile", "--older-than", "0s")
    return [r["reason"] for r in doc["not_settled"] if r["payment_id"] == pid]


# -- resolve --as completed --------------------------------------------------------------------


def test_resolve_completed_checks_daraja_moves_the_balance_once_and_a_second_run_is_refused(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    pid = stale_pending(db)
    fake.configure(query_answer="paid")
    queries = fake.snapshot().query

    doc = run_json("mpesa", "resolve", str(pid), "--as", "completed", "--receipt", "th3ab7xy9k",
                   "--reason", "receipt on the M-Pesa statement")  # fmt: skip

    assert fake.snapshot().query == queries + 1  # checked against Daraja first
    assert (doc["status"], doc["resolved_from"], doc["receipt_number"]) == (
        "completed", "pending", "TH3AB7XY9K",
    )  # fmt: skip
    assert (doc["settled_by"], doc["resolution"]) == ("manual", "receipt on the M-Pesa statement")
    assert doc["resolved_at"].endswith("+03:00")
    assert (doc["amount_credited"], doc["balance_after"]) == ("500.00", "1000.00")
    assert balance(db) == "1000.00"
    assert len(ledger_entries(db, pid)) == 1
    [entry] = history(pid)
    assert entry["action"] == "payment.resolve"
    assert entry["reason"] == "receipt on the M-Pesa statement"
    assert entry["changes"]["status"] == ["pending", "completed"]
    assert entry["changes"]["receipt_number"] == [None, "TH3AB7XY9K"]
    assert entry["changes"]["amount_credited"] == [None, "500.00"]

    again = run("mpesa", "resolve", str(pid), "--as", "completed", "--receipt", "TH3AB7XY9K",
                "--reason", "twice")  # fmt: skip
    assert again.exit_code == 6
    assert again.stderr.splitlines()[0] == (
        f"Error: payment {pid} is completed and its money moved already; not resolved"
    )
    # its own callback, late: a duplicate, not a second payment
    checkout_id = office.get(pid).checkout_request_id
    assert checkout_id is not None
    assert deliver(office, callback_body(checkout_id)) == CallbackOutcome.DUPLICATE
    assert balance(db) == "1000.00"
    assert len(ledger_entries(db, pid)) == 1
    assert len(history(pid)) == 1


def test_two_resolves_at_once_move_the_balance_once(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    pid = stale_pending(db)
    fake.configure(query_answer="paid")
    start = threading.Barrier(2)

    def resolve() -> str:
        start.wait(5)
        try:
            office.resolve(pid, outcome="completed", receipt="TH3AB7XY9K", reason="statement")
        except ConflictError as exc:
            return exc.message
        return "resolved"

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(lambda _: resolve(), range(2)))

    assert outcomes[1] == "resolved"
    assert outcomes[0].startswith(f"payment {pid} ")  # changed meanwhile, or already moved
    assert balance(db) == "1000.00"
    assert len(ledger_entries(db, pid)) == 1
    assert len(history(pid)) == 1


def test_resolve_of_an_unknown_payment_whose_push_id_never_came_takes_the_receipt(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    pid = stale_pending(db)
    checkout = office.get(pid).checkout_request_id
    assert checkout is not None
    lose_push_answer(db, pid)
    assert not_settled(pid)  # reconcile names it, every run
    queries = fake.snapshot().query

    result = run("mpesa", "resolve", str(pid), "--as", "completed", "--receipt", "TH3AB7XY9K",
                 "--reason", "customer's SMS")  # fmt: skip

    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout.strip() == (
        f"Payment {pid}: unknown -> completed, resolved by hand (receipt TH3AB7XY9K); "
        "KES 500.00 credited, balance now 1000.00."
    )
    assert fake.snapshot().query == queries  # no CheckoutRequestID to ask about
    assert balance(db) == "1000.00"
    assert not_settled(pid) == []  # reconcile stops naming it
    assert run_json("mpesa", "status", str(pid))["settled_by"] == "manual"

    # Its callback turns up after all, with the receipt the office typed: the same payment.
    late = callback_body(checkout, receipt="TH3AB7XY9K", phone=PHONE)
    assert deliver(office, late) == CallbackOutcome.NEEDS_QUERY  # matched by phone and amount
    fake.configure(query_answer="paid")
    run_json("mpesa", "reconcile", "--older-than", "0s")
    shown = run_json("mpesa", "status", str(pid))
    assert (shown["status"], shown["refund_due"], shown["checkout_request_id"]) == (
        "completed", False, None,
    )  # fmt: skip
    assert balance(db) == "1000.00"
    assert len(ledger_entries(db, pid)) == 1


def test_resolve_needs_the_receipt_and_refuses_one_another_payment_holds(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    first, second = stale_pending(db, "100"), stale_pending(db, "200")
    fake.configure(query_answer="paid")
    missing = run("mpesa", "resolve", str(first), "--as", "completed", "--reason", "x")
    assert missing.exit_code == 4
    assert missing.stderr.splitlines()[0] == (
        "Error: --receipt is needed to resolve a payment as completed"
    )
    bad = run("mpesa", "resolve", str(first), "--as", "completed", "--receipt", "TH3-AB",
              "--reason", "x")  # fmt: skip
    assert bad.exit_code == 4
    assert bad.stderr.splitlines()[0] == "Error: not an M-Pesa receipt number (TH3-AB)"
    run_json("mpesa", "resolve", str(first), "--as", "completed", "--receipt", "TH3AB7XY9K",
             "--reason", "statement")  # fmt: skip
    taken = run("mpesa", "resolve", str(second), "--as", "completed", "--receipt", "TH3AB7XY9K",
                "--reason", "statement")  # fmt: skip
    assert taken.exit_code == 6
    assert taken.stderr.splitlines()[0] == (
        f"Error: receipt TH3AB7XY9K already belongs to payment {first}; not resolved"
    )
    assert office.get(second).status == PaymentStatus.PENDING
    assert balance(db) == "1400.00"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("cancelled", "Daraja says payment {pid} was not paid (1032 Request cancelled by user); "
                      "not resolved as completed"),
        ("processing", "Daraja is still processing push {checkout} of payment {pid}; "
                       "not resolved"),
    ],
)  # fmt: skip
def test_resolve_completed_that_daraja_contradicts_is_refused_and_changes_nothing(
    office: Payments,
    owes_1500: dict[str, Any],
    fake: FakeDaraja,
    db: Database,
    answer: str,
    message: str,
) -> None:
    pid = stale_pending(db)
    fake.configure(query_answer=answer)
    result = run("mpesa", "resolve", str(pid), "--as", "completed", "--receipt", "TH3AB7XY9K",
                 "--reason", "they say they paid")  # fmt: skip
    assert result.exit_code == 6
    checkout = office.get(pid).checkout_request_id
    assert result.stderr.splitlines()[0] == "Error: " + message.format(pid=pid, checkout=checkout)
    after = office.get(pid)
    assert (after.status, after.receipt_number, after.resolved_at) == ("pending", None, None)
    assert balance(db) == "1500.00"
    assert history(pid) == []


def test_resolve_while_daraja_cannot_be_reached_is_refused_with_a_hint(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    pid = stale_pending(db)
    checkout = office.get(pid).checkout_request_id
    fake.stop()
    result = run("mpesa", "resolve", str(pid), "--as", "completed", "--receipt", "TH3AB7XY9K",
                 "--reason", "statement")  # fmt: skip
    assert result.exit_code == 8
    lines = result.stderr.splitlines()
    assert lines[0] == (
        f"Error: payment {pid} is not resolved: Daraja could not be asked about its push "
        f"{checkout}: Daraja could not be reached ({fake.url})"
    )
    assert lines[1] == (
        "Hint: nothing was changed; resolve it once Daraja answers (a resolution is never guessed)"
    )
    assert office.get(pid).status == PaymentStatus.PENDING
    assert balance(db) == "1500.00"


def test_resolve_refuses_a_push_whose_prompt_may_still_be_on_the_phone(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja
) -> None:
    pid = request()
    result = run("mpesa", "resolve", str(pid), "--as", "failed", "--reason", "no answer")
    assert result.exit_code == 6
    assert "its prompt may still be on the phone" in result.stderr.splitlines()[0]
    assert fake.snapshot().query == 0


# -- resolve --as failed | cancelled -----------------------------------------------------------


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_resolve_failed_or_cancelled_closes_it_without_money_and_it_is_never_pushed_again(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database, outcome: str
) -> None:
    pid = stale_pending(db)
    fake.configure(query_answer="failed")
    doc = run_json("mpesa", "resolve", str(pid), "--as", outcome, "--reason", "unreachable")
    assert (doc["status"], doc["settled_by"], doc["amount_credited"]) == (outcome, "manual", None)
    assert balance(db) == "1500.00"
    assert ledger_entries(db, pid) == []
    [entry] = history(pid)
    assert entry["action"] == "payment.resolve"
    assert entry["changes"]["status"] == ["pending", outcome]
    pushes = fake.snapshot().push
    resend = run("mpesa", "resend", str(pid))
    assert resend.exit_code == 6
    assert f"payment {pid} is {outcome} (resolved by hand); it is never pushed again" in (
        resend.stderr
    )
    assert fake.snapshot().push == pushes


def test_resolve_failed_is_refused_when_daraja_says_it_was_paid(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    pid = stale_pending(db)
    fake.configure(query_answer="paid")
    result = run("mpesa", "resolve", str(pid), "--as", "failed", "--reason", "no answer")
    assert result.exit_code == 6
    checkout = office.get(pid).checkout_request_id
    assert result.stderr.splitlines()[0] == (
        f"Error: Daraja says push {checkout} of payment {pid} was paid; not resolved as failed"
    )
    assert office.get(pid).status == PaymentStatus.PENDING


def test_resolve_failed_is_refused_once_money_moved(
    office: Payments, owes_1500: dict[str, Any], db: Database
) -> None:
    pid = request()
    checkout = office.get(pid).checkout_request_id
    assert checkout is not None
    assert deliver(office, callback_body(checkout)) == CallbackOutcome.APPLIED
    result = run("mpesa", "resolve", str(pid), "--as", "failed", "--reason", "oops")
    assert result.exit_code == 6
    assert result.stderr.splitlines()[0] == (
        f"Error: payment {pid} is completed and its money moved already; not resolved"
    )
    assert office.get(pid).status == PaymentStatus.COMPLETED
    assert balance(db) == "1000.00"


# -- a payment in review -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "credited", "after"),
    [(["--accept-paid-amount"], "300.00", "1200.00"), ([], "500.00", "1000.00")],
)
def test_resolve_of_a_payment_in_review_credits_what_was_paid_or_what_was_asked(
    office: Payments,
    owes_1500: dict[str, Any],
    fake: FakeDaraja,
    db: Database,
    options: list[str],
    credited: str,
    after: str,
) -> None:
    pid = request()
    checkout = office.get(pid).checkout_request_id
    assert checkout is not None
    review = callback_body(checkout, amount=300, receipt="SFREVIEW01")
    assert deliver(office, review) == CallbackOutcome.REVIEW
    assert any("needs review" in why for why in not_settled(pid))
    fake.configure(query_answer="paid")

    doc = run_json("mpesa", "resolve", str(pid), "--as", "completed", *options,
                   "--reason", "agreed with the customer")  # fmt: skip

    assert (doc["status"], doc["receipt_number"], doc["amount_credited"]) == (
        "completed", "SFREVIEW01", credited,
    )  # fmt: skip
    assert balance(db) == after
    [entry] = ledger_entries(db, pid)
    assert entry.amount_cents == -int(credited.replace(".", ""))
    assert not_settled(pid) == []
    assert deliver(office, review) == CallbackOutcome.DUPLICATE
    assert balance(db) == after


def test_accept_paid_amount_is_only_for_a_payment_in_review(
    office: Payments, owes_1500: dict[str, Any], db: Database
) -> None:
    pid = stale_pending(db)
    result = run("mpesa", "resolve", str(pid), "--as", "completed", "--receipt", "TH3AB7XY9K",
                 "--accept-paid-amount", "--reason", "x")  # fmt: skip
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == (
        f"Error: --accept-paid-amount is for a payment in needs_review (payment {pid} is pending)"
    )


# -- paid twice: refund-done -------------------------------------------------------------------


def paid_twice(db: Database, office: Payments) -> int:
    """A payment pushed twice, both pushes paid: completed once, a refund due."""
    now = utcnow()
    with db.write() as session:
        payment = MpesaPayment(
            person_id=1, phone_number=PHONE, amount=500, payment_purpose="Deposit",
            status=PaymentStatus.PENDING, initiated_at=now, checkout_request_id="ws_CO_TWO",
            push_count=2, last_pushed_at=now,
        )  # fmt: skip
        session.add(payment)
        session.flush()
        assert payment.id is not None
        pid = payment.id
        for checkout in ("ws_CO_ONE", "ws_CO_TWO"):
            session.add(MpesaCheckout(payment_id=pid, checkout_request_id=checkout, pushed_at=now))
    assert deliver(office, callback_body("ws_CO_TWO", receipt="SFSECOND02")) == "applied"
    assert deliver(office, callback_body("ws_CO_ONE", receipt="SFFIRST001")) == "refund_due"
    return pid


def test_refund_done_clears_the_refund_and_reconcile_stops_naming_it(
    office: Payments, owes_1500: dict[str, Any], db: Database
) -> None:
    pid = paid_twice(db, office)
    assert not_settled(pid) == [
        "paid twice (by two pushes): a refund is due; once it is made, "
        f"`sfcrm mpesa refund-done {pid} --reason ...`"
    ]
    assert "completed by callback (refund due)" in run("mpesa", "status").stdout
    resolve = run("mpesa", "resolve", str(pid), "--as", "completed", "--reason", "x")
    assert resolve.exit_code == 6
    assert resolve.stderr.splitlines()[1] == (
        f"Hint: a refund is due: `sfcrm mpesa refund-done {pid} --reason ...` once it is made"
    )

    doc = run_json("mpesa", "refund-done", str(pid), "--reason", "KES 500 sent back by M-Pesa")

    assert (doc["refund_due"], doc["status"]) == (False, "completed")
    assert doc["refund_done_at"].endswith("+03:00")
    assert not_settled(pid) == []
    assert "completed by callback (refunded)" in run("mpesa", "status").stdout
    [entry] = history(pid)
    assert (entry["action"], entry["reason"]) == (
        "payment.refund_done", "KES 500 sent back by M-Pesa",
    )  # fmt: skip
    assert entry["changes"]["refund_due"] == [True, False]
    assert balance(db) == "1000.00"  # a refund moves no balance: only one payment counted
    again = run("mpesa", "refund-done", str(pid), "--reason", "again")
    assert again.exit_code == 6
    assert again.stderr.splitlines()[0].startswith(
        f"Error: no refund is due for payment {pid}; its refund was recorded on "
    )


def test_refund_done_of_a_payment_without_a_refund_due_is_refused(
    office: Payments, owes_1500: dict[str, Any], db: Database
) -> None:
    pid = stale_pending(db)
    result = run("mpesa", "refund-done", str(pid), "--reason", "x")
    assert result.exit_code == 6
    assert result.stderr.splitlines()[0] == f"Error: no refund is due for payment {pid}"
    assert history(pid) == []


# -- how a payment was settled -----------------------------------------------------------------


def test_status_shows_a_payment_settled_by_query_and_one_settled_by_callback(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    by_query = stale_pending(db, "100")
    by_callback = request("200")
    checkout = office.get(by_callback).checkout_request_id
    assert checkout is not None
    deliver(office, callback_body(checkout, amount=200, receipt="SFCALLBK01"))
    fake.configure(query_answer="paid")
    run_json("mpesa", "reconcile", "--older-than", "5m")

    assert run_json("mpesa", "status", str(by_query))["settled_by"] == "query"
    shown = run_json("mpesa", "status", str(by_callback))
    assert (shown["settled_by"], shown["receipt_number"]) == ("callback", "SFCALLBK01")
    table = run("mpesa", "status").stdout
    assert "completed by query" in table and "completed by callback" in table
    detail = run("mpesa", "status", str(by_query)).stdout
    assert any(line.split() == ["settled_by", "query"] for line in detail.splitlines())


def test_a_query_that_settles_a_waiting_paid_callback_keeps_its_receipt(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    pid = stale_pending(db)
    checkout = office.get(pid).checkout_request_id
    assert checkout is not None
    waiting = office.receive(callback_body(checkout, receipt="SFWAITED01"), "10.0.0.9",
                             trusted=False)  # fmt: skip
    assert waiting[1].outcome == CallbackOutcome.NEEDS_QUERY
    fake.configure(query_answer="paid")
    run_json("mpesa", "reconcile", "--older-than", "0s")
    shown = run_json("mpesa", "status", str(pid))
    assert (shown["status"], shown["settled_by"], shown["receipt_number"]) == (
        "completed", "query", "SFWAITED01",
    )  # fmt: skip


# -- asking for money: credit, archived people -------------------------------------------------


def test_request_for_more_than_owed_is_refused_without_allow_credit(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    result = run("mpesa", "request", "--person", "1", "--amount", "1600", "--purpose", "Deposit")
    assert result.exit_code == 4
    lines = result.stderr.splitlines()
    assert lines[0] == "Error: KES 1600 is more than Wanjiru owes (KES 1500.00)"
    assert lines[1].startswith("Hint: add --allow-credit")
    assert run_json("mpesa", "status") == []
    assert fake.snapshot().total == 0  # Daraja never called

    allowed = run("mpesa", "request", "--person", "1", "--amount", "1600", "--purpose",
                  "Deposit", "--allow-credit")  # fmt: skip
    assert allowed.exit_code == 0, allowed.stderr
    assert "Note: KES 1600 is more than Wanjiru owes (KES 1500.00)" in allowed.stderr
    pid = int(run_json("mpesa", "status")[0]["payment_id"])
    checkout = office.get(pid).checkout_request_id
    assert checkout is not None
    deliver(office, callback_body(checkout, amount=1600))

    # in credit: words for people, the number as it is for JSON
    assert run_json("people", "show", "1")["balance"] == "-100.00"
    assert "in credit KES 100.00" in run("people", "show", "1").stdout
    assert run("people", "history", "1").stdout.splitlines()[0] == (
        "Wanjiru is in credit KES 100.00"
    )
    again = run("mpesa", "request", "--person", "1", "--amount", "50", "--purpose", "More")
    assert again.exit_code == 4
    assert again.stderr.splitlines()[0] == (
        "Error: KES 50 is more than Wanjiru owes (in credit KES 100.00)"
    )


def test_request_of_exactly_what_is_owed_needs_no_allow_credit(
    office: Payments, owes_1500: dict[str, Any]
) -> None:
    doc = run_json("mpesa", "request", "--person", "1", "--amount", "1500", "--purpose", "All")
    assert doc["success"] is True


def archive(db: Database, person_id: int = 1) -> None:
    with db.write() as session:
        person = session.get(Person, person_id)
        assert person is not None
        person.archived_at = utcnow()
        session.add(person)


def test_an_archived_person_is_never_asked_for_money(
    office: Payments, owes_1500: dict[str, Any], fake: FakeDaraja, db: Database
) -> None:
    fake.configure(query_answer="cancelled")
    pid = stale_pending(db)
    archive(db)
    before = fake.snapshot()

    result = run("mpesa", "request", "--person", "1", "--amount", "100", "--purpose", "Deposit")
    assert result.exit_code == 6
    assert result.stderr.splitlines()[0] == (
        "Error: Wanjiru (person 1) is archived; an archived person is never asked for money"
    )
    resent = run("mpesa", "resend", str(pid))
    assert resent.exit_code == 6
    assert "is archived" in resent.stderr
    with db.read() as session:
        ids = session.exec(select(MpesaPayment.id).order_by(col(MpesaPayment.id))).all()
    assert list(ids) == [pid]  # nothing written
    after = fake.snapshot()
    assert (after.push, after.query) == (before.push, before.query)
