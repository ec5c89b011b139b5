"""The benchmark fills its databases behind sfcrm's back (executemany on SQLite, COPY on
PostgreSQL): the rows must be ones sfcrm reads and extends as its own, on either engine."""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

from sqlalchemy import func
from sqlmodel import col, select

from sfcrm.db import Database
from sfcrm.models import CrewStatus, Event, EventCrew, MpesaCheckout, MpesaPayment, Person


def benchmark_data() -> ModuleType:
    path = Path(__file__).parents[1] / "benchmarks" / "data.py"
    spec = importlib.util.spec_from_file_location("benchmark_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_loaded_rows_read_back_as_sfcrm_writes_them(engine_name: str, database_url: str) -> None:
    data = benchmark_data()
    target = data.Target(engine_name, database_url)
    start = datetime(2030, 5, 1, 15, 0, 0, 123456, tzinfo=UTC)
    data.crew(target, people=3, events=2, per_event=2, status=CrewStatus.CONFIRMED,
              start=start, spread=timedelta(days=2))  # fmt: skip
    ids = data.pending_payments(target, 4, person=4, people=2)

    db = Database(database_url)
    try:
        with db.read() as session:
            event = session.get(Event, 2)
            assert event is not None
            assert event.starts_at == start + timedelta(days=1)
            assert event.ends_at == event.starts_at + timedelta(hours=5)
            crew = session.exec(select(EventCrew).order_by(col(EventCrew.id))).all()
            assert [(c.event_id, c.person_id, c.status) for c in crew] == [
                (1, 1, "confirmed"), (1, 2, "confirmed"), (2, 3, "confirmed"), (2, 1, "confirmed"),
            ]  # fmt: skip
            assert all(c.invitation_sent is False and c.reminder_sent is False for c in crew)
            payment = session.exec(
                select(MpesaPayment).where(col(MpesaPayment.checkout_request_id) == ids[-1])
            ).one()
            assert (payment.person_id, payment.status, payment.amount) == (5, "pending", 10)
            owners = session.exec(
                select(MpesaPayment.person_id).order_by(col(MpesaPayment.id))
            ).all()
            assert owners == [4, 5, 4, 5]
            assert payment.balance_applied is False and payment.refund_due is False
            assert payment.initiated_at.tzinfo is UTC
            pushes = session.exec(select(func.count()).select_from(MpesaCheckout)).one()
            assert pushes == 4
    finally:
        db.close()


def test_sfcrm_adds_rows_after_the_loaded_ones(engine_name: str, database_url: str) -> None:
    """Rows loaded with their ids must leave room for the next id sfcrm's inserts take."""
    data = benchmark_data()
    target = data.Target(engine_name, database_url)
    data.crew(target, people=5, events=1, per_event=1, status=CrewStatus.INVITED)

    db = Database(database_url)
    try:
        with db.write() as session:
            added = Person(name="New", phone="254711000000", created_at=datetime.now(UTC))
            session.add(added)
            session.flush()
            assert added.id == 6
        assert data.count(target, Person) == 6
    finally:
        db.close()
