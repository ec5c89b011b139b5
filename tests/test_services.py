"""The composition root: every service built from the settings, once, and only when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import services_for

from sfcrm.config import SAFARICOM_CALLBACK_ADDRESSES
from sfcrm.db import Database
from sfcrm.services import Services


def test_the_services_are_wired_from_the_settings(database_url: str, db: Database) -> None:
    services = services_for(
        database_url,
        db,
        MPESA_CALLBACK_URL="https://pay.example.co.ke/cb/a-long-random-secret-path",
        MPESA_CONFIRM_BY_QUERY="true",
        SFCRM_TIMEZONE="Africa/Kampala",
        SFCRM_ORG_NAME="Sound Fusion Ltd",
        DEFAULT_FROM_EMAIL="Office <office@soundfusion.example>",
    )

    assert services.db is db
    assert services.people.db is services.payments.db is services.crew.db is db
    assert (
        services.payments.callback_url == "https://pay.example.co.ke/cb/a-long-random-secret-path"
    )
    assert services.payments.confirm_by_query is True
    assert str(services.tz) == "Africa/Kampala"
    assert services.org.name == "Sound Fusion Ltd"
    assert services.mailer.sender == "Office <office@soundfusion.example>"
    assert services.people is services.people  # built once


def test_the_listener_serves_the_callback_path_and_crew_pages_with_its_limits(
    database_url: str, db: Database
) -> None:
    services = services_for(
        database_url,
        db,
        MPESA_CALLBACK_URL="https://pay.example.co.ke/cb/a-long-random-secret-path",
        SFCRM_SECRET_KEY="rsvp-key-0123456789abcdef",
        SFCRM_TRUSTED_PROXIES="10.0.0.5",
        SFCRM_CALLBACK_ALLOWLIST="safaricom",
        SFCRM_LISTENER_CONNECTIONS_PER_ADDRESS="7",
    )

    app = services.callback_app()
    limits = services.listener_limits()

    assert app.payments is services.payments
    assert app.rsvp is services.rsvp_pages is not None
    assert limits.per_address == 7
    assert set(limits.uncapped) == {"127.0.0.1", "::1", "10.0.0.5", *SAFARICOM_CALLBACK_ADDRESSES}


def test_without_a_secret_key_there_are_no_crew_pages_and_no_links(
    database_url: str, db: Database
) -> None:
    services = services_for(database_url, db, SFCRM_PUBLIC_URL="https://pay.example.co.ke")

    assert services.rsvp_pages is None
    assert services.callback_app().rsvp is None
    assert services.rsvp_link(1, "x", services.clock()) is None


def test_closing_closes_only_a_database_the_services_opened(
    database_url: str, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []
    monkeypatch.setattr(Database, "close", lambda self: closed.append(self.where))
    given = services_for(database_url, db)
    _ = given.db
    given.close()
    assert closed == []
    own = Services(given.settings)
    _ = own.db
    own.close()
    assert closed == [db.where]


PROBE = """
import json, sys
from sfcrm.config import load_settings
from sfcrm.services import Services
services = Services(load_settings(environ={}, files=False))
services.settings.timezone
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_building_the_services_loads_no_library_until_one_is_used(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFCRM_", "MPESA_", "EMAIL_"))}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=60, check=True,
    )  # fmt: skip
    loaded = set(json.loads(result.stdout))
    assert not loaded & {"sqlalchemy", "sqlmodel", "requests", "jinja2", "waitress"}
