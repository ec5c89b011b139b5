"""Helpers the tests share (importable as ``support``: the tests folder is on sys.path)."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import itertools
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import requests
from aiosmtpd.controller import Controller

from sfcrm.payments import Payments
from sfcrm.server import CallbackApp, make_server

if TYPE_CHECKING:
    from sfcrm.daraja import DarajaClient
    from sfcrm.db import Database
    from sfcrm.server import ConnectionLimits
    from sfcrm.services import Services

# A PostgreSQL server for the database tests' second run (see conftest's ``engine_name``)
PG_URL = os.environ.get("SFCRM_TEST_DATABASE_URL") or None
ENGINES = ("sqlite", "postgresql")

CONSUMER_KEY = "test-consumer-key"
CONSUMER_SECRET = "test-consumer-secret"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Listener:
    url: str  # the full callback URL, secret path included
    base: str  # http://127.0.0.1:PORT
    path: str
    app: CallbackApp
    server: Any

    def post(self, body: bytes | str | dict[str, Any], **kwargs: Any) -> requests.Response:
        data = json.dumps(body) if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return requests.post(self.url, data=data, headers=headers, timeout=10, **kwargs)


def start_listener(
    payments: Payments, *, limits: ConnectionLimits | None = None, **app_options: Any
) -> Listener:
    path = "/cb/" + secrets.token_urlsafe(16)
    app = CallbackApp(payments, callback_path=path, **app_options)
    server = make_server(app, "127.0.0.1", 0, threads=8, limits=limits)
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"
    payments.callback_url = base + path
    return Listener(url=base + path, base=base, path=path, app=app, server=server)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


# -- PostgreSQL: a new database per test -------------------------------------------------


class PostgresServer:
    """The server SFCRM_TEST_DATABASE_URL names. Each test gets a database of its own, copied
    from a template that sfcrm's migrations built once, and dropped after the test."""

    def __init__(self, url: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        from sfcrm.db import Database

        self.url = make_url(url).set(drivername="postgresql+psycopg")
        self._names = itertools.count(1)
        self._made: list[str] = []
        self._prefix = f"sfcrm_test_{os.getpid()}"
        self._admin = psycopg.connect(
            self.url.set(drivername="postgresql").render_as_string(hide_password=False),
            autocommit=True,
        )
        self.template = f"{self._prefix}_template"
        self._admin.execute(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')
        self._admin.execute(f'CREATE DATABASE "{self.template}"')
        built = Database(self._url_of(self.template))
        _ = built.engine  # runs every migration
        built.close()

    def _url_of(self, name: str) -> str:
        return self.url.set(database=name).render_as_string(hide_password=False)

    def new_database(self) -> str:
        name = f"{self._prefix}_{next(self._names)}"
        self._admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self._made.append(name)
        return self._url_of(name)

    def new_empty_database(self) -> str:
        """A database with no schema at all (what a new office's server hands sfcrm)."""
        name = f"{self._prefix}_{next(self._names)}"
        self._admin.execute(f'CREATE DATABASE "{name}"')
        self._made.append(name)
        return self._url_of(name)

    def drop(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        for name in [*self._made, self.template]:
            self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin.close()


# -- raw HTTP over a socket ------------------------------------------------------------------


def status_of(response: bytes) -> int | None:
    """The final status code of a raw HTTP answer (past any "100 Continue"), or None."""
    while response.startswith(b"HTTP/1.1 100 "):
        response = response.split(b"\r\n\r\n", 1)[-1]
    first = response.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) >= 2 and first[1].isdigit() else None


def read_answer(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection or the deadline passes."""
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        received += chunk
    return received


def request_head(path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- a real SMTP server on loopback (aiosmtpd) ------------------------------------------


@dataclass
class Received:
    peer: Any  # (host, port) of the client connection
    mail_from: str
    recipients: list[str]
    content: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


@dataclass
class Recorder:
    """aiosmtpd handler: keeps every message; faults are switched per test."""

    messages: list[Received] = field(default_factory=list)
    temp_fail: set[str] = field(default_factory=set)  # answered 451 at RCPT
    perm_fail: set[str] = field(default_factory=set)  # answered 550 at RCPT
    delay: float = 0.0  # seconds before accepting each message
    stop_after: int | None = None  # stop the server when the next message starts after this
    on_stop: Callable[[], None] | None = None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.stop_after is not None and len(self.messages) >= self.stop_after:
            self.stop_after = None
            assert self.on_stop is not None
            threading.Thread(target=self.on_stop, daemon=True).start()
            await asyncio.sleep(30)  # never answers: stopping the server cancels this
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.perm_fail:
            return "550 5.1.1 mailbox unavailable"
        if address in self.temp_fail:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.messages.append(
            Received(session.peer, envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
        )
        return "250 2.0.0 accepted"

    def message_ids(self) -> list[str]:
        return [m.message_id for m in self.messages]

    def connections(self) -> int:
        return len({m.peer for m in self.messages})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port from ``source``: any of 127.0.0.0/8 works on
    loopback, so one test can be many client addresses."""
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server ends the connection within ``timeout`` s, False when it is still
    open then. Whatever the server sends first is read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def raise_open_files(needed: int) -> None:
    """Let this process hold ``needed`` open files, or skip the test where the system will not."""
    import resource

    import pytest

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the open-file limit ({hard}) is under the {needed} this test holds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class SmtpSink:
    """An aiosmtpd server that can be stopped and started again on the same port."""

    def __init__(self, handler: Recorder, **options: Any) -> None:
        self.handler = handler
        self.port = free_port()
        self.options = options
        self.controller: Controller | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self.controller = Controller(
                self.handler, hostname="127.0.0.1", port=self.port, **self.options
            )
            self.controller.start()

    def stop(self) -> None:
        with self._lock:
            if self.controller is not None:
                self.controller.stop()
                self.controller = None


# -- the CLI as staff and cron use it ----------------------------------------------------------


# The time a cron summary starts with: SFCRM_TIMEZONE's wall clock, with its offset.
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ", re.MULTILINE)


def unstamped(text: str) -> str:
    """Output whose summary line starts with a timestamp, without it (it must be there)."""
    assert STAMP.search(text), f"no line starts with a timestamp: {text!r}"
    return STAMP.sub("", text)


def run(*args: str) -> Any:
    """One sfcrm command in-process (CliRunner), as typed at a terminal."""
    from typer.testing import CliRunner

    from sfcrm.cli import app

    return CliRunner().invoke(app, list(args))


def run_json(*args: str, code: int = 0) -> Any:
    """One sfcrm command with --json: its exit code, and stdout as exactly one JSON document."""
    result = run(*args, "--json")
    assert result.exit_code == code, result.output + result.stderr
    return json.loads(result.stdout)


def outcome(doc: dict[str, Any], word: str, key: str = "email_id") -> list[Any]:
    """The ``key`` of each item of a batch command's JSON (``crew invite|remind|brief``,
    ``mail retry``, ``mpesa resend``) whose outcome is ``word``, in order."""
    return [item[key] for item in doc["results"] if item["outcome"] == word]


def reasons(doc: dict[str, Any], word: str, key: str = "assignment_id") -> list[tuple[Any, str]]:
    """(``key``, message) of each item of a batch command's JSON whose outcome is ``word``."""
    return [(item[key], item["message"]) for item in doc["results"] if item["outcome"] == word]


def written(doc: dict[str, Any]) -> list[int]:
    """The emails a crew batch (``crew invite|remind|brief``) wrote, whatever became of them."""
    return [item["email_id"] for item in doc["results"] if item["email_id"] is not None]


def daraja_env(base_url: str, callback_url: str, timeout: float | None = None) -> dict[str, str]:
    """The settings of an sfcrm that pushes to the Daraja (emulator or fake) at ``base_url``
    with the sandbox's shortcode and passkey, and has its callbacks sent to ``callback_url``;
    it waits ``timeout`` seconds for an answer, or MPESA_TIMEOUT's default."""
    from sfcrm.emulator import SANDBOX_PASSKEY, SANDBOX_SHORTCODE

    env = {
        "MPESA_CONSUMER_KEY": CONSUMER_KEY,
        "MPESA_CONSUMER_SECRET": CONSUMER_SECRET,
        "MPESA_PASS_KEY": SANDBOX_PASSKEY,
        "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
        "MPESA_BASE_URL": base_url,
        "MPESA_CALLBACK_URL": callback_url,
    }
    if timeout is not None:
        env["MPESA_TIMEOUT"] = str(timeout)
    return env


def sfcrm_env(fake: Any, db_path: Any, callback_url: str, timeout: float = 5.0) -> dict[str, str]:
    """The environment of an sfcrm process that pushes to the fake Daraja ``fake`` and has its
    callbacks sent to ``callback_url``."""
    return {
        **os.environ,
        **daraja_env(fake.url, callback_url, timeout),
        "SFCRM_DATABASE_URL": str(db_path),
    }


def services_for(
    database_url: str,
    db: Database | None = None,
    *,
    daraja_client: DarajaClient | None = None,
    **env: str,
) -> Services:
    """sfcrm's services as its composition root builds them, from settings alone (no sfcrm.toml,
    .env or process environment is read): the database ``database_url`` (``db`` when it is
    open already) and the settings ``env``, by their variable names."""
    from sfcrm.config import load_settings
    from sfcrm.services import Services

    settings = load_settings(environ={"SFCRM_DATABASE_URL": database_url, **env}, files=False)
    return Services(settings, clock=utcnow, database=db, daraja_client=daraja_client)


def sfcrm_process(*args: str) -> Any:
    """sfcrm as cron starts it: its own process, pipes for output, the test's environment
    (EMAIL_*, SFCRM_DATABASE_URL), no terminal."""
    import os
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "sfcrm", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def finish(procs: list[Any], timeout: float = 60) -> list[tuple[str, str]]:
    """Wait for processes started together; kill any still running after ``timeout``."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def recipients(sink: SmtpSink) -> list[str]:
    return [r for m in sink.handler.messages for r in m.recipients]


# -- Daraja callbacks of the real shape --------------------------------------------------------


def paid_callback(checkout_id: str, amount: Any = 500, receipt: str = "TH3AB7XY9K") -> Any:
    return {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-34620561-1",
                "CheckoutRequestID": checkout_id,
                "ResultCode": 0,
                "ResultDesc": "The service request is processed successfully.",
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": amount},
                        {"Name": "MpesaReceiptNumber", "Value": receipt},
                        {"Name": "Balance"},
                        {"Name": "TransactionDate", "Value": 20250803135929},
                        {"Name": "PhoneNumber", "Value": 254708374149},
                    ]
                },
            }
        }
    }


# -- the crew's RSVP pages -----------------------------------------------------------------------


@contextmanager
def rsvp_server(monkeypatch: Any) -> Iterator[str]:
    """The listener with crew links on, on a loopback socket, for the office the environment
    names; yields its base URL (also set as SFCRM_PUBLIC_URL, so emails link to it)."""
    from sfcrm.cli.runtime import RootOptions, Runtime
    from sfcrm.server import RsvpPages

    monkeypatch.setenv("SFCRM_SECRET_KEY", "rsvp-test-secret-key")
    rt = Runtime(RootOptions(), json_output=False)
    pages = RsvpPages(rt.crew, rt.renderer, secret_key="rsvp-test-secret-key", clock=rt.clock)
    server = make_server(
        CallbackApp(rt.payments, callback_path=None, rsvp=pages), "127.0.0.1", 0, 4
    )
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"
    monkeypatch.setenv("SFCRM_PUBLIC_URL", base)
    try:
        yield base
    finally:
        server.close()
        rt.close()


def rsvp_link_in(message: email.message.EmailMessage) -> str:
    """The RSVP link in an email's plain text."""
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    match = re.search(r"(http://\S+/crew/rsvp/\S+)", text)
    assert match, text
    return match.group(1)


def mail_office(monkeypatch: Any, database_url: str, sink: SmtpSink, **settings: str) -> SmtpSink:
    """The office, its database on the engine given, its mail going to the real SMTP server
    ``sink``, with the office's contact set (and ``settings`` on top)."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    monkeypatch.setenv("EMAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("EMAIL_PORT", str(sink.port))
    monkeypatch.setenv("DEFAULT_FROM_EMAIL", "Sound Fusion <office@soundfusion.test>")
    monkeypatch.setenv("SFCRM_ORG_PHONE", "0711000111")
    monkeypatch.setenv("SFCRM_ORG_EMAIL", "bookings@soundfusion.test")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return sink
