"""Issue 4, row 19: canary secrets in every credential, every command run, with network faults
and crashes; no canary (nor an encoding of one) may show anywhere an operator or a log reader
can see it.

The credentials are distinctive canaries, set once through the environment and once through
``.env``. Every command of the Typer tree is run with plausible arguments: against the Daraja
emulator, a closed port, a fake Daraja that answers 500 with an HTML page echoing the request
(as a misconfigured gateway's debug page does) or never answers; against an SMTP server that
works with a login, refuses the login, or is not there; against a corrupted database; with an
unexpected exception (carrying the request, as a chatty library's would) both through the error
boundary and with ``SFCRM_TRACEBACK=1`` / ``--traceback``. Then stdout, stderr, the log file,
every text and blob column of every table, and ``config show`` are searched for the canaries,
any 12-character piece of one, and inside every base64-looking token (so the Basic header and
the STK Password, which are base64 of secrets, are caught whatever their timestamp).

The canaries are 22 characters long (1 more than a multiple of 3) so that base64 of a string
that contains one is not base64 of the canary alone: a redactor that only knows
``base64(secret)`` misses the Basic header and the STK Password.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from aiosmtpd.smtp import AuthResult
from support import Recorder, SmtpSink, free_port
from typer.main import get_command
from typer.testing import CliRunner

from sfcrm.cli import app
from sfcrm.emulator import SANDBOX_SHORTCODE, DarajaEmulator, EmulatorSettings

runner = CliRunner()
NAIROBI = ZoneInfo("Africa/Nairobi")
MASK = "********"

CONSUMER_KEY = "CANARY-ck-7f3a91e2c4d5"
CONSUMER_SECRET = "CANARY-cs-2d8e41b79a0c"
PASS_KEY = "CANARY-pk-c0ffee5a1b3d"
INITIATOR_PASSWORD = "CANARY-ip-91ab37d4e6f0"
CALLBACK_SECRET = "CANARY-cb-4f0d2e6a8c1b"
SMTP_PASSWORD = "CANARY-sm-5e7b20c9a1f4"
SECRET_KEY = "CANARY-sk-a3c9d1f0b2e4"
DATABASE_PASSWORD = "CANARY-db-6a2f9c0e1d7b"  # set only for the runs against a server
CANARIES = [
    CONSUMER_KEY,
    CONSUMER_SECRET,
    PASS_KEY,
    INITIATOR_PASSWORD,
    CALLBACK_SECRET,
    SMTP_PASSWORD,
    SECRET_KEY,
    DATABASE_PASSWORD,
]
SMTP_USER = "office"
PIECE = 12  # a piece of a canary this long is a leak too (a cut-off echo, say)
PIECES = sorted({c[i : i + PIECE] for c in CANARIES for i in range(len(c) - PIECE + 1)})
FOLDED_PIECES = sorted({p.casefold() for p in PIECES})
BASIC = base64.b64encode(f"{CONSUMER_KEY}:{CONSUMER_SECRET}".encode()).decode()
_B64_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")


# -- finding leaks -----------------------------------------------------------------------------


def _decodings(token: str) -> Iterator[str]:
    """The token read as base64 from each of its first four characters (a token may have been
    glued to, or cut from, what surrounds it)."""
    standard = token.rstrip("=").replace("-", "+").replace("_", "/")
    for start in range(4):
        body = standard[start:]
        body = body[: len(body) - len(body) % 4]
        if len(body) < 8:
            continue
        try:
            yield base64.b64decode(body, validate=True).decode("latin-1")
        except (binascii.Error, ValueError):
            continue


def leaks(text: str) -> list[str]:
    """What of the canaries shows in text, in any case: a canary, a piece of one, or either
    inside base64."""
    folded = text.casefold()
    found = [f"plain {p!r}" for p in FOLDED_PIECES if p in folded]
    for token in set(_B64_TOKEN.findall(text)):
        for decoded in _decodings(token):
            hits = [p for p in FOLDED_PIECES if p in decoded.casefold()]
            if hits:
                found.append(f"base64 {token[:40]!r} holds {hits[0]!r}")
                break
    return found


def test_the_leak_finder_finds_each_form_it_is_meant_to() -> None:
    timestamp = datetime.now(NAIROBI).strftime("%Y%m%d%H%M%S")
    password = base64.b64encode(f"{SANDBOX_SHORTCODE}{PASS_KEY}{timestamp}".encode()).decode()
    for text in (
        f"x {CONSUMER_KEY} y",
        f"Authorization: Basic {BASIC}",
        f'"Password": "{password}"',
        f"cut off: {PASS_KEY[:14]}…",
        base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()).decode(),
        f"path=/cb/{CALLBACK_SECRET}",
        base64.urlsafe_b64encode(SECRET_KEY.encode()).decode(),
        f"invalid key {CONSUMER_KEY.lower()}",
        f"INVALID SECRET {CONSUMER_SECRET.upper()[:13]}",
    ):
        assert leaks(text), text
    assert all(len(c) % 3 == 1 for c in CANARIES)
    assert leaks("Error: Daraja answered HTTP 500 to the token request (********)") == []


@dataclass
class Harvest:
    """Every text an operator or a log reader could see, by where it came from."""

    texts: list[tuple[str, str]] = field(default_factory=list)
    commands: set[tuple[str, ...]] = field(default_factory=set)
    exit_codes: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, text: str) -> None:
        self.texts.append((label, text))

    def problems(self) -> list[str]:
        out = []
        for label, text in self.texts:
            for leak in leaks(text):
                out.append(f"{label}: {leak}")
        return out


def dump_database(path: Path) -> str:
    """Every text and blob column of every table, as text."""
    parts: list[str] = []
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        parts.append(value.decode("latin-1"))
                    elif isinstance(value, str):
                        parts.append(value)
    return "\n".join(parts)


def command_tree() -> set[tuple[str, ...]]:
    """Every leaf command of the Typer app, as its words."""
    found: set[tuple[str, ...]] = set()

    def walk(node: Any, path: tuple[str, ...]) -> None:
        commands = getattr(node, "commands", None)
        if commands:
            for name, sub in commands.items():
                walk(sub, (*path, name))
        else:
            found.add(path)

    walk(get_command(app), ())
    return found


COMMANDS = command_tree()


def words_of(args: tuple[str, ...]) -> tuple[str, ...]:
    for n in (1, 2):
        if tuple(args[:n]) in COMMANDS:
            return tuple(args[:n])
    raise AssertionError(f"not a command: {args}")


# -- a fake Daraja with switchable faults ------------------------------------------------------


class FakeDaraja:
    """Token: ``ok``, ``html500``, ``hang`` or ``echo_key``; push and query: ``html500``,
    ``hang`` or ``json400echo``. The 500 page echoes the request line, headers and body, as some
    gateways' debug pages do; ``json400echo`` is Daraja's error envelope quoting the Password and
    the CallBackURL it was sent; ``echo_key`` answers 500 quoting the consumer key and secret of
    the Basic header passed through ``echo_case`` (a gateway that upper- or lower-cases what it
    logs)."""

    def __init__(self) -> None:
        self.token_mode = "html500"
        self.api_mode = "html500"
        self.echo_case: Any = str.lower
        self.release = threading.Event()
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.answer(fake.token_mode if "oauth" in self.path else fake.api_mode)

            def do_POST(self) -> None:
                self.answer(fake.api_mode if "oauth" not in self.path else fake.token_mode)

            def answer(self, mode: str) -> None:
                fake.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                if mode == "hang":
                    fake.release.wait(5)  # longer than MPESA_TIMEOUT; bounded all the same
                    return
                if mode == "ok":
                    token = {"access_token": "fake-token-0001", "expires_in": "3599"}
                    self.reply(200, "application/json", json.dumps(token))
                    return
                if mode == "echo_key":
                    basic = self.headers.get("Authorization", "").removeprefix("Basic ")
                    key, _, secret = base64.b64decode(basic).decode().partition(":")
                    quoted = f"no app with consumer key {fake.echo_case(key)}"
                    quoted += f" and secret {fake.echo_case(secret)}"
                    self.reply(500, "text/plain", quoted)
                    return
                if mode == "json400echo":  # Daraja's own envelope, quoting what it was sent
                    sent = json.loads(body or "{}")
                    message = f"Bad Request - Invalid Password {sent.get('Password')}"
                    message += f" for {sent.get('CallBackURL')}"
                    error = {"requestId": "r-1", "errorCode": "400.002.02", "errorMessage": message}
                    self.reply(400, "application/json", json.dumps(error))
                    return
                auth = self.headers.get("Authorization", "")
                echo = f"Authorization: {auth}\n{body}\n{self.requestline}\n{self.headers}"
                page = (
                    f"<html><body><h1>500 Internal Server Error</h1><pre>{echo}</pre></body></html>"
                )
                self.reply(500, "text/html", page)

            def reply(self, status: int, content_type: str, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# -- the office, its services and its faults ---------------------------------------------------


def accept_only_the_office(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = auth_data.login == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


def refuse_every_login(*_args: Any) -> AuthResult:
    return AuthResult(success=False, handled=False)


@dataclass
class Office:
    tmp: Path
    db: Path
    log: Path
    secrets_from: str  # "environment" or ".env"
    env: dict[str, str]  # the non-secret settings every command gets
    listener_port: int
    harvest: Harvest = field(default_factory=Harvest)

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.listener_port}/cb/{CALLBACK_SECRET}"

    def cli(self, *args: str, label: str = "", **env: str) -> Any:
        result = runner.invoke(app, list(args), env={**self.env, **env})
        name = f"{label} sfcrm {' '.join(args)}".strip()
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            # the boundary let something through: its text is part of what a user would see
            self.harvest.add(name + " [exception]", repr(result.exception))
        self.harvest.add(name, result.stdout + "\n" + result.stderr)
        self.harvest.commands.add(words_of(tuple(a for a in args if a != "--traceback")))
        self.harvest.exit_codes[name] = result.exit_code
        return result

    def process_env(self, **env: str) -> dict[str, str]:
        return {**os.environ, **self.env, **env}

    def process(
        self,
        *args: str,
        label: str = "",
        bootstrap: str | None = None,
        timeout: float = 30,
        **env: str,
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sfcrm", *args]
        if bootstrap is not None:
            command = [sys.executable, "-c", bootstrap, *args]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp,
            env=self.process_env(**env),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        name = f"{label} process sfcrm {' '.join(args)}".strip()
        self.harvest.add(name, done.stdout + "\n" + done.stderr)
        self.harvest.commands.add(words_of(tuple(a for a in args if a != "--traceback")))
        self.harvest.exit_codes[name] = done.returncode
        return done


def secret_settings(callback_url: str) -> dict[str, str]:
    return {
        "MPESA_CONSUMER_KEY": CONSUMER_KEY,
        "MPESA_CONSUMER_SECRET": CONSUMER_SECRET,
        "MPESA_PASS_KEY": PASS_KEY,
        "MPESA_INITIATOR_PASSWORD": INITIATOR_PASSWORD,
        "MPESA_CALLBACK_URL": callback_url,
        "EMAIL_HOST_PASSWORD": SMTP_PASSWORD,
        "SFCRM_SECRET_KEY": SECRET_KEY,
    }


@pytest.fixture(params=["environment", ".env"])
def office(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Office:
    listener_port = free_port()
    db = tmp_path / "sfcrm.db"
    log = tmp_path / "sfcrm.log"
    env = {
        "SFCRM_DATABASE_URL": str(db),
        "SFCRM_LOG_FILE": str(log),
        "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
        "MPESA_INITIATOR_NAME": "apiop",
        "MPESA_TIMEOUT": "1",
        "SFCRM_PUBLIC_URL": f"http://127.0.0.1:{listener_port}",
        "DEFAULT_FROM_EMAIL": "Sound Fusion <office@soundfusion.test>",
        "EMAIL_BACKEND": "smtp",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_HOST_USER": SMTP_USER,
        "SFCRM_ORG_EMAIL": "bookings@soundfusion.test",
    }
    result = Office(tmp_path, db, log, request.param, env, listener_port)
    secrets = secret_settings(result.callback_url)
    if request.param == "environment":
        for name, value in secrets.items():
            monkeypatch.setenv(name, value)
    else:
        (tmp_path / ".env").write_text(
            "".join(f"{name}={value}\n" for name, value in secrets.items()), encoding="utf-8"
        )
    return result


@pytest.fixture
def emulator() -> Iterator[DarajaEmulator]:
    settings = EmulatorSettings(passkey=PASS_KEY, callback_delay=0.05, prompt_seconds=1.0)
    with DarajaEmulator(settings) as running:
        yield running


@pytest.fixture
def fake_daraja() -> Iterator[FakeDaraja]:
    fake = FakeDaraja()
    yield fake
    fake.close()


@pytest.fixture
def smtp_with_login() -> Iterator[SmtpSink]:
    sink = SmtpSink(Recorder(), authenticator=accept_only_the_office, auth_require_tls=False)
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def smtp_refusing_login() -> Iterator[SmtpSink]:
    sink = SmtpSink(Recorder(), authenticator=refuse_every_login, auth_require_tls=False)
    sink.start()
    yield sink
    sink.stop()


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[str], timeout: float = 10) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=5)


# The crash: a library that puts the request it was given into its exception's text.
CHATTY_FAILURE = """
import sys, requests, smtplib
def request(self, method, url, headers=None, data=None, **kw):
    raise RuntimeError(f"proxy refused {method} {url} headers={headers} body={data}")
def login(self, user, password, **kw):
    raise RuntimeError(f"AUTH failed for {user}:{password}")
requests.Session.request = request
smtplib.SMTP.login = login
if "--token-cached" in sys.argv:
    sys.argv.remove("--token-cached")
    import sfcrm.daraja
    sfcrm.daraja.DarajaClient.token = lambda self, replacing=None: "cached-token"
from sfcrm.cli import app
app(prog_name="sfcrm")
"""


# -- the run -----------------------------------------------------------------------------------


def day(delta: timedelta) -> tuple[str, str]:
    when = datetime.now(NAIROBI) + delta
    return when.date().isoformat(), when.strftime("%H:%M")


def run_everything(  # one long, flat script of what the office does
    office: Office,
    emulator: DarajaEmulator,
    fake: FakeDaraja,
    smtp_ok: SmtpSink,
    smtp_refusing: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = office.cli
    closed_port = str(free_port())
    office.env["MPESA_BASE_URL"] = emulator.url
    office.env["EMAIL_PORT"] = str(smtp_ok.port)

    listener = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", "serve-callback", "--port", str(office.listener_port)],
        cwd=office.tmp,
        env=office.process_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(office.listener_port)
        office.harvest.commands.add(("serve-callback",))

        # -- setting up, people, events, crew, mail: everything working ----------------------
        cli("init")
        cli("init", "--json")
        for args in (("config", "show"), ("config", "show", "--json")):
            assert cli(*args).exit_code == 0
        for json_flag in ((), ("--json",)):  # the listener and Daraja asked, over the network
            cli("doctor", "--port", str(office.listener_port), *json_flag)
        cli("doctor", "--offline")
        cli("people", "add", "--name", "Payer", "--phone", "0708374149", "--balance", "1500")
        cli("people", "add", "--name", "Silent Payer", "--phone", "0700001037", "--balance", "900")
        cli(
            "people",
            "add",
            "--name",
            "Achieng",
            "--phone",
            "0712000001",
            "--email",
            "achieng@example.co.ke",
            "--json",
        )
        csv_file = office.tmp / "crew.csv"
        csv_file.write_text(
            "name,phone,email,balance\n"
            + "".join(f"Crew {n},07130000{n:02d},crew{n}@example.co.ke,0\n" for n in range(8)),
            encoding="utf-8",
        )
        cli("people", "import", str(csv_file))
        cli("people", "list")
        cli("people", "list", "--json")
        cli("people", "show", "1")
        cli("people", "charge", "1", "--amount", "200", "--reason", "Advance")
        cli("people", "credit", "1", "--amount", "100", "--reason", "Cash")
        cli("people", "history", "1", "--json")
        cli("people", "edit", "1", "--name", "Payer Two")
        cli("people", "edit", "1", "--name", "Payer", "--json")
        cli("people", "archive", "2", "--reason", "left")
        cli("people", "unarchive", "2", "--json")
        cli("history")
        cli("history", "--person", "1", "--json")
        date, at = day(timedelta(hours=3))
        cli(
            "events",
            "add",
            "--name",
            "Gala",
            "--date",
            date,
            "--time",
            at,
            "--location",
            "KICC",
            "--details",
            "Load-in 14:00",
        )
        date2, _ = day(timedelta(days=6))
        cli("events", "add", "--name", "Rally", "--date", date2, "--location", "Naivasha")
        cli("events", "list")
        cli("events", "list", "--upcoming", "--json")
        cli("events", "show", "1")
        for person in range(3, 8):
            cli("crew", "assign", "--event", "1", "--person", str(person), "--role", "Rigger")
        cli("crew", "list", "--json")
        cli("crew", "confirm", "1")
        cli("crew", "confirm", "2")
        cli("crew", "decline", "3")
        cli("crew", "assignments", "--person", "3")
        cli("crew", "edit", "1", "--notes", "Bring the long XLR run")
        assert cli("crew", "invite", "1", "2").exit_code == 0
        cli("crew", "invite", "--event", "1", "--dry-run")
        assert cli("crew", "remind", "--json").exit_code == 0
        assert cli("crew", "brief", "--event", "1").exit_code == 0
        cli("crew", "complete", "--event", "1")  # not over yet: refused
        cli("mail", "list")
        cli("mail", "show", "1")
        cli("mail", "retry", "--json")
        assert smtp_ok.handler.messages, "the login with the canary password must have worked"

        # -- RSVP page and callbacks through the running listener ----------------------------
        rsvp = re.findall(
            r"(http://\S+/crew/rsvp/\S+)",
            smtp_ok.handler.messages[0].message.get_body(("plain",)).get_content(),
        )
        assert rsvp
        office.harvest.add("rsvp page", requests.get(rsvp[0], timeout=10).text)
        office.harvest.add("rsvp forged", requests.get(rsvp[0][:-4] + "AAAA", timeout=10).text)
        answer = requests.post(
            office.callback_url,
            timeout=10,
            json={
                "Body": {
                    "stkCallback": {
                        "MerchantRequestID": "m-1",
                        "CheckoutRequestID": "ws_CO_unknown",
                        "ResultCode": 1032,
                        "ResultDesc": "Request cancelled",
                    }
                }
            },
        )
        assert answer.status_code == 200
        wrong = f"http://127.0.0.1:{office.listener_port}/cb/{CALLBACK_SECRET[:-1]}X"
        assert requests.post(wrong, data=b"{}", timeout=10).status_code == 404

        # -- M-Pesa through the emulator -----------------------------------------------------
        assert (
            cli(
                "mpesa", "request", "--person", "1", "--amount", "100", "--purpose", "Deposit"
            ).exit_code
            == 0
        )
        cli(
            "mpesa", "request", "--person", "2", "--amount", "50", "--purpose", "Deposit", "--json"
        )  # never answered: stays pending
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            doc = json.loads(
                runner.invoke(app, ["mpesa", "status", "1", "--json"], env=office.env).stdout
            )
            if doc["status"] == "completed":
                break
            time.sleep(0.1)
        assert doc["status"] == "completed", doc
        cli("mpesa", "status")
        cli("mpesa", "status", "1", "--json")
        cli("mpesa", "status", "--refresh", "--json")
        cli("mpesa", "resend", "1")  # completed: refused
        cli("mpesa", "reconcile", "--older-than", "1")
        cli("mpesa", "callbacks")
        cli("mpesa", "callbacks", "--unmatched", "--json")
        cli("mpesa", "resolve", "2", "--as", "failed", "--reason", "no answer")  # prompt: refused
        cli("mpesa", "refund-done", "1", "--reason", "none due", "--json")  # refused
        cli("history")

        # -- Daraja faults -------------------------------------------------------------------
        faults = [
            ("closed port", f"http://127.0.0.1:{closed_port}", None, None),
            ("token 500 page", fake.url, "html500", "html500"),
            ("token hangs", fake.url, "hang", "html500"),
            ("push 500 page", fake.url, "ok", "html500"),
            ("push hangs", fake.url, "ok", "hang"),
        ]
        for label, base, token_mode, api_mode in faults:
            if token_mode is not None:
                fake.token_mode, fake.api_mode = token_mode, api_mode
            tag = f"[{label}]"
            env = {"MPESA_BASE_URL": base}
            for extra in ((), ("--json",)):
                cli(
                    "mpesa",
                    "request",
                    "--person",
                    "1",
                    "--amount",
                    "10",
                    "--purpose",
                    "Deposit",
                    *extra,
                    label=tag,
                    **env,
                )
            cli("mpesa", "status", "--refresh", label=tag, **env)
            cli("mpesa", "resend", "--all-pending", label=tag, **env)
            cli("mpesa", "resend", "2", "--force", "--json", label=tag, **env)
            cli("mpesa", "reconcile", "--older-than", "1", label=tag, **env)
            cli("mpesa", "reconcile", "--older-than", "1", "--json", label=tag, **env)
        # without a log file, warnings would reach stderr: a cron process, as cron runs it
        fake.token_mode, fake.api_mode = "html500", "html500"
        office.process(
            "mpesa",
            "request",
            "--person",
            "1",
            "--amount",
            "10",
            "--purpose",
            "Deposit",
            label="[no log file, new host]",
            MPESA_BASE_URL=fake.url + "/",
            SFCRM_LOG_FILE="",
        )
        fake.token_mode = "ok"
        office.process(
            "mpesa",
            "reconcile",
            "--older-than",
            "1",
            label="[no log file]",
            MPESA_BASE_URL=fake.url,
            SFCRM_LOG_FILE="",
        )

        # -- SMTP faults ---------------------------------------------------------------------
        smtp_faults = [
            ("smtp refused", {"EMAIL_PORT": closed_port}),
            ("smtp login refused", {"EMAIL_PORT": str(smtp_refusing.port)}),
        ]
        for n, (label, env) in enumerate(smtp_faults):
            tag = f"[{label}]"
            cli("crew", "assign", "--event", "2", "--person", str(4 + n), "--role", "Runner")
            assignment = json.loads(
                runner.invoke(
                    app, ["crew", "list", "--event", "2", "--json"], env=office.env
                ).stdout
            )[-1]["id"]
            cli("crew", "invite", str(assignment), label=tag, **env)
            cli("crew", "brief", "--event", "1", "--again", "--json", label=tag, **env)
            cli("crew", "remind", "--hours", "200", label=tag, **env)
            cli("mail", "retry", label=tag, **env)
            cli("mail", "retry", "1", "--json", label=tag, **env)
            cli("mail", "list", "--failed", label=tag, **env)
            office.process("mail", "retry", label=f"{tag} [no log file]", SFCRM_LOG_FILE="", **env)

        # -- crashes -------------------------------------------------------------------------
        failed_mail = json.loads(
            runner.invoke(app, ["mail", "list", "--failed", "--json"], env=office.env).stdout
        )
        assert failed_mail, "the SMTP faults must have left failed emails"
        failed_id = str(failed_mail[0]["id"])
        import smtplib

        import requests as requests_module

        def chatty_request(self: Any, method: str, url: str, **kw: Any) -> Any:
            raise RuntimeError(
                f"proxy refused {method} {url} headers={kw.get('headers')} body={kw.get('data')}"
            )

        def chatty_login(self: Any, user: str, password: str, **kw: Any) -> Any:
            raise RuntimeError(f"AUTH failed for {user}:{password}")

        with monkeypatch.context() as patched:
            patched.setattr(requests_module.Session, "request", chatty_request)
            patched.setattr(smtplib.SMTP, "login", chatty_login)
            fresh = f"http://127.0.0.1:{free_port()}"  # no token cached for it
            cli(
                "mpesa",
                "request",
                "--person",
                "1",
                "--amount",
                "10",
                "--purpose",
                "Crash",
                label="[crash, token]",
                MPESA_BASE_URL=fresh,
            )
            cli(
                "mpesa",
                "request",
                "--person",
                "1",
                "--amount",
                "10",
                "--purpose",
                "Crash",
                label="[crash, push]",
                MPESA_BASE_URL=emulator.url,
            )
            cli("mail", "retry", failed_id, label="[crash, login]")
        for how in ({"SFCRM_TRACEBACK": "1"}, {}):
            for args in (
                ("mpesa", "request", "--person", "1", "--amount", "10", "--purpose", "Crash"),
                (
                    "mpesa",
                    "request",
                    "--person",
                    "1",
                    "--amount",
                    "10",
                    "--purpose",
                    "Crash",
                    "--token-cached",
                ),
                ("mail", "retry", failed_id),
            ):
                flag = () if how else ("--traceback",)
                done = office.process(
                    *flag,
                    *args,
                    label="[crash, traceback]",
                    bootstrap=CHATTY_FAILURE,
                    MPESA_BASE_URL=f"http://127.0.0.1:{free_port()}",
                    **how,
                )
                assert done.returncode == 70, done.stderr
                assert "Traceback" in done.stderr and "RuntimeError" in done.stderr
        broken = office.tmp / "broken.db"
        broken.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
        for args in (
            ("people", "list"),
            ("mpesa", "status", "--json"),
            ("mail", "retry"),
            ("mpesa", "request", "--person", "1", "--amount", "10", "--purpose", "X"),
        ):
            cli(*args, label="[corrupted db]", SFCRM_DATABASE_URL=str(broken))
        office.process(
            "crew",
            "remind",
            label="[corrupted db]",
            SFCRM_DATABASE_URL=str(broken),
            SFCRM_TRACEBACK="1",
        )
        for args in (("db", "current"), ("db", "upgrade", "--json"), ("backup", "copy.db")):
            cli(*args, label="[corrupted db]", SFCRM_DATABASE_URL=str(broken))

        # -- corrections: an event moved, then cancelled; one crew member taken off ---------
        def listed(*args: str) -> Any:
            return json.loads(runner.invoke(app, [*args, "--json"], env=office.env).stdout)

        date3, at3 = day(timedelta(days=9))
        cli("events", "add", "--name", "Workshop", "--date", date3, "--time", at3,
            "--location", "Westlands")  # fmt: skip
        workshop = str(listed("events", "list")[-1]["id"])
        for person in (3, 5):
            cli("crew", "assign", "--event", workshop, "--person", str(person), "--role", "Usher")
        first = str(listed("crew", "list", "--event", workshop)[0]["id"])
        cli("crew", "invite", "--event", workshop)
        cli("events", "edit", workshop, "--time", "10:00")
        cli("events", "edit", workshop, "--location", "Karen", "--quiet", "--json")
        cli("events", "needs", workshop, "Usher=3", "Stagehand=1")
        cli("crew", "gaps", "--days", "30")
        cli("crew", "gaps", "--json")
        cli("crew", "suggest", "--event", workshop, "--role", "Usher")
        cli("crew", "suggest", "--event", workshop, "--role", "Usher", "--csv")
        cli("crew", "link", "3")
        cli("crew", "link", "3", "--reset", "--reason", "lost phone", "--email", "--json")
        cli("crew", "checkin", first)  # not within two hours of the call: refused
        cli("crew", "remove", first)
        cli("crew", "remove", first, "--json")  # removed already: refused
        cli("events", "cancel", workshop, "--reason", "venue flooded")
        cli("events", "cancel", workshop, "--json")  # cancelled already: refused

        # -- the database's schema and its backup, then a PostgreSQL server that is down ------
        cli("db", "current")
        cli("db", "current", "--json")
        cli("db", "upgrade")
        cli("db", "upgrade", "--json")
        backup = office.tmp / "backup.db"
        assert cli("backup", str(backup)).exit_code == 0
        cli("backup", str(backup), "--json")  # exists: refused
        office.harvest.add("backup tables", dump_database(backup))
        server_down = {
            "SFCRM_DATABASE_URL": (
                f"postgresql://office:{DATABASE_PASSWORD}@127.0.0.1:{closed_port}/sfcrm"
            )
        }
        for args, code in (
            (("people", "list"), 9),
            (("people", "list", "--json"), 9),
            (("people", "show", "1", "--json"), 9),
            (("db", "current"), 9),
            (("db", "upgrade", "--json"), 9),
            (("backup", "copy.db"), 3),  # pg_dump's work
            (("db", "copy", "--from", str(backup)), 9),
            (("config", "show"), 0),
            (("config", "show", "--json"), 0),
        ):
            assert cli(*args, label="[database server down]", **server_down).exit_code == code
        office.process("people", "list", label="[database server down]", **server_down)
        office.process(
            "--traceback", "crew", "remind", label="[database server down]", **server_down
        )

        # -- the other servers and the demo --------------------------------------------------
        cli("demo", "--clean", "--json")
        port = free_port()
        emulator_proc = subprocess.Popen(
            [sys.executable, "-m", "sfcrm", "mpesa", "emulator", "--port", str(port)],
            cwd=office.tmp,
            env=office.process_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_port(port)
        out, err = stop_process(emulator_proc)
        office.harvest.add("process sfcrm mpesa emulator", out + "\n" + err)
        office.harvest.commands.add(("mpesa", "emulator"))
        for args in (("config", "show"), ("config", "show", "--json")):
            shown = cli(*args, label="[final]")
            assert shown.exit_code == 0
            assert office.secrets_from in shown.stdout
    finally:
        out, err = stop_process(listener)
        office.harvest.add("process sfcrm serve-callback", out + "\n" + err)


def test_row19_no_canary_secret_shows_in_output_logs_database_or_config_show(
    office: Office,
    emulator: DarajaEmulator,
    fake_daraja: FakeDaraja,
    smtp_with_login: SmtpSink,
    smtp_refusing_login: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    run_everything(office, emulator, fake_daraja, smtp_with_login, smtp_refusing_login, monkeypatch)
    harvest = office.harvest
    harvest.add("log file", office.log.read_text(encoding="utf-8"))
    harvest.add("database tables", dump_database(office.db))

    assert harvest.commands >= COMMANDS, sorted(COMMANDS - harvest.commands)
    # the faults were real: the fake was asked, the listener stored the callbacks
    assert fake_daraja.requests > 0 and emulator.pushes
    problems = harvest.problems()
    elapsed = time.monotonic() - started
    print(
        f"\nissue 4 row 19 ({office.secrets_from}): {len(harvest.commands)} commands of "
        f"{len(COMMANDS)}, {len(harvest.texts)} outputs searched "
        f"({sum(len(t) for _, t in harvest.texts)} characters), leaks={len(problems)}, "
        f"{elapsed:.1f} s"
    )
    assert problems == [], "\n".join(problems[:40])


# -- regressions for what row 19 found ---------------------------------------------------------


def test_redactor_hides_the_basic_header_and_the_stk_password_whatever_the_timestamp() -> None:
    from sfcrm.daraja import stk_password
    from sfcrm.logs import Redactor

    redact = Redactor([CONSUMER_KEY, CONSUMER_SECRET, PASS_KEY])
    for second in range(0, 60, 7):
        timestamp = f"2026112801{second:04d}"
        password = stk_password(SANDBOX_SHORTCODE, PASS_KEY, timestamp)
        for text in (f'"Password": "{password}"', f'"Password": "{password[:30]}…'):
            assert leaks(redact(text)) == [], text
    shown = redact(f"headers={{'Authorization': 'Basic {BASIC}'}} url=http://127.0.0.1:9/x")
    assert shown == "headers={'Authorization': 'Basic ********'} url=http://127.0.0.1:9/x"


def mixed_case(text: str) -> str:
    return "".join(c.upper() if n % 2 else c.lower() for n, c in enumerate(text))


@pytest.mark.parametrize("case", [str.lower, str.upper, mixed_case, str.swapcase])
def test_redactor_hides_a_secret_whatever_its_case(case: Any) -> None:
    from sfcrm.logs import Redactor

    redact = Redactor(CANARIES)
    for secret in CANARIES:
        echoed = case(secret)
        for text in (
            f"Error: Daraja said: invalid client {echoed}",
            f"cut off: {echoed[:14]}…",
            f'{{"key": "{echoed}", "url": "http://127.0.0.1:9/x"}}',
            base64.b64encode(f"{echoed}:{case(CONSUMER_SECRET)}".encode()).decode(),
        ):
            shown = redact(text)
            assert leaks(shown) == [], (text, shown)
            assert MASK in shown
    assert redact("Daraja said: INVALID CLIENT, url http://127.0.0.1:9/X") == (
        "Daraja said: INVALID CLIENT, url http://127.0.0.1:9/X"
    )


def test_redactor_masks_the_echo_itself_beside_letters_that_grow_when_case_folded() -> None:
    from sfcrm.logs import Redactor

    eszett = "Nywila-Straße-2025"  # folds to ...strasse...: one character more
    redact = Redactor([CONSUMER_KEY, eszett])

    assert redact(f"Grüße aus Köln, STRASSE: {CONSUMER_KEY.upper()}!") == (
        "Grüße aus Köln, STRASSE: ********!"
    )
    assert redact(f"ẞ key={eszett.upper()} ß") == "ẞ key=******** ß"
    assert redact(f"key={eszett.lower()} ß") == "key=******** ß"


def test_log_line_echoing_a_secret_in_another_case_is_masked(tmp_path: Path) -> None:
    import logging

    from sfcrm.logs import Redactor, configure_logging

    log_file = tmp_path / "sfcrm.log"
    configure_logging(log_file, Redactor(CANARIES))
    logger = logging.getLogger("sfcrm.test")
    try:
        logger.warning("token refused for %s", CONSUMER_KEY.upper())
        logger.warning("smtp said: 535 bad password %s", SMTP_PASSWORD.lower())
        try:
            raise RuntimeError(f"AUTH failed for office:{mixed_case(SMTP_PASSWORD)}")
        except RuntimeError:
            logger.exception("crashed")
    finally:
        configure_logging(None, Redactor([]))

    logged = log_file.read_text(encoding="utf-8")
    assert logged.count(MASK) == 3
    assert leaks(logged) == [], logged


@pytest.mark.parametrize("case", [str.lower, str.upper, mixed_case])
def test_daraja_echoing_the_consumer_key_in_another_case_shows_it_nowhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_daraja: FakeDaraja, case: Any
) -> None:
    for name, value in secret_settings("http://127.0.0.1:9/cb/" + CALLBACK_SECRET).items():
        monkeypatch.setenv(name, value)
    fake_daraja.token_mode, fake_daraja.echo_case = "echo_key", case
    env = {
        "SFCRM_DATABASE_URL": str(tmp_path / "sfcrm.db"),
        "SFCRM_LOG_FILE": str(tmp_path / "sfcrm.log"),
        "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
        "MPESA_BASE_URL": fake_daraja.url,
    }
    runner.invoke(
        app, ["people", "add", "--name", "P", "--phone", "0708374149", "--balance", "100"], env=env
    )
    args = ["mpesa", "request", "--person", "1", "--amount", "10", "--purpose", "X"]

    results = [runner.invoke(app, args, env=env), runner.invoke(app, [*args, "--json"], env=env)]

    assert fake_daraja.requests >= 2  # the key was echoed both times
    assert [r.exit_code for r in results] == [7, 7]
    shown = "Daraja answered HTTP 500 to the token request (no app with consumer key ******** "
    shown += "and secret ********)"
    assert results[0].stderr.splitlines()[0] == f"Error: payment 1: {shown}"
    assert json.loads(results[1].stdout)["error"] == f"payment 2: {shown}"
    for text in [r.stdout + r.stderr for r in results]:
        assert leaks(text) == [], text
    assert leaks((tmp_path / "sfcrm.log").read_text(encoding="utf-8")) == []
    assert leaks(dump_database(tmp_path / "sfcrm.db")) == []


def test_redactor_hides_a_secret_cut_short_but_not_the_callback_host() -> None:
    from sfcrm.logs import Redactor

    url = f"https://pay.example.co.ke/cb/{CALLBACK_SECRET}"
    redact = Redactor([url, f"cb/{CALLBACK_SECRET}", SMTP_PASSWORD])
    assert redact(f"echo: {url[:-5]}…") == "echo: https://pay.example.co.ke/********…"
    assert redact(f"bad password {SMTP_PASSWORD[:13]}…") == "bad password ********…"
    assert redact("Daraja could not be reached (https://pay.example.co.ke)") == (
        "Daraja could not be reached (https://pay.example.co.ke)"
    )
    assert redact("nothing secret here, and a path /tmp/pytest-of-root/sfcrm.db") == (
        "nothing secret here, and a path /tmp/pytest-of-root/sfcrm.db"
    )


def test_traceback_mode_masks_secrets_in_the_traceback_and_exits_70(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in secret_settings("http://127.0.0.1:9/cb/" + CALLBACK_SECRET).items():
        monkeypatch.setenv(name, value)
    env = {
        "SFCRM_DATABASE_URL": str(tmp_path / "sfcrm.db"),
        "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
        "MPESA_BASE_URL": f"http://127.0.0.1:{free_port()}",
    }
    assert (
        runner.invoke(
            app,
            ["people", "add", "--name", "P", "--phone", "0708374149", "--balance", "100"],
            env=env,
        ).exit_code
        == 0
    )
    args = ["mpesa", "request", "--person", "1", "--amount", "10", "--purpose", "Crash"]
    for how in ({"SFCRM_TRACEBACK": "1"}, {}):
        flag = [] if how else ["--traceback"]
        done = subprocess.run(
            [sys.executable, "-c", CHATTY_FAILURE, *flag, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env, **how},
            check=False,
        )
        assert done.returncode == 70, done.stderr
        assert done.stderr.startswith("Traceback (most recent call last):")
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("RuntimeError: proxy refused GET http://127.0.0.1:")
        assert "'Authorization': 'Basic ********'" in last
        assert leaks(done.stdout + done.stderr) == []


def test_daraja_error_message_quoting_the_request_is_neither_stored_nor_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_daraja: FakeDaraja
) -> None:
    """Fails until sfcrm/daraja.py scrubs the text Daraja sends back (errorMessage, fault
    strings, snippets, ResultDesc) of the client's own secrets: payments.py stores
    ``exc.message`` in ``mpesa_payment.result_desc`` and ``mpesa status`` prints it."""
    for name, value in secret_settings("http://127.0.0.1:9/cb/" + CALLBACK_SECRET).items():
        monkeypatch.setenv(name, value)
    fake_daraja.token_mode, fake_daraja.api_mode = "ok", "json400echo"
    env = {
        "SFCRM_DATABASE_URL": str(tmp_path / "sfcrm.db"),
        "SFCRM_LOG_FILE": str(tmp_path / "sfcrm.log"),
        "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
        "MPESA_BASE_URL": fake_daraja.url,
    }
    runner.invoke(
        app, ["people", "add", "--name", "P", "--phone", "0708374149", "--balance", "100"], env=env
    )

    pushed = runner.invoke(
        app, ["mpesa", "request", "--person", "1", "--amount", "10", "--purpose", "X"], env=env
    )
    status = runner.invoke(app, ["mpesa", "status", "1", "--json"], env=env)

    assert pushed.exit_code == 7
    assert leaks(pushed.stdout + pushed.stderr) == []  # the error line is redacted already
    assert leaks((tmp_path / "sfcrm.log").read_text(encoding="utf-8")) == []
    assert leaks(status.stdout) == [], status.stdout
    assert leaks(dump_database(tmp_path / "sfcrm.db")) == []
