"""The database: one engine (a SQLite file, or a PostgreSQL server), its transactions, its
cross-process locks, its schema upgrades (Alembic, :mod:`sfcrm.migrations`) and its backup.

This is the only module that knows which engine it runs on.

- SQLite: every connection runs in WAL mode with a busy timeout and foreign keys on. Writes go
  through :meth:`Database.write`, which opens ``BEGIN IMMEDIATE``: the write lock is taken
  before the first read, so a read-modify-write (a balance, a status move) can never interleave
  with another process's, and SQLite waits for the lock instead of failing half-way.
- PostgreSQL: a write transaction is READ COMMITTED; each read-modify-write locks the rows it
  reads (``with_for_update``, a no-op on SQLite, where the whole file is locked already), and
  claims of work skip rows another sender holds (``skip_locked``). A serialization failure or a
  deadlock is :class:`DatabaseConflictError`; :meth:`Database.transaction` runs the work again.

The rule that makes running again safe: no transaction spans a Daraja or SMTP call. Work that
talks to the outside world writes what it is about to do, commits, talks, then records the
answer in a transaction of its own.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

from sfcrm.errors import (
    ConfigError,
    DatabaseBusyError,
    DatabaseConflictError,
    DatabaseError,
    ValidationError,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from sqlalchemy.exc import DatabaseError as SADatabaseError
    from sqlmodel import Session

T = TypeVar("T")

log = logging.getLogger("sfcrm.db")

BUSY_TIMEOUT_SECONDS = 60.0

# The newest Alembic revision in sfcrm/migrations/versions (a test checks they agree): a file
# at it opens without loading Alembic.
HEAD = "0006"
# Releases before Alembic counted upgrades in PRAGMA user_version; each count is a revision.
LEGACY_REVISIONS = {1: "0001", 2: "0002", 3: "0003", 4: "0004"}
# Written to PRAGMA user_version once Alembic keeps the schema: those releases then refuse the
# file ("newer than this sfcrm knows") instead of writing to a schema they do not know.
ALEMBIC_USER_VERSION = 100
# A serialization failure or deadlock is tried this many times in all.
CONFLICT_ATTEMPTS = 8
# A PostgreSQL connection idle in the pool this long is checked before use (one round trip);
# one handed back a moment ago is not: a send loop checks one out for every email.
PING_AFTER_IDLE_SECONDS = 2.0


POSTGRES_SCHEMES = ("postgresql+psycopg", "postgresql+psycopg2", "postgresql", "postgres")


def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["sfcrm_idle_since"] = time.monotonic()


def _on_checkout(dialect: Any, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """The pool's pre-ping, for a connection that sat idle a while (the server may have
    closed it): a dead one is replaced before any statement runs on it."""
    from sqlalchemy.exc import DisconnectionError

    since = record.info.get("sfcrm_idle_since")
    if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
        return  # new, or handed back a moment ago
    try:
        alive = dialect.do_ping(dbapi_connection)
    except Exception as exc:
        raise DisconnectionError(str(exc)) from exc
    if not alive:
        raise DisconnectionError("the connection did not answer")


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


def masked_url(url: str) -> str:
    """A database URL fit to show: any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        password = None
    if not password:
        return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def url_password(url: str) -> str | None:
    """The password inside a database URL, for redaction."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    if password is None:
        return None
    from urllib.parse import unquote

    return unquote(password)


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands (``sfcrm db current``)."""

    revision: str | None  # Alembic's, or the one an older release's user_version stands for
    legacy_version: int | None  # PRAGMA user_version of a file no Alembic revision was written to
    head: str = HEAD

    @property
    def current(self) -> bool:
        return self.revision == self.head and self.legacy_version is None

    @property
    def empty(self) -> bool:
        return self.revision is None and self.legacy_version is None


class Database:
    """One database: a SQLite file (a path) or a PostgreSQL server (a ``postgresql+psycopg://``
    URL). Cheap to build; the engine is made and the schema upgraded on first use."""

    def __init__(self, target: Path | str) -> None:
        self.url: str | None = None
        self.path: Path
        if isinstance(target, str) and "://" in target:
            scheme = target.partition("://")[0].lower()
            if scheme not in POSTGRES_SCHEMES:
                raise ConfigError(
                    f"SFCRM_DATABASE_URL names a database sfcrm does not support ({scheme})",
                    value=masked_url(target),
                    hint="give a SQLite file path, sqlite:///path or postgresql+psycopg://…",
                )
            self.url = "postgresql+psycopg://" + target.partition("://")[2]
            self.path = Path()  # no file: only SQLite has one
        else:
            self.path = Path(target)
        self._engine: Engine | None = None
        self._plain: Engine | None = None  # the engine before any upgrade (``db current``)
        self._local = threading.local()
        self._write_bind: Engine | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()
        self._names_lock = threading.Lock()
        # Writers of this process take turns here, in order, instead of in SQLite's busy
        # handler, which sleeps in growing steps: under a burst that sleeping is most of the
        # time. Other processes still meet the busy timeout.
        self._writer_turn = threading.Lock()
        self._named_locks: dict[str, threading.Lock] = {}

    @property
    def dialect(self) -> str:
        """The engine's kind: "sqlite" or "postgresql"."""
        return "sqlite" if self.url is None else "postgresql"

    @property
    def where(self) -> str:
        """The database, fit for a message: the file, or the URL with its password masked."""
        return str(self.path) if self.url is None else masked_url(self.url)

    def __repr__(self) -> str:
        return f"Database({self.where})"

    @property
    def engine(self) -> Engine:
        """The engine, the schema brought up to date first."""
        if self._engine is None:
            engine = self._plain_engine()
            try:
                upgrade(engine, self.where)
            except BaseException:
                self._dispose_plain()  # a refused database (newer schema) must not stay open
                raise
            self._engine = engine
        return self._engine

    def _plain_engine(self) -> Engine:
        if self._plain is None:
            self._plain = self._create_engine()
        return self._plain

    def _dispose_plain(self) -> None:
        if self._plain is not None:
            self._plain.dispose()
            self._plain = None

    def _check_folder(self) -> None:
        if self.url is None and not self.path.parent.is_dir():
            raise DatabaseError(
                "the database folder does not exist",
                value=str(self.path.parent),
                hint="create it, or point SFCRM_DATABASE_URL somewhere else",
            )

    def _create_engine(self) -> Engine:
        from sqlalchemy import URL, create_engine, event

        self._check_folder()
        if self.url is not None:
            server = create_engine(
                self.url,
                pool_size=10,
                max_overflow=40,
                connect_args={
                    "connect_timeout": 10,
                    # a lock held longer than SQLite's busy timeout is "busy" on both engines
                    "options": f"-c lock_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}",
                },
            )
            event.listen(server, "checkin", _on_checkin)
            event.listen(server, "checkout", partial(_on_checkout, server.dialect))
            return server
        engine = create_engine(
            # built, not formatted: a '%' or '?' in the path is part of the file's name
            URL.create("sqlite", database=str(self.path)),
            connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        )
        event.listen(engine, "connect", _on_connect)
        event.listen(engine, "begin", _on_begin)
        return engine

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (one consistent snapshot on SQLite)."""
        from sqlmodel import Session

        with self._guard(), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction, committed on success, rolled back on error. On SQLite it is
        ``BEGIN IMMEDIATE``; on PostgreSQL lock what you read (``with_for_update``)."""
        from sqlmodel import Session

        bind = self._write_bind
        if bind is None:  # made once: a copy of the engine's options costs as much as a write
            bind = self.engine
            if self.url is None:
                bind = bind.execution_options(sfcrm_immediate=True)
            self._write_bind = bind
        with (
            self._one_writer(),
            self._guard(),
            Session(bind, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    def transaction(self, work: Callable[[Session], T]) -> T:
        """``work`` in one write transaction, run again when PostgreSQL reports a serialization
        failure or a deadlock (nothing of the failed run was written). ``work`` must only read
        and write the database: never call Daraja or send mail inside it."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                with self.write() as session:
                    return work(session)
            except DatabaseConflictError:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info("write conflict, running the transaction again (%d)", attempt)
                time.sleep(random.uniform(0.0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """One holder at a time of the lock ``name``, across threads, processes and machines:
        an advisory lock on PostgreSQL, a file lock beside a SQLite file. Held outside any
        transaction, so a Daraja call may run under it (the token refresh)."""
        with self._names_lock:
            lock = self._named_locks.setdefault(name, threading.Lock())
        with lock:
            if self.url is None:
                with (
                    self._guard(),
                    _file_lock(self.path.with_name(f"{self.path.name}.{name}-lock")),
                ):
                    yield
                return
            from sqlalchemy import func, select

            key = int.from_bytes(
                hashlib.sha256(f"sfcrm:{name}".encode()).digest()[:8], "big", signed=True
            )
            with self._guard(), self.engine.connect() as conn:
                conn.execute(select(func.pg_advisory_lock(key)))
                conn.commit()  # the lock is the session's: it outlives the transaction
                try:
                    yield
                finally:
                    conn.execute(select(func.pg_advisory_unlock(key)))
                    conn.commit()

    @contextmanager
    def _one_writer(self) -> Iterator[None]:
        # A second write transaction opened by the same thread would wait for its own lock.
        if getattr(self._local, "writing", False):
            raise RuntimeError("a write transaction is already open in this thread")
        self._local.writing = True
        try:
            if self.url is None:
                with self._writer_turn:
                    yield
            else:
                yield
        finally:
            self._local.writing = False

    @contextmanager
    def _guard(self) -> Iterator[None]:
        from sqlalchemy.exc import DatabaseError as SADatabaseError

        try:
            yield
        except SADatabaseError as exc:
            raise _database_error(exc, self.where) from None
        except sqlite3.DatabaseError as exc:
            raise _sqlite_error(exc, self.where) from None

    # -- the schema, checkpoints, backups --------------------------------------------------

    def schema(self) -> SchemaState:
        """Where the schema stands, without upgrading anything."""
        with self._guard(), self._plain_engine().connect() as conn:
            return _schema_state(conn)

    def upgrade(self) -> tuple[SchemaState, SchemaState]:
        """Bring the schema to HEAD now; the states before and after."""
        before = self.schema()
        _ = self.engine
        return before, self.schema()

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log back into the file (PASSIVE: blocks no reader or
        writer). Only SQLite has one; elsewhere this does nothing."""
        if self.url is not None:
            return
        # One connection for every checkpoint, behind a lock that close() takes too: closing it
        # while a checkpoint runs on it would take the process down.
        with self._checkpoint_lock:
            if self._checkpoint_conn is None:
                # mode=rw: never create a file that is not there
                self._checkpoint_conn = sqlite3.connect(
                    f"file:{quote(str(self.path))}?mode=rw", uri=True, isolation_level=None,
                    check_same_thread=False,
                )  # fmt: skip
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def backup(self, target: Path) -> Path:
        """A consistent copy of the SQLite file at ``target`` (SQLite's online backup: writers
        go on meanwhile). Written beside it first, then renamed, so a stopped backup leaves no
        half file under the name. PostgreSQL is backed up with its own ``pg_dump``."""
        if self.url is not None:
            raise ConfigError(
                "sfcrm backup copies a SQLite file; this database is on PostgreSQL",
                value=self.where,
                hint="back it up with PostgreSQL's own tool: pg_dump --format=custom "
                "--file FILE DBNAME (see the README's PostgreSQL section)",
            )
        target = target.expanduser()
        if target.exists():
            raise ValidationError(
                "the backup file exists already", value=str(target), hint="name a new file"
            )
        if not target.parent.is_dir():
            raise ValidationError("the backup's folder does not exist", value=str(target.parent))
        _ = self.engine  # the file exists and its schema is current
        partial = target.with_name(f".{target.name}.partial")
        try:
            with (
                self._guard(),
                _closing(sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True)) as src,
                _closing(sqlite3.connect(partial)) as dst,
            ):
                src.backup(dst, pages=1024, sleep=0.005)
            partial.replace(target)
        except OSError as exc:
            raise ValidationError(
                f"cannot write the backup: {exc.strerror or exc}", value=str(target)
            ) from None
        finally:
            partial.unlink(missing_ok=True)
        return target

    def copy_to(self, target: Database, *, batch: int = 5000) -> dict[str, int]:
        """Every row of this database into ``target``, which must hold none yet (moving an office
        from its SQLite file to a PostgreSQL server, or back). One transaction on the target:
        all rows or none. Ids are kept, so links already emailed keep working; PostgreSQL's id
        sequences are moved past the copied ids. Returns the rows copied per table."""
        from sqlalchemy import func, select, update
        from sqlmodel import SQLModel

        import sfcrm.models  # noqa: F401 - registers every table on SQLModel.metadata

        if target.where == self.where:
            raise ValidationError("the database cannot be copied onto itself", value=self.where)
        tables = SQLModel.metadata.sorted_tables
        copied: dict[str, int] = {}
        # The mail log and the assignments point at each other: emails go in first without
        # their assignment, which is set once the assignments are in.
        emails = SQLModel.metadata.tables["email_notification"]
        links: list[tuple[int, int]] = []
        with self._guard(), target._guard(), self.engine.connect() as source:
            with target.engine.begin() as sink:
                if target.dialect == "sqlite":
                    sink.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
                for table in tables:
                    if sink.execute(select(func.count()).select_from(table)).scalar_one():
                        raise ValidationError(
                            f"the target database holds data already ({table.name})",
                            value=target.where,
                            hint="copy into a new, empty database",
                        )
                for table in tables:
                    copied[table.name] = 0
                    ordered = select(table).order_by(*table.primary_key.columns)
                    for chunk in source.execute(ordered).mappings().partitions(batch):
                        rows = [dict(row) for row in chunk]
                        if table is emails:
                            links += [
                                (row["id"], row["assignment_id"])
                                for row in rows
                                if row["assignment_id"] is not None
                            ]
                            for row in rows:
                                row["assignment_id"] = None
                        sink.execute(table.insert(), rows)
                        copied[table.name] += len(rows)
                for email_id, assignment_id in links:
                    sink.execute(
                        update(emails)
                        .where(emails.c.id == email_id)
                        .values(assignment_id=assignment_id)
                    )
                if target.dialect == "postgresql":
                    for table in tables:
                        if "id" in table.c and table.c.id.autoincrement is not False:
                            highest = sink.execute(select(func.max(table.c.id))).scalar_one()
                            if highest is not None:
                                sequence = func.pg_get_serial_sequence(table.name, "id")
                                sink.execute(select(func.setval(sequence, highest)))
            source.rollback()
        return copied

    def close(self) -> None:
        with self._checkpoint_lock:
            if self._checkpoint_conn is not None:
                self._checkpoint_conn.close()
                self._checkpoint_conn = None
        self._local = threading.local()
        self._write_bind = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        self._dispose_plain()


@contextmanager
def _closing(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: threads are still serialised by the caller
        yield
        return
    try:
        handle = path.open("a")
    except OSError as exc:
        raise DatabaseError(
            f"cannot open the lock file: {exc.strerror or exc}", value=str(path)
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _busy(where: str) -> DatabaseBusyError:
    return DatabaseBusyError(
        "the database stayed busy for too long",
        value=where,
        hint="another sfcrm is holding a long write; try again",
    )


def _sqlite_error(exc: sqlite3.DatabaseError, where: str) -> DatabaseError:
    if "locked" in str(exc):
        return _busy(where)
    return DatabaseError(f"database error: {exc}", value=where)


# PostgreSQL's SQLSTATEs: the transaction lost a race and may run again; a lock wait timed out
_CONFLICT_STATES = ("40001", "40P01")
_BUSY_STATES = ("55P03",)


def _database_error(exc: SADatabaseError, where: str) -> DatabaseError:
    from sqlalchemy.exc import OperationalError

    text = str(exc.orig) if exc.orig is not None else str(exc)
    state = getattr(exc.orig, "sqlstate", None)
    if state in _CONFLICT_STATES:
        return DatabaseConflictError(
            "another writer's change crossed this one; nothing was written",
            value=where,
            hint="run the command again",
        )
    if state in _BUSY_STATES or (isinstance(exc, OperationalError) and "locked" in text):
        return _busy(where)
    if state is None and isinstance(exc, OperationalError) and where.startswith("postgresql"):
        first = text.strip().splitlines()[0] if text.strip() else "no answer"
        return DatabaseError(
            f"cannot reach the database server: {first}",
            value=where,
            hint="check SFCRM_DATABASE_URL and that the PostgreSQL server runs and takes you",
        )
    return DatabaseError(f"database error: {text}", value=where)


# -- schema upgrades (Alembic) -----------------------------------------------------------------


def _stored_revision(conn: Connection) -> str | None:
    """Alembic's revision of the database, or None where no revision was ever written."""
    from sqlalchemy import column, select, table
    from sqlalchemy.exc import DatabaseError as SADatabaseError

    try:
        revisions: list[str] = list(
            conn.scalars(select(column("version_num")).select_from(table("alembic_version")))
        )
    except SADatabaseError:
        conn.rollback()
        if not conn.dialect.has_table(conn, "alembic_version"):
            return None
        raise
    conn.rollback()
    return revisions[0] if revisions else None


def _user_version(conn: Connection) -> int:
    if conn.dialect.name != "sqlite":
        return 0
    value = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
    conn.rollback()
    return value


def _schema_state(conn: Connection) -> SchemaState:
    revision = _stored_revision(conn)
    if revision is not None:
        return SchemaState(revision, None)
    legacy = _user_version(conn)
    if legacy == 0:
        return SchemaState(None, None)
    return SchemaState(LEGACY_REVISIONS.get(legacy), legacy)


def _newer(found: str, where: str) -> DatabaseError:
    return DatabaseError(
        f"the database has schema {found}, newer than this sfcrm knows ({HEAD})",
        value=where,
        hint="upgrade sfcrm",
    )


def upgrade(engine: Engine, where: str) -> SchemaState:
    """Bring the database to HEAD in place, in one transaction; the state found before.

    A new (empty) SQLite file is built from the models and marked as at HEAD, Alembic's own
    recipe for a database made from scratch, without loading Alembic (a new file is what most
    test and demo runs start from). A PostgreSQL database, and any database holding an older
    schema, gets there through the revisions. Two processes may start on a new database at once: the
    second waits for the first's lock, then finds the work done.
    """
    from sqlalchemy.exc import DatabaseError as SADatabaseError

    try:
        with engine.connect() as conn:
            found = _schema_state(conn)
            if found.current:
                return found
            if found.legacy_version is not None and found.revision is None:
                raise _newer(str(found.legacy_version), where)
            if found.empty and conn.dialect.name == "sqlite" and not _has_tables(conn):
                _create(conn)
            else:
                _run_alembic(conn, where)
            return found
    except SADatabaseError as exc:
        raise _database_error(exc, where) from None


def _has_tables(conn: Connection) -> bool:
    return bool(conn.dialect.get_table_names(conn))


def _version_table() -> Any:
    """Alembic's table of the revision a database is at, as Alembic itself defines it."""
    from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table

    return Table(
        "alembic_version",
        MetaData(),
        Column("version_num", String(32), nullable=False),
        PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
    )


def _create(conn: Connection) -> None:
    from sqlmodel import SQLModel

    import sfcrm.models  # noqa: F401 - registers every table on SQLModel.metadata

    with _locked(conn):
        if _has_tables(conn):
            return  # another process made it meanwhile (it holds what this one would make)
        SQLModel.metadata.create_all(conn)
        versions = _version_table()
        versions.create(conn)
        conn.execute(versions.insert().values(version_num=HEAD))
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"PRAGMA user_version = {ALEMBIC_USER_VERSION}")


@contextmanager
def _locked(conn: Connection) -> Iterator[None]:
    """One transaction holding the schema's lock: SQLite's write lock, or PostgreSQL's advisory
    lock for schema changes."""
    from sqlalchemy import func, select

    conn.rollback()  # end the read of the state: the change takes its lock first
    if conn.dialect.name == "sqlite":
        conn = conn.execution_options(sfcrm_immediate=True)
    with conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        yield


def _run_alembic(conn: Connection, where: str) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.attributes["connection"] = conn
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    quiet = logging.getLogger("alembic")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with _locked(conn):
            # again under the lock: another process may have done it meanwhile
            state = _locked_state(conn)
            if state.revision is not None and state.revision not in known:
                raise _newer(state.revision, where)
            if state.legacy_version is not None:
                command.stamp(config, str(state.revision))
            if state.revision != HEAD or state.legacy_version is not None:
                command.upgrade(config, "head")
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql(f"PRAGMA user_version = {ALEMBIC_USER_VERSION}")
    finally:
        quiet.setLevel(level)


def _lock_key(name: str) -> int:
    """The 64-bit key of PostgreSQL's advisory lock called ``name``."""
    return int.from_bytes(hashlib.sha256(f"sfcrm:{name}".encode()).digest()[:8], "big", signed=True)


_SCHEMA_LOCK = _lock_key("schema")


def _locked_state(conn: Connection) -> SchemaState:
    """The schema state read inside the upgrade's own transaction (no rollback)."""
    from sqlalchemy import column, select, table

    if conn.dialect.has_table(conn, "alembic_version"):
        revisions: list[str] = list(
            conn.scalars(select(column("version_num")).select_from(table("alembic_version")))
        )
        return SchemaState(revisions[0] if revisions else None, None)
    if conn.dialect.name == "sqlite":
        legacy = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
        if legacy:
            if legacy not in LEGACY_REVISIONS:
                raise AssertionError("checked before the lock")  # pragma: no cover
            return SchemaState(LEGACY_REVISIONS[legacy], legacy)
    return SchemaState(None, None)
