"""The SQLite file: connection settings, transactions and in-place schema upgrades.

Every connection runs in WAL mode with a busy timeout and foreign keys on. Writes go through
:meth:`Database.write`, which opens ``BEGIN IMMEDIATE``: the write lock is taken before the
first read, so a read-modify-write (a balance, a status move) can never interleave with another
process's, and SQLite waits for the lock instead of failing half-way with "database is locked".
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload
from urllib.parse import quote

from sfcrm.errors import DatabaseBusyError, DatabaseError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.exc import DatabaseError as SADatabaseError
    from sqlmodel import Session

log = logging.getLogger("sfcrm.db")

BUSY_TIMEOUT_SECONDS = 60.0

# Each entry upgrades the schema by one version; never edit one that has shipped, add another.
MIGRATIONS: tuple[str, ...] = (
    # 1: people, payments, their pushes, the callback inbox and the token cache
    """
    CREATE TABLE person (
        id INTEGER NOT NULL PRIMARY KEY,
        name VARCHAR NOT NULL,
        phone VARCHAR NOT NULL UNIQUE,
        email VARCHAR UNIQUE,
        balance_cents INTEGER NOT NULL,
        created_at DATETIME NOT NULL
    );
    CREATE TABLE mpesa_payment (
        id INTEGER NOT NULL PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES person (id),
        phone_number VARCHAR NOT NULL,
        amount INTEGER NOT NULL,
        payment_purpose VARCHAR NOT NULL,
        account_reference VARCHAR,
        status VARCHAR NOT NULL,
        checkout_request_id VARCHAR UNIQUE,
        merchant_request_id VARCHAR,
        result_code VARCHAR,
        result_desc VARCHAR,
        receipt_number VARCHAR,
        transaction_date DATETIME,
        initiated_at DATETIME NOT NULL,
        completed_at DATETIME,
        last_pushed_at DATETIME,
        push_count INTEGER NOT NULL,
        balance_applied BOOLEAN NOT NULL,
        refund_due BOOLEAN NOT NULL,
        resend_claimed_until DATETIME
    );
    CREATE INDEX ix_mpesa_payment_person_status ON mpesa_payment (person_id, status);
    CREATE INDEX ix_mpesa_payment_status ON mpesa_payment (status);
    CREATE TABLE mpesa_checkout (
        id INTEGER NOT NULL PRIMARY KEY,
        payment_id INTEGER NOT NULL REFERENCES mpesa_payment (id),
        checkout_request_id VARCHAR NOT NULL UNIQUE,
        merchant_request_id VARCHAR,
        pushed_at DATETIME NOT NULL,
        result_code VARCHAR,
        result_desc VARCHAR,
        result_source VARCHAR,
        result_at DATETIME,
        receipt_number VARCHAR,
        paid_amount VARCHAR
    );
    CREATE INDEX ix_mpesa_checkout_payment_id ON mpesa_checkout (payment_id);
    CREATE TABLE mpesa_callback (
        id INTEGER NOT NULL PRIMARY KEY,
        received_at DATETIME NOT NULL,
        source_addr VARCHAR,
        body BLOB NOT NULL,
        checkout_request_id VARCHAR,
        result_code VARCHAR,
        trusted BOOLEAN NOT NULL,
        outcome VARCHAR NOT NULL,
        detail VARCHAR,
        payment_id INTEGER REFERENCES mpesa_payment (id),
        processed_at DATETIME
    );
    CREATE INDEX ix_mpesa_callback_checkout_request_id ON mpesa_callback (checkout_request_id);
    CREATE INDEX ix_mpesa_callback_outcome ON mpesa_callback (outcome);
    CREATE TABLE daraja_token (
        cache_key VARCHAR NOT NULL PRIMARY KEY,
        access_token VARCHAR NOT NULL,
        expires_at DATETIME NOT NULL,
        fetched_at DATETIME NOT NULL
    );
    """,
    # 2: events, crew assignments and the mail log
    """
    CREATE TABLE event (
        id INTEGER NOT NULL PRIMARY KEY,
        name VARCHAR NOT NULL,
        date VARCHAR NOT NULL,
        time VARCHAR,
        end_time VARCHAR,
        location VARCHAR NOT NULL,
        details VARCHAR,
        starts_at DATETIME NOT NULL,
        ends_at DATETIME NOT NULL,
        created_at DATETIME NOT NULL
    );
    CREATE INDEX ix_event_starts_at ON event (starts_at);
    CREATE TABLE email_notification (
        id INTEGER NOT NULL PRIMARY KEY,
        recipient VARCHAR NOT NULL,
        person_id INTEGER REFERENCES person (id),
        assignment_id INTEGER REFERENCES event_crew (id),
        notification_type VARCHAR NOT NULL,
        subject VARCHAR NOT NULL,
        message VARCHAR NOT NULL,
        mime BLOB NOT NULL,
        created_at DATETIME NOT NULL,
        is_sent BOOLEAN NOT NULL,
        sent_at DATETIME,
        failed_attempts INTEGER NOT NULL,
        last_error VARCHAR,
        permanent_failure BOOLEAN NOT NULL,
        claimed_until DATETIME,
        claim_token VARCHAR
    );
    CREATE INDEX ix_email_notification_person_id ON email_notification (person_id);
    CREATE INDEX ix_email_notification_notification_type ON email_notification (notification_type);
    CREATE INDEX ix_email_notification_created_at ON email_notification (created_at);
    CREATE INDEX ix_email_notification_is_sent ON email_notification (is_sent);
    CREATE TABLE event_crew (
        id INTEGER NOT NULL PRIMARY KEY,
        event_id INTEGER NOT NULL REFERENCES event (id),
        person_id INTEGER NOT NULL REFERENCES person (id),
        role VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        notes VARCHAR,
        invitation_sent BOOLEAN NOT NULL,
        invitation_sent_at DATETIME,
        invitation_email_id INTEGER REFERENCES email_notification (id),
        reminder_sent BOOLEAN NOT NULL,
        reminder_sent_at DATETIME,
        reminder_email_id INTEGER REFERENCES email_notification (id),
        responded_at DATETIME,
        created_at DATETIME NOT NULL
    );
    CREATE UNIQUE INDEX ux_event_crew_event_person ON event_crew (event_id, person_id);
    CREATE INDEX ix_event_crew_event_status ON event_crew (event_id, status);
    CREATE INDEX ix_event_crew_person_status ON event_crew (person_id, status);
    """,
    # 3: the balance ledger; balances held before it become opening entries
    """
    CREATE TABLE balance_entry (
        id INTEGER NOT NULL PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES person (id),
        amount_cents INTEGER NOT NULL,
        balance_after_cents INTEGER NOT NULL,
        kind VARCHAR NOT NULL,
        reason VARCHAR,
        payment_id INTEGER REFERENCES mpesa_payment (id),
        created_at DATETIME NOT NULL
    );
    CREATE INDEX ix_balance_entry_person_id ON balance_entry (person_id);
    CREATE UNIQUE INDEX ux_balance_entry_payment ON balance_entry (payment_id)
        WHERE payment_id IS NOT NULL;
    INSERT INTO balance_entry (person_id, amount_cents, balance_after_cents, kind, reason,
                               created_at)
        SELECT id, balance_cents, balance_cents, 'opening', 'balance before the ledger',
               strftime('%Y-%m-%d %H:%M:%S', 'now')
        FROM person WHERE balance_cents != 0;
    """,
    # 4: a payment left "initiated" by an older release may have been pushed (that release
    # recorded the push only once Daraja answered): its outcome is unknown, not "never sent";
    # pushes are found by when they were sent (a "paid" callback no push holds)
    """
    UPDATE mpesa_payment
        SET status = 'unknown',
            last_pushed_at = COALESCE(last_pushed_at, initiated_at),
            result_desc = COALESCE(result_desc, 'left initiated by an older sfcrm: the push '
                                                || 'may have been sent')
        WHERE status = 'initiated';
    CREATE INDEX ix_mpesa_payment_last_pushed_at ON mpesa_payment (last_pushed_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # Take transaction control away from the driver so BEGIN IMMEDIATE can be ours.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _on_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get("sfcrm_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """One SQLite file. Cheap to build; the engine and schema are set up on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._engine: Engine | None = None
        self._local = threading.local()
        self._raw_connections: list[sqlite3.Connection] = []
        self._raw_lock = threading.Lock()
        # Writers of this process take turns here, in order, instead of in SQLite's busy
        # handler, which sleeps in growing steps: under a burst that sleeping is most of the
        # time. Other processes still meet the busy timeout.
        self._writer_turn = threading.Lock()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._open()
        return self._engine

    def _check_folder(self) -> None:
        if not self.path.parent.is_dir():
            raise DatabaseError(
                "the database folder does not exist",
                value=str(self.path.parent),
                hint="create it, or point SFCRM_DATABASE_URL somewhere else",
            )

    def _open(self) -> Engine:
        from sqlalchemy import URL, create_engine, event
        from sqlalchemy.exc import DatabaseError as SADatabaseError

        self._check_folder()
        engine = create_engine(
            # built, not formatted: a '%' or '?' in the path is part of the file's name
            URL.create("sqlite", database=str(self.path)),
            connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        )
        event.listen(engine, "connect", _on_connect)
        event.listen(engine, "begin", _on_begin)
        try:
            migrate(engine)
        except SADatabaseError as exc:
            engine.dispose()
            raise _database_error(exc, self.path) from None
        except BaseException:
            engine.dispose()  # a refused file (newer schema) must not stay open
            raise
        return engine

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (a deferred transaction: one consistent snapshot)."""
        from sqlmodel import Session

        with self._guard(), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One ``BEGIN IMMEDIATE`` transaction, committed on success, rolled back on error."""
        from sqlmodel import Session

        bind = self.engine.execution_options(sfcrm_immediate=True)
        with (
            self._one_writer(),
            self._guard(),
            Session(bind, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    @contextmanager
    def raw_write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction on a plain sqlite3 connection of this thread,
        for the paths that run per callback or per email: no ORM, no pool, a tenth of the
        cost. Committed on success, rolled back on error."""
        with self._one_writer(), self._raw_transaction("BEGIN IMMEDIATE", commit=True) as conn:
            yield conn

    @contextmanager
    def raw_read(self) -> Iterator[sqlite3.Connection]:
        """A deferred transaction (one consistent snapshot) on this thread's plain sqlite3
        connection, for commands that must start fast: no SQLAlchemy is loaded."""
        with self._raw_transaction("BEGIN", commit=False) as conn:
            yield conn

    @contextmanager
    def _raw_transaction(self, begin: str, *, commit: bool) -> Iterator[sqlite3.Connection]:
        conn = self._raw_connection()
        try:
            conn.execute(begin)
        except sqlite3.DatabaseError as exc:
            raise _sqlite_error(exc, self.path) from None
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            _rollback(conn)
            raise _sqlite_error(exc, self.path) from None
        except BaseException:
            _rollback(conn)
            raise
        try:
            conn.execute("COMMIT" if commit else "ROLLBACK")
        except sqlite3.DatabaseError as exc:
            _rollback(conn)
            raise _sqlite_error(exc, self.path) from None

    def _raw_connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "raw", None)
        if conn is None:
            conn = self._connect_raw()
            self._local.raw = conn
            with self._raw_lock:
                self._raw_connections.append(conn)
        return conn

    def _connect_raw(self) -> sqlite3.Connection:
        """A plain connection to a file whose schema is current. The SQLAlchemy engine, which
        creates and upgrades the schema, is loaded only when the file is new or older."""
        if self._engine is None:
            self._check_folder()
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
        except sqlite3.DatabaseError as exc:
            raise _sqlite_error(exc, self.path) from None
        try:
            _on_connect(conn, None)
            current = self._engine is not None or (
                conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            )
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _sqlite_error(exc, self.path) from None
        if not current:
            try:
                _ = self.engine  # creates or upgrades the schema, or refuses a newer one
            except BaseException:
                conn.close()
                raise
        return conn

    @contextmanager
    def _one_writer(self) -> Iterator[None]:
        # A second write transaction opened by the same thread would wait for its own lock.
        if getattr(self._local, "writing", False):
            raise RuntimeError("a write transaction is already open in this thread")
        self._local.writing = True
        try:
            with self._writer_turn:
                yield
        finally:
            self._local.writing = False

    @contextmanager
    def _guard(self) -> Iterator[None]:
        from sqlalchemy.exc import DatabaseError as SADatabaseError

        try:
            yield
        except SADatabaseError as exc:
            raise _database_error(exc, self.path) from None

    @property
    def dialect(self) -> str:
        """The engine's kind: "sqlite" (or "postgresql")."""
        return "sqlite"

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log back into the file (PASSIVE: blocks no reader or
        writer). Only SQLite has one; elsewhere this does nothing."""
        if self.dialect != "sqlite":
            return
        conn: sqlite3.Connection | None = getattr(self._local, "checkpoint", None)
        if conn is None:
            # mode=rw: never create a file that is not there
            conn = sqlite3.connect(
                f"file:{quote(str(self.path))}?mode=rw", uri=True, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
            self._local.checkpoint = conn
            with self._raw_lock:
                self._raw_connections.append(conn)
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        with self._raw_lock:
            for conn in self._raw_connections:
                conn.close()
            self._raw_connections.clear()
        self._local = threading.local()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def raw_connection(session: Session) -> sqlite3.Connection:
    """The sqlite3 connection under a session, inside the session's transaction."""
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


def db_time(value: datetime | None) -> str | None:
    """A datetime as the columns store it: naive UTC text, as SQLAlchemy writes it."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


@overload
def from_db_time(value: str) -> datetime: ...
@overload
def from_db_time(value: None) -> None: ...
@overload
def from_db_time(value: str | None) -> datetime | None: ...
def from_db_time(value: str | None) -> datetime | None:
    """A time as the columns store it (``db_time``) read back: an aware datetime in UTC."""
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may have rolled back already (disk full, I/O error): keep the original error.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            log.warning("rollback failed after an error", exc_info=True)


def _sqlite_error(exc: sqlite3.DatabaseError, path: Path) -> DatabaseError:
    if "locked" in str(exc):
        return DatabaseBusyError(
            "the database stayed busy for too long",
            value=str(path),
            hint="another sfcrm is holding a long write; try again",
        )
    return DatabaseError(f"database error: {exc}", value=str(path))


def _database_error(exc: SADatabaseError, path: Path) -> DatabaseError:
    from sqlalchemy.exc import OperationalError

    text = str(exc.orig) if exc.orig is not None else str(exc)
    if isinstance(exc, OperationalError) and "locked" in text:
        return DatabaseBusyError(
            "the database stayed busy for too long",
            value=str(path),
            hint="another sfcrm is holding a long write; try again",
        )
    return DatabaseError(f"database error: {text}", value=str(path))


def migrate(engine: Engine) -> int:
    """Bring the file up to SCHEMA_VERSION in place; returns the version found before."""
    with engine.connect() as conn:
        found = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
        conn.rollback()
        if found == SCHEMA_VERSION:
            return found
        if found > SCHEMA_VERSION:
            raise DatabaseError(
                f"the database has schema {found}, newer than this sfcrm knows ({SCHEMA_VERSION})",
                hint="upgrade sfcrm",
            )
        # Two processes may start on a new file at once: the second waits, then sees the work done.
        conn = conn.execution_options(sfcrm_immediate=True)
        with conn.begin():
            current = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        conn.exec_driver_sql(statement)
            conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return found
