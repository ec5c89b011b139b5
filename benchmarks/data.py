"""The benchmark's databases: a fresh one per figure on each engine, filled fast.

A SQLite database is a file in the run's folder; a PostgreSQL one is created on the server the
run was given and dropped when the run ends. Either way sfcrm's own migrations build the schema
(``Database(url).engine``), and rows go in through the models' tables: one ``executemany`` in
one transaction on SQLite, ``COPY`` on PostgreSQL, each value converted by its column's type
exactly as sfcrm would store it.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

SQLITE = "sqlite"
POSTGRES = "postgresql"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
BATCH = 50_000


@dataclass(frozen=True)
class Target:
    """One database of one figure: what SFCRM_DATABASE_URL gets, and its engine."""

    engine: str
    url: str  # a SQLite file's path, or a postgresql+psycopg:// URL

    def database(self) -> Any:
        from sfcrm.db import Database

        return Database(self.url)


@dataclass
class Engines:
    """Where the run's databases live: a folder, and the PostgreSQL server if one was given."""

    work: Path
    postgres: str | None = None
    _made: list[str] = field(default_factory=list)
    _names: Iterator[int] = field(default_factory=lambda: iter(range(1, 1_000_000)))
    _templates: dict[str, Target] = field(default_factory=dict)

    @property
    def available(self) -> list[str]:
        return [SQLITE, POSTGRES] if self.postgres else [SQLITE]

    def fresh(self, engine: str, label: str, *, schema: bool = True) -> Target:
        """A new database: with sfcrm's schema (a copy of one its migrations built once in
        this run), or empty."""
        return self._new(engine, label, self._template(engine) if schema else None)

    def _template(self, engine: str) -> Target:
        if engine not in self._templates:
            template = self._new(engine, "template", None)
            db = template.database()
            try:
                _ = db.engine  # runs every migration
            finally:
                db.close()
            self._templates[engine] = template
        return self._templates[engine]

    def _new(self, engine: str, label: str, template: Target | None) -> Target:
        n = next(self._names)
        if engine == SQLITE:
            path = self.work / f"{label}-{n}.db"
            if template is not None:
                shutil.copyfile(template.url, path)
            return Target(SQLITE, str(path))
        import psycopg
        from psycopg import sql

        name = f"sfcrm_bench_{os.getpid()}_{label}_{n}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(_database_of(template)))
        with self._admin() as admin:
            for attempt in range(20):
                try:
                    admin.execute(statement)
                    break
                except psycopg.errors.ObjectInUse:  # the template's last session still ending
                    if attempt == 19:
                        raise
                    time.sleep(0.1)
        self._made.append(name)
        return Target(POSTGRES, self._url_of(name))

    def drop(self, target: Target) -> None:
        """Give a database's room back as soon as its figure is done."""
        if target.engine == SQLITE:
            for path in Path(target.url).parent.glob(f"{Path(target.url).name}*"):
                path.unlink(missing_ok=True)
            return
        name = _database_of(target)
        with self._admin() as admin:
            admin.execute(_drop(name))
        if name in self._made:
            self._made.remove(name)

    def close(self) -> None:
        """Drop every PostgreSQL database the run made (the folder is the caller's)."""
        if not self._made:
            return
        with self._admin() as admin:
            for name in self._made:
                admin.execute(_drop(name))
        self._made.clear()
        self._templates.clear()

    def server_version(self) -> str | None:
        if not self.postgres:
            return None
        with self._admin() as admin:
            row = admin.execute("SHOW server_version").fetchone()
        return str(row[0]).split()[0] if row else None

    def _url_of(self, name: str) -> str:
        from sqlalchemy.engine import make_url

        assert self.postgres
        url = make_url(self.postgres).set(drivername="postgresql+psycopg", database=name)
        return url.render_as_string(hide_password=False)

    @contextmanager
    def _admin(self) -> Iterator[Any]:
        import psycopg
        from sqlalchemy.engine import make_url

        assert self.postgres
        url = make_url(self.postgres).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
            yield conn


def _database_of(target: Target) -> str:
    from sqlalchemy.engine import make_url

    return str(make_url(target.url).database)


def _drop(name: str) -> Any:
    from psycopg import sql

    return sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))


def check_postgres_url(url: str) -> str | None:
    """Why the benchmark will not use this server, or None: it must answer on this machine."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parts = make_url(url)
    except ArgumentError:
        return "not a database URL"
    if not parts.drivername.startswith("postgres"):
        return "not a postgresql:// URL"
    if (parts.host or "127.0.0.1") not in LOOPBACK:
        return f"the server {parts.host} is not on this machine; all traffic stays on 127.0.0.1"
    return None


# -- loading rows ------------------------------------------------------------------------------


def load(target: Target, model: Any, names: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Insert ``rows`` (values of the columns ``names``, as Python objects: aware datetimes,
    bools) into the model's table; every other column gets the model's default. One
    transaction; returns the number of rows."""
    table = model.__table__
    defaults = {
        name: info.default
        for name, info in model.model_fields.items()
        if name not in names and name in table.c and _has_default(info)
    }
    columns = [*names, *defaults]
    db = target.database()
    try:
        engine = db.engine
        stored = map(_storage(table, names, defaults, engine.dialect), rows)
        raw = engine.raw_connection()
        try:
            if target.engine == SQLITE:
                count = _load_sqlite(raw, table, columns, stored, engine.dialect)
            else:
                count = _copy_postgres(raw, table.name, columns, stored)
            raw.commit()
        finally:
            raw.close()
        if target.engine == POSTGRES:
            _advance_sequence(engine, table)
        return count
    finally:
        db.close()


def _has_default(info: Any) -> bool:
    from pydantic_core import PydanticUndefined

    return info.default is not PydanticUndefined and info.default is not None


def _storage(
    table: Any, names: Sequence[str], defaults: dict[str, Any], dialect: Any
) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A row of Python values made what the driver is handed, as the model's column types make
    it (a UTC column takes an aware datetime and stores it naive), the defaults appended.
    Repeated values (one "now" in every row) convert once."""

    def processor(name: str) -> Callable[[Any], Any] | None:
        column_type = table.c[name].type
        process: Callable[[Any], Any] | None = column_type.dialect_impl(dialect).bind_processor(
            dialect
        )
        return process

    constants = []
    for name, value in defaults.items():
        process = processor(name)
        constants.append(value if process is None else process(value))
    converted = [
        (i, functools.lru_cache(maxsize=1024)(process))
        for i, name in enumerate(names)
        if (process := processor(name)) is not None
    ]

    def store(row: Sequence[Any]) -> Sequence[Any]:
        out = [*row, *constants]
        for i, process in converted:
            out[i] = process(out[i])
        return out

    return store


def _load_sqlite(
    raw: Any, table: Any, columns: Sequence[str], rows: Iterator[Sequence[Any]], dialect: Any
) -> int:
    quote = dialect.identifier_preparer.quote
    statement = (
        f"INSERT INTO {quote(table.name)} ({', '.join(map(quote, columns))}) "
        f"VALUES ({', '.join('?' * len(columns))})"
    )
    cursor = raw.cursor()
    cursor.execute("PRAGMA cache_size = -262144")  # 256 MiB: index pages stay in memory
    cursor.execute("PRAGMA foreign_keys = OFF")  # consistent by construction
    cursor.execute("BEGIN")
    count = 0
    while batch := list(islice(rows, BATCH)):
        cursor.executemany(statement, batch)
        count += len(batch)
    return count


def _copy_postgres(
    raw: Any, table: str, columns: Sequence[str], rows: Iterator[Sequence[Any]]
) -> int:
    from psycopg import sql

    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    count = 0
    with raw.cursor() as cursor:
        _skip_foreign_key_checks(cursor)
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def _skip_foreign_key_checks(cursor: Any) -> None:
    """The rows are consistent by construction: a superuser loads them without PostgreSQL's
    per-row foreign key triggers (a third of the time); anyone else loads them with."""
    import psycopg

    cursor.execute("SAVEPOINT replica")
    try:
        cursor.execute("SET LOCAL session_replication_role = replica")
    except psycopg.errors.InsufficientPrivilege:
        cursor.execute("ROLLBACK TO SAVEPOINT replica")
    else:
        cursor.execute("RELEASE SAVEPOINT replica")


def _advance_sequence(engine: Any, table: Any) -> None:
    """Rows loaded with their ids leave PostgreSQL's id sequence behind: sfcrm's next insert
    must not collide with them."""
    from sqlalchemy import func, select

    if "id" not in table.c:
        return
    following = func.coalesce(select(func.max(table.c.id)).scalar_subquery(), 0) + 1
    with engine.begin() as conn:
        conn.execute(
            select(func.setval(func.pg_get_serial_sequence(table.name, "id"), following, False))
        )


def analyze(target: Target) -> None:
    """Fresh planner statistics, as a database that grew over months has them (PostgreSQL's
    autovacuum; on SQLite the last ``ANALYZE``)."""
    db = target.database()
    try:
        raw = db.engine.raw_connection()
        try:
            if target.engine == SQLITE:
                raw.cursor().execute("ANALYZE")
                return
            raw.rollback()  # VACUUM runs outside any transaction
            raw.driver_connection.autocommit = True
            with raw.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE")
            raw.driver_connection.autocommit = False
        finally:
            raw.close()
    finally:
        db.close()


def query(target: Target, statement: Any) -> list[Any]:
    """The rows of one statement built from the models, read through sfcrm's Database."""
    db = target.database()
    try:
        with db.read() as session:
            return list(session.execute(statement))
    finally:
        db.close()


def count(target: Target, model: Any, **where: Any) -> int:
    """How many rows of the model's table have these column values."""
    from sqlalchemy import func, select

    statement = select(func.count()).select_from(model)
    for name, value in where.items():
        statement = statement.where(getattr(model, name) == value)
    return int(query(target, statement)[0][0])


# -- what the figures need ---------------------------------------------------------------------

PHONE = "254708374149"


def checkout_ids(count: int) -> list[str]:
    """The CheckoutRequestIDs of ``pending_payments``, for the callbacks that settle them."""
    return [f"ws_CO_bench_{i:06d}" for i in range(count)]


def pending_payments(target: Target, count: int, *, person: int = 1, people: int = 1) -> list[str]:
    """``people`` people (ids from ``person`` on) and ``count`` pending payments, each with its
    push, taken by those people in turn; their CheckoutRequestIDs."""
    from sfcrm.models import MpesaCheckout, MpesaPayment, PaymentStatus, Person

    now = datetime.now(UTC)
    owners = [person + n for n in range(people)]
    load(
        target,
        Person,
        ("id", "name", "phone", "email", "balance_cents", "created_at"),
        [(owner, f"Bench {owner}", PHONE if owner == person else f"2547{owner:08d}", None, 0, now)
         for owner in owners],
    )  # fmt: skip
    ids = checkout_ids(count)
    load(
        target,
        MpesaPayment,
        ("id", "person_id", "phone_number", "amount", "payment_purpose", "account_reference",
         "status", "checkout_request_id", "initiated_at", "last_pushed_at", "push_count"),
        ((i + 1, owners[i % people], PHONE, 10, "Bench", f"SF-{i + 1}", PaymentStatus.PENDING,
          cid, now, now, 1) for i, cid in enumerate(ids)),
    )  # fmt: skip
    load(
        target,
        MpesaCheckout,
        ("payment_id", "checkout_request_id", "pushed_at"),
        ((i + 1, cid, now) for i, cid in enumerate(ids)),
    )
    return ids


def crew(
    target: Target,
    *,
    people: int,
    events: int,
    per_event: int,
    status: str,
    start: datetime | None = None,
    spread: timedelta = timedelta(0),
) -> None:
    """People with emails; events from ``start`` (default: in three days), one every
    ``spread / events``; ``per_event`` assignments of each, all in one status."""
    from sfcrm.models import Event, EventCrew, Person

    now = datetime.now(UTC)
    first = start or now + timedelta(days=3)
    load(
        target,
        Person,
        ("id", "name", "phone", "email", "balance_cents", "created_at"),
        ((i, f"Crew {i}", f"2547{i:08d}", f"crew{i}@example.co.ke", 0, now)
         for i in range(1, people + 1)),
    )  # fmt: skip
    step = spread / events if events > 1 else timedelta(0)

    def event(n: int) -> tuple[Any, ...]:
        starts = first + step * (n - 1)
        return (n, f"Event {n}", starts.date().isoformat(), "18:00", "23:00", "KICC, Nairobi",
                starts, starts + timedelta(hours=5), now)  # fmt: skip

    load(
        target,
        Event,
        ("id", "name", "date", "time", "end_time", "location", "starts_at", "ends_at",
         "created_at"),
        (event(n) for n in range(1, events + 1)),
    )  # fmt: skip
    load(
        target,
        EventCrew,
        ("event_id", "person_id", "role", "status", "created_at"),
        ((e, ((e - 1) * per_event + k) % people + 1, "Sound Engineer", status, now)
         for e in range(1, events + 1) for k in range(per_event)),
    )  # fmt: skip


PAYMENTS = 1_000_000
EVENTS = 20_000
PER_EVENT = 10  # 200,000 assignments
PEOPLE = 20_000


def large(target: Target) -> int:
    """1,000,000 payments, 20,000 events and 200,000 confirmed assignments (an office's years);
    returns the id of the next event to start, for ``crew list --event``."""
    from sqlalchemy import select
    from sqlmodel import col

    from sfcrm.models import CrewStatus, Event, MpesaPayment, PaymentStatus

    now = datetime.now(UTC)
    # an event every 10.5 hours from two years back (today's a few of them, the last decades on)
    crew(
        target,
        people=PEOPLE,
        events=EVENTS,
        per_event=PER_EVENT,
        status=CrewStatus.CONFIRMED,
        start=now - timedelta(days=730),
        spread=timedelta(hours=10.5) * EVENTS,
    )
    statuses = (
        [PaymentStatus.COMPLETED] * 90
        + [PaymentStatus.FAILED] * 6
        + [PaymentStatus.CANCELLED] * 3
        + [PaymentStatus.PENDING]
    )
    load(
        target,
        MpesaPayment,
        ("id", "person_id", "phone_number", "amount", "payment_purpose", "status",
         "checkout_request_id", "initiated_at", "last_pushed_at", "push_count"),
        ((i, i % PEOPLE + 1, f"2547{i % PEOPLE + 1:08d}", 100, "Bench",
          statuses[i % len(statuses)], f"ws_CO_large_{i:07d}", now, now, 1)
         for i in range(1, PAYMENTS + 1)),
    )  # fmt: skip
    analyze(target)
    starts = col(Event.starts_at)
    statement = select(col(Event.id)).where(starts > now).order_by(starts).limit(1)
    return int(query(target, statement)[0][0])


def one_event(target: Target) -> int:
    """An empty database's one event, for ``crew list --event`` to find."""
    from sfcrm.models import Event

    moment = datetime(2030, 1, 1, tzinfo=UTC)
    load(
        target,
        Event,
        ("id", "name", "date", "location", "starts_at", "ends_at", "created_at"),
        [(1, "E", "2030-01-01", "X", moment, moment + timedelta(days=1), moment)],
    )
    return 1
