"""The command line as office staff and cron use it: exit codes, exact messages, --json."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from legacy_schema import MIGRATIONS
from sqlalchemy import func, select
from sqlmodel import col
from support import PG_URL, Listener, free_port, paid_callback, run, run_json, wait_for

from sfcrm.cli import app
from sfcrm.db import HEAD, Database
from sfcrm.emulator import DarajaEmulator
from sfcrm.models import BalanceEntry, MpesaCheckout, MpesaPayment, PaymentStatus, Person


@pytest.fixture
def on_each_engine(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """The commands use the test's database: a SQLite file, then a PostgreSQL database."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def office_file(monkeypatch: pytest.MonkeyPatch, db_path: Path) -> Path:
    """The commands use the SQLite file ``db_path`` (a test looking at the file itself)."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", str(db_path))
    return db_path


# -- people ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("on_each_engine")
def test_people_add_prints_the_person_as_json_with_money_as_text() -> None:
    doc = run_json("people", "add", "--name", "Achieng Otieno", "--phone", "0712 345 678",
                   "--email", "Achieng@Example.com", "--balance", "1500")  # fmt: skip
    assert doc == {
        "id": 1,
        "name": "Achieng Otieno",
        "phone": "254712345678",
        "email": "achieng@example.com",
        "balance": "1500.00",
        "archived_at": None,
    }


@pytest.mark.usefixtures("on_each_engine")
def test_people_show_finds_by_id_phone_and_email() -> None:
    run_json("people", "add", "--name", "Otieno", "--phone", "0712345678", "--email", "o@x.co.ke")
    for ref in ("1", "0712345678", "+254 712 345 678", "712345678", "O@X.co.ke"):
        assert run_json("people", "show", ref)["id"] == 1


@pytest.mark.usefixtures("on_each_engine")
def test_people_show_unknown_person_exits_5_with_one_line() -> None:
    result = run("people", "show", "0799999999")
    assert result.exit_code == 5
    assert result.stderr.splitlines()[0] == "Error: no such person (0799999999)"


@pytest.mark.usefixtures("on_each_engine")
def test_people_add_refuses_a_foreign_phone_with_exit_4_and_no_row() -> None:
    result = run("people", "add", "--name", "X", "--phone", "255712345678")
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == "Error: not a Kenyan mobile number (255712345678)"
    assert run_json("people", "list") == []


@pytest.mark.usefixtures("on_each_engine")
def test_people_add_refuses_a_duplicate_phone() -> None:
    run_json("people", "add", "--name", "A", "--phone", "0712345678")
    result = run("people", "add", "--name", "B", "--phone", "+254712345678")
    assert result.exit_code == 6
    assert "already has this phone" in result.stderr


@pytest.mark.usefixtures("on_each_engine")
def test_errors_under_json_are_one_document_on_stdout() -> None:
    doc = run_json("people", "show", "42", code=5)
    assert doc["status"] == "failed"
    assert doc["code"] == "NOT_FOUND"
    assert doc["error"] == "no such person (42)"


@pytest.mark.usefixtures("on_each_engine")
def test_people_import_adds_every_row(tmp_path: Path) -> None:
    csv = tmp_path / "crew.csv"
    csv.write_text("name,phone,email,balance\nA One,0712000001,a@x.co.ke,100\nB Two,0712000002,,\n")
    doc = run_json("people", "import", str(csv))
    assert doc["imported"] == 2
    assert [p["balance"] for p in run_json("people", "list")] == ["100.00", "0.00"]


@pytest.mark.usefixtures("on_each_engine")
def test_people_import_with_a_bad_row_names_its_line_and_imports_nothing(tmp_path: Path) -> None:
    csv = tmp_path / "crew.csv"
    csv.write_text(
        "name,phone,email,balance\n"
        "A One,0712000001,a@x.co.ke,100\n"
        "B Two,0812000002,,\n"
        "C Three,0712000003,,abc\n"
    )
    result = run("people", "import", str(csv))
    assert result.exit_code == 4
    assert "line 3: not a Kenyan mobile number (must be 07.. or 01..) (0812000002)" in result.stderr
    assert "line 4: balance must be a number (abc)" in result.stderr
    assert run_json("people", "list") == []


@pytest.mark.usefixtures("on_each_engine")
def test_people_import_refuses_a_file_without_the_header(tmp_path: Path) -> None:
    csv = tmp_path / "crew.csv"
    csv.write_text("A One,0712000001,a@x.co.ke,100\n")
    result = run("people", "import", str(csv))
    assert result.exit_code == 4
    assert "header name,phone,email,balance" in result.stderr


# -- configuration -----------------------------------------------------------------------------


def test_config_show_masks_secrets_and_names_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPESA_CONSUMER_SECRET", "canary-consumer-secret")
    monkeypatch.setenv("MPESA_CALLBACK_URL", "https://pay.example.co.ke/cb/canary-path-secret")
    Path(".env").write_text("MPESA_PASS_KEY=canary-passkey\nMPESA_CONSUMER_SECRET=from-dotenv\n")
    Path("sfcrm.toml").write_text('[mpesa]\nbusiness_short_code = "600100"\n')
    for args in (("config", "show"), ("config", "show", "--json")):
        result = run(*args)
        assert result.exit_code == 0, result.output
        for canary in ("canary-consumer-secret", "canary-path-secret", "canary-passkey"):
            assert canary not in result.output
    doc = run_json("config", "show")
    rows = {row["setting"]: row for row in doc["settings"]}
    secret = rows["MPESA_CONSUMER_SECRET"]
    assert (secret["value"], secret["source"]) == ("********", "environment")
    assert rows["MPESA_PASS_KEY"]["source"] == ".env"
    assert rows["MPESA_BUSINESS_SHORT_CODE"]["value"] == "600100"
    assert rows["MPESA_BUSINESS_SHORT_CODE"]["source"] == "sfcrm.toml"
    assert rows["MPESA_CALLBACK_URL"]["value"] == "https://pay.example.co.ke/********"
    timezone = rows["SFCRM_TIMEZONE"]
    assert (timezone["value"], timezone["source"]) == ("Africa/Nairobi", "default")


def test_a_secret_in_sfcrm_toml_is_refused() -> None:
    Path("sfcrm.toml").write_text('[mpesa]\nconsumer_secret = "oops"\n')
    result = run("config", "show")
    assert result.exit_code == 3
    assert (
        result.stderr.splitlines()[0] == "Error: sfcrm.toml holds a secret (mpesa.consumer_secret)"
    )
    assert "oops" not in result.output


@pytest.mark.usefixtures("on_each_engine")
def test_request_without_credentials_names_the_variable_and_leaves_no_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_json("people", "add", "--name", "A", "--phone", "0712345678", "--balance", "900")
    monkeypatch.setenv("MPESA_CALLBACK_URL", "https://pay.example.co.ke/cb/secret")
    result = run("mpesa", "request", "--person", "1", "--amount", "500", "--purpose", "Deposit")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[0] == "Error: MPESA_CONSUMER_KEY is not set"
    assert run_json("mpesa", "status") == []


def test_init_writes_starter_files_and_the_database() -> None:
    doc = run_json("init")
    assert sorted(doc["written"]) == [".env.example", "sfcrm.toml"]
    assert Path(doc["database"]).is_file()
    assert "MPESA_CONSUMER_KEY=" in Path(".env.example").read_text()
    # a second run keeps the user's edits
    Path("sfcrm.toml").write_text("# mine\n")
    assert run_json("init")["written"] == []
    assert Path("sfcrm.toml").read_text() == "# mine\n"


# -- payments through the emulator and the listener --------------------------------------------


@pytest.fixture
def payer(cli_env: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = run_json(
        "people", "add", "--name", "Wanjiru", "--phone", "0708374149", "--balance", "1500"
    )
    return doc


def test_request_answers_like_the_old_api_and_the_callback_completes_it(
    payer: dict[str, Any],
) -> None:
    doc = run_json("mpesa", "request", "--person", "0708374149", "--amount", "500",
                   "--purpose", "Crew deposit")  # fmt: skip
    assert doc["success"] is True
    assert doc["message"] == "STK push initiated successfully"
    assert doc["checkout_request_id"].startswith("ws_CO_")
    pid = str(doc["payment_id"])
    status = wait_for(
        lambda: (s := run_json("mpesa", "status", pid))["status"] == "completed" and s
    )
    assert status["amount"] == "500.00"
    assert len(status["receipt_number"]) == 10
    assert status["completed_at"].endswith("+03:00")
    assert status["checkout_request_id"] == doc["checkout_request_id"]
    assert status["result_code"] == "0"
    assert run_json("people", "show", "0708374149")["balance"] == "1000.00"


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("0", "Error: amount must be at least 1 (0)"),
        ("500.50", "Error: amount must be whole shillings (M-Pesa takes no cents) (500.50)"),
        ("250001", "Error: amount is over M-Pesa's 250,000 limit per payment (250001)"),
        ("-3", "Error: amount must be at least 1 (-3)"),
    ],
)
def test_request_refuses_bad_amounts_before_any_network_call(
    payer: dict[str, Any], emulator: DarajaEmulator, amount: str, message: str
) -> None:
    result = run("mpesa", "request", "--person", "1", "--amount", amount, "--purpose", "x")
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == message
    assert emulator.token_requests == 0
    assert run_json("mpesa", "status") == []


def test_request_refuses_a_foreign_phone_before_any_network_call(
    payer: dict[str, Any], emulator: DarajaEmulator
) -> None:
    result = run("mpesa", "request", "--person", "1", "--amount", "10", "--purpose", "x",
                 "--phone", "255712345678")  # fmt: skip
    assert result.exit_code == 4
    assert emulator.token_requests == 0
    assert run_json("mpesa", "status") == []


def test_request_for_an_unknown_person_exits_5(payer: dict[str, Any]) -> None:
    result = run("mpesa", "request", "--person", "77", "--amount", "10", "--purpose", "x")
    assert result.exit_code == 5
    assert result.stderr.splitlines()[0] == "Error: no such person (77)"


def test_a_refused_push_prints_daraja_hint_and_keeps_a_failed_row(cli_env: dict[str, str]) -> None:
    run_json("people", "add", "--name", "Busy", "--phone", "0700000500", "--balance", "10")
    result = run("mpesa", "request", "--person", "1", "--amount", "10", "--purpose", "x")
    assert result.exit_code == 7
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: payment 1: Daraja refused the STK push: Unable to lock")
    assert lines[1] == "Hint: another M-Pesa prompt is open on that phone; wait a minute or two"
    assert run_json("mpesa", "status", "1")["status"] == "failed"


def test_resend_of_a_completed_payment_is_refused(
    payer: dict[str, Any], emulator: DarajaEmulator
) -> None:
    run_json("mpesa", "request", "--person", "1", "--amount", "500", "--purpose", "Deposit")
    wait_for(lambda: run_json("mpesa", "status", "1")["status"] == "completed")
    result = run("mpesa", "resend", "1")
    assert result.exit_code == 6
    assert "payment 1 is completed; it is never pushed again" in result.stderr
    assert len(emulator.pushes) == 1


def test_resend_after_a_cancelled_prompt_pushes_again(cli_env: dict[str, str]) -> None:
    run_json("people", "add", "--name", "Cancels", "--phone", "0700000032", "--balance", "20")
    run_json("mpesa", "request", "--person", "1", "--amount", "20", "--purpose", "Deposit")
    wait_for(lambda: run_json("mpesa", "status", "1")["status"] == "cancelled")
    doc = run_json("mpesa", "resend", "1")
    assert doc == {
        "results": [{"payment_id": 1, "email_id": None, "outcome": "pushed",
                     "message": "STK push sent again"}],
        "counts": {"pushed": 1}, "total": 1,
    }  # fmt: skip
    assert run_json("mpesa", "status", "1")["push_count"] == 2


def test_status_lists_filter_by_status_and_person(payer: dict[str, Any]) -> None:
    run_json("mpesa", "request", "--person", "1", "--amount", "500", "--purpose", "Deposit")
    wait_for(lambda: run_json("mpesa", "status", "1")["status"] == "completed")
    assert [p["payment_id"] for p in run_json("mpesa", "status", "--status", "completed")] == [1]
    assert run_json("mpesa", "status", "--status", "pending") == []
    assert len(run_json("mpesa", "status", "--person", "0708374149")) == 1
    result = run("mpesa", "status", "--status", "bogus")
    assert result.exit_code == 4


def test_status_of_an_unknown_payment_exits_5(cli_env: dict[str, str]) -> None:
    result = run("mpesa", "status", "99")
    assert result.exit_code == 5
    assert result.stderr.splitlines()[0] == "Error: no such payment (99)"


def test_reconcile_settles_a_payment_whose_callback_was_lost(
    payer: dict[str, Any], emulator: DarajaEmulator, listener: Listener
) -> None:
    emulator.settings.send_callbacks = False
    run_json("mpesa", "request", "--person", "1", "--amount", "500", "--purpose", "Deposit")
    import time

    time.sleep(0.2)  # let the emulator settle the push (callback_delay is 0.05 s)
    doc = run_json("mpesa", "reconcile", "--older-than", "0s")
    assert [p["status"] for p in doc["settled"]] == ["completed"]
    assert run_json("people", "show", "1")["balance"] == "1000.00"
    again = run_json("mpesa", "reconcile", "--older-than", "0s")
    assert again["settled"] == []
    assert run_json("people", "show", "1")["balance"] == "1000.00"


def test_reconcile_refuses_a_bad_duration(cli_env: dict[str, str]) -> None:
    result = run("mpesa", "reconcile", "--older-than", "soon")
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == "Error: not a duration; use e.g. 90s, 2m, 1h (soon)"


def test_callbacks_lists_unmatched_ones(cli_env: dict[str, str], listener: Listener) -> None:
    body = json.loads((Path(__file__).parent / "samples" / "callback-cancelled.json").read_text())
    assert listener.post(body).status_code == 200
    rows = run_json("mpesa", "callbacks", "--unmatched")
    assert [r["checkout_request_id"] for r in rows] == ["ws_CO_21072024125243250722943992"]


# -- meta --------------------------------------------------------------------------------------


def _commands() -> list[list[str]]:
    import typer.main

    found: list[list[str]] = []

    def walk(command: Any, prefix: list[str]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*prefix, name])
        else:
            found.append(prefix)

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_has_help_with_an_example() -> None:
    commands = _commands()
    assert ["mpesa", "request"] in commands
    for path in commands:
        result = run(*path, "--help")
        assert result.exit_code == 0, path
        assert "Example: sfcrm " + " ".join(path) in result.output, path


def test_every_command_takes_json() -> None:
    for path in _commands():
        assert "--json" in run(*path, "--help").output, path


README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_command_shown_in_the_readme_exists() -> None:
    import re

    commands = {" ".join(path) for path in _commands()}
    code = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(), re.M | re.S))
    shown = re.findall(
        r"(?:^|\$ |sfcrm/venv/bin/)sfcrm ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", code, re.M
    )
    assert shown
    for text in shown:
        words = text.split()
        assert " ".join(words) in commands or words[0] in commands, text


def test_every_command_is_documented_in_the_readme() -> None:
    text = README.read_text()
    for path in _commands():
        assert "sfcrm " + " ".join(path) in text, path


def test_every_setting_is_in_the_readme_table() -> None:
    from sfcrm.config import SPECS

    text = README.read_text()
    for spec in SPECS:
        assert f"| `{spec.env}` |" in text, spec.env


@pytest.mark.usefixtures("on_each_engine")
def test_a_number_without_a_safaricom_prefix_is_kept_with_a_note() -> None:
    result = run("people", "add", "--name", "Airtel User", "--phone", "0730000000")
    assert result.exit_code == 0
    assert "does not have a Safaricom prefix" in result.stderr
    assert run_json("people", "show", "0730000000")["phone"] == "254730000000"


# -- the balance ledger ------------------------------------------------------------------------


@pytest.mark.usefixtures("on_each_engine")
def test_charge_and_credit_move_the_balance_and_write_the_ledger() -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "1500")
    charged = run_json("people", "charge", "0712345678", "--amount", "2000.50",
                       "--reason", "Advance for Rally weekend")  # fmt: skip
    assert charged["balance"] == "3500.50"
    assert charged["entry"]["kind"] == "charge" and charged["entry"]["amount"] == "2000.50"
    credited = run_json("people", "credit", "1", "--amount", "500", "--reason", "Cash")
    assert credited["balance"] == "3000.50"
    history = run_json("people", "history", "1")
    assert [(e["kind"], e["amount"], e["balance_after"]) for e in history["entries"]] == [
        ("credit", "-500.00", "3000.50"),
        ("charge", "2000.50", "3500.50"),
        ("opening", "1500.00", "1500.00"),
    ]


@pytest.mark.usefixtures("on_each_engine")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--amount", "0", "--reason", "x"], "Error: amount must be more than 0 (0)"),
        (["--amount", "-5", "--reason", "x"], "Error: amount must be more than 0 (-5)"),
        (
            ["--amount", "1.005", "--reason", "x"],
            "Error: amount has more than two decimals (1.005)",
        ),
        (["--amount", "10", "--reason", " "], "Error: a reason is required, for the ledger"),
    ],
)
def test_charge_refuses_bad_amounts_and_changes_nothing(args: list[str], message: str) -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "100")
    result = run("people", "charge", "1", *args)
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == message
    assert run_json("people", "show", "1")["balance"] == "100.00"
    assert len(run_json("people", "history", "1")["entries"]) == 1


def test_a_completed_payment_is_in_the_ledger_once(
    payer: dict[str, Any], listener: Listener
) -> None:
    run_json("mpesa", "request", "--person", "1", "--amount", "500", "--purpose", "Deposit")
    wait_for(lambda: run_json("mpesa", "status", "1")["status"] == "completed")
    body = {"Body": {"stkCallback": {
        "CheckoutRequestID": run_json("mpesa", "status", "1")["checkout_request_id"],
        "ResultCode": 0, "ResultDesc": "ok",
        "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": 500}]},
    }}}  # fmt: skip
    assert listener.post(body).status_code == 200  # a duplicate callback
    entries = run_json("people", "history", "1")["entries"]
    assert [(e["kind"], e["amount"], e["payment_id"]) for e in entries] == [
        ("payment", "-500.00", 1),
        ("opening", "1500.00", None),
    ]
    assert run_json("people", "show", "1")["balance"] == "1000.00"


@pytest.mark.usefixtures("on_each_engine")
def test_tables_into_a_pipe_cut_nothing() -> None:
    name = "Wanjiku Njeri Kamau-Otieno of the Sound Fusion Rigging Crew"
    email = "wanjiku.njeri.kamau.otieno.rigging@soundfusion-events.example.co.ke"
    assert (
        run("people", "add", "--name", name, "--phone", "0712345678", "--email", email).exit_code
        == 0
    )
    result = run("people", "list")
    assert result.exit_code == 0
    assert name in result.stdout
    assert email in result.stdout
    assert "…" not in result.stdout


# -- a PostgreSQL database's password ----------------------------------------------------------

DB_PASSWORD = "pg-canary-7c1e9a4b2f"


def nobody_listens_url() -> str:
    """A PostgreSQL URL with a password, of a port on loopback nobody listens on."""
    return f"postgresql://office:{DB_PASSWORD}@127.0.0.1:{free_port()}/sfcrm"


def test_config_show_masks_the_password_of_the_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SFCRM_DATABASE_URL", nobody_listens_url())
    result = run("config", "show")
    assert result.exit_code == 0, result.output
    assert DB_PASSWORD not in result.output
    shown = [line for line in result.stdout.splitlines() if line.startswith("database:")]
    assert shown == [
        f"database:    postgresql+psycopg://office:********@127.0.0.1:{shown[0][-11:]}"
    ]
    doc = run_json("config", "show")
    assert DB_PASSWORD not in json.dumps(doc)
    row = {r["setting"]: r for r in doc["settings"]}["SFCRM_DATABASE_URL"]
    assert row["value"] == doc["database"]
    assert row["value"].startswith("postgresql+psycopg://office:********@127.0.0.1:")
    assert row["source"] == "environment"


def test_a_database_url_with_a_password_in_sfcrm_toml_is_refused() -> None:
    Path("sfcrm.toml").write_text(f'[database]\nurl = "{nobody_listens_url()}"\n')
    for args in (("config", "show"), ("people", "list"), ("config", "show", "--json")):
        result = run(*args)
        assert result.exit_code == 3
        assert DB_PASSWORD not in result.output
    lines = run("people", "list").stderr.splitlines()
    assert lines[0] == "Error: sfcrm.toml holds a secret (the password in database.url)"
    assert lines[1].startswith("Hint: set SFCRM_DATABASE_URL, password and all, in the environment")


def test_a_database_url_without_a_password_in_sfcrm_toml_is_taken() -> None:
    Path("sfcrm.toml").write_text('[database]\nurl = "postgresql://office@db.internal/sfcrm"\n')
    doc = run_json("config", "show")
    assert doc["database"] == "postgresql+psycopg://office@db.internal/sfcrm"


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["text", "json"])
def test_a_server_nobody_listens_on_is_one_error_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, json_flag: tuple[str, ...]
) -> None:
    url = nobody_listens_url()
    monkeypatch.setenv("SFCRM_DATABASE_URL", url)
    monkeypatch.setenv("SFCRM_LOG_FILE", str(tmp_path / "sfcrm.log"))
    for args in (("people", "list"), ("db", "current"), ("db", "upgrade"), ("init",)):
        result = run(*args, *json_flag)
        assert result.exit_code == 9, (args, result.output)
        assert DB_PASSWORD not in result.output + result.stderr
        masked = url.replace(DB_PASSWORD, "***").replace("postgresql:", "postgresql+psycopg:")
        if json_flag:
            doc = json.loads(result.stdout)
            assert doc["code"] == "DATABASE_ERROR"
            assert doc["error"].startswith("cannot reach the database server: ")
            assert doc["error"].endswith(f"({masked})")
        else:
            lines = result.stderr.splitlines()
            assert len(lines) == 2, result.stderr
            assert lines[0].startswith("Error: cannot reach the database server: ")
            assert lines[0].endswith(f"({masked})")
            assert lines[1].startswith("Hint: check SFCRM_DATABASE_URL")
    assert DB_PASSWORD not in (tmp_path / "sfcrm.log").read_text()


# -- sfcrm db ----------------------------------------------------------------------------------


def legacy_file(path: Path, version: int) -> None:
    """A file as the release of schema ``version`` (before Alembic) left it, empty."""
    import sqlite3

    with closing(sqlite3.connect(path)) as conn:
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


def test_db_current_of_a_missing_file_creates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFCRM_DATABASE_URL", "office.db")
    result = run("db", "current")
    assert result.exit_code == 0
    assert (
        result.stdout
        == f"no database at {Path.cwd() / 'office.db'} yet; the first command creates it\n"
    )
    doc = run_json("db", "current")
    assert (doc["revision"], doc["user_version"], doc["head"], doc["newest"]) == (
        None, None, HEAD, False,
    )  # fmt: skip
    assert not Path("office.db").exists()


def test_db_current_and_upgrade_of_a_file_an_older_release_wrote(office_file: Path) -> None:
    db_path = office_file
    legacy_file(db_path, 3)
    current = run("db", "current")
    assert current.exit_code == 0
    assert current.stdout == (
        f"the database is at schema 0003 (user_version 3); {HEAD} is the newest "
        "(`sfcrm db upgrade` or any command upgrades it)\n"
    )
    doc = run_json("db", "current")
    assert (doc["revision"], doc["user_version"], doc["newest"]) == ("0003", 3, False)
    assert run_json("db", "current")["user_version"] == 3  # looking never upgrades

    upgraded = run("db", "upgrade")
    assert upgraded.exit_code == 0
    assert upgraded.stdout == f"upgraded the database from schema 0003 (user_version 3) to {HEAD}\n"
    assert run("db", "current").stdout == f"the database is at schema {HEAD}, the newest\n"
    again = run_json("db", "upgrade")
    assert again == {
        "database": str(db_path), "from": HEAD, "from_user_version": None, "to": HEAD,
        "upgraded": False,
    }  # fmt: skip
    assert run("db", "upgrade").stdout == f"the database is at schema {HEAD} already\n"


def test_db_current_of_a_file_the_newest_release_before_alembic_wrote(office_file: Path) -> None:
    db_path = office_file
    legacy_file(db_path, len(MIGRATIONS))
    assert run("db", "current").stdout == (
        f"the database is at schema 0004 (user_version 4); {HEAD} is the newest "
        "(`sfcrm db upgrade` or any command upgrades it)\n"
    )
    assert run("db", "upgrade").stdout == (
        f"upgraded the database from schema 0004 (user_version 4) to {HEAD}\n"
    )
    assert run_json("db", "current")["newest"] is True


def test_db_current_of_a_database_a_newer_sfcrm_wrote_says_so(
    on_each_engine: str, db: Database
) -> None:
    db.upgrade()
    with db.write() as session:
        from sqlalchemy import column, table, update

        session.execute(update(table("alembic_version", column("version_num"))).values(
            version_num="0099"
        ))  # fmt: skip
    db.close()
    result = run("db", "current")
    assert result.exit_code == 0
    assert result.stdout == (
        f"the database is at schema 0099, newer than this sfcrm knows ({HEAD}); upgrade sfcrm\n"
    )
    refused = run("db", "upgrade")
    assert refused.exit_code == 9
    assert refused.stderr.splitlines()[0].startswith(
        f"Error: the database has schema 0099, newer than this sfcrm knows ({HEAD})"
    )


@pytest.mark.usefixtures("office_file")
def test_db_upgrade_of_a_new_file_creates_its_schema() -> None:
    assert run("db", "upgrade").stdout == f"created the database at schema {HEAD}\n"
    assert run("db", "current").stdout == f"the database is at schema {HEAD}, the newest\n"


def test_any_command_brings_the_schema_up_to_date_first(on_each_engine: str) -> None:
    assert run_json("people", "list") == []
    doc = run_json("db", "upgrade")
    assert (doc["from"], doc["to"], doc["upgraded"]) == (HEAD, HEAD, False)
    assert run("db", "upgrade").stdout == f"the database is at schema {HEAD} already\n"


def test_db_commands_on_an_empty_postgresql_database(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not PG_URL:
        pytest.skip("SFCRM_TEST_DATABASE_URL names no PostgreSQL server")
    server = request.getfixturevalue("postgres_server")
    url = server.new_empty_database()
    monkeypatch.setenv("SFCRM_DATABASE_URL", url)
    assert run("db", "current").stdout == (
        f"the database is empty; the first command creates schema {HEAD} in it\n"
    )
    assert run("db", "current").stdout.startswith("the database is empty")  # still
    result = run("db", "upgrade")
    assert result.exit_code == 0
    assert result.stdout == f"created the database at schema {HEAD}\n"
    assert run_json("db", "current")["newest"] is True


# -- sfcrm backup ------------------------------------------------------------------------------


def test_backup_copies_the_database_and_refuses_an_existing_file(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SFCRM_DATABASE_URL", str(db_path))
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "100")
    copy = tmp_path / "copy.db"
    result = run("backup", str(copy))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Backed up {db_path} to {copy}.\n"
    monkeypatch.setenv("SFCRM_DATABASE_URL", str(copy))
    assert run_json("people", "show", "0712345678")["balance"] == "100.00"
    monkeypatch.setenv("SFCRM_DATABASE_URL", str(db_path))
    copy.write_bytes(b"keep me")
    refused = run("backup", str(copy))
    assert refused.exit_code == 4
    assert refused.stderr.splitlines() == [
        f"Error: the backup file exists already ({copy})",
        "Hint: name a new file",
    ]
    assert copy.read_bytes() == b"keep me"
    doc = run_json("backup", str(tmp_path / "second.db"))
    assert doc == {"database": str(db_path), "backup": str(tmp_path / "second.db")}


def test_backup_of_a_postgresql_database_points_to_pg_dump(
    on_each_engine: str, tmp_path: Path
) -> None:
    if not on_each_engine.startswith("postgresql"):
        pytest.skip("SQLite is backed up by sfcrm itself (above)")
    result = run("backup", str(tmp_path / "copy.db"))
    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    assert lines[0].startswith(
        "Error: sfcrm backup copies a SQLite file; this database is on PostgreSQL ("
    )
    assert lines[1].startswith("Hint: back it up with PostgreSQL's own tool: pg_dump")
    assert not (tmp_path / "copy.db").exists()


PAYMENTS = 400


def pending_payments(db: Database, count: int) -> list[str]:
    """A person and ``count`` pending payments of KES 10, each with its push: the checkout ids."""
    now = datetime.now(UTC)
    ids = [f"ws_CO_backup_{i:06d}" for i in range(count)]
    with db.write() as session:
        session.add(Person(name="Achieng", phone="254708374149", created_at=now))
        session.flush()
        for n, checkout in enumerate(ids, start=1):
            session.add(
                MpesaPayment(
                    id=n, person_id=1, phone_number="254708374149", amount=10,
                    payment_purpose="Deposit", status=PaymentStatus.PENDING,
                    checkout_request_id=checkout, initiated_at=now, last_pushed_at=now,
                    push_count=1,
                )
            )  # fmt: skip
        session.flush()
        session.add_all(
            MpesaCheckout(payment_id=n, checkout_request_id=c, pushed_at=now)
            for n, c in enumerate(ids, start=1)
        )
    return ids


def settled(db: Database) -> int:
    with db.read() as session:
        return int(
            session.execute(
                select(func.count())
                .select_from(MpesaPayment)
                .where(col(MpesaPayment.status) == PaymentStatus.COMPLETED)
            ).scalar_one()
        )


@pytest.fixture
def listener_process(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``sfcrm serve-callback`` as its own process on the test's file; yields the callback URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/cb/backup-test-secret-0123456789"
    monkeypatch.setenv("SFCRM_DATABASE_URL", str(db_path))
    monkeypatch.setenv("MPESA_CALLBACK_URL", url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", "serve-callback", "--port", str(port)],
        env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=30)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_backup_while_the_listener_applies_callbacks_is_a_consistent_copy(
    db: Database, listener_process: str, tmp_path: Path
) -> None:
    ids = pending_payments(db, PAYMENTS)
    stop = threading.Event()
    answers: list[int] = []

    def post() -> None:
        with requests.Session() as http:
            for n, checkout in enumerate(ids):
                if stop.is_set():
                    return
                body = paid_callback(checkout, amount=10, receipt=f"TB{n:08d}")
                answers.append(http.post(listener_process, json=body, timeout=10).status_code)

    poster = threading.Thread(target=post)
    poster.start()
    try:
        wait_for(lambda: settled(db) >= 50, timeout=30)
        before = settled(db)
        result = run("backup", str(tmp_path / "copy.db"))
        wait_for(lambda: settled(db) >= before + 50, timeout=30)  # and they went on
    finally:
        stop.set()
        poster.join(30)
    assert result.exit_code == 0, result.output
    assert set(answers) == {200}
    copy = Database(tmp_path / "copy.db")
    try:
        assert copy.schema().current
        in_copy = settled(copy)
        with copy.read() as session:
            balance = session.get(Person, 1)
            entries = session.execute(
                select(func.count(), func.sum(BalanceEntry.amount_cents)).select_from(BalanceEntry)
            ).one()
    finally:
        copy.close()
    assert before <= in_copy <= settled(db) < PAYMENTS
    # one callback's payment, balance and ledger entry, never part of one
    assert balance is not None
    assert tuple(entries) == (in_copy, -1000 * in_copy) == (in_copy, balance.balance_cents)
