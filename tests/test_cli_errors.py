"""One error shape for scripts: every error under --json, a usage error included, is one JSON
object on stdout with the same keys, its line stays on stderr, and a warning under --json
still reaches stderr."""

from __future__ import annotations

import io
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pytest
import typer.main
from fake_daraja import FakeDaraja
from support import daraja_env, finish, run, run_json, sfcrm_process, wait_for

from sfcrm.cli import app, main
from sfcrm.cli.runtime import ERROR_KEYS
from sfcrm.errors import ExitCode

GUESSABLE_FREE_CALLBACK = "http://127.0.0.1:9/cb/" + "k3" * 16  # nothing listens: no callback


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def doc(self) -> Any:
        return json.loads(self.stdout)


def sfcrm_main(*args: str) -> Result:
    """sfcrm as its console script runs it (``sfcrm.cli.main``, where usage errors are turned
    into sfcrm's own), in this process."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["sfcrm", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code
            else:  # pragma: no cover (main always exits)
                code = 0
    finally:
        sys.argv = argv
    return Result(int(code or 0), out.getvalue(), err.getvalue())


@pytest.fixture
def on_each_engine(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    return database_url


def assert_usage_error_json(result: Result, where: str) -> dict[str, Any]:
    """Exit 2, the error's line and hint on stderr, and the same as JSON on stdout."""
    assert result.code == int(ExitCode.USAGE) == 2, result
    line, hint = result.stderr.splitlines()
    doc = result.doc()
    assert tuple(doc) == ERROR_KEYS
    assert doc == {
        "error": line.removeprefix("Error: "),
        "status": "failed",
        "code": "USAGE_ERROR",
        "hint": f"see `{where} --help`",
        "value": None,
    }
    assert hint == f"Hint: see `{where} --help`"
    return doc


# -- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "where", "error"),
    [
        (["people", "show", "--json"], "sfcrm people show", "Missing argument 'ref'."),
        (["--json", "people", "show"], "sfcrm", "No such option: --json"),
        (["mpesa", "request", "--json"], "sfcrm mpesa request", "Missing option '--person'."),
        (["people", "show", "1", "--bogus", "--json"], "sfcrm people show",
         "No such option: --bogus"),
        (["people", "show", "--json", "1", "--bogus"], "sfcrm people show",
         "No such option: --bogus"),
        (["events", "show", "0", "--json"], "sfcrm events show",
         "Invalid value for 'event_id': Input should be greater than or equal to 1"),
        (["serve-callback", "--host", "no host!", "--json"], "sfcrm serve-callback",
         "Invalid value for '--host': not an address or host name: 'no host!'"),
        (["people", "edit", "1", "--json"], "sfcrm people edit",
         "give at least one of --name, --phone, --email, --no-email"),
        (["events", "edit", "1", "--quiet", "--json"], "sfcrm events edit",
         "give at least one of --name, --date, --time, --end-time, --location, --details"),
        (["people", "list", "--csv", "--json"], "sfcrm people list",
         "--csv and --json cannot be given together"),
    ],
)  # fmt: skip
def test_a_usage_error_under_json_is_also_one_json_error_on_stdout(
    args: list[str], where: str, error: str
) -> None:
    doc = assert_usage_error_json(sfcrm_main(*args), where)
    assert doc["error"].startswith(error)


def test_a_usage_error_without_json_prints_nothing_on_stdout() -> None:
    result = sfcrm_main("people", "show")
    assert (result.code, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "Error: Missing argument 'ref'.",
        "Hint: see `sfcrm people show --help`",
    ]


def test_json_after_a_double_dash_is_an_argument_not_the_option() -> None:
    result = sfcrm_main("people", "show", "--", "--json", "extra")  # a person named --json
    assert (result.code, result.stdout) == (2, ""), result
    assert result.stderr.startswith("Error: Got unexpected extra argument")


def test_an_argument_that_is_not_utf8_under_json_is_a_json_error() -> None:
    result = sfcrm_main("people", "show", "\udcff", "--json")
    assert result.code == 4
    assert result.doc() == {
        "error": "an argument is not UTF-8 text (b'\\xff')",
        "status": "failed",
        "code": "INVALID_INPUT",
        "hint": None,
        "value": "b'\\xff'",
    }


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield path, command
        return
    for name, sub in subcommands.items():
        yield from _commands(sub, (*path, name))


REQUIRING = [
    (" ".join(path), command)
    for path, command in _commands(typer.main.get_command(app))
    if any(param.required for param in command.params)
]


def test_the_walk_finds_the_commands_with_a_required_argument_or_option() -> None:
    names = {name for name, _ in REQUIRING}
    assert {"people show", "mpesa request", "events add", "crew brief", "backup"} <= names
    assert "people list" not in names


@pytest.mark.parametrize(("name", "command"), REQUIRING, ids=[name for name, _ in REQUIRING])
def test_every_command_missing_a_required_argument_or_option_exits_2(
    name: str, command: Any
) -> None:
    plain = sfcrm_main(*name.split())
    assert (plain.code, plain.stdout) == (2, ""), plain
    assert plain.stderr.startswith("Error: Missing "), plain.stderr

    doc = assert_usage_error_json(sfcrm_main(*name.split(), "--json"), f"sfcrm {name}")
    assert doc["error"].startswith("Missing ")


# -- every error has the same keys -------------------------------------------------------------


def assert_error(result: Any, code: int) -> dict[str, Any]:
    assert result.exit_code == code, result.output + result.stderr
    doc = json.loads(result.stdout)
    assert tuple(doc) == ERROR_KEYS
    assert doc["status"] == "failed"
    return dict(doc)


@pytest.mark.usefixtures("on_each_engine")
def test_an_error_with_a_value_and_a_hint_gives_both() -> None:
    doc = assert_error(run("people", "show", "42", "--json"), 5)
    assert doc == {
        "error": "no such person (42)",
        "status": "failed",
        "code": "NOT_FOUND",
        "hint": "see `sfcrm people list`",
        "value": "42",
    }


@pytest.mark.usefixtures("on_each_engine")
def test_an_error_without_a_hint_or_value_gives_them_as_null() -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678")
    result = run("mpesa", "request", "--person", "1", "--amount", "100", "--purpose", " ",
                 "--json")  # fmt: skip
    doc = assert_error(result, 4)
    assert doc == {
        "error": "purpose must not be empty",
        "status": "failed",
        "code": "INVALID_INPUT",
        "hint": None,
        "value": None,
    }


def test_no_office_here_under_json_has_every_key() -> None:
    doc = assert_error(run("people", "list", "--json"), 3)
    assert doc["code"] == "NO_OFFICE" and doc["hint"] and doc["value"] is None


@pytest.mark.usefixtures("on_each_engine")
def test_a_daraja_refusal_under_json_has_every_key(
    fake: FakeDaraja, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "500")
    for key, value in daraja_env(fake.url, GUESSABLE_FREE_CALLBACK).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MPESA_CONSUMER_SECRET", "not-the-secret")
    result = run("mpesa", "request", "--person", "1", "--amount", "100", "--purpose", "Deposit",
                 "--json")  # fmt: skip
    doc = assert_error(result, int(ExitCode.DARAJA))
    assert doc["code"] == "DARAJA_AUTH" and doc["hint"]
    assert "not-the-secret" not in result.stdout


@pytest.mark.usefixtures("on_each_engine")
def test_a_bug_under_json_has_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfcrm.people import People

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(People, "find", broken)
    doc = assert_error(run("people", "list", "--json"), 70)
    assert (doc["code"], doc["error"]) == ("INTERNAL_ERROR", "unexpected RuntimeError: boom")
    assert doc["hint"] == "rerun with --traceback and report it"


@pytest.mark.usefixtures("on_each_engine")
def test_ctrl_c_under_json_is_130_and_a_json_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfcrm.people import People

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(People, "find", interrupted)
    doc = assert_error(run("people", "list", "--json"), 130)
    assert doc == {
        "error": "Interrupted.",
        "status": "failed",
        "code": "INTERRUPTED",
        "hint": None,
        "value": None,
    }
    text = run("people", "list")
    assert (text.exit_code, text.stdout, text.stderr) == (130, "", "Interrupted.\n")


def test_ctrl_c_mid_push_under_json_names_the_payment_in_the_json_error(
    fake: FakeDaraja, on_each_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "500")
    fake.configure(push_latency=8.0)  # the push's answer is still on its way at the Ctrl-C
    for key, value in daraja_env(fake.url, GUESSABLE_FREE_CALLBACK, timeout=20).items():
        monkeypatch.setenv(key, value)
    proc = sfcrm_process("mpesa", "request", "--person", "1", "--amount", "100",
                         "--purpose", "Deposit", "--json")  # fmt: skip
    wait_for(lambda: fake.snapshot().push == 1, timeout=20)
    proc.send_signal(signal.SIGINT)
    [(out, err)] = finish([proc])

    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert tuple(doc) == ERROR_KEYS
    assert doc["code"] == "INTERRUPTED"
    assert doc["error"].startswith("Interrupted: payment 1's push may have reached the phone.")
    assert "Traceback" not in err


# -- warnings under --json ---------------------------------------------------------------------


@pytest.mark.usefixtures("on_each_engine")
def test_a_warning_under_json_goes_to_stderr_and_the_document_stays_whole() -> None:
    # 0733: an Airtel prefix, which reaches M-Pesa only if the number moved to Safaricom
    result = run("people", "add", "--name", "Baraka", "--phone", "0733000001", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["phone"] == "254733000001"
    assert "0733 000 001 does not have a Safaricom prefix" in result.stderr

    edited = run("people", "edit", "1", "--phone", "0734000002", "--json")
    assert json.loads(edited.stdout)["phone"] == "254734000002"
    assert "does not have a Safaricom prefix" in edited.stderr


@pytest.mark.usefixtures("on_each_engine")
def test_a_push_for_more_than_is_owed_notes_the_credit_under_json(
    fake: FakeDaraja, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "100")
    for key, value in daraja_env(fake.url, GUESSABLE_FREE_CALLBACK).items():
        monkeypatch.setenv(key, value)
    result = run("mpesa", "request", "--person", "1", "--amount", "300", "--purpose", "Deposit",
                 "--allow-credit", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["payment_id"] == 1
    assert "becomes their credit" in result.stderr


@pytest.mark.usefixtures("on_each_engine")
def test_an_edit_that_makes_a_clash_warns_on_stderr_under_json() -> None:
    day = (date.today() + timedelta(days=20)).isoformat()
    later = (date.today() + timedelta(days=21)).isoformat()
    run_json("events", "add", "--name", "Gala", "--date", day, "--time", "18:00",
             "--end-time", "23:00", "--location", "KICC")  # fmt: skip
    run_json("events", "add", "--name", "Rally", "--date", later, "--time", "18:00",
             "--end-time", "23:00", "--location", "Naivasha")  # fmt: skip
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678")
    for event in ("1", "2"):
        assignment = run_json(
            "crew", "assign", "--event", event, "--person", "1", "--role", "Sound"
        )
        run_json("crew", "confirm", str(assignment["id"]))

    result = run("events", "edit", "2", "--date", day, "--quiet", "--json")

    assert result.exit_code == 0, result.output
    assert [c["other_event_id"] for c in json.loads(result.stdout)["clashes"]] == [1]
    assert "Warning: Achieng (assignment 2) is also on Gala (event 1" in result.stderr


@pytest.mark.usefixtures("on_each_engine")
def test_a_refresh_that_cannot_settle_a_payment_says_so_on_stderr_under_json(
    fake: FakeDaraja, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_json("people", "add", "--name", "Achieng", "--phone", "0712345678", "--balance", "500")
    for key, value in daraja_env(fake.url, GUESSABLE_FREE_CALLBACK).items():
        monkeypatch.setenv(key, value)
    run_json("mpesa", "request", "--person", "1", "--amount", "100", "--purpose", "Deposit")
    monkeypatch.setenv("MPESA_BASE_URL", "http://127.0.0.1:9")  # Daraja out of reach now

    result = run("mpesa", "status", "1", "--refresh", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["payment_id"] == 1
    assert result.stderr.startswith("refresh: payment 1: "), result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("mpesa", "resend"), "give payment ids or --all-pending (one of the two)"),
        (("mpesa", "resend", "1", "--all-pending"),
         "give payment ids or --all-pending (one of the two)"),
        (("crew", "invite"), "give --event or assignment ids (one of the two)"),
        (("crew", "invite", "1", "--event", "1"),
         "give --event or assignment ids (one of the two)"),
    ],
)  # fmt: skip
def test_a_choice_of_two_options_given_neither_or_both_exits_2(
    args: tuple[str, ...], message: str
) -> None:
    plain = sfcrm_main(*args)
    assert plain.code == 2 and plain.stderr.startswith(f"Error: {message}\n"), plain
    doc = assert_usage_error_json(sfcrm_main(*args, "--json"), "sfcrm " + " ".join(args[:2]))
    assert doc["error"] == message
