"""Attacks on the money path (issue 4, rows 2-7): concurrent writers, a listener killed
mid-burst, a listener that was down, callbacks that beat the push, odd amounts, results out
of order.

Real parts only: one SQLite file, the real listener on a loopback socket (the real
``sfcrm serve-callback`` process where the row is about the deployed process), the Daraja
emulator over HTTP. Every loop is bounded in count and time and talks to 127.0.0.1 only.
Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import col, select
from support import (
    CONSUMER_KEY,
    CONSUMER_SECRET,
    Listener,
    free_port,
    start_listener,
    utcnow,
    wait_for,
)
from typer.testing import CliRunner

from sfcrm.cli import app as cli_app
from sfcrm.daraja import DarajaClient
from sfcrm.db import Database
from sfcrm.emulator import (
    PAID_DESC,
    SANDBOX_PASSKEY,
    SANDBOX_PHONE,
    SANDBOX_SHORTCODE,
    DarajaEmulator,
    EmulatorSettings,
)
from sfcrm.models import (
    BalanceEntry,
    BalanceKind,
    CallbackOutcome,
    MpesaCallback,
    MpesaCheckout,
    MpesaPayment,
    PaymentStatus,
    Person,
)
from sfcrm.payments import Payments
from sfcrm.people import People
from sfcrm.server import CallbackApp, make_server

UNANSWERED_PHONE = "254700001037"  # the emulator's customer who never answers the prompt


# -- shared helpers ----------------------------------------------------------------------------


def paid_body(
    checkout_id: str,
    amount_json: str = "500",
    *,
    receipt: str | None = None,
    desc: str = PAID_DESC,
    phone: str = SANDBOX_PHONE,
) -> bytes:
    """A success callback of Daraja's shape; ``amount_json`` is written into the JSON as is."""
    stk = {
        "MerchantRequestID": "29115-34620561-1",
        "CheckoutRequestID": checkout_id,
        "ResultCode": 0,
        "ResultDesc": desc,
        "CallbackMetadata": {
            "Item": [
                {"Name": "Amount", "Value": "@AMOUNT@"},
                {"Name": "MpesaReceiptNumber", "Value": receipt or receipt_number()},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": 20260314102030},
                {"Name": "PhoneNumber", "Value": int(phone)},
            ]
        },
    }
    text = json.dumps({"Body": {"stkCallback": stk}}).replace('"@AMOUNT@"', amount_json)
    return text.encode()


def unpaid_body(checkout_id: str, code: int | str, desc: str) -> bytes:
    stk = {
        "MerchantRequestID": "29115-34620561-1",
        "CheckoutRequestID": checkout_id,
        "ResultCode": code,
        "ResultDesc": desc,
    }
    return json.dumps({"Body": {"stkCallback": stk}}).encode()


def receipt_number() -> str:
    return "T" + secrets.token_hex(5).upper()[:9]


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, float]:
    """POST one callback on a new connection, as Daraja does; (status, seconds)."""
    start = time.monotonic()
    answer = requests.post(
        url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout
    )
    return answer.status_code, time.monotonic() - start


def add_pending(
    db: Database, person: Person, checkout_ids: Iterable[str], amounts: Iterable[int]
) -> list[int]:
    """Pending payments, each pushed once with the given CheckoutRequestID, in one write."""
    now = utcnow()
    ids: list[int] = []
    with db.write() as session:
        for checkout_id, amount in zip(checkout_ids, amounts, strict=True):
            payment = MpesaPayment(
                person_id=person.id or 0,
                phone_number=person.phone,
                amount=amount,
                payment_purpose="Crew deposit",
                status=PaymentStatus.PENDING,
                initiated_at=now,
                checkout_request_id=checkout_id,
                merchant_request_id="29115-34620561-1",
                push_count=1,
                last_pushed_at=now,
            )
            session.add(payment)
            session.flush()
            assert payment.id is not None
            payment.account_reference = f"SF-{payment.id}"
            session.add(
                MpesaCheckout(
                    payment_id=payment.id,
                    checkout_request_id=checkout_id,
                    merchant_request_id="29115-34620561-1",
                    pushed_at=now,
                )
            )
            ids.append(payment.id)
    return ids


def money_problems(db: Database) -> list[str]:
    """Everything wrong with the money in the database, read with plain queries (not sfcrm's).

    On SQLite the file passes PRAGMA integrity_check and foreign_key_check (PostgreSQL keeps its
    own); every payment is either completed with balance_applied and exactly one ledger entry of
    minus its amount, or none of the three; a checkout recorded as paid belongs to a payment
    that is completed or in review; every person's balance is the sum of their ledger, and
    their newest entry's balance_after.
    """
    problems: list[str] = []
    if db.dialect == "sqlite":
        with closing(sqlite3.connect(db.path, timeout=30)) as conn:
            integrity = conn.execute("PRAGMA integrity_check").fetchall()
            if integrity != [("ok",)]:
                problems.append(f"integrity_check: {integrity[:5]}")
            foreign = conn.execute("PRAGMA foreign_key_check").fetchall()
            if foreign:
                problems.append(f"foreign_key_check: {foreign[:5]}")

    def count(model: Any, *where: Any) -> Any:
        return sa_select(func.count()).select_from(model).where(*where).scalar_subquery()

    of_payment = col(BalanceEntry.payment_id) == col(MpesaPayment.id)
    of_person = col(BalanceEntry.person_id) == col(Person.id)
    with db.read() as session:
        rows = session.execute(
            sa_select(
                MpesaPayment.id,
                MpesaPayment.status,
                MpesaPayment.balance_applied,
                count(BalanceEntry, of_payment),
                count(
                    BalanceEntry,
                    of_payment,
                    col(BalanceEntry.kind) == BalanceKind.PAYMENT,
                    col(BalanceEntry.amount_cents) == -col(MpesaPayment.amount) * 100,
                ),
                count(
                    MpesaCheckout,
                    col(MpesaCheckout.payment_id) == col(MpesaPayment.id),
                    col(MpesaCheckout.result_code) == "0",
                ),
            )
        ).all()
        people = session.execute(
            sa_select(
                Person.id,
                Person.balance_cents,
                sa_select(func.coalesce(func.sum(BalanceEntry.amount_cents), 0))
                .where(of_person)
                .scalar_subquery(),
                sa_select(BalanceEntry.balance_after_cents)
                .where(of_person)
                .order_by(col(BalanceEntry.id).desc())
                .limit(1)
                .scalar_subquery(),
            )
        ).all()
    for pid, status, applied, entries, right_entries, paid_pushes in rows:
        completed = status == PaymentStatus.COMPLETED
        if not (completed == bool(applied) == (entries == 1) == (right_entries == 1)):
            problems.append(
                f"payment {pid} half-applied: status {status}, balance_applied {applied}, "
                f"{entries} ledger entries ({right_entries} of its amount)"
            )
        settled_paid = status in (PaymentStatus.COMPLETED, PaymentStatus.NEEDS_REVIEW)
        if (paid_pushes > 0) != settled_paid:
            problems.append(f"payment {pid} is {status} with {paid_pushes} paid pushes")
    for person_id, balance, ledger, last_after in people:
        if balance != ledger or (last_after is not None and last_after != balance):
            problems.append(
                f"person {person_id}: balance {balance}, ledger sum {ledger}, "
                f"newest entry says {last_after}"
            )
    return problems


def balances(db: Database) -> dict[int, int]:
    with db.read() as session:
        return {p.id or 0: p.balance_cents for p in session.exec(select(Person)).all()}


def ledger_entries(db: Database, kind: str | None = None) -> list[BalanceEntry]:
    with db.read() as session:
        query = select(BalanceEntry).order_by(col(BalanceEntry.id))
        if kind is not None:
            query = query.where(BalanceEntry.kind == kind)
        return list(session.exec(query).all())


def callback_rows(db: Database) -> list[MpesaCallback]:
    with db.read() as session:
        return list(session.exec(select(MpesaCallback).order_by(col(MpesaCallback.id))).all())


def checkouts_of(db: Database, payment_id: int) -> list[MpesaCheckout]:
    with db.read() as session:
        return list(
            session.exec(
                select(MpesaCheckout)
                .where(MpesaCheckout.payment_id == payment_id)
                .order_by(col(MpesaCheckout.id))
            ).all()
        )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def no_network() -> DarajaClient:
    raise AssertionError("this step must not talk to Daraja")


# -- the deployed listener, as its own process -------------------------------------------------


@dataclass
class ListenerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    output: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Ctrl-C, as an operator stops it; killed if it does not go within 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Spawner:
    """Starts ``sfcrm serve-callback`` processes on one database; kills any left at the end."""

    folder: Path
    database_url: str
    started: list[ListenerProcess] = field(default_factory=list)

    def listener(self, name: str, *, threads: int = 8, timeout: float = 20.0) -> ListenerProcess:
        port = free_port()
        url = f"http://127.0.0.1:{port}/cb/{secrets.token_urlsafe(18)}"
        env = {
            **os.environ,
            "SFCRM_DATABASE_URL": self.database_url,
            "MPESA_CALLBACK_URL": url,
            "SFCRM_LISTENER_THREADS": str(threads),
        }
        output = self.folder / f"{name}.out"
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sfcrm", "serve-callback", "--port", str(port)],
                env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=self.folder,
            )  # fmt: skip
        running = ListenerProcess(proc, url, port, output)
        self.started.append(running)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"listener exited {proc.returncode}: {output.read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return running
            if time.monotonic() > deadline:
                raise AssertionError(f"listener not up within {timeout} s")
            time.sleep(0.01)

    def close(self) -> None:
        for running in self.started:
            running.kill()


@pytest.fixture
def spawner(tmp_path: Path, database_url: str, db: Database) -> Iterator[Spawner]:
    _ = db.engine  # the database exists, at the current schema, before any process opens it
    running = Spawner(tmp_path, database_url)
    yield running
    running.close()


# -- 2. concurrent writers ---------------------------------------------------------------------

WRITERS = 8
OPS_PER_WRITER = 500
SHARED_PEOPLE = 4
PENDING_PER_PERSON = 50

# One writer process: People.charge/credit in a loop on the shared people, through sfcrm's own
# code. It prints what it changed; any exception is a failure the office would have seen.
WRITER = r"""
import json, random, sys, time
from datetime import UTC, datetime
from pathlib import Path
from sfcrm.db import Database
from sfcrm.people import People

url, seed, ops, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
refs = sys.argv[5].split(",")
people = People(Database(url), lambda: datetime.now(UTC))
people.show(refs[0])  # open the file before the start line
Path(f"{go}.ready.{seed}").touch()
rng = random.Random(seed)
net = {ref: 0 for ref in refs}
errors, slowest = [], 0.0
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.005)
start = time.monotonic()
for i in range(ops):
    ref, cents = rng.choice(refs), rng.randint(1, 99_999)
    amount = f"{cents // 100}.{cents % 100:02d}"
    began = time.monotonic()
    try:
        if rng.random() < 0.5:
            people.charge(ref, amount, f"writer {seed} op {i}")
            net[ref] += cents
        else:
            people.credit(ref, amount, f"writer {seed} op {i}")
            net[ref] -= cents
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    slowest = max(slowest, time.monotonic() - began)
print(json.dumps({"net": net, "errors": errors[:10], "error_count": len(errors),
                  "seconds": time.monotonic() - start, "slowest": slowest}))
"""


@pytest.mark.slow
def test_eight_writer_processes_and_the_listener_lose_no_update_and_never_see_locked(
    db: Database, database_url: str, people: People, spawner: Spawner, tmp_path: Path
) -> None:
    crew = [
        people.add(f"Crew {n}", f"07110000{n:02d}", None, f"{1000 * n}")
        for n in range(1, SHARED_PEOPLE + 1)
    ]
    opening = balances(db)
    rng = random.Random(2)
    pending: list[tuple[int, str, int]] = []  # (person id, checkout id, amount)
    for person in crew:
        checkout_ids = [f"ws_CO_W{person.id}_{n:03d}" for n in range(PENDING_PER_PERSON)]
        amounts = [rng.randint(1, 2000) for _ in checkout_ids]
        add_pending(db, person, checkout_ids, amounts)
        pending += [(person.id or 0, c, a) for c, a in zip(checkout_ids, amounts, strict=True)]
    listener = spawner.listener("writers-listener")

    go = tmp_path / "go"
    refs = ",".join(str(p.id) for p in crew)
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                *map(str, (database_url, seed, OPS_PER_WRITER, go)),
                refs,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for seed in range(WRITERS)
    ]

    # The listener takes every pending payment's callback while the writers run, then the
    # same callbacks again (Daraja resends) until the writers are done: bounded in count.
    answers: list[tuple[int, float]] = []
    answers_lock = threading.Lock()
    writers_done = threading.Event()
    bodies = [paid_body(c, str(a)) for _p, c, a in pending]
    max_posts = 4 * len(bodies)
    next_post = iter(range(max_posts))
    next_lock = threading.Lock()

    def poster() -> None:
        while True:
            with next_lock:
                n = next(next_post, None)
            if n is None or (n >= len(bodies) and writers_done.is_set()):
                return
            try:
                result = post(listener.url, bodies[n % len(bodies)], timeout=30)
            except requests.RequestException as exc:
                result = (-1, 0.0)
                print("post failed:", exc)
            with answers_lock:
                answers.append(result)

    def all_ready() -> bool:
        dead = [w.returncode for w in writers if w.poll() is not None]
        assert dead == [], f"a writer died before the start: {writers[0].communicate()[1]}"
        return all(Path(f"{go}.ready.{seed}").exists() for seed in range(WRITERS))

    wait_for(all_ready, timeout=60)
    # cron's reconcile runs too: it replays stored callbacks the listener may be acting on.
    cron = Payments(db, callback_url=None, clock=utcnow, client_factory=no_network)
    cron_runs: list[int] = []
    cron_errors: list[str] = []

    def reconcile_from_cron() -> None:
        while not writers_done.wait(0.02) and len(cron_runs) < 5000:
            try:
                report = cron.reconcile()
            except Exception as exc:
                cron_errors.append(repr(exc))
                continue
            cron_errors.extend(report.errors)
            cron_runs.append(report.callbacks_applied)

    started = time.monotonic()
    go.touch()
    posters = [threading.Thread(target=poster) for _ in range(4)]
    posters.append(threading.Thread(target=reconcile_from_cron))
    for thread in posters:
        thread.start()
    reports: list[dict[str, Any]] = []
    failures: list[str] = []
    for writer in writers:
        try:
            out, err = writer.communicate(timeout=100)
        except subprocess.TimeoutExpired:
            writer.kill()
            out, err = writer.communicate()
        if writer.returncode != 0:
            failures.append(f"writer exit {writer.returncode}: {err[-2000:]}")
        else:
            reports.append(json.loads(out))
    writers_done.set()
    writing_took = time.monotonic() - started
    for thread in posters:
        thread.join(60)
    listener.stop()
    took = time.monotonic() - started

    statuses = [status for status, _ in answers]
    latencies = [seconds for _, seconds in answers]
    errors = [e for r in reports for e in r["errors"]]
    ops = WRITERS * OPS_PER_WRITER
    print(
        f"\n[row 2] {WRITERS} writers x {OPS_PER_WRITER} ops = {ops} balance changes in "
        f"{writing_took:.1f} s ({ops / writing_took:.0f}/s), slowest op "
        f"{max((r['slowest'] for r in reports), default=0):.3f} s; listener took "
        f"{len(answers)} callbacks ({len(bodies)} distinct) in {took:.1f} s, "
        f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 "
        f"{percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
        f"worker errors {sum(r['error_count'] for r in reports)}, "
        f"non-200 answers {sum(s != 200 for s in statuses)}; cron reconcile ran "
        f"{len(cron_runs)} times and applied {sum(cron_runs)} stored callbacks"
    )
    assert failures == []
    assert errors == []
    assert cron_errors == []
    assert [r["error_count"] for r in reports] == [0] * WRITERS
    assert len(statuses) >= len(bodies)
    assert set(statuses) == {200}
    log = listener.output.read_text(errors="replace")
    assert "locked" not in log.lower()
    assert "Traceback" not in log

    # 0 lost updates: each balance is the opening, plus every writer's net, minus its payments.
    expected = dict(opening)
    for report in reports:
        for ref, cents in report["net"].items():
            expected[int(ref)] += cents
    for person_id, _checkout, amount in pending:
        expected[person_id] -= amount * 100
    assert balances(db) == expected
    assert money_problems(db) == []
    entries = ledger_entries(db)
    assert len(entries) == len(opening) + ops + len(pending)
    assert sum(e.kind == BalanceKind.PAYMENT for e in entries) == len(pending)
    rows = callback_rows(db)
    assert len(rows) == len(answers)
    assert {r.outcome for r in rows} <= {CallbackOutcome.APPLIED, CallbackOutcome.DUPLICATE}
    assert sum(r.outcome == CallbackOutcome.APPLIED for r in rows) == len(pending)


# -- 2b. cron's reconcile while the listener takes callbacks -----------------------------------


def test_callback_replayed_by_reconcile_before_the_listener_acts_on_it_stays_applied(
    db: Database, person_with_balance: Person
) -> None:
    """Regression: the listener stores a body, cron's reconcile replays it (the row is still
    "received"), then the listener acts on it: the row that moved the money must keep saying
    so, not be rewritten as a duplicate of itself."""
    payments = Payments(db, callback_url=None, clock=utcnow, client_factory=no_network)
    [pid] = add_pending(db, person_with_balance, ["ws_CO_RACE"], [500])
    callback_id = payments.store_callback(paid_body("ws_CO_RACE"), "127.0.0.1", trusted=True)

    assert payments.replay_callbacks() == 1  # cron got there first
    late = payments.process_callback(callback_id)  # then the listener's own thread

    assert (late.outcome, late.payment_id) == (CallbackOutcome.APPLIED, pid)
    [row] = callback_rows(db)
    assert (row.outcome, row.payment_id) == (CallbackOutcome.APPLIED, pid)
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 1
    assert money_problems(db) == []


@pytest.mark.parametrize(
    "emulator_settings",
    [EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=False)],
)
def test_worker_and_reconcile_confirming_one_callback_at_once_keep_it_applied(
    payments: Payments, db: Database, crew_of_five: list[Person]
) -> None:
    """Regression: a "paid" after a recorded 1037 waits for a query; the listener's worker and
    cron's reconcile confirm it at the same moment. One of them moves the money, and the row
    says "applied", never "duplicate"."""
    requested = [payments.request(str(p.id), 100, "Deposit") for p in crew_of_five * 2]
    waiting: list[int] = []
    for payment in requested:
        checkout_id = payment.checkout_request_id or ""
        failed = payments.store_callback(
            unpaid_body(checkout_id, 1037, "DS timeout user cannot be reached"), None, trusted=True
        )
        assert payments.process_callback(failed).outcome == CallbackOutcome.APPLIED
        paid = payments.store_callback(paid_body(checkout_id, "100"), None, trusted=True)
        assert payments.process_callback(paid).outcome == CallbackOutcome.NEEDS_QUERY
        waiting.append(paid)

    for callback_id in waiting:
        start = threading.Barrier(2)

        def confirm(callback_id: int = callback_id, start: threading.Barrier = start) -> str:
            start.wait(5)
            return payments.confirm_callback(callback_id).outcome

        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = list(pool.map(lambda _: confirm(), range(2)))
        assert outcomes == [CallbackOutcome.APPLIED] * 2
    rows = {r.id: r for r in callback_rows(db)}
    assert [rows[i].outcome for i in waiting] == [CallbackOutcome.APPLIED] * 10
    assert [payments.get(p.id or 0).status for p in requested] == [PaymentStatus.COMPLETED] * 10
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 10
    assert money_problems(db) == []


# -- 2c. two listener processes on one database, in a storm of duplicates ---------------------

STORM_PAYMENTS = 60
STORM_COPIES = 6  # each success callback is posted this many times, to both listeners


@pytest.mark.slow
def test_two_listener_processes_in_a_duplicate_storm_complete_each_payment_once(
    db: Database, people: People, spawner: Spawner
) -> None:
    """Daraja resends, and the office runs two listeners (behind one proxy, or one per
    machine) on one database: the same success callbacks reach both many times at once.
    Every body is stored, each payment is completed by exactly one of them, and each balance
    moves once."""
    crew = [people.add(f"Crew {n}", f"07140000{n:02d}", None, "50000") for n in range(1, 4)]
    opening = balances(db)
    pending: list[tuple[int, str, int]] = []  # (person id, checkout id, amount)
    for n, person in enumerate(crew):
        checkout_ids = [f"ws_CO_S{n}_{k:03d}" for k in range(STORM_PAYMENTS // len(crew))]
        amounts = [100 + k for k in range(len(checkout_ids))]
        add_pending(db, person, checkout_ids, amounts)
        pending += [(person.id or 0, c, a) for c, a in zip(checkout_ids, amounts, strict=True)]
    first = spawner.listener("storm-a", threads=4)
    second = spawner.listener("storm-b", threads=4)
    bodies = [paid_body(c, str(a), receipt=f"TS{n:08d}") for n, (_p, c, a) in enumerate(pending)]
    posts = [
        ((first, second)[copy % 2].url, body) for body in bodies for copy in range(STORM_COPIES)
    ]
    random.Random(4).shuffle(posts)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(lambda p: post(p[0], p[1], timeout=30), posts))
    took = time.monotonic() - started
    first.stop()
    second.stop()

    assert [status for status, _ in answers] == [200] * len(posts)
    for listener in (first, second):
        log = listener.output.read_text(errors="replace")
        assert "Traceback" not in log
        assert "locked" not in log.lower()
    rows = callback_rows(db)
    assert sorted(r.body for r in rows) == sorted(body for _url, body in posts)  # all stored
    applied = [r for r in rows if r.outcome == CallbackOutcome.APPLIED]
    assert sorted(r.checkout_request_id or "" for r in applied) == sorted(c for _, c, _ in pending)
    assert {r.outcome for r in rows} == {CallbackOutcome.APPLIED, CallbackOutcome.DUPLICATE}
    with db.read() as session:
        payments = session.exec(select(MpesaPayment)).all()
    assert {p.status for p in payments} == {PaymentStatus.COMPLETED}
    expected = dict(opening)
    for person_id, _checkout, amount in pending:
        expected[person_id] -= amount * 100
    assert balances(db) == expected
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == len(pending)
    assert money_problems(db) == []
    latencies = [seconds for _, seconds in answers]
    print(
        f"\n[row 2c] {db.dialect}: 2 listeners x 4 threads took {len(posts)} posts "
        f"({len(pending)} payments x {STORM_COPIES}) in {took:.1f} s, p50 "
        f"{percentile(latencies, 0.5) * 1000:.0f} ms, p99 {percentile(latencies, 0.99) * 1000:.0f} "
        f"ms; {len(applied)} applied, {len(rows) - len(applied)} duplicates"
    )


# -- 3. the listener SIGKILLed mid-burst -------------------------------------------------------

KILL_ROUNDS = 50
BURST_PAYMENTS = 30
BURST_RESENDS = 10  # the same payment's callback posted twice in a burst


@pytest.mark.slow
def test_listener_killed_mid_burst_fifty_times_keeps_every_answered_callback_and_no_half_payment(
    db: Database, people: People, spawner: Spawner
) -> None:
    crew = [people.add(f"Crew {n}", f"07120000{n:02d}", None, "100000") for n in range(1, 4)]
    rng = random.Random(3)
    answered: dict[str, str] = {}  # marker -> CheckoutRequestID, for every post answered 200
    lost_in_flight = 0
    mid_burst = 0
    startups: list[float] = []
    started = time.monotonic()
    for round_no in range(KILL_ROUNDS):
        checkout_ids = [f"ws_CO_K{round_no:02d}_{n:03d}" for n in range(BURST_PAYMENTS)]
        for n, person in enumerate(crew):
            mine = checkout_ids[n :: len(crew)]
            add_pending(db, person, mine, [500] * len(mine))
        targets = checkout_ids + rng.sample(checkout_ids, BURST_RESENDS)
        rng.shuffle(targets)
        burst = [(f"mark-{round_no}-{n}", cid) for n, cid in enumerate(targets)]

        up = time.monotonic()
        listener = spawner.listener(f"kill-{round_no:02d}")
        startups.append(time.monotonic() - up)

        answering = threading.Event()

        def fire(
            marker: str,
            checkout_id: str,
            url: str = listener.url,
            answering: threading.Event = answering,
        ) -> bool:
            body = paid_body(checkout_id, "500", desc=f"{PAID_DESC} {marker}")
            try:
                ok = post(url, body, timeout=10)[0] == 200
            except requests.RequestException:
                return False
            answering.set()
            return ok

        delay = rng.uniform(0.0, 0.1)
        with ThreadPoolExecutor(max_workers=10) as pool:
            futures = [(m, c, pool.submit(fire, m, c)) for m, c in burst]
            # Counted from the first answer: a listener on PostgreSQL opens a connection for
            # each of its threads on their first requests, so its bursts start later.
            answering.wait(10)
            time.sleep(delay)
            listener.kill()
            results = [(m, c, f.result(timeout=30)) for m, c, f in futures]
        ok = [(m, c) for m, c, good in results if good]
        answered.update(ok)
        lost_in_flight += len(burst) - len(ok)
        mid_burst += 0 < len(ok) < len(burst)

        problems = money_problems(db)
        assert problems == [], f"round {round_no}: {problems}"
        stored = {
            json.loads(row.body)["Body"]["stkCallback"]["ResultDesc"].rsplit(" ", 1)[-1]
            for row in callback_rows(db)
        }
        missing = [m for m, _c in ok if m not in stored]
        assert missing == [], f"round {round_no}: answered 200 but not stored: {missing}"

    # What a kill left stored but not acted on is applied by the next reconcile (no network).
    leftovers = sum(r.outcome == CallbackOutcome.RECEIVED for r in callback_rows(db))
    replay = Payments(db, callback_url=None, clock=utcnow, client_factory=no_network)
    replay.replay_callbacks()
    assert money_problems(db) == []
    with db.read() as session:
        status_of = {
            p.checkout_request_id: p.status for p in session.exec(select(MpesaPayment)).all()
        }
    not_completed = {c for c in answered.values() if status_of[c] != PaymentStatus.COMPLETED}
    assert not_completed == set()
    completed = sum(s == PaymentStatus.COMPLETED for s in status_of.values())
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == completed
    print(
        f"\n[row 3] {KILL_ROUNDS} kills in {time.monotonic() - started:.1f} s; listener start "
        f"median {statistics.median(startups):.2f} s, max {max(startups):.2f} s; "
        f"{mid_burst}/{KILL_ROUNDS} kills mid-burst; {len(answered)} posts answered 200 and "
        f"all stored, {lost_in_flight} lost in flight; {leftovers} stored but not yet acted on "
        f"at a kill, applied by replay; {completed} payments completed, each once; "
        f"integrity ok {KILL_ROUNDS}/{KILL_ROUNDS}"
    )
    assert mid_burst >= KILL_ROUNDS // 5  # the kills really landed inside bursts


# -- in-process listener with every answer on record -------------------------------------------


class AnswerRecorder:
    """WSGI middleware around the real CallbackApp noting every status it answers."""

    def __init__(self, app: CallbackApp) -> None:
        self.app = app
        self.max_body = app.max_body
        self.statuses: list[int] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def noting(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            self.statuses.append(int(status.split()[0]))
            return start_response(status, headers, *exc_info)

        return self.app(environ, noting)


@dataclass
class RecordedListener:
    listener: Listener
    recorder: AnswerRecorder


@pytest.fixture
def recorded_listener(payments: Payments) -> Iterator[RecordedListener]:
    path = "/cb/" + secrets.token_urlsafe(16)
    app = CallbackApp(payments, callback_path=path)
    recorder = AnswerRecorder(app)
    server = make_server(cast(CallbackApp, recorder), "127.0.0.1", 0, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"
    payments.callback_url = base + path
    yield RecordedListener(Listener(base + path, base, path, app, server), recorder)
    server.close()
    app.stop()


def cli_env(
    monkeypatch: pytest.MonkeyPatch, emulator: DarajaEmulator, database_url: str, callback_url: str
) -> None:
    for name, value in {
        "MPESA_CONSUMER_KEY": CONSUMER_KEY,
        "MPESA_CONSUMER_SECRET": CONSUMER_SECRET,
        "MPESA_PASS_KEY": SANDBOX_PASSKEY,
        "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
        "MPESA_BASE_URL": emulator.url,
        "MPESA_CALLBACK_URL": callback_url,
        "SFCRM_DATABASE_URL": database_url,
    }.items():
        monkeypatch.setenv(name, value)


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(cli_app, [*args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def crew_of_five(people: People) -> list[Person]:
    return [people.add(f"Crew {n}", f"07130000{n:02d}", None, "10000") for n in range(1, 6)]


# -- 4. the listener down while payments complete ----------------------------------------------


@pytest.mark.parametrize(
    "emulator_settings",
    [EmulatorSettings(callback_delay=0.05, prompt_seconds=1.0, send_callbacks=True)],
)
def test_payments_completed_while_the_listener_was_down_are_settled_by_one_reconcile(
    payments: Payments,
    emulator: DarajaEmulator,
    db: Database,
    database_url: str,
    crew_of_five: list[Person],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = f"http://127.0.0.1:{free_port()}/cb/{secrets.token_urlsafe(16)}"  # nobody listens
    payments.callback_url = down
    opening = balances(db)
    requested = [
        payments.request(str(crew_of_five[n % 5].id), 100 + n, "Crew levy") for n in range(20)
    ]
    # Daraja finished all 20 and tried to tell us: every delivery failed.
    wait_for(lambda: len(emulator.callbacks_sent) == 20, timeout=20)
    assert callback_rows(db) == []
    assert all(payments.get(p.id or 0).status == PaymentStatus.PENDING for p in requested)

    cli_env(monkeypatch, emulator, database_url, down)
    started = time.monotonic()
    report = cli_json("mpesa", "reconcile", "--older-than", "0s")
    took = time.monotonic() - started
    assert report["checked"] == 20
    assert sorted(p["payment_id"] for p in report["settled"]) == sorted(p.id for p in requested)
    assert {p["status"] for p in report["settled"]} == {PaymentStatus.COMPLETED}
    assert report["still_pending"] == report["errors"] == report["unknown_outcome"] == []
    for payment in requested:
        [push] = checkouts_of(db, payment.id or 0)
        assert (push.result_code, push.result_source) == ("0", "query")
    expected = dict(opening)
    for payment in requested:
        expected[payment.person_id] -= payment.amount * 100
    assert balances(db) == expected
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 20
    assert money_problems(db) == []

    # The listener comes back and Daraja's lost callbacks turn up after all.
    late = start_listener(payments)
    try:
        bodies = emulator.callbacks_sent
        sent_for = [cast(Any, b)["Body"]["stkCallback"]["CheckoutRequestID"] for b in bodies]
        assert sorted(sent_for) == sorted(p.checkout_request_id for p in requested)
        with ThreadPoolExecutor(max_workers=10) as pool:
            statuses = list(pool.map(lambda b: late.post(b).status_code, bodies))
    finally:
        late.server.close()
        late.app.stop()
    assert statuses == [200] * 20
    assert [r.outcome for r in callback_rows(db)] == [CallbackOutcome.DUPLICATE] * 20
    assert balances(db) == expected
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 20
    again = cli_json("mpesa", "reconcile", "--older-than", "0s")
    assert (again["checked"], again["settled"], again["callbacks_applied"]) == (0, [], 0)
    assert balances(db) == expected
    assert len(emulator.pushes) == 20  # reconcile never pushes
    print(
        f"\n[row 4] 20 payments completed with the listener down: reconcile settled 20/20 by "
        f"query in one run ({took:.2f} s), 20 late callbacks answered 200, 0 changes"
    )


# -- 5. a callback before the push's answer; a callback nobody asked for -------------------------


@pytest.mark.parametrize(
    "emulator_settings",
    [EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=False)],
)
def test_callbacks_that_beat_the_push_answer_are_applied_once_when_it_is_stored(
    payments: Payments,
    daraja_client: DarajaClient,
    recorded_listener: RecordedListener,
    db: Database,
    crew_of_five: list[Person],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listener = recorded_listener.listener
    real_push = daraja_client.stk_push
    early: list[tuple[str, int, str]] = []  # checkout id, answer, stored outcome at that moment

    def push_whose_callback_arrives_first(**kwargs: Any) -> Any:
        accepted = real_push(**kwargs)
        checkout_id = accepted.checkout_request_id
        answer = listener.post(paid_body(checkout_id, str(kwargs["amount"])))
        [row] = [r for r in callback_rows(db) if r.checkout_request_id == checkout_id]
        early.append((checkout_id, answer.status_code, row.outcome))
        return accepted

    monkeypatch.setattr(daraja_client, "stk_push", push_whose_callback_arrives_first)
    opening = balances(db)
    requested = [payments.request(str(p.id), 250, "Deposit") for p in crew_of_five * 2]

    assert [(a, o) for _c, a, o in early] == [(200, CallbackOutcome.UNMATCHED)] * 10
    # Attached as soon as the push's answer was stored: complete when request() returns.
    assert [p.status for p in requested] == [PaymentStatus.COMPLETED] * 10
    rows = callback_rows(db)
    assert [(r.outcome, r.payment_id) for r in rows] == [
        (CallbackOutcome.APPLIED, p.id) for p in requested
    ]
    assert balances(db) == {pid: cents - 2 * 250_00 for pid, cents in opening.items()}
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 10
    payments.reconcile(older_than=timedelta(0))
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 10
    assert money_problems(db) == []
    assert recorded_listener.recorder.statuses == [200] * 10


@pytest.mark.parametrize(
    "emulator_settings",
    [EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=True)],
)
def test_emulator_callbacks_racing_the_push_answer_complete_each_payment_once(
    payments: Payments,
    emulator: DarajaEmulator,
    recorded_listener: RecordedListener,
    db: Database,
    crew_of_five: list[Person],
) -> None:
    opening = balances(db)
    count = 30
    with ThreadPoolExecutor(max_workers=5) as pool:
        requested = list(
            pool.map(
                lambda n: payments.request(str(crew_of_five[n % 5].id), 100, "Deposit"),
                range(count),
            )
        )
    wait_for(lambda: len(emulator.callbacks_sent) == count, timeout=20)
    wait_for(
        lambda: all(payments.get(p.id or 0).status == PaymentStatus.COMPLETED for p in requested),
        timeout=10,
    )
    assert recorded_listener.recorder.statuses == [200] * count
    rows = callback_rows(db)
    assert sorted((r.payment_id or 0) for r in rows) == sorted(p.id or 0 for p in requested)
    assert {r.outcome for r in rows} == {CallbackOutcome.APPLIED}
    assert balances(db) == {pid: cents - 6 * 100_00 for pid, cents in opening.items()}
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == count
    assert money_problems(db) == []
    with db.read() as session:
        pushed_at = {
            c.checkout_request_id: c.pushed_at for c in session.exec(select(MpesaCheckout)).all()
        }
    early = sum(r.received_at < pushed_at[r.checkout_request_id or ""] for r in rows)
    print(
        f"\n[row 5] {count} pushes with callback_delay=0: {early} callbacks stored before "
        f"their push's answer; all {count} answered 200, each payment reduced once"
    )


@pytest.mark.parametrize(
    "emulator_settings",  # the pending payment's own callback would race the stranger's
    [EmulatorSettings(callback_delay=0.05, prompt_seconds=1.0, send_callbacks=False)],
)
def test_callback_for_an_id_nobody_issued_is_answered_stored_and_stays_unmatched(
    payments: Payments,
    emulator: DarajaEmulator,
    listener: Listener,
    db: Database,
    database_url: str,
    person_with_balance: Person,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pending = payments.request(str(person_with_balance.id), 500, "Deposit")
    stranger = "ws_CO_01012026000000000999999999"
    body = paid_body(stranger, "500", receipt="TNOBODY001")

    answer = listener.post(body)

    assert answer.status_code == 200
    [row] = callback_rows(db)
    assert (row.body, row.outcome, row.payment_id) == (body, CallbackOutcome.UNMATCHED, None)
    cli_env(monkeypatch, emulator, database_url, listener.url)
    listed = cli_json("mpesa", "callbacks", "--unmatched")
    assert [(d["id"], d["checkout_request_id"]) for d in listed] == [(row.id, stranger)]
    # Reconcile and a later push do not give it to anyone.
    cli_json("mpesa", "reconcile", "--older-than", "0s")
    payments.request(str(person_with_balance.id), 500, "Deposit")
    listed = cli_json("mpesa", "callbacks", "--unmatched")
    assert [(d["id"], d["outcome"]) for d in listed] == [(row.id, CallbackOutcome.UNMATCHED)]
    assert payments.get(pending.id or 0).receipt_number != "TNOBODY001"
    assert money_problems(db) == []


# -- 6. amount forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "emulator_settings",
    [EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=False)],
)
def test_amount_forms_of_500_complete_and_1_goes_to_review_over_the_socket(
    payments: Payments,
    listener: Listener,
    db: Database,
    person_with_balance: Person,
) -> None:
    start = balances(db)[person_with_balance.id or 0]
    forms = ["500", "500.0", '"500.00"']
    requested = [payments.request("1", 500, "Deposit", allow_credit=True) for _ in forms]
    for payment, form in zip(requested, forms, strict=True):
        body = paid_body(payment.checkout_request_id or "", form)
        assert form.encode() in body
        assert listener.post(body).status_code == 200
        assert payments.get(payment.id or 0).status == PaymentStatus.COMPLETED
    assert balances(db)[person_with_balance.id or 0] == start - 3 * 500_00

    short = payments.request("1", 500, "Deposit", allow_credit=True)
    assert listener.post(paid_body(short.checkout_request_id or "", "1")).status_code == 200
    review = payments.get(short.id or 0)
    assert review.status == PaymentStatus.NEEDS_REVIEW
    assert not review.balance_applied
    # "1" for a push already completed as 500 changes nothing either.
    again = paid_body(requested[0].checkout_request_id or "", "1")
    assert listener.post(again).status_code == 200
    # Neither is open any more: reconcile changes nothing.
    payments.reconcile(older_than=timedelta(0))
    assert payments.get(short.id or 0).status == PaymentStatus.NEEDS_REVIEW
    assert payments.get(requested[0].id or 0).status == PaymentStatus.COMPLETED
    assert balances(db)[person_with_balance.id or 0] == start - 3 * 500_00
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 3
    assert [r.outcome for r in callback_rows(db)] == [
        CallbackOutcome.APPLIED,
        CallbackOutcome.APPLIED,
        CallbackOutcome.APPLIED,
        CallbackOutcome.REVIEW,
        CallbackOutcome.DUPLICATE,
    ]
    assert money_problems(db) == []


# -- 7. out of order -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "emulator_settings",
    [EmulatorSettings(callback_delay=1.5, prompt_seconds=1.5, send_callbacks=False)],
)
def test_results_out_of_order_complete_only_what_daraja_confirms(
    payments: Payments,
    daraja_client: DarajaClient,
    listener: Listener,
    db: Database,
    person_with_balance: Person,
) -> None:
    start = balances(db)[person_with_balance.id or 0]
    paid_then_cancelled = payments.request("1", 500, "Deposit")
    failed_then_paid = payments.request("1", 500, "Deposit")
    forged = payments.request("1", 500, "Deposit", phone=UNANSWERED_PHONE)
    first, second, third = (p.checkout_request_id or "" for p in (
        paid_then_cancelled, failed_then_paid, forged
    ))  # fmt: skip

    # 1032 after 0: stays completed.
    assert listener.post(paid_body(first, "500")).status_code == 200
    assert listener.post(unpaid_body(first, 1032, "Request cancelled by user")).status_code == 200
    assert payments.get(paid_then_cancelled.id or 0).status == PaymentStatus.COMPLETED

    # 0 after 1037: not believed while Daraja's query still says "being processed".
    unreachable = "DS timeout user cannot be reached"
    assert listener.post(unpaid_body(second, 1037, unreachable)).status_code == 200
    assert listener.post(unpaid_body(third, 1037, unreachable)).status_code == 200
    assert listener.post(paid_body(second, "500")).status_code == 200
    assert listener.post(paid_body(third, "500", phone=UNANSWERED_PHONE)).status_code == 200
    assert daraja_client.stk_query(second).processing  # the confirmation cannot have come yet
    assert payments.get(failed_then_paid.id or 0).status == PaymentStatus.FAILED
    assert payments.get(forged.id or 0).status == PaymentStatus.FAILED
    assert balances(db)[person_with_balance.id or 0] == start - 500_00

    # Once Daraja settles, the query confirms the real payment and refutes the forged one.
    wait_for(lambda: not daraja_client.stk_query(second).processing, timeout=10)
    wait_for(lambda: not daraja_client.stk_query(third).processing, timeout=10)
    payments.reconcile(older_than=timedelta(0))
    completed = payments.get(failed_then_paid.id or 0)
    assert completed.status == PaymentStatus.COMPLETED
    assert checkouts_of(db, completed.id or 0)[0].result_source == "query"
    assert payments.get(forged.id or 0).status == PaymentStatus.FAILED
    assert payments.get(paid_then_cancelled.id or 0).status == PaymentStatus.COMPLETED
    assert balances(db)[person_with_balance.id or 0] == start - 2 * 500_00
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 2
    assert money_problems(db) == []


@pytest.mark.parametrize(
    "emulator_settings",
    [EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=False)],
)
def test_paid_and_cancelled_racing_for_twenty_payments_end_completed_once(
    payments: Payments,
    listener: Listener,
    db: Database,
    crew_of_five: list[Person],
) -> None:
    """Daraja (asked later) says all twenty were paid; 0 and 1032 arrive at once, either first."""
    opening = balances(db)
    requested = [payments.request(str(crew_of_five[n % 5].id), 100, "Deposit") for n in range(20)]
    bodies = []
    for payment in requested:
        pair = [
            paid_body(payment.checkout_request_id or "", "100"),
            unpaid_body(payment.checkout_request_id or "", 1032, "Request cancelled by user"),
        ]
        random.shuffle(pair)
        bodies += pair
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda b: post(listener.url, b)[0], bodies))
    assert statuses == [200] * 40
    # A cancel that won the race is overturned only by the listener's confirming query.
    wait_for(
        lambda: all(payments.get(p.id or 0).status == PaymentStatus.COMPLETED for p in requested),
        timeout=15,
    )
    cancelled_first = sum(
        r.outcome == CallbackOutcome.APPLIED and r.result_code == "1032" for r in callback_rows(db)
    )
    assert balances(db) == {pid: cents - 4 * 100_00 for pid, cents in opening.items()}
    assert len(ledger_entries(db, BalanceKind.PAYMENT)) == 20
    assert money_problems(db) == []
    print(
        f"\n[row 7] 20 payments, 0 and 1032 posted at once: {cancelled_first} cancels won the "
        f"race and were overturned by query; 20/20 completed, each once"
    )
