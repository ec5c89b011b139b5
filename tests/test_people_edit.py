"""Correcting people: `people edit` with the checks of `people add`, `people archive` and
`unarchive`, each written to the audit log; archived people out of lists and searches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from support import finish, run, run_json, sfcrm_process, wait_for

from sfcrm.db import Database
from sfcrm.errors import ConflictError
from sfcrm.models import Person
from sfcrm.people import People


@pytest.fixture(autouse=True)
def office(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """The commands use the test's database: a SQLite file, then a PostgreSQL database."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.setenv("SFCRM_TIMEZONE", "Africa/Nairobi")
    return database_url


def add(name: str, phone: str, email: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = run_json(
        "people", "add", "--name", name, "--phone", phone, *(["--email", email] if email else [])
    )
    return doc


def history(ref: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = run_json("history", "--person", ref)
    return entries


# -- people edit -------------------------------------------------------------------------------


def test_edit_corrects_name_phone_and_email_with_one_audit_entry_of_what_changed() -> None:
    add("Achieng Otieno", "0712345678", "achieng@exmaple.com")
    doc = run_json("people", "edit", "1", "--name", " Achieng  Otieno ", "--phone",
                   "0712 345 679", "--email", "Achieng@Example.com")  # fmt: skip
    assert doc == {
        "id": 1, "name": "Achieng Otieno", "phone": "254712345679",
        "email": "achieng@example.com", "balance": "0.00", "archived_at": None,
    }  # fmt: skip
    assert run_json("people", "show", "0712345679") == doc
    [entry] = history("1")
    assert entry["action"] == "person.edit"
    assert (entry["person_id"], entry["event_id"], entry["payment_id"]) == (1, None, None)
    assert entry["changes"] == {  # the name was the same once cleaned: not a change
        "phone": ["254712345678", "254712345679"],
        "email": ["achieng@exmaple.com", "achieng@example.com"],
    }

    result = run("people", "edit", "achieng@example.com", "--no-email")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "Person 1: changed email.\n"
    assert run_json("people", "show", "1")["email"] is None
    assert history("1")[0]["changes"] == {"email": ["achieng@example.com", None]}


def test_edit_to_the_values_a_person_has_changes_nothing_and_writes_no_entry() -> None:
    add("Achieng Otieno", "0712345678", "achieng@example.com")
    result = run(
        "people", "edit", "1", "--phone", "+254712345678", "--email", "ACHIENG@example.com"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "Nothing changed: person 1 has these already.\n"
    assert history("1") == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "Error: give at least one of --name, --phone, --email, --no-email"),
        (["--email", "a@b.co.ke", "--no-email"],
         "Error: --email and --no-email cannot be given together"),
    ],
)  # fmt: skip
def test_edit_needs_one_option_and_not_both_email_options(args: list[str], error: str) -> None:
    add("Achieng Otieno", "0712345678")
    [(out, err)] = finish([process := sfcrm_process("people", "edit", "1", *args)])
    assert process.returncode == 2  # a usage error, as a missing option is
    assert err.splitlines() == [error, "Hint: see `sfcrm people edit --help`"]
    assert out == ""
    assert history("1") == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--phone", "255712345678"], "Error: not a Kenyan mobile number (255712345678)"),
        (["--name", " \t"], "Error: name must not be empty"),
        (["--name", "x" * 121], "Error: name is longer than 120 characters"),
        (
            ["--email", "not-an-address"],
            "Error: not an email address sfcrm can send to (not-an-address)",
        ),
        (["--email", " "], "Error: email must not be empty"),
    ],
)
def test_edit_checks_what_it_is_given_as_add_does(args: list[str], error: str) -> None:
    add("Achieng Otieno", "0712345678", "achieng@example.com")
    result = run("people", "edit", "1", *args)
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == error
    assert run_json("people", "show", "1")["name"] == "Achieng Otieno"
    assert history("1") == []


def test_edit_refuses_a_phone_or_email_another_person_holds_naming_them() -> None:
    add("Achieng Otieno", "0712345678", "achieng@example.com")
    add("Baraka Mwangi", "0722000111", "baraka@example.com")
    taken_phone = run("people", "edit", "2", "--phone", "712 345 678", "--name", "Baraka M.")
    assert taken_phone.exit_code == 6
    assert taken_phone.stderr.splitlines()[0] == (
        "Error: person 1 (Achieng Otieno) already has this phone (254712345678)"
    )
    taken_email = run_json("people", "edit", "0722000111", "--email", "ACHIENG@example.com",
                           code=6)  # fmt: skip
    assert taken_email["code"] == "CONFLICT"
    assert taken_email["error"] == (
        "person 1 (Achieng Otieno) already has this email (achieng@example.com)"
    )
    assert run_json("people", "show", "2")["name"] == "Baraka Mwangi"  # nothing of it written
    assert history("2") == []


def test_edit_racing_another_machine_that_adds_the_phone_names_who_has_it(
    db: Database, people: People, office: str
) -> None:
    if "://" not in office:
        pytest.skip("SQLite's write lock holds the whole file: the check and the write are one")
    people.add("Achieng Otieno", "0712345678")
    other = Database(office)  # another office machine, adding Baraka at this moment
    pool = ThreadPoolExecutor(1)
    try:
        with other.write() as session:
            session.add(Person(name="Baraka", phone="254722000111", created_at=datetime.now(UTC)))
            session.flush()
            edit = pool.submit(people.edit, "1", phone="0722 000 111")
            # its check saw no Baraka; its write waits for the other's uncommitted row
            wait_for(lambda: waiting_for_a_lock(db))
        with pytest.raises(ConflictError) as refused:
            edit.result(timeout=30)
    finally:
        pool.shutdown()
        other.close()
    assert str(refused.value) == "person 2 (Baraka) already has this phone (254722000111)"
    assert people.show("1").phone == "254712345678"
    assert history("1") == []


def test_an_import_read_back_after_an_edit_of_a_phone_leaves_that_person_out(
    tmp_path: Path, people: People
) -> None:
    file = tmp_path / "crew.csv"
    file.write_text("name,phone,email,balance\nAchieng,0700000001,,\nBaraka,0700000002,,\n")
    imported = people.import_csv(file)
    people.edit("0700000001", phone="0700000009")  # before the import's ids are read back
    assert len(imported) == 2
    assert [(p.id, p.name) for p in imported] == [(2, "Baraka")]


def waiting_for_a_lock(db: Database) -> bool:
    with db.read() as session:
        query = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return bool(session.execute(query).scalar())


def test_edit_of_an_unknown_person_exits_5() -> None:
    result = run("people", "edit", "0799999999", "--name", "Nobody")
    assert result.exit_code == 5
    assert result.stderr.splitlines()[0] == "Error: no such person (0799999999)"


# -- people archive / unarchive ----------------------------------------------------------------


def test_an_archived_person_leaves_lists_and_searches_but_is_found_by_name_or_id() -> None:
    add("Achieng Otieno", "0712345678", "achieng@example.com")
    add("Achieng Wanjiru", "0722000111")
    archived = run_json("people", "archive", "0712345678", "--reason", "Moved to Mombasa")
    assert archived["id"] == 1
    assert archived["archived_at"].endswith("+03:00")  # SFCRM_TIMEZONE, with its offset

    assert [p["id"] for p in run_json("people", "list")] == [2]
    assert [p["id"] for p in run_json("people", "list", "--search", "achieng")] == [2]
    assert run_json("people", "list", "--search", "0712345678") == []
    assert run_json("people", "list", "--archived") == [archived]
    assert run_json("people", "list", "--archived", "--search", "wanjiru") == []

    assert run_json("people", "show", "achieng@example.com") == archived
    shown = run("people", "show", "1")
    assert "archived" in shown.stdout and archived["archived_at"] in shown.stdout
    assert shown.stderr == ("Achieng Otieno is archived: `sfcrm people unarchive 1` to undo.\n")
    assert "archived" not in run("people", "show", "2").stdout  # no column for the others

    [entry] = history("1")
    assert (entry["action"], entry["reason"]) == ("person.archive", "Moved to Mombasa")
    assert list(entry["changes"]) == ["archived_at"]
    assert entry["changes"]["archived_at"][0] is None


def test_archive_twice_is_refused_and_unarchive_brings_the_person_back() -> None:
    add("Achieng Otieno", "0712345678")
    run_json("people", "archive", "1")
    again = run("people", "archive", "1")
    assert again.exit_code == 6
    assert again.stderr.splitlines() == [
        "Error: person 1 (Achieng Otieno) is already archived",
        "Hint: `sfcrm people unarchive 1` brings them back",
    ]

    back = run("people", "unarchive", "0712345678")
    assert back.exit_code == 0, back.stderr
    assert back.stdout == "Person 1 (Achieng Otieno) is back from the archive.\n"
    assert [p["archived_at"] for p in run_json("people", "list")] == [None]
    assert [e["action"] for e in history("1")] == ["person.unarchive", "person.archive"]
    assert history("1")[0]["changes"]["archived_at"][1] is None
    assert history("1")[1]["reason"] is None  # none given

    not_archived = run("people", "unarchive", "1")
    assert not_archived.exit_code == 6
    assert not_archived.stderr.splitlines()[0] == "Error: person 1 (Achieng Otieno) is not archived"


def test_an_archived_person_keeps_their_ledger_and_nobody_can_be_deleted() -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "1500")
    run_json("people", "charge", "1", "--amount", "200", "--reason", "Advance")
    run_json("people", "archive", "1", "--reason", "Left the crew")
    ledger = run_json("people", "history", "1")
    assert ledger["person"]["balance"] == "1700.00"
    assert [e["kind"] for e in ledger["entries"]] == ["charge", "opening"]
    assert run("people", "delete", "1").exit_code == 2  # no such command: archive is the way


def test_archive_refuses_an_overlong_reason() -> None:
    add("Achieng Otieno", "0712345678")
    result = run("people", "archive", "1", "--reason", "x" * 501)
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == "Error: reason is longer than 500 characters"
    assert run_json("people", "list")[0]["archived_at"] is None
