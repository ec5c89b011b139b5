"""The database: connection settings, in-place upgrades (Alembic, and files of the releases
before it), refusing what it cannot open, writers in separate processes that must not lose an
update, the cross-process lock, the online backup. Tests that take ``db`` run on SQLite and on
PostgreSQL (when SFCRM_TEST_DATABASE_URL names a server)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from legacy_schema import MIGRATIONS
from sqlalchemy import inspect
from sqlmodel import SQLModel, col, select
from support import utcnow

import sfcrm.models  # noqa: F401 - registers every table on SQLModel.metadata
from sfcrm.db import ALEMBIC_USER_VERSION, HEAD, Database
from sfcrm.errors import DatabaseError, ValidationError
from sfcrm.models import BalanceEntry, MpesaCheckout, MpesaPayment, Person
from sfcrm.people import People

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A plain sqlite3 connection, to look at the file without sfcrm's own code."""
    return closing(sqlite3.connect(path))


def table_names(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    )
    return [name for (name,) in rows]


def schema_of(db: Database) -> dict[str, Any]:
    """Every table's columns (name, type, nullable), indexes and foreign keys, as the engine
    reports them: what two databases must agree on to be the same schema."""
    found: dict[str, Any] = {}
    inspector = inspect(db.engine)
    for table in sorted(inspector.get_table_names()):
        found[table] = {
            "columns": [
                (c["name"], str(c["type"]).split("(")[0], c["nullable"])
                for c in inspector.get_columns(table)
            ],
            "indexes": sorted(
                (tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)
            ),
            "unique": sorted(
                tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
            ),
            "foreign_keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"])
                for f in inspector.get_foreign_keys(table)
            ),
        }
    return found


def legacy_file(path: Path, version: int) -> None:
    """A file as the release of schema ``version`` (before Alembic) left it, empty."""
    with raw(path) as conn:
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


def add_person(db: Database, name: str = "Wanjiru", phone: str = "254712000001") -> int:
    with db.write() as session:
        person = Person(name=name, phone=phone, created_at=datetime.now(UTC))
        session.add(person)
        session.flush()
        assert person.id is not None
        return person.id


@pytest.fixture
def opened(db: Database) -> Database:
    db.engine  # noqa: B018 - opening creates and upgrades the database
    return db


# -- a new database ----------------------------------------------------------------------------


def test_new_file_is_in_wal_mode(db_path: Path) -> None:
    Database(db_path).engine.dispose()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_new_database_is_at_the_newest_revision(opened: Database) -> None:
    state = opened.schema()
    assert state.revision == HEAD and state.current


def test_new_file_fences_off_the_releases_before_alembic(db_path: Path) -> None:
    # A release that counted upgrades in user_version must refuse the file, not write to it.
    Database(db_path).engine.dispose()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == ALEMBIC_USER_VERSION
        assert len(MIGRATIONS) < ALEMBIC_USER_VERSION


def test_head_names_the_newest_migration() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(REPO / "sfcrm" / "migrations"))
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD]


def test_the_migrations_build_exactly_the_schema_of_the_models(
    engine_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A new database is made from the models and stamped; an old one gets there through every
    # revision. Here every revision runs from nothing, and the result must be the models.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from sfcrm.db import _run_alembic

    if engine_name == "sqlite":
        url = str(tmp_path / "migrated.db")
    else:
        url = request.getfixturevalue("postgres_server").new_empty_database()
    database = Database(url)
    plain = database._plain_engine()
    with plain.connect() as conn:
        _run_alembic(conn, database.where)
    assert database.schema().current
    with plain.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    database.close()
    assert differences == []


def test_sqlite_connections_enforce_foreign_keys_and_wait_for_the_lock(db_path: Path) -> None:
    database = Database(db_path)
    with database.read() as session:
        conn = session.connection()
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 5000
    database.close()


def test_a_payment_for_a_missing_person_is_refused_by_the_foreign_key(opened: Database) -> None:
    with pytest.raises(DatabaseError, match=r"(?i)foreign key"), opened.write() as session:
        session.add(
            MpesaPayment(
                person_id=999, phone_number="254708374149", amount=10, payment_purpose="x",
                initiated_at=utcnow(),
            )
        )  # fmt: skip


def test_opening_a_database_twice_is_harmless(opened: Database, database_url: str) -> None:
    add_person(opened)
    second = Database(database_url)
    try:
        with second.read() as session:
            names = [p.name for p in session.exec(select(Person).order_by(col(Person.id)))]
        assert names == ["Wanjiru"]
        before, after = second.upgrade()  # nothing left to do
        assert before.current and after.current
    finally:
        second.close()


def test_the_indexes_the_money_rules_rely_on_exist(opened: Database) -> None:
    schema = schema_of(opened)

    def keys(table: str) -> set[tuple[tuple[str, ...], bool]]:
        found = set(schema[table]["indexes"])
        return found | {(cols, True) for cols in schema[table]["unique"]}

    assert (("checkout_request_id",), True) in keys("mpesa_payment")
    assert (("status",), False) in keys("mpesa_payment")
    assert (("person_id", "status"), False) in keys("mpesa_payment")
    assert (("last_pushed_at",), False) in keys("mpesa_payment")
    assert (("checkout_request_id",), True) in keys("mpesa_checkout")
    assert (("payment_id",), False) in keys("mpesa_checkout")
    assert (("checkout_request_id",), False) in keys("mpesa_callback")
    assert (("outcome",), False) in keys("mpesa_callback")
    assert (("payment_id",), True) in keys("balance_entry")


def test_a_second_checkout_with_the_same_id_is_refused(opened: Database) -> None:
    person_id = add_person(opened)
    with opened.write() as session:
        payment = MpesaPayment(
            person_id=person_id, phone_number="254712000001", amount=10, payment_purpose="x",
            initiated_at=utcnow(),
        )  # fmt: skip
        session.add(payment)
        session.flush()
        assert payment.id is not None
        session.add(
            MpesaCheckout(payment_id=payment.id, checkout_request_id="ws_CO_1", pushed_at=utcnow())
        )
    with pytest.raises(DatabaseError, match=r"(?i)unique|duplicate"), opened.write() as session:
        session.add(
            MpesaCheckout(payment_id=payment.id, checkout_request_id="ws_CO_1", pushed_at=utcnow())
        )


def test_database_in_a_missing_folder_is_a_database_error(tmp_path: Path) -> None:
    database = Database(tmp_path / "nowhere" / "sfcrm.db")
    with pytest.raises(DatabaseError, match="folder does not exist") as caught:
        database.engine  # noqa: B018
    assert caught.value.hint
    with pytest.raises(DatabaseError, match="folder does not exist"), database.read():
        pass


def test_the_ledger_refuses_a_second_entry_for_one_payment(db: Database) -> None:
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
    with pytest.raises(DatabaseError, match=r"(?i)unique|duplicate"), db.write() as session:
        session.add(BalanceEntry(**entry, created_at=utcnow()))
    # entries without a payment (charges, credits) are many
    with db.write() as session:
        for _ in range(2):
            session.add(
                BalanceEntry(
                    person_id=person.id, amount_cents=100, balance_after_cents=0, kind="charge",
                    created_at=utcnow(),
                )
            )  # fmt: skip


def test_two_processes_opening_a_new_database_at_once_both_work(
    database_url: str, engine_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if engine_name == "postgresql":  # an empty database, not the migrated template's copy
        server = request.getfixturevalue("postgres_server")
        database_url = server.new_empty_database()
    code = (
        "import sys; from sfcrm.db import Database; d = Database(sys.argv[1]); "
        "print(d.schema().revision, d.upgrade()[1].revision)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url],
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    results = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], results
    assert all(out.split()[-1] == HEAD for out, _err in results)


# -- files written by the releases before Alembic ------------------------------------------------


def rows_of(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the older release's schema, as stored."""
    with raw(path) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in table_names(conn)
            if table != "alembic_version"
        }


@pytest.mark.parametrize("name", ["schema3.db", "schema4.db"])
def test_a_file_of_an_older_release_upgrades_without_losing_or_changing_a_row(
    name: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    shutil.copy(DATA / name, path)
    before = rows_of(path)
    assert sum(map(len, before.values())) > 40  # every table holds rows
    database = Database(path)
    state, after_state = database.upgrade()
    database.close()
    assert state.legacy_version == int(name[6]) and after_state.current
    after = rows_of(path)
    # what later revisions add comes empty: new tables, and new columns at the end of each row
    # (NULL, or 0 for an event's calendar sequence)
    for table in [t for t in after if t not in before]:
        assert after.pop(table) == []
    for table, rows in before.items():
        width = len(rows[0]) if rows else 0
        assert all(value in (None, 0) for row in after[table] for value in row[width:])
        after[table] = [row[:width] for row in after[table]] if rows else after[table]
    if name == "schema3.db":
        # the one change schema 4 makes: a payment an older release left "initiated" may have
        # been pushed, so its outcome is unknown (the test of that rule is below)
        changed = [
            (old, new) for old, new in zip(before["mpesa_payment"], after["mpesa_payment"],
                                           strict=True)
            if old != new
        ]  # fmt: skip
        assert [(old[6], new[6]) for old, new in changed] == [("initiated", "unknown")]
        before["mpesa_payment"] = after["mpesa_payment"]
    assert after == before


@pytest.mark.parametrize("name", ["schema3.db", "schema4.db"])
def test_an_upgraded_file_has_the_schema_of_a_new_one(name: str, tmp_path: Path) -> None:
    shutil.copy(DATA / name, tmp_path / name)
    upgraded, fresh = Database(tmp_path / name), Database(tmp_path / "fresh.db")
    try:
        assert schema_of(upgraded) == schema_of(fresh)
    finally:
        upgraded.close()
        fresh.close()


def test_an_upgraded_file_serves_the_commands(tmp_path: Path) -> None:
    import json

    path = tmp_path / "office.db"
    shutil.copy(DATA / "schema4.db", path)
    env = {**os.environ, "SFCRM_DATABASE_URL": str(path)}
    run = subprocess.run(
        [sys.executable, "-m", "sfcrm", "mpesa", "status", "--json"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    payments = json.loads(run.stdout)
    assert {p["status"] for p in payments} >= {"completed", "cancelled", "failed", "pending"}


def test_existing_version_1_file_keeps_its_data(db_path: Path) -> None:
    legacy_file(db_path, 1)
    with raw(db_path) as conn:
        conn.execute(
            "INSERT INTO person (name, phone, email, balance_cents, created_at)"
            " VALUES ('Otieno', '254712000002', NULL, 123456, '2025-01-02 03:04:05.000000')"
        )
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


def test_payment_left_initiated_by_an_older_sfcrm_becomes_unknown_on_upgrade(
    db_path: Path,
) -> None:
    # An older release recorded a push only once Daraja answered: its "initiated" payment may
    # have reached a phone. This release's "initiated" means "never pushed".
    legacy_file(db_path, 3)
    with raw(db_path) as conn:
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


def test_upgrading_to_the_ledger_turns_balances_into_opening_entries(db_path: Path) -> None:
    legacy_file(db_path, 2)
    with raw(db_path) as conn:
        conn.execute(
            "INSERT INTO person (name, phone, email, balance_cents, created_at) VALUES "
            "('A', '254712000001', NULL, 150000, '2026-01-01 10:00:00'), "
            "('B', '254712000002', NULL, 0, '2026-01-01 10:00:00')"
        )
        conn.commit()
    database = Database(db_path)
    people = People(database, utcnow)
    _, entries = people.history("1")
    assert [(e.kind, e.amount_cents, e.balance_after_cents) for e in entries] == [
        ("opening", 150000, 150000)
    ]
    assert people.history("2")[1] == []
    database.close()


@pytest.mark.parametrize("version", [len(MIGRATIONS) + 1, ALEMBIC_USER_VERSION + 1])
def test_file_from_a_newer_release_before_alembic_is_refused_untouched(
    db_path: Path, version: int
) -> None:
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()
    database = Database(db_path)
    with pytest.raises(DatabaseError, match="newer") as caught:
        database.engine  # noqa: B018
    assert "upgrade" in (caught.value.hint or "").lower()
    with pytest.raises(DatabaseError, match="newer"), database.read():
        pass
    database.close()
    with raw(db_path) as conn:  # left untouched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
        assert table_names(conn) == ["future"]


def test_database_of_a_newer_sfcrm_is_refused_untouched(
    opened: Database, database_url: str
) -> None:
    with opened.write() as session:
        session.connection().exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    opened.close()
    database = Database(database_url)
    with pytest.raises(DatabaseError, match="newer") as caught:
        database.engine  # noqa: B018
    assert "upgrade sfcrm" in (caught.value.hint or "")
    assert database.schema().revision == "9999"
    database.close()


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
        conn.execute(f"PRAGMA user_version = {ALEMBIC_USER_VERSION + 1}")
        conn.commit()
    with pytest.raises(DatabaseError):
        Database(db_path).engine  # noqa: B018
    assert open_handles(db_path) == []


def test_failed_upgrade_leaves_the_file_as_it_was(db_path: Path) -> None:
    # A version 1 file where the next revision's table is in the way: that revision fails.
    legacy_file(db_path, 1)
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE event_crew (x INTEGER)")
        conn.commit()
    with pytest.raises(DatabaseError, match="event_crew"):
        Database(db_path).engine  # noqa: B018
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        tables = table_names(conn)
    assert "event" not in tables and "alembic_version" not in tables


def test_a_file_that_is_not_a_database_is_a_database_error(db_path: Path) -> None:
    db_path.write_bytes(b"Name,Phone\nAchieng,0708374149\n" * 200)
    with pytest.raises(DatabaseError, match="not a database") as caught:
        Database(db_path).engine  # noqa: B018
    assert str(db_path) in str(caught.value)
    with pytest.raises(DatabaseError, match="not a database"), Database(db_path).write():
        pass


def test_a_truncated_database_file_is_a_database_error(db_path: Path) -> None:
    Database(db_path).engine.dispose()
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    data = db_path.read_bytes()
    db_path.write_bytes(b"\x00" * 16 + data[16:])  # the header is gone
    with pytest.raises(DatabaseError):
        Database(db_path).engine  # noqa: B018


def test_an_unreachable_server_is_a_database_error_without_the_password() -> None:
    with socket_nobody_listens_on() as port:
        database = Database(f"postgresql+psycopg://office:s3cret-pw@127.0.0.1:{port}/sfcrm")
        with pytest.raises(DatabaseError, match="cannot reach the database server") as caught:
            database.engine  # noqa: B018
    shown = f"{caught.value} {caught.value.hint}"
    assert "s3cret-pw" not in shown and "***" in shown
    assert "s3cret-pw" not in repr(database)


@contextlib.contextmanager
def socket_nobody_listens_on() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]  # bound, never listening: connections are refused


# -- writers in other processes ----------------------------------------------------------------

WRITERS = 4
CHANGES_EACH = 200

_WRITER = """
import os, sys, time
from pathlib import Path
from sfcrm.db import Database
from sfcrm.models import Person

url, person_id, changes, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
db = Database(url)
db.engine  # open before the start line, so the race is in the writes
Path(start + ".ready." + str(os.getpid())).touch()
while not Path(start).exists():
    time.sleep(0.005)
for _ in range(changes):
    with db.write() as session:
        person = session.get(Person, person_id, with_for_update=True)
        balance = person.balance_cents
        person.balance_cents = balance - 1
        session.add(person)
db.close()
"""


def test_concurrent_writers_in_four_processes_lose_no_update(
    opened: Database, database_url: str, tmp_path: Path
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
                database_url,
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
            _out, err = proc.communicate(timeout=60)
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


def test_a_deadlock_runs_the_transaction_again(opened: Database, engine_name: str) -> None:
    # Two transactions lock two rows in opposite orders: PostgreSQL aborts one, and
    # transaction() runs it again; both changes land. (SQLite takes the whole file first.)
    first, second = add_person(opened, "A", "254712000001"), add_person(opened, "B", "254712000002")
    both_hold_one = threading.Barrier(2, timeout=10)
    runs: list[str] = []

    def work(order: tuple[int, int], label: str) -> Any:
        def change(session: Any) -> None:
            runs.append(label)
            for index, person_id in enumerate(order):
                person = session.get(Person, person_id, with_for_update=True)
                person.balance_cents += 1
                session.add(person)
                session.flush()
                if index == 0 and runs.count(label) == 1:
                    # (on SQLite the other waits for the file lock meanwhile: the barrier breaks)
                    with contextlib.suppress(threading.BrokenBarrierError):
                        both_hold_one.wait()

        return lambda: opened.transaction(change)

    errors: list[BaseException] = []

    def run(target: Any) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    if engine_name == "sqlite":
        both_hold_one = threading.Barrier(2, timeout=0.2)
    threads = [
        threading.Thread(target=run, args=(work((first, second), "ab"),)),
        threading.Thread(target=run, args=(work((second, first), "ba"),)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with opened.read() as session:
        assert [session.get(Person, pid).balance_cents for pid in (first, second)] == [2, 2]  # type: ignore[union-attr]
    if engine_name == "postgresql":
        assert len(runs) == 3  # one of the two ran twice


# -- the cross-process lock ----------------------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from sfcrm.db import Database
db = Database(sys.argv[1])
with db.exclusive("token"):
    Path(sys.argv[2]).touch()
    time.sleep(1.0)
db.close()
"""


def test_the_exclusive_lock_holds_off_another_process(
    opened: Database, database_url: str, tmp_path: Path
) -> None:
    held = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, database_url, str(held)], cwd=REPO,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not held.exists():
        assert holder.poll() is None, holder.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    with opened.exclusive("token"):
        waited = time.monotonic() - started
    assert holder.wait(30) == 0
    assert waited > 0.5  # it waited for the other process to let go
    with opened.exclusive("other"):  # another name is another lock
        pass


# -- backups -------------------------------------------------------------------------------------


def test_backup_is_a_consistent_copy_taken_while_writers_go_on(
    db_path: Path, tmp_path: Path
) -> None:
    database = Database(db_path)
    add_person(database)
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        while not stop.is_set():
            with database.write() as session:
                person = session.get(Person, 1)
                assert person is not None
                person.balance_cents += 1
                session.add(person)
                session.add(
                    BalanceEntry(
                        person_id=1, amount_cents=1, balance_after_cents=person.balance_cents,
                        kind="charge", created_at=utcnow(),
                    )
                )  # fmt: skip
            written.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 50:
            time.sleep(0.01)
        target = database.backup(tmp_path / "copy.db")
    finally:
        stop.set()
        thread.join()
    database.close()
    assert not list(tmp_path.glob(".copy.db*"))
    with raw(target) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        balance = conn.execute("SELECT balance_cents FROM person").fetchone()[0]
        entries = conn.execute("SELECT count(*) FROM balance_entry").fetchone()[0]
    assert balance == entries > 0  # one transaction's balance and entry, never half of it
    copy = Database(target)
    assert copy.schema().current
    copy.close()


def test_backup_refuses_to_overwrite_a_file(db_path: Path, tmp_path: Path) -> None:
    database = Database(db_path)
    (tmp_path / "taken.db").write_text("keep me")
    from sfcrm.errors import ValidationError

    with pytest.raises(ValidationError, match="exists"):
        database.backup(tmp_path / "taken.db")
    assert (tmp_path / "taken.db").read_text() == "keep me"
    database.close()


def test_backup_on_postgresql_says_to_use_pg_dump() -> None:
    from sfcrm.errors import ConfigError

    database = Database("postgresql+psycopg://office:pw@127.0.0.1:1/sfcrm")
    with pytest.raises(ConfigError) as caught:
        database.backup(Path("copy.db"))
    assert "pg_dump" in (caught.value.hint or "")
    assert "pw@" not in str(caught.value)


# -- moving an office to another database --------------------------------------------------------


def test_copy_moves_every_row_and_new_rows_follow_the_copied_ids(
    database_url: str, tmp_path: Path
) -> None:
    shutil.copy(DATA / "schema4.db", tmp_path / "office.db")
    source, target = Database(tmp_path / "office.db"), Database(database_url)
    copied = source.copy_to(target)
    assert copied["person"] == 5 and copied["mpesa_payment"] == 7 and copied["event_crew"] == 7

    def everything(db: Database) -> dict[str, list[Any]]:
        found = {}
        with db.read() as session:
            for table in SQLModel.metadata.sorted_tables:
                rows = session.execute(select(table).order_by(*table.primary_key.columns))
                found[table.name] = [tuple(row) for row in rows]
        return found

    assert everything(target) == everything(source)
    assert add_person(target, "New", "254799000001") == 6  # after the copied ids
    with pytest.raises(ValidationError, match="holds data already"):
        source.copy_to(target)
    source.close()
    target.close()


def test_db_copy_moves_an_office_file_into_the_configured_database(
    database_url: str, tmp_path: Path
) -> None:
    import json

    shutil.copy(DATA / "schema4.db", tmp_path / "office.db")
    env = {**os.environ, "SFCRM_DATABASE_URL": database_url}

    def sfcrm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sfcrm", *args], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    copied = sfcrm("db", "copy", "--from", "office.db", "--json")
    assert copied.returncode == 0, copied.stderr
    assert json.loads(copied.stdout)["rows"]["mpesa_payment"] == 7
    status = sfcrm("mpesa", "status", "--json")
    assert len(json.loads(status.stdout)) == 7
    again = sfcrm("db", "copy", "--from", "office.db")
    assert again.returncode == 4
    assert "holds data already" in again.stderr
    missing = sfcrm("db", "copy", "--from", "nowhere.db")
    assert missing.returncode == 4 and not (tmp_path / "nowhere.db").exists()


def test_a_postgresql_connection_the_server_closed_while_idle_is_replaced_before_use(
    opened: Database, database_url: str, engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if engine_name != "postgresql":
        pytest.skip("a SQLite file has no server to close a connection")
    from sqlalchemy import func

    import sfcrm.db

    with opened.read() as session:
        pid = session.exec(select(func.pg_backend_pid())).one()
    other = Database(database_url)
    try:
        with other.read() as session:
            assert session.exec(select(func.pg_terminate_backend(pid))).one()
    finally:
        other.close()
    monkeypatch.setattr(sfcrm.db, "PING_AFTER_IDLE_SECONDS", 0.0)  # as after a long pause

    with opened.read() as session:
        assert session.exec(select(func.pg_backend_pid())).one() != pid
