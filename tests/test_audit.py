"""The audit log and ``sfcrm history``: entries written inside the change's own transaction,
read back newest first, filtered by person, event or payment."""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime, timedelta

import pytest
from support import run, run_json

from sfcrm import audit
from sfcrm.db import Database
from sfcrm.models import AuditEntry, Person
from sfcrm.people import People

T0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def on_each_engine(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.setenv("SFCRM_TIMEZONE", "Africa/Nairobi")
    return database_url


def entries(db: Database) -> list[AuditEntry]:
    from sqlmodel import select

    with db.read() as session:
        return list(session.exec(select(AuditEntry)).all())


def test_an_entry_is_kept_or_lost_with_the_change_it_records(db: Database, people: People) -> None:
    person = people.add("Achieng Otieno", "0708374149", None, "0")
    with pytest.raises(RuntimeError), db.write() as session:
        audit.record(session, "person.edit", now=T0, person_id=person.id,
                     changes={"name": ("Achieng Otieno", "Achieng O.")})  # fmt: skip
        raise RuntimeError("the change failed")
    assert entries(db) == []

    with db.write() as session:
        row = session.get(Person, person.id)
        assert row is not None
        row.name = "Achieng O."
        changes = audit.changed(
            {"name": "Achieng Otieno", "phone": "254708374149"},
            {"name": "Achieng O.", "phone": "254708374149"},
        )
        audit.record(session, "person.edit", now=T0, person_id=person.id, changes=changes)
    (entry,) = entries(db)
    assert (entry.action, entry.person_id, entry.at) == ("person.edit", person.id, T0)
    assert entry.changes == '{"name": ["Achieng Otieno", "Achieng O."]}'  # only what changed
    assert entry.actor == f"{getpass.getuser()}@{socket.gethostname()}"


@pytest.mark.usefixtures("on_each_engine")
def test_history_lists_newest_first_and_filters(db: Database, people: People) -> None:
    assert run("history").stdout == "No changes found.\n"
    person = people.add("Achieng Otieno", "0708374149", None, "0")
    with db.write() as session:
        audit.record(session, "person.archive", now=T0, person_id=person.id, reason="left")
        audit.record(session, "event.cancel", now=T0 + timedelta(hours=1), event_id=7,
                     changes={"cancelled_at": (None, T0)}, reason="rain")  # fmt: skip
        audit.record(session, "payment.resolve", now=T0 + timedelta(hours=2), payment_id=3,
                     person_id=person.id, changes={"status": ("unknown", "completed")})  # fmt: skip

    docs = run_json("history")
    assert [d["action"] for d in docs] == ["payment.resolve", "event.cancel", "person.archive"]
    assert docs[0]["at"] == "2026-12-01T14:30:00+03:00"  # SFCRM_TIMEZONE, with its offset
    assert docs[0]["changes"] == {"status": ["unknown", "completed"]}
    assert docs[1]["changes"] == {"cancelled_at": [None, "2026-12-01T09:30:00+00:00"]}
    assert docs[1]["reason"] == "rain"

    assert [d["action"] for d in run_json("history", "--person", "0708 374 149")] == [
        "payment.resolve", "person.archive",
    ]  # fmt: skip
    assert [d["action"] for d in run_json("history", "--event", "7")] == ["event.cancel"]
    assert [d["action"] for d in run_json("history", "--payment", "3")] == ["payment.resolve"]
    assert run_json("history", "--payment", "3", "--event", "7") == []
    assert len(run_json("history", "--limit", "1")) == 1

    table = run("history", "--event", "7").stdout
    assert "event.cancel" in table and "rain" in table and "event 7" in table


@pytest.mark.usefixtures("on_each_engine")
def test_history_of_an_unknown_person_is_not_found() -> None:
    result = run("history", "--person", "0799999999")
    assert result.exit_code == 5
    assert result.stderr.startswith("Error: no such person (0799999999)")
