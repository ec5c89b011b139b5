"""The SQLite file: pragmas, in-place migrations, refusing what it cannot open, and writers
in separate processes that must not lose an update."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlmodel import SQLModel, col, select

import sfcrm.models  # noqa: F401 - registers every table on SQLModel.metadata
from sfcrm.db import MIGRATIONS, SCHEMA_VERSION, Database, migrate
from sfcrm.errors import DatabaseError
from sfcrm.models import MpesaPayment, Person

REPO = Path(__file__).resolve().parents[1]


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A plain sqlite3 connection, to look at the file without sfcrm's own code."""
    return closing(sqlite3.connect(path))


def table_names(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    )
    return [name for (name,) in rows]


def columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str, bool, bool]]:
    """(name, declared type, not null, primary key) of each column, in order."""
    return [
        (name, kind.upper(), bool(notnull), bool(pk))
        for _cid, name, kind, notnull, _default, pk in conn.execute(f"PRAGMA table_info({table})")
    ]


def indexes(conn: sqlite3.Connection, table: str) -> set[tuple[tuple[str, ...], bool]]:
    """(indexed columns, unique) of each index; names differ between autoindexes, so unused."""
    found = set()
    for _seq, name, unique, _origin, _partial in conn.execute(f"PRAGMA index_list({table})"):
        cols = tuple(row[2] for row in conn.execute(f"PRAGMA index_info('{name}')"))
        found.add((cols, bool(unique)))
    return found


def foreign_keys(conn: sqlite3.Connection, table: str) -> set[tuple[str, str, str]]:
    return {(row[3], row[2], row[4]) for row in conn.execute(f"PRAGMA foreign_key_list({table})")}


@pytest.fixture
def opened(db: Database) -> Database:
    db.engine  # noqa: B018 - opening creates and migrates the file
    return db


@pytest.fixture
def models_file(tmp_path: Path) -> Iterator[Path]:
    """The schema as models.py declares it, built by SQLModel itself."""
    path = tmp_path / "from-models.db"
    engine = create_engine(f"sqlite:///{path}")
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    yield path


# -- a new file --------------------------------------------------------------------------------


def test_new_file_is_in_wal_mode(opened: Database, db_path: Path) -> None:
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_new_file_has_the_current_schema_version(opened: Database, db_path: Path) -> None:
    with raw(db_path) as conn:
        assert (
            conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
        )


def test_connections_enforce_foreign_keys(opened: Database) -> None:
    with opened.read() as session:
        conn = session.connection()
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 5000


def test_a_payment_for_a_missing_person_is_refused_by_the_foreign_key(opened: Database) -> None:
    with pytest.raises(DatabaseError, match="FOREIGN KEY"), opened.write() as session:
        session.connection().exec_driver_sql(
            "INSERT INTO mpesa_payment (person_id, phone_number, amount, payment_purpose, status,"
            " initiated_at, push_count, balance_applied, refund_due)"
            " VALUES (999, '254708374149', 10, 'x', 'initiated', '2025-01-01 00:00:00', 0, 0, 0)"
        )


def test_opening_a_file_twice_is_harmless(opened: Database, db_path: Path) -> None:
    with opened.write() as session:
        session.add(Person(name="Wanjiru", phone="254712000001", created_at=datetime.now(UTC)))
    second = Database(db_path)
    try:
        with second.read() as session:
            assert [p.name for p in session.exec(select(Person).order_by(col(Person.id)))] == [
                "Wanjiru"
            ]
        assert migrate(second.engine) == SCHEMA_VERSION  # nothing left to do
    finally:
        second.close()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM person").fetchone()[0] == 1


def test_migrated_schema_has_exactly_the_tables_of_the_models(
    opened: Database, db_path: Path, models_file: Path
) -> None:
    with raw(db_path) as migrated, raw(models_file) as declared:
        assert table_names(migrated) == table_names(declared)
        assert set(table_names(migrated)) == set(SQLModel.metadata.tables)


@pytest.mark.parametrize("table", sorted(SQLModel.metadata.tables))
def test_migrated_columns_equal_the_model_columns(
    opened: Database, db_path: Path, models_file: Path, table: str
) -> None:
    with raw(db_path) as migrated, raw(models_file) as declared:
        assert columns(migrated, table) == columns(declared, table)


@pytest.mark.parametrize("table", sorted(SQLModel.metadata.tables))
def test_migrated_indexes_and_foreign_keys_equal_the_models(
    opened: Database, db_path: Path, models_file: Path, table: str
) -> None:
    with raw(db_path) as migrated, raw(models_file) as declared:
        assert indexes(migrated, table) == indexes(declared, table)
        assert foreign_keys(migrated, table) == foreign_keys(declared, table)


def test_the_indexes_the_money_rules_rely_on_exist(opened: Database, db_path: Path) -> None:
    with raw(db_path) as conn:
        payment = indexes(conn, "mpesa_payment")
        checkout = indexes(conn, "mpesa_checkout")
        callback = indexes(conn, "mpesa_callback")
    assert (("checkout_request_id",), True) in payment
    assert (("status",), False) in payment
    assert (("person_id", "status"), False) in payment
    assert (("checkout_request_id",), True) in checkout
    assert (("payment_id",), False) in checkout
    assert (("checkout_request_id",), False) in callback
    assert (("outcome",), False) in callback


def test_a_second_checkout_with_the_same_id_is_refused(opened: Database, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        insert = (
            "INSERT INTO mpesa_checkout (payment_id, checkout_request_id, pushed_at)"
            " VALUES (1, 'ws_CO_1', '2025-01-01 00:00:00')"
        )
        conn.execute(insert)
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(insert)


def test_database_in_a_missing_folder_is_a_database_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="folder does not exist") as caught:
        Database(tmp_path / "nowhere" / "sfcrm.db").engine  # noqa: B018
    assert caught.value.hint


# -- existing files ----------------------------------------------------------------------------


def test_existing_version_1_file_keeps_its_data(db_path: Path) -> None:
    # Built the way a file from the first release looks: migration 1 and user_version 1.
    with raw(db_path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute(
            "INSERT INTO person (name, phone, email, balance_cents, created_at)"
            " VALUES ('Otieno', '254712000002', NULL, 123456, '2025-01-02 03:04:05.000000')"
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    database = Database(db_path)
    try:
        with database.read() as session:
            people = list(session.exec(select(Person).order_by(col(Person.id))))
    finally:
        database.close()
    assert [(p.name, p.phone, p.balance_cents) for p in people] == [
        ("Otieno", "254712000002", 123456)
    ]
    assert people[0].created_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_payment_left_initiated_by_an_older_sfcrm_becomes_unknown_on_upgrade(
    db_path: Path,
) -> None:
    # An older release recorded a push only once Daraja answered: its "initiated" payment may
    # have reached a phone. This release's "initiated" means "never pushed".
    with raw(db_path) as conn:
        for script in MIGRATIONS[:3]:
            conn.executescript(script)
        conn.execute(
            "INSERT INTO person (id, name, phone, balance_cents, created_at)"
            " VALUES (1, 'Otieno', '254712000002', 0, '2025-01-02 03:04:05.000000')"
        )
        for pid, status in ((1, "initiated"), (2, "completed"), (3, "failed")):
            conn.execute(
                "INSERT INTO mpesa_payment (id, person_id, phone_number, amount, payment_purpose,"
                " status, initiated_at, push_count, balance_applied, refund_due)"
                " VALUES (?, 1, '254712000002', 500, 'x', ?, '2025-01-02 03:04:05.000000', 0,"
                " 0, 0)",
                (pid, status),
            )
        conn.execute("PRAGMA user_version = 3")
        conn.commit()
    database = Database(db_path)
    try:
        with database.read() as session:
            rows = list(session.exec(select(MpesaPayment).order_by(col(MpesaPayment.id))))
    finally:
        database.close()
    assert [p.status for p in rows] == ["unknown", "completed", "failed"]
    assert rows[0].last_pushed_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert rows[0].result_desc is not None and "may have been sent" in rows[0].result_desc
    assert rows[1].last_pushed_at is None and rows[1].result_desc is None


def test_file_from_a_newer_sfcrm_is_refused_with_a_hint_to_upgrade(db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    database = Database(db_path)
    with pytest.raises(DatabaseError, match="newer") as caught:
        database.engine  # noqa: B018
    assert "upgrade" in (caught.value.hint or "").lower()
    with raw(db_path) as conn:  # left untouched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert table_names(conn) == ["future"]


def open_handles(path: Path) -> list[str]:
    """Files of this process under path's folder whose name starts with path's name."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_refused_newer_file_is_not_left_open(db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    with pytest.raises(DatabaseError):
        Database(db_path).engine  # noqa: B018
    assert open_handles(db_path) == []


def test_failed_upgrade_leaves_the_file_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with raw(db_path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    broken = (*MIGRATIONS[:1], "CREATE TABLE half_done (x INTEGER); CREATE TABLE (")
    monkeypatch.setattr("sfcrm.db.MIGRATIONS", broken)
    monkeypatch.setattr("sfcrm.db.SCHEMA_VERSION", len(broken))
    with pytest.raises(DatabaseError):
        Database(db_path).engine  # noqa: B018
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "half_done" not in table_names(conn)


def test_upgraded_version_1_file_has_the_schema_of_a_new_file(
    db_path: Path, tmp_path: Path
) -> None:
    with raw(db_path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    upgraded = Database(db_path)
    fresh = Database(tmp_path / "fresh.db")
    try:
        upgraded.engine  # noqa: B018
        fresh.engine  # noqa: B018
    finally:
        upgraded.close()
        fresh.close()
    with raw(db_path) as old, raw(tmp_path / "fresh.db") as new:
        assert table_names(old) == table_names(new)
        for table in table_names(new):
            assert columns(old, table) == columns(new, table), table
            assert indexes(old, table) == indexes(new, table), table
            assert foreign_keys(old, table) == foreign_keys(new, table), table


def test_a_file_that_is_not_a_database_is_a_database_error(db_path: Path) -> None:
    db_path.write_bytes(b"Name,Phone\nAchieng,0708374149\n" * 200)
    with pytest.raises(DatabaseError, match="not a database") as caught:
        Database(db_path).engine  # noqa: B018
    assert str(db_path) in str(caught.value)


def test_a_truncated_database_file_is_a_database_error(opened: Database, db_path: Path) -> None:
    opened.close()
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    data = db_path.read_bytes()
    db_path.write_bytes(b"\x00" * 16 + data[16:])  # the header is gone
    with pytest.raises(DatabaseError):
        Database(db_path).engine  # noqa: B018


# -- writers in other processes ----------------------------------------------------------------

WRITERS = 4
CHANGES_EACH = 200

_WRITER = """
import os, sys, time
from pathlib import Path
from sfcrm.db import Database
from sfcrm.models import Person

path, person_id, changes, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
db = Database(path)
db.engine  # open before the start line, so the race is in the writes
Path(start + ".ready." + str(os.getpid())).touch()
while not Path(start).exists():
    time.sleep(0.005)
for _ in range(changes):
    with db.write() as session:
        person = session.get(Person, person_id)
        balance = person.balance_cents
        person.balance_cents = balance - 1
        session.add(person)
db.close()
"""


def test_concurrent_writers_in_four_processes_lose_no_update(
    opened: Database, db_path: Path, tmp_path: Path
) -> None:
    with opened.write() as session:
        person = Person(
            name="Achieng", phone="254708374149", balance_cents=10_000, created_at=datetime.now(UTC)
        )
        session.add(person)
        session.flush()
        person_id = person.id
    start = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(db_path),
                str(person_id),
                str(CHANGES_EACH),
                str(start),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(WRITERS)
    ]
    deadline = time.monotonic() + 15
    while len(list(tmp_path.glob("go.ready.*"))) < WRITERS and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            break  # one died before the start: its stderr tells why
        time.sleep(0.01)
    start.touch()  # all four are open and waiting: they start writing together
    failures = []
    for proc in procs:
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(err)
    assert failures == []  # no "database is locked", no traceback of any kind
    with opened.read() as session:
        final = session.get(Person, person_id)
        assert final is not None
        assert final.balance_cents == 10_000 - WRITERS * CHANGES_EACH


def test_the_database_refuses_a_second_ledger_entry_for_one_payment(db: Database) -> None:
    from support import utcnow

    from sfcrm.models import BalanceEntry, MpesaPayment
    from sfcrm.people import People

    person = People(db, utcnow).add("Achieng", "0712345678", None, "1000")
    with db.write() as session:
        payment = MpesaPayment(
            person_id=person.id, phone_number=person.phone, amount=500,
            payment_purpose="x", initiated_at=utcnow(),
        )  # fmt: skip
        session.add(payment)
        session.flush()
        payment_id = payment.id
    entry = {"person_id": person.id, "amount_cents": -50000, "balance_after_cents": 50000,
             "kind": "payment", "payment_id": payment_id}  # fmt: skip
    with db.write() as session:
        session.add(BalanceEntry(**entry, created_at=utcnow()))
    with pytest.raises(DatabaseError, match="UNIQUE constraint failed"), db.write() as session:
        session.add(BalanceEntry(**entry, created_at=utcnow()))


def test_upgrading_to_the_ledger_turns_balances_into_opening_entries(tmp_path: Path) -> None:
    import sqlite3

    from sfcrm.db import MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO person (name, phone, email, balance_cents, created_at) VALUES "
        "('A', '254712000001', NULL, 150000, '2026-01-01 10:00:00'), "
        "('B', '254712000002', NULL, 0, '2026-01-01 10:00:00')"
    )
    conn.commit()
    conn.close()
    from support import utcnow

    from sfcrm.people import People

    people = People(Database(path), utcnow)
    _, entries = people.history("1")
    assert [(e.kind, e.amount_cents, e.balance_after_cents) for e in entries] == [
        ("opening", 150000, 150000)
    ]
    assert people.history("2")[1] == []


# -- the plain-SQL path (commands that never load the ORM) ---------------------------------------


def test_plain_reads_on_a_missing_folder_are_a_database_error(tmp_path: Path) -> None:
    database = Database(tmp_path / "nowhere" / "sfcrm.db")
    with pytest.raises(DatabaseError, match="folder does not exist"), database.raw_read():
        pass


def test_plain_reads_on_a_newer_file_are_refused_and_leave_it_as_it_was(db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    database = Database(db_path)
    with pytest.raises(DatabaseError, match="newer"), database.raw_read():
        pass
    database.close()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert table_names(conn) == ["future"]


def test_plain_writes_on_a_file_that_is_not_a_database_are_a_database_error(
    db_path: Path,
) -> None:
    db_path.write_bytes(b"Name,Phone\nAchieng,0708374149\n" * 200)
    database = Database(db_path)
    with pytest.raises(DatabaseError, match="not a database") as caught, database.raw_write():
        pass
    assert str(db_path) in str(caught.value)


def test_plain_reads_on_a_new_file_create_the_schema(db_path: Path) -> None:
    database = Database(db_path)
    with database.raw_read() as conn:
        assert conn.execute("SELECT count(*) FROM mpesa_payment").fetchone()[0] == 0
    database.close()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
