"""Shared fixtures. Every test runs isolated: no SFCRM_/MPESA_/EMAIL_ variable leaks in from
the machine, the working directory is a fresh tmp_path (so no real sfcrm.toml or .env is read)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_PREFIXES = ("SFCRM_", "MPESA_", "EMAIL_", "DEFAULT_FROM_EMAIL")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith(_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    # The user's own sfcrm.toml (~/.config/sfcrm/) is never found: this folder does not exist.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-user-config"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path


# -- real parts: database, Daraja emulator over HTTP, the listener on a loopback socket ---------


from fake_daraja import FakeDaraja  # noqa: E402
from support import (  # noqa: E402
    CONSUMER_KEY,
    CONSUMER_SECRET,
    ENGINES,
    PG_URL,
    Listener,
    PostgresServer,
    Recorder,
    SmtpSink,
    daraja_env,
    services_for,
    start_listener,
    wait_for,  # noqa: F401  (re-exported for test modules)
)

from sfcrm.daraja import DarajaClient  # noqa: E402
from sfcrm.db import Database  # noqa: E402
from sfcrm.emulator import (  # noqa: E402
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
    DarajaEmulator,
    EmulatorSettings,
)
from sfcrm.models import Person  # noqa: E402
from sfcrm.payments import Payments  # noqa: E402
from sfcrm.people import People  # noqa: E402
from sfcrm.services import Services  # noqa: E402


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """The SQLite file of a test that looks at the file itself (such tests run on SQLite only)."""
    return tmp_path / "sfcrm.db"


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    """Each database test runs on SQLite, and on PostgreSQL when SFCRM_TEST_DATABASE_URL names
    a server. A test that asks for ``db_path`` looks at the SQLite file: SQLite only."""
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("SFCRM_TEST_DATABASE_URL names no PostgreSQL server")
        if "db_path" in request.fixturenames:
            pytest.skip("looks at the SQLite file itself")
    return str(request.param)


@pytest.fixture
def database_url(engine_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """SFCRM_DATABASE_URL of the test's own database: a new file, or a new PostgreSQL
    database made from a migrated template (dropped after the test)."""
    if engine_name == "sqlite":
        yield str(tmp_path / "sfcrm.db")
        return
    server = request.getfixturevalue("postgres_server")
    url = server.new_database()
    yield url
    server.drop(url)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    assert PG_URL is not None
    server = PostgresServer(PG_URL)
    yield server
    server.close()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.close()


@pytest.fixture
def services(db: Database, database_url: str) -> Services:
    """sfcrm's services on the test's database, built from settings as the CLI builds them."""
    return services_for(database_url, db)


@pytest.fixture
def people(services: Services) -> People:
    return services.people


@pytest.fixture
def person_with_balance(people: People) -> Person:
    return people.add("Achieng Otieno", "0708374149", "achieng@example.com", "1500")


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    """Override in a test module to change the emulator's behaviour."""
    return EmulatorSettings(callback_delay=0.05, prompt_seconds=1.0)


@pytest.fixture
def emulator(emulator_settings: EmulatorSettings) -> Iterator[DarajaEmulator]:
    with DarajaEmulator(emulator_settings) as running:
        yield running


def _office_on_emulator(
    database_url: str, db: Database, emulator: DarajaEmulator, **kwargs: Any
) -> Services:
    return services_for(
        database_url,
        db,
        **kwargs,
        **daraja_env(emulator.url, "http://127.0.0.1:9/unused", timeout=5),
    )


@pytest.fixture
def daraja_client(db: Database, database_url: str, emulator: DarajaEmulator) -> DarajaClient:
    """The client of an office whose Daraja is the emulator, built from its settings."""
    return _office_on_emulator(database_url, db, emulator).daraja_client


@pytest.fixture
def services_on_emulator(
    db: Database, database_url: str, emulator: DarajaEmulator, daraja_client: DarajaClient
) -> Services:
    """The services of an office whose Daraja is the emulator, through ``daraja_client`` (a
    test module may give its own); the callback URL is set by the ``listener`` fixture."""
    return _office_on_emulator(database_url, db, emulator, daraja_client=daraja_client)


@pytest.fixture
def payments(services_on_emulator: Services) -> Payments:
    """Payments wired to the emulator; callback_url is set by the ``listener`` fixture."""
    return services_on_emulator.payments


@pytest.fixture
def listener(payments: Payments) -> Iterator[Listener]:
    running = start_listener(payments)
    yield running
    running.server.close()
    running.app.stop()


@pytest.fixture
def open_listener(payments: Payments) -> Iterator[Callable[..., Listener]]:
    """start_listener with options; every listener started is closed at the end."""
    started: list[Listener] = []

    def start(**options: Any) -> Listener:
        running = start_listener(payments, **options)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.close()
        running.app.stop()


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, emulator: DarajaEmulator, listener: Listener, database_url: str
) -> dict[str, str]:
    """Environment for CLI runs: Daraja is the emulator, results come back to the listener."""
    env = {**daraja_env(emulator.url, listener.url), "SFCRM_DATABASE_URL": database_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A real SMTP server on 127.0.0.1 recording every message."""
    sink = SmtpSink(Recorder())
    sink.handler.on_stop = sink.stop
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def fake() -> Iterator[FakeDaraja]:
    """The tests' own Daraja double (``tests/fake_daraja.py``), with its fault switches."""
    with FakeDaraja(
        shortcode=SANDBOX_SHORTCODE,
        passkey=SANDBOX_PASSKEY,
        consumer_key=CONSUMER_KEY,
        consumer_secret=CONSUMER_SECRET,
    ) as running:
        yield running
