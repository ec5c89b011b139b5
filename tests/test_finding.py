"""Finding things: searches as staff type them, tables that never cut what matters, the CSV
export, "No … found", and times in SFCRM_TIMEZONE (cron summaries, log lines)."""

from __future__ import annotations

import csv
import io
import logging
import os
import pty
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import STAMP, run, run_json

from sfcrm.db import Database
from sfcrm.logs import LocalTimeFormatter
from sfcrm.models import MpesaPayment, PaymentStatus

LONG_NAME = "Achieng Otieno Wanjiru Akinyi Nyambura Chebet Kamau Mwangi Odhiambo Njeri Wambui"
LIST_COMMANDS = [
    ("people", "list"),
    ("people", "history", "1"),
    ("mpesa", "status"),
    ("mpesa", "callbacks"),
    ("events", "list"),
    ("crew", "list"),
    ("crew", "assignments", "--person", "1"),
    ("mail", "list"),
    ("history",),
]


@pytest.fixture(autouse=True)
def on_each_engine(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.setenv("SFCRM_TIMEZONE", "Africa/Nairobi")
    return database_url


def add(name: str, phone: str, *more: str) -> int:
    doc = run_json("people", "add", "--name", name, "--phone", phone, *more)
    return int(doc["id"])


def ids(*args: str) -> list[int]:
    return [int(p["id"]) for p in run_json(*args)]


def parsed_csv(*args: str) -> list[dict[str, str]]:
    result = run(*args, "--csv")
    assert result.exit_code == 0, result.output + result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def add_payment(db: Database, person_id: int, **values: object) -> None:
    now = datetime(2026, 12, 1, 6, 30, tzinfo=UTC)
    with db.write() as session:
        session.add(
            MpesaPayment(**{
                "person_id": person_id, "phone_number": "254722111002", "amount": 1500,
                "payment_purpose": "Crew deposit for the Safari Rally Gala weekend",
                "status": PaymentStatus.COMPLETED, "receipt_number": "TH3AB7XY9K",
                "settled_by": "callback", "initiated_at": now, "completed_at": now,
                **values,
            })
        )  # fmt: skip


# -- searches ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed", ["0722 111 002", "+254 722-111-002", "722111002", "254722111002", "(0722) 111-002"]
)
def test_a_phone_is_found_however_staff_type_it(typed: str) -> None:
    wanted = add("Achieng Otieno", "0722111002")
    add("Brian Kiprop", "0733444555")
    assert ids("people", "list", "--search", typed) == [wanted]


def test_part_of_a_phone_typed_with_its_leading_zero_finds_it() -> None:
    wanted = add("Achieng Otieno", "0722111002")
    add("Brian Kiprop", "0733444555")
    assert ids("people", "list", "--search", "0722 111") == [wanted]


def test_percent_and_underscore_in_a_search_mean_themselves() -> None:
    percent = add("Promo 50% crew", "0722111001")
    add("Promo 5000 crew", "0722111002")  # '50%' as a LIKE pattern would match this too
    underscore = add("Team a_b", "0722111003", "--email", "a_b@example.com")
    add("Team axb", "0722111004", "--email", "axb@example.com")  # and 'a_b' this
    assert ids("people", "list", "--search", "50%") == [percent]
    assert ids("people", "list", "--search", "a_b") == [underscore]
    assert ids("people", "list", "--search", "%") == [percent]
    assert ids("people", "list", "--search", "_") == [underscore]


def test_crew_list_finds_a_crew_member_by_phone_and_takes_percent_literally() -> None:
    run_json("events", "add", "--name", "Gala 100%", "--date", "2027-12-12", "--location", "KICC")
    run_json("events", "add", "--name", "Gala 1000", "--date", "2027-12-13", "--location", "KICC")
    add("Achieng Otieno", "0722111002")
    add("Brian Kiprop", "0733444555")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Usher")
    run_json("crew", "assign", "--event", "2", "--person", "2", "--role", "Usher")
    assert ids("crew", "list", "--search", "0722 111 002") == [1]
    assert ids("crew", "list", "--search", "100%") == [1]


# -- tables ------------------------------------------------------------------------------------


def test_into_a_pipe_nothing_is_cut_or_wrapped_however_narrow_columns_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    add(LONG_NAME, "0722111002", "--balance", "1500")
    result = run("people", "list")  # CliRunner: stdout is not a terminal
    assert result.exit_code == 0
    [row] = [line for line in result.stdout.splitlines() if "0722 111 002" in line]
    assert LONG_NAME in row and "1500.00" in row


def on_a_terminal(*args: str, columns: int) -> str:
    """``sfcrm ARGS`` run with a terminal of ``columns`` as its stdout: what it shows."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", *args], stdout=follower, stderr=subprocess.PIPE, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the program closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_on_a_narrow_terminal_names_wrap_and_ids_phones_amounts_stay_whole() -> None:
    add(LONG_NAME, "0722111002", "--balance", "1234567.89")
    shown = on_a_terminal("people", "list", columns=60)
    lines = shown.splitlines()
    assert all(len(line) <= 60 for line in lines), shown
    assert LONG_NAME not in shown  # wrapped over several lines...
    cells = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    assert " ".join(row[1].strip() for row in cells) == LONG_NAME  # ...with nothing lost
    assert "0722 111 002" in shown and "1234567.89" in shown


def test_payment_tables_show_the_name_and_never_cut_status_receipt_or_time(db: Database) -> None:
    add(LONG_NAME, "0722111002", "--balance", "1500")
    add_payment(db, 1)
    shown = on_a_terminal("mpesa", "status", columns=80)
    assert "Achieng" in shown
    for whole in ("TH3AB7XY9K", "completed by callback", "2026-12-01T09:30:00+03:00", "1500.00"):
        assert whole in shown, shown
    one = run("mpesa", "status", "1")
    assert LONG_NAME in one.stdout


# -- CSV ---------------------------------------------------------------------------------------


def test_people_csv_has_one_header_plain_decimals_and_parses_back() -> None:
    add('Achieng, "Otieno"', "0722111002", "--balance", "1,500", "--email", "a@example.com")
    add("Brian Kiprop", "0733444555", "--balance", "1234567.5")
    result = run("people", "list", "--csv")
    assert result.stdout.splitlines()[0] == "id,name,phone,email,balance,archived_at"
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["name"], r["phone"], r["balance"]) for r in rows] == [
        ('Achieng, "Otieno"', "254722111002", "1500.00"),
        ("Brian Kiprop", "254733444555", "1234567.50"),
    ]


def test_payments_csv_has_iso_times_with_the_offset_the_name_and_no_kes(db: Database) -> None:
    add("Achieng Otieno", "0722111002", "--balance", "1500")
    add_payment(db, 1)
    [row] = parsed_csv("mpesa", "status")
    assert row["person"] == "Achieng Otieno"
    assert row["amount"] == "1500.00"
    assert row["initiated_at"] == "2026-12-01T09:30:00+03:00"  # as the JSON gives it
    assert row["receipt_number"] == "TH3AB7XY9K"
    assert row["initiated_at"] == run_json("mpesa", "status")[0]["initiated_at"]


def test_a_csv_cell_a_spreadsheet_would_run_as_a_formula_is_written_as_text() -> None:
    add('=HYPERLINK("http://evil.test")', "0722111002", "--balance", "0")
    run_json("people", "charge", "1", "--amount", "200", "--reason", "+advance")
    [row] = parsed_csv("people", "list")
    assert row["name"] == '\'=HYPERLINK("http://evil.test")'
    [entry] = parsed_csv("people", "history", "1")
    assert (entry["reason"], entry["amount"]) == ("'+advance", "200.00")


@pytest.mark.parametrize("command", LIST_COMMANDS, ids=" ".join)
def test_every_list_command_takes_csv_and_refuses_it_with_json(command: tuple[str, ...]) -> None:
    add("Achieng Otieno", "0722111002")
    result = run(*command, "--csv")
    assert result.exit_code == 0, result.output + result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert len(rows) >= 1 and rows[0] and all(rows[0])  # one header row, even with no rows
    both = run(*command, "--csv", "--json")
    assert both.exit_code == 2
    assert "--csv and --json cannot be given together" in both.stderr


def test_the_csv_of_each_list_has_its_rows() -> None:
    add("Achieng Otieno", "0722111002")
    run_json("events", "add", "--name", "Gala", "--date", "2027-12-12", "--location", "KICC")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Usher")
    run_json("people", "charge", "1", "--amount", "1500", "--reason", "Advance")
    run_json("people", "edit", "1", "--name", "Achieng A. Otieno")
    assert [r["name"] for r in parsed_csv("events", "list")] == ["Gala"]
    assert [(r["name"], r["role"]) for r in parsed_csv("crew", "list")] == [
        ("Achieng A. Otieno", "Usher")
    ]
    assert [
        (r["group"], r["event"]) for r in parsed_csv("crew", "assignments", "--person", "1")
    ] == [("pending", "Gala")]
    [entry] = parsed_csv("people", "history", "1")
    assert (entry["kind"], entry["amount"], entry["balance_after"]) == (
        "charge",
        "1500.00",
        "1500.00",
    )
    assert STAMP.match(entry["created_at"] + " ") and entry["created_at"].endswith("+03:00")
    [change] = parsed_csv("history")
    assert change["action"] == "person.edit" and change["person_id"] == "1"


# -- empty results -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (("people", "list"), "No people found."),
        (("mpesa", "status"), "No payments found."),
        (("mpesa", "callbacks"), "No callbacks found."),
        (("events", "list"), "No events found."),
        (("crew", "list"), "No crew found."),
        (("mail", "list"), "No emails found."),
        (("history",), "No changes found."),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "",
)
def test_an_empty_list_says_so_instead_of_an_empty_frame(
    command: tuple[str, ...], message: str
) -> None:
    result = run(*command)
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout == message + "\n"
    assert run_json(*command) == []


def test_an_empty_ledger_and_no_assignments_say_so() -> None:
    add("Achieng Otieno", "0722111002")
    assert run("people", "history", "1").stdout.splitlines()[-1] == "No ledger entries found."
    shown = run("crew", "assignments", "--person", "1").stdout
    assert shown == "No assignments found for Achieng Otieno.\n"
    run_json("events", "add", "--name", "Gala", "--date", "2027-12-12", "--location", "KICC")
    assert run("events", "show", "1").stdout.splitlines()[-1] == "No crew on this event yet."


# -- times -------------------------------------------------------------------------------------


def test_a_cron_summary_starts_with_the_time_in_sfcrm_timezone() -> None:
    result = run("mail", "retry")
    assert result.exit_code == 0, result.output + result.stderr
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+03:00 Retry: 0 sent, 0 failed, 0 not retried\.\n",
        result.stdout,
    ), result.stdout
    now = datetime.now(UTC).astimezone()
    stamped = datetime.fromisoformat(result.stdout.split()[0])
    assert abs((stamped - now).total_seconds()) < 60


def test_log_lines_are_stamped_in_sfcrm_timezone_with_its_offset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log_file = tmp_path / "sfcrm.log"
    monkeypatch.setenv("SFCRM_LOG_FILE", str(log_file))
    monkeypatch.setenv("TZ", "UTC")
    add("Achieng Otieno", "0722111002")
    run_json("people", "charge", "1", "--amount", "100", "--reason", "Advance")
    lines = log_file.read_text().splitlines()
    assert lines
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+03:00 INFO sfcrm", x) for x in lines)


def test_the_log_formatter_writes_the_zone_it_is_given() -> None:
    record = logging.LogRecord("sfcrm", logging.INFO, __file__, 1, "hello", None, None)
    record.created = datetime(2026, 12, 1, 6, 0, tzinfo=UTC).timestamp()
    assert LocalTimeFormatter("Africa/Nairobi").format(record) == (
        "2026-12-01T09:00:00+03:00 INFO sfcrm hello"
    )
    assert LocalTimeFormatter("UTC", "%(asctime)s %(message)s").format(record) == (
        "2026-12-01T06:00:00+00:00 hello"
    )
