"""Every push that may have reached a phone is accounted for, whatever stops the command.

The real program in its own process, the real database (a SQLite file, or PostgreSQL), the
real listener on a loopback socket, and the tests' fake Daraja answering late: the command is
killed (SIGKILL, SIGTERM) or interrupted (SIGINT, as Ctrl-C) while Daraja still holds the
push's answer, and the customer's "paid" callback has already reached the listener.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import timedelta

import pytest
import requests
from fake_daraja import FakeDaraja, callback_body
from sqlmodel import select
from support import CONSUMER_KEY, CONSUMER_SECRET, Listener, finish, sfcrm_env, utcnow, wait_for

from sfcrm.daraja import DarajaClient, QueryResult
from sfcrm.db import Database
from sfcrm.emulator import SANDBOX_PASSKEY, SANDBOX_SHORTCODE
from sfcrm.errors import ConflictError, DarajaTimeoutError
from sfcrm.models import (
    BalanceEntry,
    CallbackOutcome,
    MpesaCallback,
    MpesaPayment,
    PaymentStatus,
    Person,
)
from sfcrm.payments import DatabaseTokenCache, Payments
from sfcrm.people import People

START = 150_000  # cents
PHONE = "0712000009"
STOPS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


@pytest.fixture
def payments(db: Database, fake: FakeDaraja) -> Payments:
    """The listener's Payments (conftest's ``listener`` serves these), wired to the fake."""
    client = DarajaClient(
        fake.url, CONSUMER_KEY, CONSUMER_SECRET, SANDBOX_SHORTCODE, SANDBOX_PASSKEY,
        session=requests.Session(), timeout=5.0, clock=utcnow,
        token_cache=DatabaseTokenCache(db),
    )  # fmt: skip
    return Payments(
        db, callback_url="http://127.0.0.1:9/unused", clock=utcnow, client_factory=lambda: client
    )


@pytest.fixture
def person_id(people: People) -> int:
    person = people.add("Akinyi Odhiambo", PHONE, None, "1500")
    assert person.id is not None
    return person.id


def env_for(fake: FakeDaraja, database_url: str, listener: Listener, timeout: float = 20) -> dict:
    return sfcrm_env(fake, database_url, listener.url, timeout)


def start(env: dict, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sfcrm", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip


def sfcrm(env: dict, *args: str) -> subprocess.CompletedProcess[str]:
    proc = start(env, *args)
    [(out, err)] = finish([proc])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop_mid_push(proc: subprocess.Popen[str], fake: FakeDaraja, how: str) -> str:
    """Stop the command while Daraja holds its push's answer, after the customer paid."""
    before = fake.snapshot()
    wait_for(lambda: fake.snapshot().push == before.push + 1, timeout=15)
    wait_for(lambda: len(fake.snapshot().callback_statuses) > len(before.callback_statuses), 15)
    assert fake.snapshot().callback_statuses[-1] == 200
    assert fake.last_push().answered_at is None  # the command is still waiting for Daraja
    proc.send_signal(STOPS[how])
    [(_, err)] = finish([proc], timeout=15)
    return err


def payment_row(db: Database, pid: int) -> MpesaPayment:
    with db.read() as session:
        row = session.get(MpesaPayment, pid)
        assert row is not None
        return row


def only_payment(db: Database) -> MpesaPayment:
    with db.read() as session:
        [row] = session.exec(select(MpesaPayment)).all()
        return row


def payment_count(db: Database) -> int:
    with db.read() as session:
        return len(session.exec(select(MpesaPayment)).all())


def balance_entries(db: Database, pid: int) -> int:
    with db.read() as session:
        rows = session.exec(select(BalanceEntry).where(BalanceEntry.payment_id == pid)).all()
        return len(rows)


def balance(db: Database, person_id: int) -> int:
    with db.read() as session:
        person = session.get(Person, person_id)
        assert person is not None
        return person.balance_cents


def callbacks(db: Database) -> list[MpesaCallback]:
    with db.read() as session:
        return list(session.exec(select(MpesaCallback).order_by(MpesaCallback.id)).all())


def age_the_push(db: Database, pid: int, minutes: int = 5) -> None:
    """As if the office came back to the payment minutes later (its resend claim gone too)."""
    with db.write() as session:
        row = session.get(MpesaPayment, pid)
        assert row is not None and row.last_pushed_at is not None
        row.last_pushed_at -= timedelta(minutes=minutes)
        row.initiated_at -= timedelta(minutes=minutes)
        row.resend_claimed_until = None
        session.add(row)


def request_without_answer(
    payments: Payments, fake: FakeDaraja, person_ref: str, phone: str | None = None
) -> int:
    """A request whose push Daraja takes but answers only after the client gave up (the
    prompt is on the phone); then Daraja answers at once again. Returns the payment's id."""
    fake.configure(push_latency=1.5)
    payments.client.timeout = 0.5
    with pytest.raises(DarajaTimeoutError, match="may have reached the phone"):
        payments.request(person_ref, 500, "Crew deposit", phone=phone)
    payments.client.timeout = 5.0
    fake.configure(push_latency=0)
    return int(fake.pushes[-1].body["AccountReference"].removeprefix("SF-"))


# -- a request stopped while Daraja holds the push's answer ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_request_stopped_mid_push_is_settled_by_its_paid_callback_and_never_pushed_twice(
    how: str,
    fake: FakeDaraja,
    listener: Listener,
    db: Database,
    database_url: str,
    person_id: int,
) -> None:
    # Daraja takes the push and the customer pays at once (callback at 1 s), but Daraja's HTTP
    # answer to the push takes 8 s; the command is stopped before it comes.
    fake.configure(
        push_latency=8.0, callback="paid", callback_delay=1.0, callback_before_answer=True,
        query_answer="paid",
    )  # fmt: skip
    env = env_for(fake, database_url, listener)
    proc = start(env, "mpesa", "request", "--person", PHONE, "--amount", "500",
                 "--purpose", "Crew deposit")  # fmt: skip
    err = stop_mid_push(proc, fake, how)
    pid = only_payment(db).id
    assert pid is not None

    # The listener matched the callback to the push that never got its answer, confirmed it by
    # query, and the balance went down once.
    wait_for(lambda: payment_row(db, pid).status == PaymentStatus.COMPLETED, timeout=15)
    assert balance(db, person_id) == START - 500_00
    assert balance_entries(db, pid) == 1
    [stored] = callbacks(db)
    assert (stored.outcome, stored.payment_id) == (CallbackOutcome.APPLIED, pid)
    if how == "SIGINT":
        assert proc.returncode == 130
        assert f"payment {pid}'s push may have reached the phone. Do not push again" in err
        assert "try again" not in err

    # The hint the office would follow pushes nothing, with or without --force.
    age_the_push(db, pid)
    for args in ((), ("--force",)):
        resend = sfcrm(env, "mpesa", "resend", str(pid), *args)
        assert resend.returncode == 6, resend.stderr
        assert f"payment {pid} is completed; it is never pushed again" in resend.stderr
    assert fake.snapshot().push == 1
    report = sfcrm(env, "mpesa", "reconcile", "--older-than", "0s", "--json")
    doc = json.loads(report.stdout)
    assert (doc["not_settled"], doc["unmatched_paid_callbacks"], doc["errors"]) == ([], [], [])
    assert balance(db, person_id) == START - 500_00
    assert fake.snapshot().push == 1


@pytest.mark.slow
def test_request_stopped_mid_push_without_a_callback_is_listed_by_reconcile_with_the_reason(
    fake: FakeDaraja, listener: Listener, db: Database, database_url: str, person_id: int
) -> None:
    fake.configure(push_latency=8.0, callback=None)
    env = env_for(fake, database_url, listener)
    proc = start(env, "mpesa", "request", "--person", PHONE, "--amount", "500",
                 "--purpose", "Crew deposit")  # fmt: skip
    wait_for(lambda: fake.snapshot().push == 1, timeout=15)
    proc.kill()
    finish([proc])
    payment = only_payment(db)
    pid = payment.id
    assert (payment.status, payment.checkout_request_id) == (PaymentStatus.UNKNOWN, None)

    # Not yet due: reconcile leaves a push younger than --older-than alone...
    assert json.loads(sfcrm(env, "mpesa", "reconcile", "--json").stdout)["not_settled"] == []
    # ...and lists it once it is, with what the office can do.
    report = sfcrm(env, "mpesa", "reconcile", "--older-than", "0s")
    assert report.returncode == 0, report.stderr
    line = next(x for x in report.stdout.splitlines() if x.startswith(f"payment {pid} ("))
    named = rf"payment {pid} \(.+\): not settled: pushed, but Daraja's answer never came"
    assert re.match(named, line)
    assert f"account SF-{pid}" in line
    assert "1 not settled" in report.stdout.splitlines()[-1]
    # a plain resend refuses; it is --force only, and only once the prompt cannot be on the phone
    resend = sfcrm(env, "mpesa", "resend", str(pid))
    assert resend.returncode == 6
    assert "has an unknown outcome and was sent" in resend.stderr
    assert fake.snapshot().push == 1


# -- a resend stopped while Daraja holds the push's answer -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_resend_stopped_mid_push_never_pushes_again_while_its_paid_callback_waits(
    how: str,
    fake: FakeDaraja,
    listener: Listener,
    payments: Payments,
    db: Database,
    database_url: str,
    person_id: int,
) -> None:
    first = payments.request(str(person_id), 500, "Crew deposit")
    pid = first.id
    assert pid is not None and first.checkout_request_id
    assert fake.post_callback(listener.url, callback_body(first.checkout_request_id, 1032)) == 200
    assert payment_row(db, pid).status == PaymentStatus.CANCELLED

    # The resend's push is taken and paid; its answer is slow; Daraja's query still says
    # "processing" when the listener asks, so the callback waits for confirmation.
    fake.configure(
        push_latency=8.0, callback="paid", callback_delay=1.0, callback_before_answer=True,
        query_answer="processing",
    )  # fmt: skip
    env = env_for(fake, database_url, listener)
    proc = start(env, "mpesa", "resend", str(pid))
    stop_mid_push(proc, fake, how)
    wait_for(lambda: fake.snapshot().query >= 1, timeout=15)
    [_, paid] = callbacks(db)
    wait_for(lambda: callbacks(db)[1].outcome == CallbackOutcome.NEEDS_QUERY, timeout=15)
    assert payment_row(db, pid).status == PaymentStatus.UNKNOWN

    # Minutes later, the claim gone: no resend pushes while that "paid" waits, --force neither.
    age_the_push(db, pid)
    pushes = fake.snapshot().push
    for args in ((), ("--force",)):
        resend = sfcrm(env, "mpesa", "resend", str(pid), *args)
        assert resend.returncode == 6, resend.stderr
        if args:
            assert f"may be payment {pid}'s waits for Daraja to confirm it" in resend.stderr
    assert fake.snapshot().push == pushes

    # Daraja now confirms it: the resend settles from that callback instead of pushing.
    fake.configure(query_answer="paid")
    settled = sfcrm(env, "mpesa", "resend", str(pid), "--force", "--json")
    assert settled.returncode == 0, settled.stdout + settled.stderr
    [result] = json.loads(settled.stdout)["results"]
    assert (result["outcome"], result["message"]) == (
        "already_paid",
        "already paid: not pushed again",
    )
    assert fake.snapshot().push == pushes
    assert payment_row(db, pid).status == PaymentStatus.COMPLETED
    assert callbacks(db)[1].outcome == CallbackOutcome.APPLIED
    assert balance(db, person_id) == START - 500_00
    assert balance_entries(db, pid) == 1
    settled_by = callbacks(db)[1]
    assert (settled_by.id, settled_by.payment_id) == (paid.id, pid)
    assert settled_by.detail is not None and settled_by.detail.startswith("confirmed by query")


# -- a long write lock while a push is answered ------------------------------------------------


def test_push_answered_while_another_writer_holds_the_database_is_recorded_once_it_is_free(
    fake: FakeDaraja,
    payments: Payments,
    db: Database,
    person_id: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each write waits 0.2 s for the lock here (60 s in use); the lock (SQLite's on the file,
    # PostgreSQL's on the payment's row) is held for 2 s, ten busy timeouts, from the moment
    # Daraja has the push until after it answered.
    monkeypatch.setattr("sfcrm.db.BUSY_TIMEOUT_SECONDS", 0.2)
    db.close()
    notes: list[str] = []
    payments.notify = notes.append
    fake.configure(push_latency=0.5)
    held = threading.Event()

    def hold_the_lock() -> None:
        wait_for(lambda: fake.snapshot().push == 1, timeout=10, interval=0.005)
        if db.dialect == "sqlite":  # the whole file
            with closing(sqlite3.connect(db.path, isolation_level=None)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                held.set()
                time.sleep(2.0)  # the other writer's long transaction (an import, say)
                conn.execute("COMMIT")
            return
        with db.write() as session:  # PostgreSQL: the payment's row
            session.exec(select(MpesaPayment).with_for_update()).one()
            held.set()
            time.sleep(2.0)

    writer = threading.Thread(target=hold_the_lock)
    writer.start()
    try:
        payment = payments.request(str(person_id), 500, "Crew deposit")
    finally:
        writer.join()
    assert held.is_set()
    assert payment.status == PaymentStatus.PENDING
    assert payment.checkout_request_id == fake.last_push().checkout_request_id
    assert payment.push_count == 1
    assert fake.snapshot().push == 1
    assert notes == [
        f"payment {payment.id}: the database is busy; still waiting to record Daraja's answer "
        "to the push (do not push again)"
    ]


# -- two pushes of one amount to one phone, both unanswered ------------------------------------


@pytest.mark.slow
def test_two_unanswered_pushes_of_one_amount_to_one_phone_are_both_settled_oldest_first(
    fake: FakeDaraja, listener: Listener, db: Database, database_url: str, person_id: int
) -> None:
    # Daraja answers each push after the client gave up (1 s), and the customer pays both.
    fake.configure(push_latency=2.5, callback="paid", callback_delay=0.1, query_answer="paid")
    fake.hold_callbacks()
    env = env_for(fake, database_url, listener, timeout=1)
    for purpose in ("Crew deposit", "Cable damage"):
        request = sfcrm(env, "mpesa", "request", "--person", PHONE, "--amount", "500",
                        "--purpose", purpose)  # fmt: skip
        assert request.returncode == 8
        assert "Hint: the prompt may be on the phone: do not request or resend it" in (
            request.stderr
        )
    with db.read() as session:
        rows = session.exec(select(MpesaPayment).order_by(MpesaPayment.id)).all()
    assert [(p.status, p.checkout_request_id) for p in rows] == [(PaymentStatus.UNKNOWN, None)] * 2
    wait_for(lambda: all(p.answered_at for p in fake.pushes), timeout=10)
    fake.release_callbacks()
    wait_for(lambda: fake.snapshot().callback_statuses == [200, 200], timeout=10)

    ids = [p.id for p in rows]
    assert None not in ids
    wait_for(
        lambda: all(payment_row(db, i).status == PaymentStatus.COMPLETED for i in ids),  # type: ignore[arg-type]
        timeout=15,
    )
    assert balance(db, person_id) == START - 2 * 500_00
    assert [balance_entries(db, i) for i in ids] == [1, 1]  # type: ignore[arg-type]
    details = [payment_row(db, i).result_desc or "" for i in ids]  # type: ignore[arg-type]
    assert "oldest of 2 unanswered pushes" in details[0]
    report = json.loads(sfcrm(env, "mpesa", "reconcile", "--older-than", "0s", "--json").stdout)
    assert (report["not_settled"], report["unmatched_paid_callbacks"]) == ([], [])


def test_resend_refuses_a_push_that_may_still_be_on_the_phone_even_with_force(
    fake: FakeDaraja, payments: Payments, db: Database, person_id: int
) -> None:
    pid = request_without_answer(payments, fake, str(person_id))
    with pytest.raises(ConflictError, match=r"has an unknown outcome and was sent [01] s ago"):
        payments.resend(pid, force=True)
    assert fake.snapshot().push == 1
    age_the_push(db, pid, minutes=1)
    with pytest.raises(ConflictError, match=r"was sent 6[012] s ago"):
        payments.resend(pid, force=True)
    age_the_push(db, pid, minutes=2)
    assert payments.resend(pid, force=True).pushed
    assert fake.snapshot().push == 2


def test_paid_callback_of_an_unanswered_push_settles_the_payment_after_a_later_push_went_out(
    fake: FakeDaraja, listener: Listener, payments: Payments, db: Database, person_id: int
) -> None:
    # The first push got no answer; minutes later the office forced a new prompt. Then the
    # customer's payment of the first prompt arrives: it is this payment's money.
    fake.configure(query_answer="paid")
    pid = request_without_answer(payments, fake, str(person_id))
    age_the_push(db, pid)
    second = payments.resend(pid, force=True).payment
    assert second.status == PaymentStatus.PENDING
    first_push, second_push = (p.checkout_request_id for p in fake.pushes)
    assert second.checkout_request_id == second_push

    paid_first = callback_body(first_push, amount=500, phone=254712000009, receipt="SFFIRST001")
    assert fake.post_callback(listener.url, paid_first) == 200
    wait_for(lambda: payment_row(db, pid).status == PaymentStatus.COMPLETED, timeout=10)
    assert payment_row(db, pid).receipt_number == "SFFIRST001"
    assert balance(db, person_id) == START - 500_00

    # the customer pays the second prompt too: the balance stays, a refund is flagged
    paid_second = callback_body(second_push, amount=500, phone=254712000009, receipt="SFSECND002")
    assert fake.post_callback(listener.url, paid_second) == 200
    wait_for(lambda: payment_row(db, pid).refund_due, timeout=10)
    assert balance(db, person_id) == START - 500_00
    assert balance_entries(db, pid) == 1


def test_resend_refuses_while_a_confirmed_unmatched_paid_has_the_payments_phone_and_amount(
    fake: FakeDaraja,
    payments: Payments,
    db: Database,
    person_id: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pushed = payments.request(str(person_id), 500, "Crew deposit")
    pid = pushed.id
    assert pid is not None and pushed.checkout_request_id
    failed = payments.store_callback(
        callback_body(pushed.checkout_request_id, 1037), "127.0.0.1", trusted=True
    )
    payments.process_callback(failed)
    assert payment_row(db, pid).status == PaymentStatus.FAILED

    # a "paid" no payment takes, with this payment's phone and amount; Daraja confirms it
    stray = payments.store_callback(
        callback_body("ws_CO_PAID_ELSEWHERE", amount=500, phone=254712000009), "127.0.0.1",
        trusted=True,
    )  # fmt: skip
    real_query = payments.client.stk_query
    monkeypatch.setattr(
        payments.client, "stk_query",
        lambda cid: QueryResult(cid, "0", "paid") if cid == "ws_CO_PAID_ELSEWHERE"
        else real_query(cid),
    )  # fmt: skip
    with pytest.raises(ConflictError) as refused:
        payments.resend(pid)
    assert refused.value.message == (
        f"a 'paid' callback no payment has taken has payment {pid}'s phone and amount "
        f"(callback {stray}); not pushed again"
    )
    assert fake.snapshot().push == 1


@pytest.mark.parametrize(
    "phone", [254712000009, "2547******09", None], ids=["plain", "masked", "no-phone"]
)
def test_a_forged_paid_daraja_never_issued_is_rejected_and_holds_up_no_resend(
    fake: FakeDaraja, payments: Payments, db: Database, person_id: int, phone: object
) -> None:
    pushed = payments.request(str(person_id), 500, "Crew deposit")
    pid = pushed.id
    assert pid is not None and pushed.checkout_request_id
    cancelled = payments.store_callback(
        callback_body(pushed.checkout_request_id, 1032), "127.0.0.1", trusted=True
    )
    payments.process_callback(cancelled)
    forged = payments.store_callback(
        callback_body("ws_CO_FORGED", amount=500, phone=phone), "203.0.113.9", trusted=True
    )
    assert payments.resend(pid).pushed
    assert fake.snapshot().push == 2
    [row] = [c for c in callbacks(db) if c.id == forged]
    assert row.outcome == CallbackOutcome.REJECTED
    assert row.detail == "Daraja knows no such CheckoutRequestID: not a real payment"


def test_a_paid_without_its_phone_holds_up_a_forced_resend_until_daraja_settles_it(
    fake: FakeDaraja, payments: Payments, db: Database, person_id: int
) -> None:
    # The push gets no answer; the customer pays it; M-Pesa's callback lacks the PhoneNumber,
    # so nothing can match it by phone.
    pid = request_without_answer(payments, fake, str(person_id))
    fake.configure(query_answer="processing")
    first_push = fake.pushes[0].checkout_request_id
    payments.store_callback(callback_body(first_push, phone=None), "127.0.0.1", trusted=True)
    age_the_push(db, pid)
    with pytest.raises(ConflictError, match="no payment has taken"):
        payments.resend(pid, force=True)
    assert fake.snapshot().push == 1


def test_paid_that_beats_its_answer_is_never_given_to_another_persons_push(
    fake: FakeDaraja, listener: Listener, payments: Payments, db: Database, people: People
) -> None:
    # Two children, one parent's phone, one amount. The first child's push got no answer; the
    # second child's push is paid at once, its callback before Daraja's answer to the push.
    first = people.add("Child One", "0711000001", None, "1500").id
    second = people.add("Child Two", "0711000002", None, "1500").id
    assert first is not None and second is not None
    unanswered = request_without_answer(payments, fake, str(first), phone=PHONE)
    fake.configure(
        push_latency=1.0, callback="paid", callback_delay=0.1, callback_before_answer=True,
        query_answer="paid",
    )  # fmt: skip
    paid = payments.request(str(second), 500, "Crew deposit", phone=PHONE)

    assert paid.status == PaymentStatus.COMPLETED
    assert payment_row(db, unanswered).status == PaymentStatus.UNKNOWN
    assert (balance(db, first), balance(db, second)) == (START, START - 500_00)
    [stored] = callbacks(db)
    assert (stored.outcome, stored.payment_id) == (CallbackOutcome.APPLIED, paid.id)


def test_a_resend_while_the_request_waits_for_its_token_sends_one_prompt(
    fake: FakeDaraja, payments: Payments, db: Database, person_id: int
) -> None:
    # The request has written its row and waits for Daraja's token; the office resends it.
    token_free = threading.Event()
    slow = DarajaClient(
        fake.url, CONSUMER_KEY, CONSUMER_SECRET, SANDBOX_SHORTCODE, SANDBOX_PASSKEY,
        session=requests.Session(), timeout=5.0, clock=utcnow,
        token_cache=DatabaseTokenCache(db),
    )  # fmt: skip
    real_token = slow.token

    def token_after_the_resend(**options: object) -> str:
        token_free.wait(10)
        return real_token(**options)  # type: ignore[arg-type]

    slow.token = token_after_the_resend  # type: ignore[method-assign]
    requester = Payments(
        db, callback_url="http://127.0.0.1:9/unused", clock=utcnow, client_factory=lambda: slow
    )
    outcome: list[object] = []

    def request() -> None:
        try:
            outcome.append(requester.request(str(person_id), 500, "Crew deposit"))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=request)
    thread.start()
    try:
        wait_for(lambda: payment_count(db) == 1, timeout=10)
        assert payments.resend(1).pushed
    finally:
        token_free.set()
        thread.join(10)
    [refused] = outcome
    assert isinstance(refused, ConflictError)
    assert "was pushed by another sfcrm meanwhile" in refused.message
    assert fake.snapshot().push == 1
    assert payment_row(db, 1).status == PaymentStatus.PENDING


def test_the_paid_of_an_unanswered_push_after_the_payment_completed_flags_a_refund(
    fake: FakeDaraja, listener: Listener, payments: Payments, db: Database, person_id: int
) -> None:
    # Push 1 gets no answer but reaches the phone; minutes later the office forces push 2,
    # which is paid; then push 1's "paid" arrives: the customer paid both prompts.
    fake.configure(query_answer="paid")
    pid = request_without_answer(payments, fake, str(person_id))
    age_the_push(db, pid)
    second = payments.resend(pid, force=True).payment
    first_push, second_push = (p.checkout_request_id for p in fake.pushes)
    assert second.checkout_request_id == second_push
    assert fake.post_callback(listener.url, callback_body(second_push, phone=254712000009)) == 200
    assert payment_row(db, pid).status == PaymentStatus.COMPLETED

    # (another M-Pesa transaction: its own receipt)
    paid_again = callback_body(first_push, phone=254712000009, receipt="SFPAIDTWCE")
    assert fake.post_callback(listener.url, paid_again) == 200
    wait_for(lambda: payment_row(db, pid).refund_due, timeout=10)
    assert balance(db, person_id) == START - 500_00
    assert balance_entries(db, pid) == 1
