"""Correcting crew assignments (`crew edit`), and archived people in the crew CRM: their
assignments stay visible, `crew assign` refuses them, and no crew email goes to them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from support import SmtpSink, finish, outcome, reasons, recipients, run, run_json, sfcrm_process

NAIROBI = ZoneInfo("Africa/Nairobi")


@pytest.fixture(autouse=True)
def office(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """The commands use the test's database: a SQLite file, then a PostgreSQL database."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def smtp_env(monkeypatch: pytest.MonkeyPatch, smtp_sink: SmtpSink) -> SmtpSink:
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    monkeypatch.setenv("EMAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("EMAIL_PORT", str(smtp_sink.port))
    monkeypatch.setenv("DEFAULT_FROM_EMAIL", "Sound Fusion <office@soundfusion.test>")
    return smtp_sink


def event_in(hours: float, name: str = "Gala") -> dict[str, Any]:
    starts = datetime.now(NAIROBI) + timedelta(hours=hours)
    doc: dict[str, Any] = run_json(
        "events", "add", "--name", name, "--date", starts.date().isoformat(),
        "--time", starts.strftime("%H:%M"), "--location", "KICC, Nairobi",
    )  # fmt: skip
    return doc


def crew_member(name: str, phone: str) -> dict[str, Any]:
    email = f"{name.lower()}@example.co.ke"
    doc: dict[str, Any] = run_json(
        "people", "add", "--name", name, "--phone", phone, "--email", email
    )
    return doc


def assign(event_id: int, person_id: int, role: str, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = run_json(
        "crew", "assign", "--event", str(event_id), "--person", str(person_id), "--role", role,
        *extra,
    )  # fmt: skip
    return doc


# -- crew edit ---------------------------------------------------------------------------------


def test_crew_edit_corrects_role_and_notes_with_an_audit_entry_and_no_email() -> None:
    event_in(72)
    crew_member("Achieng", "0712000001")
    assign(1, 1, "Sound", "--notes", "Bring the DI boxes")
    run_json("crew", "invite", "1")  # into the outbox: nothing configured
    doc = run_json("crew", "edit", "1", "--role", " Lighting   Technician ", "--notes",
                   "Bring gaffer tape\nand the spare bulbs")  # fmt: skip
    assert (doc["id"], doc["role"], doc["notes"]) == (
        1, "Lighting Technician", "Bring gaffer tape\nand the spare bulbs",
    )  # fmt: skip
    assert run_json("crew", "list")[0] == doc
    assert len(run_json("mail", "list")) == 1  # the invitation only: an edit emails nobody

    [entry] = run_json("history", "--event", "1")
    assert entry["action"] == "assignment.edit"
    assert (entry["assignment_id"], entry["event_id"], entry["person_id"]) == (1, 1, 1)
    assert entry["changes"] == {
        "role": ["Sound", "Lighting Technician"],
        "notes": ["Bring the DI boxes", "Bring gaffer tape\nand the spare bulbs"],
    }
    assert run_json("history", "--person", "1") == [entry]

    result = run("crew", "edit", "1", "--no-notes", "--role", "Lighting Technician")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "Assignment 1: changed notes; nobody was emailed.\n"
    assert run_json("crew", "list")[0]["notes"] is None
    assert run_json("history", "--event", "1")[0]["changes"] == {
        "notes": ["Bring gaffer tape\nand the spare bulbs", None]
    }


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "Error: give at least one of --role, --notes, --no-notes"),
        (["--notes", "x", "--no-notes"], "Error: --notes and --no-notes cannot be given together"),
    ],
)
def test_crew_edit_needs_one_option_and_not_both_notes_options(args: list[str], error: str) -> None:
    event_in(72)
    crew_member("Achieng", "0712000001")
    assign(1, 1, "Sound")
    [(out, err)] = finish([process := sfcrm_process("crew", "edit", "1", *args)])
    assert process.returncode == 2  # a usage error, as a missing option is
    assert err.splitlines() == [error, "Hint: see `sfcrm crew edit --help`"]
    assert out == ""
    assert run_json("history") == []


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (["1", "--role", " "], 4, "Error: role must not be empty"),
        (["1", "--role", "x" * 81], 4, "Error: role is longer than 80 characters"),
        (["1", "--notes", " \n "], 4, "Error: notes must not be empty"),
        (["9", "--role", "Sound"], 5, "Error: no such assignment (9)"),
    ],
)
def test_crew_edit_checks_role_and_notes_as_assign_does(
    args: list[str], code: int, error: str
) -> None:
    event_in(72)
    crew_member("Achieng", "0712000001")
    assign(1, 1, "Sound")
    result = run("crew", "edit", *args)
    assert result.exit_code == code
    assert result.stderr.splitlines()[0] == error
    assert run_json("crew", "list")[0]["role"] == "Sound"
    assert run_json("history") == []


# -- archived people ---------------------------------------------------------------------------


def test_crew_assign_refuses_an_archived_person_until_unarchived() -> None:
    event_in(72)
    crew_member("Achieng", "0712000001")
    run_json("people", "archive", "1")
    result = run("crew", "assign", "--event", "1", "--person", "0712000001", "--role", "Sound")
    assert result.exit_code == 6
    assert result.stderr.splitlines() == [
        "Error: Achieng is archived and cannot be put on an event (person 1)",
        "Hint: `sfcrm people unarchive 1` first, if they are back",
    ]
    assert run_json("crew", "list") == []
    run_json("people", "unarchive", "1")
    assert assign(1, 1, "Sound")["status"] == "invited"


def test_invite_skips_an_archived_person_whose_assignment_stays_listed(
    smtp_env: SmtpSink,
) -> None:
    event_in(72)
    crew_member("Achieng", "0712000001")
    crew_member("Baraka", "0712000002")
    assign(1, 1, "Sound")
    assign(1, 2, "Lights")
    run_json("people", "archive", "1", "--reason", "Left the crew")

    doc = run_json("crew", "invite", "--event", "1")
    assert reasons(doc, "skipped") == [(1, "Achieng is archived")]
    assert len(outcome(doc, "sent")) == 1
    assert recipients(smtp_env) == ["baraka@example.co.ke"]
    assert [(c["name"], c["invitation_sent"]) for c in run_json("crew", "list")] == [
        ("Achieng", False), ("Baraka", True),
    ]  # fmt: skip
    assert [c["id"] for c in run_json("crew", "list", "--search", "achieng")] == [1]

    dry = run("crew", "invite", "1", "--dry-run")
    assert "assignment 1 skipped: Achieng is archived" in dry.stderr


def test_reminders_and_briefings_skip_an_archived_person(smtp_env: SmtpSink) -> None:
    event_in(5)
    crew_member("Achieng", "0712000001")
    crew_member("Baraka", "0712000002")
    for person_id, role in ((1, "Sound"), (2, "Lights")):
        assign(1, person_id, role)
        run_json("crew", "confirm", str(person_id))
    run_json("people", "archive", "2")

    reminders = run_json("crew", "remind", "--hours", "24")
    assert reasons(reminders, "skipped") == [(2, "Baraka is archived")]
    briefings = run_json("crew", "brief", "--event", "1")
    assert reasons(briefings, "skipped") == [(2, "Baraka is archived")]
    assert recipients(smtp_env) == ["achieng@example.co.ke", "achieng@example.co.ke"]
