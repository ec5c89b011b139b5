"""No input ends in an internal error: exit 70 is for bugs only.

Every hostile input below is refused with one line naming it and its documented exit code
(3 a setting, 4 a value, Typer's 2 an option or argument out of range) before any row is
written or any request sent. Each runs sfcrm as its own process, as cron and the office do.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import socket
import sqlite3
import subprocess
import sys
import typing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import typer
from fake_daraja import FakeDaraja
from support import CONSUMER_KEY, CONSUMER_SECRET, free_port, run, run_json, utcnow, wait_for
from typer.models import ParameterInfo

from sfcrm.cli import app
from sfcrm.cli.runtime import MAX_INT, clean_text
from sfcrm.db import Database
from sfcrm.emulator import SANDBOX_PASSKEY, SANDBOX_SHORTCODE
from sfcrm.ledger import change_balance
from sfcrm.people import People

PROCESS_TIMEOUT = 30
OFFICE_PREFIXES = ("SFCRM_", "MPESA_", "EMAIL_", "DEFAULT_FROM_EMAIL")  # none leaks in
PASSWORD = "hunter2-not-for-your-eyes"
CALLBACK_SECRET = "cb-secret-path-0123456789abcdef"


# -- running sfcrm as a process --------------------------------------------------------------


@dataclass
class Office:
    """A folder sfcrm runs in, its database, and a Daraja that counts what reaches it."""

    folder: Path
    daraja: FakeDaraja

    @property
    def db_path(self) -> Path:
        return self.folder / "sfcrm.db"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(OFFICE_PREFIXES)}
        env.update(
            HOME=str(self.folder),
            SFCRM_DATABASE_URL=str(self.db_path),
            MPESA_CONSUMER_KEY=CONSUMER_KEY,
            MPESA_CONSUMER_SECRET=CONSUMER_SECRET,
            MPESA_PASS_KEY=SANDBOX_PASSKEY,
            MPESA_BUSINESS_SHORT_CODE=SANDBOX_SHORTCODE,
            MPESA_BASE_URL=self.daraja.url,
            MPESA_CALLBACK_URL=f"https://pay.example.co.ke/cb/{CALLBACK_SECRET}",
        )
        env.update(extra)
        return env

    def sfcrm(self, *args: str, stdout: Any = subprocess.PIPE, **env: str) -> Result:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "sfcrm", *args],
                cwd=self.folder, env=self.env(**env), stdin=subprocess.DEVNULL, stdout=stdout,
                stderr=subprocess.PIPE, encoding="utf-8", errors="replace", timeout=PROCESS_TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:  # killed: a server that should have refused
            return Result(-9, "", f"still running after {exc.timeout} s")
        return Result(proc.returncode, proc.stdout or "", proc.stderr)


def rows(db_path: Path, table: str) -> int:
    """Rows in ``table``; none when the file or the table was never made."""
    if not db_path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        known = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()[0]
        if not known:
            return 0
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def add_person(db_path: Path) -> None:
    """Achieng, owing nothing (so the ledger is empty too)."""
    db = Database(db_path)
    try:
        People(db, utcnow).add("Achieng Otieno", "0708374149", "achieng@example.co.ke")
    finally:
        db.close()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def office(tmp_path: Path) -> Iterator[Office]:
    with FakeDaraja() as daraja:
        yield Office(tmp_path, daraja)


def assert_one_error_line(result: Result, names: str) -> None:
    """stderr is ``Error: ...`` naming the input, then at most a ``Hint:`` line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert "unexpected" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert names in lines[0], result.stderr
    if len(lines) == 2:
        assert lines[1].startswith("Hint: "), result.stderr


def assert_usage_error(result: Result, names: str) -> None:
    """A usage error (Typer's check of an option's range) is one line too, and its hint."""
    assert_one_error_line(result, f"Invalid value for '{names}'")
    assert result.stderr.splitlines()[1].startswith("Hint: see `sfcrm "), result.stderr


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    names: str  # what the error line must name
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # written in the folder first
    unwritten: str | None = None  # a table that must stay empty
    person: bool = False  # a person exists before the run
    hidden: str | None = None  # a secret the output must not show


HUGE = "99999999999999999999"  # past SQLite's 64-bit INTEGER
JUST_PAST = str(MAX_INT + 1)
REQUEST = ("mpesa", "request", "--person", "0708374149", "--amount", "500", "--purpose", "Dues")
LISTEN = ("serve-callback", "--port", "8000")

CASES = {
    # whole numbers no SQLite INTEGER holds, or that mean nothing: Typer's usage error
    "payment id past 64 bits": Case(("mpesa", "status", JUST_PAST), 2, "payment_id"),
    "payment ids to resend past 64 bits": Case(("mpesa", "resend", HUGE), 2, "payment_ids"),
    "offset past 64 bits": Case(("mpesa", "status", "--offset", HUGE), 2, "--offset"),
    "email id past 64 bits": Case(("mail", "show", HUGE), 2, "email_id"),
    "email ids to retry past 64 bits": Case(("mail", "retry", HUGE), 2, "email_ids"),
    "max attempts past 64 bits": Case(
        ("mail", "retry", "--max-attempts", JUST_PAST), 2, "--max-attempts"
    ),
    "event id past 64 bits": Case(("events", "show", HUGE), 2, "event_id"),
    "event option past 64 bits": Case(
        ("crew", "assign", "--event", HUGE, "--person", "1", "--role", "Sound"), 2, "--event"
    ),
    "assignment id past 64 bits": Case(("crew", "confirm", HUGE), 2, "assignment_id"),
    "assignment ids to invite past 64 bits": Case(("crew", "invite", HUGE), 2, "assignment_ids"),
    "listener port past 65535": Case(("serve-callback", "--port", "70000"), 2, "--port"),
    "emulator port past 65535": Case(("mpesa", "emulator", "--port", "70000"), 2, "--port"),
    "listener host that is no address": Case(
        ("serve-callback", "--host", "not an address"), 2, "--host"
    ),
    "emulator delay that is not a number": Case(
        ("mpesa", "emulator", "--callback-delay", "nan"), 2, "--callback-delay"
    ),
    # dates and durations at the edges of the calendar
    "event on the first day of the calendar": Case(
        ("events", "add", "--name", "Gala", "--date", "0001-01-01", "--location", "KICC"),
        4,
        "0001-01-01",
        unwritten="event",
    ),
    "event on the last day of the calendar": Case(
        ("events", "add", "--name", "Gala", "--date", "9999-12-31", "--location", "KICC"),
        4,
        "9999-12-31",
        unwritten="event",
    ),
    "mail since the first day of the calendar": Case(
        ("mail", "list", "--since", "0001-01-01"), 4, "0001-01-01"
    ),
    "reconcile older than the calendar": Case(
        ("mpesa", "reconcile", "--older-than", "3000000d"), 4, "3000000d"
    ),
    "reconcile older than any integer": Case(
        ("mpesa", "reconcile", "--older-than", HUGE + "d"), 4, HUGE
    ),
    "remind hours infinite": Case(("crew", "remind", "--hours", "inf"), 4, "--hours"),
    "remind hours not a number": Case(("crew", "remind", "--hours", "nan"), 4, "--hours"),
    "remind hours past the calendar": Case(("crew", "remind", "--hours", "1e30"), 4, "--hours"),
    # settings
    "timeout not a number": Case(
        REQUEST,
        3,
        "MPESA_TIMEOUT",
        env={"MPESA_TIMEOUT": "nan"},
        person=True,
        unwritten="mpesa_payment",
    ),
    "timeout infinite": Case(("config", "show"), 3, "MPESA_TIMEOUT", env={"MPESA_TIMEOUT": "inf"}),
    "Daraja URL with an unclosed IPv6 bracket": Case(
        REQUEST,
        3,
        "MPESA_BASE_URL",
        env={"MPESA_BASE_URL": "http://[::1"},
        person=True,
        unwritten="mpesa_payment",
    ),
    "Daraja URL with a port that is no number": Case(
        REQUEST,
        3,
        "MPESA_BASE_URL",
        env={"MPESA_BASE_URL": "http://127.0.0.1:http"},
        person=True,
        unwritten="mpesa_payment",
    ),
    "Daraja URL with a broken host name": Case(
        REQUEST,
        3,
        "MPESA_BASE_URL",
        env={"MPESA_BASE_URL": "https://sandbox..safaricom"},
        person=True,
        unwritten="mpesa_payment",
    ),
    "callback URL with an unclosed IPv6 bracket": Case(
        ("people", "list"),
        3,
        "MPESA_CALLBACK_URL",
        env={"MPESA_CALLBACK_URL": f"https://[::1/cb/{CALLBACK_SECRET}"},
        hidden=CALLBACK_SECRET,
    ),
    "public URL with an unclosed IPv6 bracket": Case(
        ("config", "show"), 3, "SFCRM_PUBLIC_URL", env={"SFCRM_PUBLIC_URL": "http://[::1"}
    ),
    "trusted proxy that is no network": Case(
        LISTEN, 3, "SFCRM_TRUSTED_PROXIES", env={"SFCRM_TRUSTED_PROXIES": "10.0.0.1,banana"}
    ),
    "allowlist network with a /33 mask": Case(
        LISTEN, 3, "SFCRM_CALLBACK_ALLOWLIST", env={"SFCRM_CALLBACK_ALLOWLIST": "10.0.0.0/33"}
    ),
    "SMTP port past 65535": Case(("config", "show"), 3, "EMAIL_PORT", env={"EMAIL_PORT": "70000"}),
    "listener threads written with an underscore": Case(
        ("config", "show"), 3, "SFCRM_LISTENER_THREADS", env={"SFCRM_LISTENER_THREADS": "1_000"}
    ),
    "log file that is a folder": Case(
        ("people", "list"), 3, "SFCRM_LOG_FILE", env={"SFCRM_LOG_FILE": "."}
    ),
    "log file in a missing folder": Case(
        ("people", "list"), 3, "SFCRM_LOG_FILE", env={"SFCRM_LOG_FILE": "no/such/folder/sfcrm.log"}
    ),
    "time zone name too long for a file": Case(
        ("people", "list"), 3, "SFCRM_TIMEZONE", env={"SFCRM_TIMEZONE": "Africa/" + "x" * 300}
    ),
    "PostgreSQL server nobody listens on": Case(
        ("people", "list"),
        9,
        "cannot reach the database server",
        env={"SFCRM_DATABASE_URL": f"postgresql://sfcrm:{PASSWORD}@127.0.0.1:1/sfcrm"},
        hidden=PASSWORD,
    ),
    "MySQL database URL": Case(
        ("people", "list"),
        3,
        "SFCRM_DATABASE_URL",
        env={"SFCRM_DATABASE_URL": f"mysql://sfcrm:{PASSWORD}@db.internal/sfcrm"},
        hidden=PASSWORD,
    ),
    "in-memory database URL": Case(
        ("people", "add", "--name", "A", "--phone", "0712345678"),
        3,
        "SFCRM_DATABASE_URL",
        env={"SFCRM_DATABASE_URL": "sqlite:///:memory:"},
    ),
    ".env that is not UTF-8": Case(
        ("config", "show"), 3, ".env", files={".env": b"SFCRM_ORG_NAME=Sound \xff Fusion\n"}
    ),
    "sfcrm.toml that is not UTF-8": Case(
        ("config", "show"), 3, "sfcrm.toml", files={"sfcrm.toml": b'[org]\nname = "\xff"\n'}
    ),
    "setting that is not UTF-8": Case(
        ("config", "show"), 3, "SFCRM_ORG_NAME", env={"SFCRM_ORG_NAME": "Sound \udcff"}
    ),
    "argument that is not UTF-8": Case(("people", "list", "--search", "\udcff"), 4, "UTF-8"),
    # amounts in a form people do not write money in
    "payment amount in scientific notation": Case(
        (*REQUEST[:5], "5e2", *REQUEST[6:]), 4, "5e2", person=True, unwritten="mpesa_payment"
    ),
    "opening balance with an underscore": Case(
        ("people", "add", "--name", "A", "--phone", "0712345678", "--balance", "1_000"),
        4,
        "1_000",
        unwritten="person",
    ),
    "charge in scientific notation": Case(
        ("people", "charge", "0708374149", "--amount", "1e3", "--reason", "Advance"),
        4,
        "1e3",
        person=True,
        unwritten="balance_entry",
    ),
    "CSV balance in scientific notation": Case(
        ("people", "import", "crew.csv"),
        4,
        "1e3",
        unwritten="person",
        files={"crew.csv": b"name,phone,email,balance\nAchieng,0712345678,,1e3\n"},
    ),
}


@dataclass
class Refusals:
    results: dict[str, tuple[Result, Path]]  # each case's run and its database
    reached_daraja: int


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Refusals]:
    """Every case run once, a few processes at a time (each in a folder of its own)."""
    with FakeDaraja() as daraja:
        offices = {name: Office(tmp_path_factory.mktemp("office"), daraja) for name in CASES}
        for name, case in CASES.items():
            if case.person:
                add_person(offices[name].db_path)
            for file_name, content in case.files.items():
                (offices[name].folder / file_name).write_bytes(content)

        def refuse(name: str) -> tuple[str, tuple[Result, Path]]:
            office, case = offices[name], CASES[name]
            return name, (office.sfcrm(*case.args, **case.env), office.db_path)

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(pool.map(refuse, CASES))
        yield Refusals(results, daraja.snapshot().total)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_hostile_input_is_refused_with_its_exit_code_and_one_line(
    refusals: Refusals, name: str
) -> None:
    case = CASES[name]
    result, db_path = refusals.results[name]

    assert result.code == case.code, result.stderr
    if case.code == 2:
        assert_usage_error(result, case.names)
    else:
        assert_one_error_line(result, case.names)
    if case.unwritten:
        assert rows(db_path, case.unwritten) == 0
    if case.hidden:
        assert case.hidden not in result.stderr + result.stdout


@pytest.mark.slow
def test_no_hostile_input_sends_a_request_to_daraja(refusals: Refusals) -> None:
    assert refusals.reached_daraja == 0


def test_every_whole_number_option_and_argument_has_bounds_sqlite_can_hold() -> None:
    """Declared once per parameter, checked here for all: a new int option without bounds
    would reach SQLite as an OverflowError."""

    def commands(group: typer.Typer, path: str) -> Iterator[tuple[str, Any]]:
        for info in group.registered_commands:
            assert info.callback is not None
            yield f"{path} {info.name or info.callback.__name__}", info.callback
        for sub in group.registered_groups:
            assert sub.typer_instance is not None
            yield from commands(sub.typer_instance, f"{path} {sub.name}")

    unbounded = []
    for name, callback in commands(app, "sfcrm"):
        hints = typing.get_type_hints(callback, include_extras=True)
        for param in inspect.signature(callback).parameters:
            hint = hints[param]
            base, *extras = typing.get_args(hint) if typing.get_origin(hint) else (hint,)
            inner = {a for a in typing.get_args(base)} | {base}
            inner |= {x for a in inner for x in typing.get_args(a)}
            if int not in inner or bool in inner:
                continue
            info = next(e for e in extras if isinstance(e, ParameterInfo))
            if not (
                info.min is not None
                and info.max is not None
                and -(2**63) <= info.min <= info.max <= MAX_INT
            ):
                unbounded.append(f"{name} {param}")
    assert unbounded == []


def test_a_listener_host_that_resolves_to_nothing_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sfcrm.server

    monkeypatch.setenv("SFCRM_DATABASE_URL", str(tmp_path / "sfcrm.db"))

    def unresolved(*args: Any, **options: Any) -> Any:
        raise ValueError("Invalid host/port specified.")  # what waitress raises

    monkeypatch.setattr(sfcrm.server, "make_server", unresolved)
    monkeypatch.setenv("MPESA_CALLBACK_URL", f"https://pay.example.co.ke/cb/{CALLBACK_SECRET}")

    result = run("serve-callback", "--host", "sfcrm-listener.example", "--port", "8000")

    assert result.exit_code == 4
    assert result.stderr.splitlines() == [
        "Error: cannot listen on sfcrm-listener.example:8000: not an address of this machine"
        " (sfcrm-listener.example)"
    ]


# -- stdout that cannot be written ---------------------------------------------------------------


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["table", "json"])
def test_a_closed_stdout_pipe_ends_quietly_with_141(
    office: Office, json_flag: tuple[str, ...]
) -> None:
    add_person(office.db_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before sfcrm writes: `| head -c0`, always
    try:
        result = office.sfcrm("people", "list", *json_flag, stdout=write_end)
    finally:
        os.close(write_end)

    assert result.code == 141
    assert result.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "args",
    [("people", "list"), ("people", "list", "--json"), ("people", "show", "42", "--json")],
    ids=["table", "json", "json error"],
)
def test_a_full_disk_under_stdout_is_one_line_and_exit_74(
    office: Office, args: tuple[str, ...]
) -> None:
    add_person(office.db_path)
    with open("/dev/full", "w") as full:
        result = office.sfcrm(*args, stdout=full)

    assert result.code == 74
    assert result.stderr.splitlines() == [
        f"Error: cannot write to standard output: {os.strerror(errno.ENOSPC)}"
    ]


# -- sfcrm init where nothing can be written -------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_init_in_a_read_only_folder_is_a_config_error(office: Office) -> None:
    office.folder.chmod(0o555)
    try:
        result = office.sfcrm("init")
    finally:
        office.folder.chmod(0o755)

    assert result.code == 3
    assert_one_error_line(result, "cannot write sfcrm.toml")


def test_init_that_cannot_write_its_config_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: Path, *args: Any, **kwargs: Any) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)

    result = run("init")

    assert result.exit_code == 3
    assert result.stderr.splitlines()[0].startswith(
        f"Error: cannot write sfcrm.toml: {os.strerror(errno.EACCES)}"
    )


# -- one database file, whatever its name looks like -------------------------------------------


@pytest.mark.parametrize(
    ("setting", "file_name"),
    [
        ("sqlite:///{folder}/My%20Data.db", "My Data.db"),  # a URL is URL-decoded
        ("{folder}/My%20Data?.db", "My%20Data?.db"),  # a path is taken as written
    ],
    ids=["url", "path"],
)
def test_every_command_and_the_listener_use_the_one_file_the_setting_names(
    office: Office, setting: str, file_name: str
) -> None:
    folder = office.folder / "data"
    folder.mkdir()
    url = setting.format(folder=folder)  # an absolute folder: sqlite:////...
    database = folder / file_name
    port = free_port()
    callback_url = f"http://127.0.0.1:{port}/cb/{CALLBACK_SECRET}"
    env = {"SFCRM_DATABASE_URL": url, "MPESA_CALLBACK_URL": callback_url,
           "EMAIL_BACKEND": "file", "EMAIL_FILE_PATH": str(office.folder / "outbox")}  # fmt: skip

    added = office.sfcrm("people", "add", "--name", "Achieng", "--phone", "0708374149",
                         "--email", "achieng@example.co.ke", "--json", **env)  # fmt: skip
    assert added.code == 0, added.stderr
    # mpesa status reads with plain sqlite3: it must find the person the ORM wrote
    status = office.sfcrm("mpesa", "status", "--person", "0708374149", "--json", **env)
    assert (status.code, status.stdout.strip()) == (0, "[]"), status.stderr
    for args in (
        ("events", "add", "--name", "Gala", "--date", "2999-12-12", "--location", "KICC"),
        ("crew", "assign", "--event", "1", "--person", "0708374149", "--role", "Sound"),
        ("crew", "invite", "--event", "1"),  # crew mail: plain sqlite3 again
    ):
        done = office.sfcrm(*args, **env)
        assert done.code == 0, done.stderr

    listener = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", "serve-callback", "--port", str(port)],
        cwd=office.folder, env=office.env(**env), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _listening(port), timeout=PROCESS_TIMEOUT)
        cancelled = {"MerchantRequestID": "1", "CheckoutRequestID": "ws_CO_1",
                     "ResultCode": 1032, "ResultDesc": "Request cancelled by user"}  # fmt: skip
        answer = requests.post(callback_url, json={"Body": {"stkCallback": cancelled}}, timeout=10)
        assert answer.status_code == 200
    finally:
        listener.terminate()
        listener.wait(PROCESS_TIMEOUT)

    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
        file_name
    ]
    with contextlib.closing(sqlite3.connect(database)) as conn:
        assert conn.execute("SELECT count(*) FROM person").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM email_notification").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM mpesa_callback").fetchone() == (1,)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///sfcrm.db", "{cwd}/sfcrm.db"),
        ("sqlite:////srv/sfcrm/My%20Data.db", "/srv/sfcrm/My Data.db"),
        ("sqlite:////srv/sfcrm/100%25%3F.db", "/srv/sfcrm/100%?.db"),
        ("/srv/sfcrm/My%20Data?.db", "/srv/sfcrm/My%20Data?.db"),
        ("sqlite+pysqlite:////srv/x.db", "/srv/x.db"),
    ],
)
def test_the_database_setting_is_parsed_once_into_a_path(
    tmp_path: Path, url: str, path: str
) -> None:
    from sfcrm.config import load_settings

    settings = load_settings(environ={"SFCRM_DATABASE_URL": url}, dotenv_path=tmp_path / ".none")

    assert settings.database_path == Path(path.format(cwd=Path.cwd()))


def test_the_orm_opens_a_file_whose_name_holds_url_syntax(tmp_path: Path) -> None:
    path = tmp_path / "100%25 sure?mode=ro#1.db"
    db = Database(path)
    try:
        People(db, utcnow).add("Achieng", "0708374149")
    finally:
        db.close()

    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".db"] == [path.name]


# -- settings, unit by unit --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MPESA_TIMEOUT", "nan"),
        ("MPESA_TIMEOUT", "1e3"),
        ("MPESA_TIMEOUT", "601"),
        ("SFCRM_CALLBACK_MAX_BODY", "2_000"),
        ("SFCRM_LISTENER_THREADS", "1000000"),
        ("EMAIL_PORT", "0"),
        ("EMAIL_PORT", "+70000"),
        ("MPESA_BASE_URL", "http://127.0.0.1:99999"),
        ("MPESA_BASE_URL", "http://127.0.0.1:0"),
        ("MPESA_BASE_URL", "http://-sandbox.example"),
        ("MPESA_BASE_URL", "http://"),
        ("MPESA_CALLBACK_URL", "https://pay.example:port/cb/x"),
        ("SFCRM_PUBLIC_URL", "pay.example.co.ke"),
        ("SFCRM_PUBLIC_URL", "javascript:alert(1)"),
        ("SFCRM_CALLBACK_ALLOWLIST", "196.201.214.200,safaricom,999.1.1.1"),
        ("SFCRM_TRUSTED_PROXIES", "fe80::/129"),
        ("SFCRM_DATABASE_URL", "sqlite:///db?mode=ro"),
        ("SFCRM_DATABASE_URL", "sqlite://"),
        ("SFCRM_DATABASE_URL", "sqlite:///%ff.db"),
        ("SFCRM_DATABASE_URL", "file:///srv/sfcrm.db"),
        ("SFCRM_LOG_FILE", "~no-such-user-here/sfcrm.log"),
    ],
)
def test_a_setting_out_of_its_range_is_a_config_error_naming_it(
    tmp_path: Path, name: str, value: str
) -> None:
    from sfcrm.config import load_settings
    from sfcrm.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings(environ={name: value}, dotenv_path=tmp_path / ".none")

    assert name in str(caught.value)


# -- text from callbacks on a terminal -----------------------------------------------------------

HOSTILE_DESC = "Cancelled\x1b[2J\x1b]0;pwned\x07\x1b[31m by user\r\nPAID\x9b1m\x00"


def test_clean_text_drops_terminal_control_sequences_and_line_breaks() -> None:
    assert clean_text(HOSTILE_DESC) == "Cancelled by user PAID"
    assert clean_text("two\nlines\ttab", lines=True) == "two\nlines\ttab"
    assert clean_text("Ünïcödé, plain") == "Ünïcödé, plain"


def test_payment_views_show_callback_text_without_control_sequences(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_person(db_path)
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute(
            "INSERT INTO mpesa_payment (person_id, phone_number, amount, payment_purpose, status,"
            " result_desc, initiated_at, push_count, balance_applied, refund_due)"
            " VALUES (1, '254708374149', 500, ?, 'failed', ?, ?, 1, 0, 0)",
            (f"Dues{HOSTILE_DESC}", HOSTILE_DESC, datetime(2026, 1, 5, 9, 0).isoformat(" ")),
        )
    monkeypatch.setenv("SFCRM_DATABASE_URL", str(db_path))

    detail = run("mpesa", "status", "1")
    table = run("mpesa", "status")
    doc = run_json("mpesa", "status", "1")

    for shown in (detail.stdout, table.stdout):
        assert not any(ch in shown for ch in "\x1b\x9b\x07\x00\r"), repr(shown)
    assert "Cancelled by user PAID" in detail.stdout
    assert doc["result_desc"] == HOSTILE_DESC  # JSON keeps the exact value


# -- balances stay whole cents -------------------------------------------------------------------


@pytest.mark.parametrize("amount", [1.5, 100.0, True])
def test_a_balance_moves_only_by_whole_cents(db: Database, people: People, amount: Any) -> None:
    person = people.add("Achieng", "0708374149")
    with db.write() as session, pytest.raises(TypeError, match="whole cents"):
        change_balance(session, person.id or 0, amount, kind="charge", now=utcnow())

    assert people.show("0708374149").balance_cents == 0
