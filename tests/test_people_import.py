"""``sfcrm people import``: a file is read as a stream and checked whole, then written in one
short transaction; all rows or none; files past the documented limits are refused early."""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import col
from support import Listener, paid_callback, run, run_json, sfcrm_process, utcnow

from sfcrm import people as people_module
from sfcrm.db import Database
from sfcrm.emulator import EmulatorSettings
from sfcrm.errors import ConflictError, ValidationError
from sfcrm.models import BalanceEntry, PaymentStatus, Person
from sfcrm.payments import Payments
from sfcrm.people import People

HEADER = "name,phone,email,balance\n"


@pytest.fixture(autouse=True)
def database_for_commands(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    """The CLI, in-process or as its own process, uses the tests' database."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    # The tests post every callback themselves.
    return EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=False)


def crew_rows(count: int, first: int = 0) -> str:
    """``count`` good rows: every other one with an email, two in three with a balance."""
    return "".join(
        f"Crew Member {i},07{i:08d},{f'crew{i}@example.co.ke' if i % 2 == 0 else ''},"
        f"{(i % 50) * 100 if i % 3 else ''}\n"
        for i in range(first, first + count)
    )


def stored(db: Database, query: Any) -> Any:
    with db.read() as session:
        return session.execute(query).scalar_one()


def count(model: Any, *where: Any) -> Any:
    return select(func.count()).select_from(model).where(*where)


def people_stored(db: Database) -> int:
    return int(stored(db, count(Person)))


def error_lines(result: Any) -> list[str]:
    return list(result.stderr.splitlines())


# -- what is imported ----------------------------------------------------------------------------


def test_import_writes_each_row_with_its_opening_balance_and_reports_the_stored_ids(
    tmp_path: Path, db: Database
) -> None:
    run_json("people", "add", "--name", "Already Here", "--phone", "0799000000")
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(3000))
    doc = run_json("people", "import", str(file))
    assert doc["imported"] == 3000
    assert doc["people"][:2] == [
        {"id": 2, "name": "Crew Member 0", "phone": "254700000000",
         "email": "crew0@example.co.ke", "balance": "0.00", "archived_at": None},
        {"id": 3, "name": "Crew Member 1", "phone": "254700000001", "email": None,
         "balance": "100.00", "archived_at": None},
    ]  # fmt: skip
    last_two = doc["people"][-2:]
    assert [run_json("people", "show", str(p["id"])) for p in last_two] == last_two
    # every balance is its ledger: one opening entry for each person who owes something
    owing = sum(1 for i in range(3000) if i % 3 and i % 50)
    assert stored(db, count(BalanceEntry, col(BalanceEntry.kind) == "opening")) == owing
    ledger_sum = (
        select(func.coalesce(func.sum(BalanceEntry.amount_cents), 0))
        .where(col(BalanceEntry.person_id) == col(Person.id))
        .scalar_subquery()
    )
    off_ledger = stored(db, count(Person, col(Person.balance_cents) != ledger_sum))
    assert off_ledger == 0
    assert run_json("people", "history", "3")["entries"][0]["kind"] == "opening"


def test_import_of_a_large_file_with_a_bad_last_row_adds_nobody(
    tmp_path: Path, db: Database
) -> None:
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(30_000) + "Last One,0812000002,,\n")
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result)[0] == (
        "Error: crew.csv was not imported: line 30002: not a Kenyan mobile number "
        "(must be 07.. or 01..) (0812000002)"
    )
    assert error_lines(result)[1] == (
        "Hint: fix the lines named and import the file again; nothing was added"
    )
    assert people_stored(db) == 0


def test_import_reports_phones_and_emails_already_stored_or_repeated_as_before(
    tmp_path: Path, people: People
) -> None:
    people.add("Achieng Otieno", "0708374149", "achieng@example.com")
    people.add("Baraka Mwangi", "0711000001", "baraka@example.com")
    file = tmp_path / "crew.csv"
    file.write_text(
        HEADER
        + "New One,0712000001,new@example.com,\n"
        + "Same Phone,+254 708 374 149,other@example.com,\n"
        + "Same Email,0712000003,BARAKA@example.com,\n"
        + "Repeat,0712000001,,\n"
        + "Both Taken,0711000001,achieng@example.com,\n"
        + "Repeat Email,0712000006,new@example.com,\n"
    )
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result)[0] == (
        "Error: crew.csv was not imported: "
        "line 5: phone repeats line 2; "
        "line 7: email repeats line 2; "
        "line 3: person 1 (Achieng Otieno) already has this phone (254708374149); "
        "line 4: person 2 (Baraka Mwangi) already has this email (baraka@example.com); "
        "line 6: person 2 (Baraka Mwangi) already has this phone (254711000001)"
    )
    assert [p.name for p in people.find()] == ["Achieng Otieno", "Baraka Mwangi"]


def test_import_names_the_first_twenty_bad_rows_and_counts_the_rest(
    tmp_path: Path, people: People
) -> None:
    first = tmp_path / "first.csv"
    first.write_text(HEADER + crew_rows(25))
    people.import_csv(first)
    again = tmp_path / "again.csv"
    again.write_text(HEADER + crew_rows(30))
    result = run("people", "import", str(again))
    assert result.exit_code == 4
    message = error_lines(result)[0]
    assert message.startswith(
        "Error: again.csv was not imported: "
        "line 2: person 1 (Crew Member 0) already has this phone (254700000000); "
    )
    assert message.count("already has this phone") == 20
    assert message.endswith(
        "line 21: person 20 (Crew Member 19) already has this phone (254700000019); and 5 more"
    )
    assert len(people.find()) == 25


def test_a_phone_stored_by_someone_else_after_the_check_refuses_the_whole_file(
    tmp_path: Path, db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = db.write

    @contextmanager
    def write_after_another_office_added_a_person() -> Iterator[Any]:
        other = Database(database_url)
        try:
            People(other, utcnow).add("Late Comer", "0700000002")
        finally:
            other.close()
        with real_write() as session:
            yield session

    monkeypatch.setattr(db, "write", write_after_another_office_added_a_person)
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(6000))
    with pytest.raises(ValidationError) as refused:
        People(db, utcnow).import_csv(file)
    assert str(refused.value) == (
        "crew.csv was not imported: "
        "line 4: person 1 (Late Comer) already has this phone (254700000002)"
    )
    assert refused.value.exit_code == 4
    assert people_stored(db) == 1
    assert stored(db, count(BalanceEntry)) == 0


def test_a_person_added_but_not_yet_committed_during_the_check_refuses_the_whole_file(
    tmp_path: Path, db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other office's add has written its row, not committed it, when the file is checked:
    # the check cannot see it, the import's own write meets it (PostgreSQL: the unique index
    # waits for the add's commit; SQLite: BEGIN IMMEDIATE does).
    other = Database(database_url)
    adder = People(other, utcnow)
    written, checked = threading.Event(), threading.Event()

    def create_then_wait(session: Any, new: Any, now: Any) -> Person:
        person = People._create(adder, session, new, now)
        written.set()
        assert checked.wait(30)
        return person

    monkeypatch.setattr(adder, "_create", create_then_wait)
    importer = People(db, utcnow)
    checks: list[int] = []

    def check_then_let_the_add_commit(rows: Any) -> None:
        People._report_taken(importer, rows)
        checks.append(rows.bad)
        checked.set()

    monkeypatch.setattr(importer, "_report_taken", check_then_let_the_add_commit)
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(10))
    adding = threading.Thread(target=adder.add, args=("Late Comer", "0700000002"))
    adding.start()
    try:
        assert written.wait(30)
        with pytest.raises(ValidationError) as refused:
            importer.import_csv(file)
    finally:
        checked.set()
        adding.join(30)
        other.close()
    assert str(refused.value) == (
        "crew.csv was not imported: "
        "line 4: person 1 (Late Comer) already has this phone (254700000002)"
    )
    assert checks == [0, 1]  # clean at first; the refused write checked again
    assert people_stored(db) == 1
    assert stored(db, count(BalanceEntry)) == 0


def test_a_person_added_while_an_import_writes_is_refused_as_already_there(
    tmp_path: Path, db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The add checks while the import's rows are written but not committed: on PostgreSQL its
    # check cannot see them and its insert waits for the import, then is refused; the add's
    # check, run again, names the person. (On SQLite the add waits for the import's commit
    # before its check.)
    importer = People(db, utcnow)
    written, release = threading.Event(), threading.Event()

    def insert_then_wait(session: Any, rows: Any, now: Any) -> list[int]:
        ids = People._insert(importer, session, rows, now)
        written.set()
        assert release.wait(30)
        return ids

    monkeypatch.setattr(importer, "_insert", insert_then_wait)
    other = Database(database_url)
    adder = People(other, utcnow)
    passed: list[str] = []

    def check(session: Any, new: Any) -> None:
        People._check_unique(adder, session, new)
        passed.append(new.phone)
        release.set()  # the import commits while this add goes on to its insert

    monkeypatch.setattr(adder, "_check_unique", check)
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(10))
    importing = threading.Thread(target=importer.import_csv, args=(file,))
    importing.start()
    try:
        assert written.wait(30)
        if db.dialect == "sqlite":
            release.set()  # the add's BEGIN IMMEDIATE waits for the import's commit
        with pytest.raises(ConflictError) as refused:
            adder.add("Late Comer", "0700000003")
    finally:
        release.set()
        importing.join(30)
        other.close()
    assert str(refused.value) == ("person 4 (Crew Member 3) already has this phone (254700000003)")
    assert refused.value.exit_code == 6
    # PostgreSQL: the first check passed, the refused insert ran it again
    assert len(passed) == (1 if db.dialect == "postgresql" else 0)
    assert people_stored(db) == 10


# -- the listener is not kept waiting ------------------------------------------------------------


@pytest.mark.slow
def test_a_paid_callback_during_a_large_import_is_answered_in_under_two_seconds(
    tmp_path: Path,
    db_path: Path,  # the file's write lock is what the listener could wait for: SQLite only
    db: Database,
    payments: Payments,
    listener: Listener,
    person_with_balance: Person,
) -> None:
    payment = payments.request(str(person_with_balance.id), 500, "Crew deposit")
    assert payment.checkout_request_id is not None
    body = paid_callback(payment.checkout_request_id)
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(40_000))

    importing = sfcrm_process("people", "import", str(file))
    answers: list[float] = []
    try:
        # Daraja's callbacks, one after another for as long as the import runs: some of them
        # arrive while it writes.
        while importing.poll() is None:
            started = time.monotonic()
            reply = listener.post(body)
            answers.append(time.monotonic() - started)
            assert reply.status_code == 200
        out, err = importing.communicate(timeout=60)
    finally:
        if importing.poll() is None:
            importing.kill()
            importing.wait(5)
    assert importing.returncode == 0, err
    assert out.strip() == f"Imported 40000 people from {file}."
    print(
        f"\n[import] {len(answers)} callbacks answered during a 40,000-row import, "
        f"the slowest in {max(answers):.2f} s"
    )
    assert len(answers) >= 10
    assert max(answers) < 2.0, f"slowest of {len(answers)} answers: {max(answers):.2f} s"
    assert payments.get(payment.id or 0).status == PaymentStatus.COMPLETED
    assert people_stored(db) == 40_001


# -- files that are refused ------------------------------------------------------------------------


def test_a_field_over_the_csv_limit_is_one_clear_error_naming_its_row(
    tmp_path: Path, db: Database
) -> None:
    limit = csv.field_size_limit()
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + "Good One,0712000001,,\n" + "A" * (limit + 1) + ",0712000002,,\n")
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result) == [
        f"Error: line 3: a field is longer than {limit:,} characters ({file})",
        "Hint: fix that line and import the file again; nothing was added",
    ]
    assert people_stored(db) == 0


def test_a_quoted_field_running_over_many_lines_past_the_csv_limit_is_refused(
    tmp_path: Path, db: Database
) -> None:
    limit = csv.field_size_limit()
    file = tmp_path / "crew.csv"
    lines = ("x" * 999 + "\n") * (limit // 1000 + 1)
    file.write_text(HEADER + "Good One,0712000001,,\n" + f'"{lines}",0712000002,,\n')
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result)[0] == (
        f"Error: line 3: a field is longer than {limit:,} characters ({file})"
    )
    assert people_stored(db) == 0


def test_a_line_longer_than_the_limit_is_refused_before_it_is_split(
    tmp_path: Path, db: Database
) -> None:
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + "," * (people_module.MAX_IMPORT_LINE_BYTES + 1) + "\n")
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result)[0] == (
        f"Error: line 2: the line is longer than "
        f"{people_module.MAX_IMPORT_LINE_BYTES:,} bytes ({file})"
    )
    assert people_stored(db) == 0


def test_a_file_with_more_rows_than_the_limit_is_refused_with_nothing_imported(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(people_module, "MAX_IMPORT_ROWS", 1000)
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(1001))
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result) == [
        f"Error: more than 1,000 rows, the most one import takes ({file})",
        "Hint: split the file and import each part; nothing was added",
    ]
    assert people_stored(db) == 0


def test_a_file_larger_than_the_limit_is_refused_before_it_is_read(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(people_module, "MAX_IMPORT_BYTES", 2_000_000)
    file = tmp_path / "crew.csv"
    file.write_text(HEADER + crew_rows(50_000))
    assert file.stat().st_size > 2_000_000
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result)[0] == (
        f"Error: larger than 2 MB, the most one import takes ({file})"
    )
    assert people_stored(db) == 0


def test_an_endless_stream_is_refused_once_past_the_limit_without_being_read_to_its_end(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(people_module, "MAX_IMPORT_BYTES", 1_000_000)
    fifo = tmp_path / "endless.csv"
    os.mkfifo(fifo)
    chunk = crew_rows(1000).encode()  # about 45 kB
    planned = 200  # 9 MB: far past the limit, yet an end if the whole stream were read
    sent: list[int] = []

    def feed() -> None:
        with open(fifo, "wb") as pipe:
            pipe.write(HEADER.encode())
            try:
                for _ in range(planned):
                    pipe.write(chunk)
                    sent.append(len(chunk))
            except BrokenPipeError:
                pass  # the reader stopped: what an endless stream meets

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        result = run("people", "import", str(fifo))
    finally:
        feeder.join(30)
    assert result.exit_code == 4
    assert error_lines(result)[0] == f"Error: larger than 1 MB, the most one import takes ({fifo})"
    assert len(sent) < planned
    assert people_stored(db) == 0


def test_a_file_that_is_not_utf8_is_refused_naming_its_first_bad_line(
    tmp_path: Path, db: Database
) -> None:
    file = tmp_path / "crew.csv"
    file.write_bytes((HEADER + "Good One,0712000001,,\nJosé,0712000002,,\n").encode("latin-1"))
    result = run("people", "import", str(file))
    assert result.exit_code == 4
    assert error_lines(result) == [
        f"Error: line 3: not UTF-8 text ({file})",
        "Hint: save the file as CSV UTF-8 and import it again; nothing was added",
    ]
    assert people_stored(db) == 0


def test_a_missing_file_or_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = run("people", "import", str(tmp_path / "missing.csv"))
    assert missing.exit_code == 5
    assert error_lines(missing) == [f"Error: file not found ({tmp_path / 'missing.csv'})"]
    folder = run("people", "import", str(tmp_path))
    assert folder.exit_code == 4
    assert error_lines(folder) == [f"Error: cannot read file: Is a directory ({tmp_path})"]


def test_a_byte_order_mark_before_the_header_is_accepted(tmp_path: Path) -> None:
    file = tmp_path / "crew.csv"
    file.write_bytes(b"\xef\xbb\xbf" + (HEADER + "A One,0712000001,,\n").encode())
    assert run_json("people", "import", str(file))["imported"] == 1


def test_import_help_states_the_limits() -> None:
    text = " ".join(run("people", "import", "--help").stdout.split())
    rows = f"{people_module.MAX_IMPORT_ROWS:,} rows"
    size = f"{people_module.MAX_IMPORT_BYTES // 1_000_000} MB"
    assert f"A file of more than {rows} or {size} is refused" in text
