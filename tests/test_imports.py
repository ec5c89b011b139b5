"""Start-up stays fast: heavy libraries load only in the commands that need them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# pydantic is not listed: Typer itself loads it to convert typed options (int, float, Path).
HEAVY = ("sqlmodel", "sqlalchemy", "alembic", "requests", "urllib3", "jinja2", "waitress",
         "dotenv", "aiosmtpd", "psycopg")  # fmt: skip

PROBE = """
import json, sys
sys.argv = ["sfcrm", *json.loads(sys.argv[1])]
try:
    from sfcrm.cli import main
    main()
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
"""


def loaded_by(args: list[str], cwd: Path) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFCRM_", "MPESA_", "EMAIL_"))}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
    )  # fmt: skip
    modules: set[str] = set(json.loads(result.stderr.strip().splitlines()[-1]))
    return modules


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (["--help"], set()),
        (["mpesa", "--help"], set()),
        (["crew", "invite", "--help"], set()),
        (["db", "current", "--help"], set()),
        (["backup", "--help"], set()),
        (["config", "show", "--json"], {"dotenv"}),
        (["mpesa", "status", "--json"], {"sqlmodel", "sqlalchemy", "dotenv"}),
        (["crew", "list", "--json"], {"sqlmodel", "sqlalchemy", "dotenv"}),
    ],
)
def test_commands_load_only_the_libraries_they_need(
    args: list[str], allowed: set[str], tmp_path: Path
) -> None:
    (tmp_path / "sfcrm.toml").write_text("", encoding="utf-8")  # an office, its database here
    heavy = loaded_by(args, tmp_path) & set(HEAVY)
    assert heavy <= allowed, f"sfcrm {' '.join(args)} loaded {sorted(heavy - allowed)}"


def test_frequent_commands_load_no_migrations_on_an_existing_database(tmp_path: Path) -> None:
    """Cron runs `crew remind` and `mail retry` every few minutes and the office checks
    `mpesa status` all day: once the database is at the newest schema they check that with one
    select, without loading Alembic, and send or show without the Daraja client's libraries."""
    from datetime import date, timedelta

    from support import run_json

    (tmp_path / "sfcrm.toml").write_text("", encoding="utf-8")  # an office, its database here
    person = run_json("people", "add", "--name", "Achieng", "--phone", "0712345678",
                      "--email", "achieng@example.co.ke")  # fmt: skip
    tomorrow = (date.today() + timedelta(days=1)).isoformat()
    event = run_json("events", "add", "--name", "Gala", "--date", tomorrow, "--time", "18:00",
                     "--location", "KICC, Nairobi")  # fmt: skip
    run_json("crew", "assign", "--event", str(event["id"]), "--person", str(person["id"]),
             "--role", "Sound Engineer")  # fmt: skip
    event_id = str(event["id"])
    commands = [
        ["crew", "invite", "--event", event_id, "--dry-run"],
        ["crew", "invite", "--event", event_id],  # to the outbox folder
        ["crew", "confirm", "1"],
        ["crew", "remind", "--hours", "48"],
        ["crew", "brief", "--event", event_id],
        ["mail", "retry"],
        ["mpesa", "status", "--json"],
        ["mpesa", "status", "--status", "pending", "--person", "0712345678", "--json"],
    ]
    outbox = tmp_path / "outbox"
    for args in commands:
        heavy = loaded_by(args, tmp_path) & set(HEAVY)
        allowed = {"sqlmodel", "sqlalchemy", "jinja2", "dotenv"}
        assert heavy <= allowed, f"sfcrm {' '.join(args)} loaded {sorted(heavy - allowed)}"
    # the probes did the work: an invitation, a reminder and a briefing are in the outbox
    assert len(list(outbox.iterdir())) == 3
