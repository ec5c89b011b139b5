"""``sfcrm doctor``: each check passing on a ready office and failing, with its fix, when one
setting or service is not ready; the network checks against a real listener socket and the
tests' fake Daraja over real HTTP, never the internet."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_daraja import FakeDaraja
from sqlmodel import select
from support import daraja_env, free_port, run, run_json

from sfcrm.db import Database
from sfcrm.models import DarajaToken, EmailNotification, MpesaPayment, PaymentStatus, Person
from sfcrm.server import CallbackApp, make_server
from sfcrm.services import Services

# A secret path with none of the words Daraja rejects (a random one might hold "sql").
CALLBACK_SECRET = "Zx81Qw7Lm2Np4Rt6Vb9Kc3Hy"
CALLBACK_PATH = f"/cb/{CALLBACK_SECRET}"
PUBLIC = "https://pay.soundfusion.co.ke"
SMTP_PASSWORD = "smtp-CANARY-doctor"
SECRET_KEY = "rsvp-CANARY-" + "k" * 40
OFFLINE_CHECKS = ["office", "daraja keys", "callback url", "rsvp", "smtp"]
DATABASE_CHECKS = ["pending payments", "unsent emails"]
ALL_CHECKS = [*OFFLINE_CHECKS, "listener", "daraja token", *DATABASE_CHECKS]


@pytest.fixture
def listener_port(services: Services) -> Iterator[int]:
    """sfcrm's listener on a loopback socket, serving CALLBACK_PATH."""
    app = CallbackApp(services.payments, callback_path=CALLBACK_PATH)
    server = make_server(app, "127.0.0.1", 0, threads=2)
    threading.Thread(target=server.run, daemon=True).start()
    yield int(server.effective_port)
    server.close()
    app.stop()


@pytest.fixture
def ready_office(
    monkeypatch: pytest.MonkeyPatch, db: Database, database_url: str, fake: FakeDaraja
) -> dict[str, str]:
    """The environment of an office every check passes on (its Daraja is the fake)."""
    db.upgrade()  # the database exists, at the newest schema
    env = {
        **daraja_env(fake.url, PUBLIC + CALLBACK_PATH, timeout=5),
        "SFCRM_DATABASE_URL": database_url,
        "SFCRM_PUBLIC_URL": PUBLIC,
        "SFCRM_SECRET_KEY": SECRET_KEY,
        "EMAIL_BACKEND": "smtp",
        "EMAIL_HOST": "smtp.soundfusion.co.ke",
        "EMAIL_PORT": "587",
        "EMAIL_USE_TLS": "true",
        "EMAIL_HOST_USER": "office@soundfusion.co.ke",
        "EMAIL_HOST_PASSWORD": SMTP_PASSWORD,
        "DEFAULT_FROM_EMAIL": "Sound Fusion <office@soundfusion.co.ke>",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def doctor(*args: str, code: int) -> dict[str, dict[str, Any]]:
    """The checks of one `sfcrm doctor --json` run, by name, after asserting its exit code."""
    checks = run_json("doctor", *args, code=code)
    assert all(set(check) == {"name", "ok", "detail", "fix"} for check in checks)
    return {check["name"]: check for check in checks}


def only_failure(checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    failed = [check for check in checks.values() if not check["ok"]]
    assert len(failed) == 1, failed
    assert failed[0]["fix"], failed[0]
    return failed[0]


# -- a ready office ---------------------------------------------------------------------------


def test_every_check_passes_on_a_ready_office_with_its_listener_and_daraja(
    ready_office: dict[str, str], listener_port: int, fake: FakeDaraja
) -> None:
    checks = doctor("--port", str(listener_port), code=0)

    assert list(checks) == ALL_CHECKS
    assert all(check["ok"] and check["fix"] is None for check in checks.values())
    assert fake.snapshot().token == 1


def test_the_text_report_is_one_line_per_check_and_shows_no_secret(
    ready_office: dict[str, str], listener_port: int
) -> None:
    result = run("doctor", "--port", str(listener_port))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line[6:].split("  ")[0] for line in lines] == ALL_CHECKS
    assert all(line.startswith("ok    ") for line in lines)
    assert result.stderr == f"{len(ALL_CHECKS)} of {len(ALL_CHECKS)} checks passed.\n"
    for secret in (CALLBACK_SECRET, SMTP_PASSWORD, SECRET_KEY, ready_office["MPESA_PASS_KEY"]):
        assert secret not in result.output


def test_the_token_fetched_goes_to_the_office_token_cache(
    ready_office: dict[str, str], listener_port: int, db: Database, fake: FakeDaraja
) -> None:
    doctor("--port", str(listener_port), code=0)
    doctor("--port", str(listener_port), code=0)

    # each run checks the keys with a new token, and leaves it where every process finds it
    assert fake.snapshot().token == 2
    with db.read() as session:
        assert len(session.exec(select(DarajaToken)).all()) == 1


def test_offline_skips_the_network_checks(ready_office: dict[str, str], fake: FakeDaraja) -> None:
    checks = doctor("--offline", code=0)

    assert list(checks) == [*OFFLINE_CHECKS, *DATABASE_CHECKS]
    assert fake.snapshot().total == 0
    result = run("doctor", "--offline")
    assert result.stderr == "7 of 7 checks passed (network checks skipped: --offline).\n"


# -- each setting not ready -------------------------------------------------------------------

SETTING_FAILURES = {
    "no consumer key": ({"MPESA_CONSUMER_KEY": ""}, "daraja keys", "MPESA_CONSUMER_KEY not set"),
    "no passkey": ({"MPESA_PASS_KEY": ""}, "daraja keys", "MPESA_PASS_KEY not set"),
    "a till without its number": (
        {"MPESA_TRANSACTION_TYPE": "CustomerBuyGoodsOnline"}, "daraja keys",
        "MPESA_TILL_NUMBER not set",
    ),
    "production on the sandbox shortcode": (
        {"MPESA_ENVIRONMENT": "production"}, "daraja keys", "sandbox shortcode 174379",
    ),
    "no callback url": (
        {"MPESA_CALLBACK_URL": ""}, "callback url", "MPESA_CALLBACK_URL is not set",
    ),
    "a callback over http": (
        {"MPESA_CALLBACK_URL": "http://pay.soundfusion.co.ke" + CALLBACK_PATH}, "callback url",
        "is not https",
    ),
    "a callback to a private address": (
        {"MPESA_CALLBACK_URL": "https://192.168.1.20" + CALLBACK_PATH}, "callback url",
        "an address the internet cannot reach (192.168.1.20)",
    ),
    "a callback to localhost": (
        {"MPESA_CALLBACK_URL": "https://localhost" + CALLBACK_PATH}, "callback url",
        "a host only this network knows (localhost)",
    ),
    "a callback with a word Daraja rejects": (
        {"MPESA_CALLBACK_URL": f"{PUBLIC}/mpesa/{CALLBACK_SECRET}"}, "callback url",
        "holds 'mpesa', which Daraja rejects",
    ),
    "a callback with a guessable path": (
        {"MPESA_CALLBACK_URL": f"{PUBLIC}/callback/"}, "callback url", "holds no long secret",
    ),
    "no public url": ({"SFCRM_PUBLIC_URL": ""}, "rsvp", "SFCRM_PUBLIC_URL is not set"),
    "a public url over http": (
        {"SFCRM_PUBLIC_URL": "http://pay.soundfusion.co.ke"}, "rsvp", "is not https",
    ),
    "no secret key": ({"SFCRM_SECRET_KEY": ""}, "rsvp", "SFCRM_SECRET_KEY is not set"),
    "a short secret key": (
        {"SFCRM_SECRET_KEY": "abc123"}, "rsvp", "SFCRM_SECRET_KEY is 6 characters, under 32",
    ),
    "the file backend": ({"EMAIL_BACKEND": "file"}, "smtp", "EMAIL_BACKEND is file"),
    "no backend": ({"EMAIL_BACKEND": ""}, "smtp", "EMAIL_BACKEND is file"),
    "the console backend": ({"EMAIL_BACKEND": "console"}, "smtp", "EMAIL_BACKEND is console"),
    "an unknown backend": ({"EMAIL_BACKEND": "sendgrid"}, "smtp", "EMAIL_BACKEND is not one"),
    "a login without its password": (
        {"EMAIL_HOST_PASSWORD": ""}, "smtp", "EMAIL_HOST_PASSWORD is not set",
    ),
    "no login to a remote server": (
        {"EMAIL_HOST_USER": "", "EMAIL_HOST_PASSWORD": ""}, "smtp", "no SMTP login",
    ),
    "a login in clear": ({"EMAIL_USE_TLS": "false"}, "smtp", "unencrypted"),
    "the default from address": (
        {"DEFAULT_FROM_EMAIL": "Sound Fusion <noreply@soundfusion.invalid>"}, "smtp",
        "which no server delivers from",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "name", "detail"), list(SETTING_FAILURES.values()), ids=list(SETTING_FAILURES)
)
def test_a_setting_not_ready_fails_its_check_with_a_fix(
    ready_office: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    name: str,
    detail: str,
) -> None:
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)

    failed = only_failure(doctor("--offline", code=1))

    assert failed["name"] == name
    assert detail in failed["detail"]
    assert CALLBACK_SECRET not in failed["detail"] + failed["fix"]


def test_a_failure_prints_its_fix_on_its_line_and_exits_1(
    ready_office: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFCRM_SECRET_KEY", "")

    result = run("doctor", "--offline")

    assert result.exit_code == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("FAIL"))
    assert line == (
        "FAIL  rsvp              SFCRM_SECRET_KEY is not set — fix: set SFCRM_SECRET_KEY in .env "
        'to the output of: python -c "import secrets; print(secrets.token_urlsafe(32))"'
    )
    assert result.stderr == "6 of 7 checks passed (network checks skipped: --offline).\n"


# -- the network checks -----------------------------------------------------------------------


def test_a_listener_not_running_fails_with_how_to_start_it(ready_office: dict[str, str]) -> None:
    port = free_port()

    failed = only_failure(doctor("--port", str(port), code=1))

    assert failed["name"] == "listener"
    assert failed["detail"] == f"nothing answers on 127.0.0.1:{port}"
    assert f"sfcrm serve-callback --port {port}" in failed["fix"]


def test_a_listener_serving_another_callback_path_fails(
    ready_office: dict[str, str], listener_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_CALLBACK_URL", f"{PUBLIC}/cb/Another9Secret8Path7Here6")

    failed = only_failure(doctor("--port", str(listener_port), code=1))

    assert failed["name"] == "listener"
    assert "answers, but not on the path of MPESA_CALLBACK_URL" in failed["detail"]


def test_the_listener_is_asked_directly_whatever_proxy_the_environment_names(
    ready_office: dict[str, str], listener_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    checks = run_json("doctor", "--port", str(listener_port), code=1)

    assert {c["name"]: c["ok"] for c in checks}["listener"] is True
    # (Daraja is reached as the office's client reaches it: here through that dead proxy)
    assert {c["name"]: c["ok"] for c in checks}["daraja token"] is False


def test_keys_daraja_refuses_fail_the_token_check(
    ready_office: dict[str, str], listener_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_CONSUMER_SECRET", "not-the-secret")

    failed = only_failure(doctor("--port", str(listener_port), code=1))

    assert failed["name"] == "daraja token"
    assert "Daraja refused the consumer key and secret" in failed["detail"]
    assert "MPESA_CONSUMER_SECRET" in failed["fix"]


def test_a_daraja_nobody_answers_fails_the_token_check_quickly(
    ready_office: dict[str, str], listener_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_BASE_URL", f"http://127.0.0.1:{free_port()}")

    failed = only_failure(doctor("--port", str(listener_port), code=1))

    assert failed["name"] == "daraja token"


# -- what the database holds ------------------------------------------------------------------


def add_payment(db: Database, person: Person, status: str, pushed: datetime) -> int:
    with db.write() as session:
        payment = MpesaPayment(
            person_id=person.id, phone_number=person.phone, amount=500,
            payment_purpose="Deposit", status=status, initiated_at=pushed, last_pushed_at=pushed,
            checkout_request_id=f"ws_CO_{status}_{pushed.timestamp():.0f}",
        )  # fmt: skip
        session.add(payment)
        session.flush()
        assert payment.id is not None
        return payment.id


def test_a_payment_left_pending_fails_with_reconcile_as_its_fix(
    ready_office: dict[str, str], db: Database, person_with_balance: Person
) -> None:
    now = datetime.now(UTC)
    stale = add_payment(db, person_with_balance, PaymentStatus.PENDING, now - timedelta(hours=1))
    add_payment(db, person_with_balance, PaymentStatus.PENDING, now)  # its prompt is still up
    add_payment(db, person_with_balance, PaymentStatus.COMPLETED, now - timedelta(hours=2))

    failed = only_failure(doctor("--offline", code=1))

    assert failed["name"] == "pending payments"
    assert failed["detail"] == f"1 open for more than 15 minutes: {stale}"
    assert "sfcrm mpesa reconcile" in failed["fix"]


def add_email(
    db: Database, *, sent: bool, permanent: bool = False, superseded: bool = False
) -> int:
    with db.write() as session:
        row = EmailNotification(
            recipient="crew@example.com", notification_type="crew_invitation", subject="Hi",
            message="Hi", mime=b"Subject: Hi\r\n\r\nHi\r\n", created_at=datetime.now(UTC),
            is_sent=sent, permanent_failure=permanent,
            superseded_at=datetime.now(UTC) if superseded else None,
        )  # fmt: skip
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def test_unsent_emails_fail_with_retry_as_their_fix(
    ready_office: dict[str, str], db: Database
) -> None:
    add_email(db, sent=True)
    add_email(db, sent=False, superseded=True)  # never to be sent: nothing to do about it
    assert doctor("--offline", code=0)["unsent emails"]["ok"]
    queued = add_email(db, sent=False)
    refused = add_email(db, sent=False, permanent=True)

    failed = only_failure(doctor("--offline", code=1))

    assert failed["name"] == "unsent emails"
    assert failed["detail"] == f"2 not sent: {queued} {refused} (1 refused permanently)"
    assert "sfcrm mail retry" in failed["fix"]


# -- no office --------------------------------------------------------------------------------


def test_outside_an_office_doctor_says_so_and_creates_nothing(tmp_path: Path) -> None:
    checks = doctor("--offline", code=1)

    assert list(checks) == OFFLINE_CHECKS  # nothing to read the payments and emails from
    assert not checks["office"]["ok"]
    assert "sfcrm init" in checks["office"]["fix"]
    assert list(tmp_path.iterdir()) == []


def test_an_office_whose_database_file_is_missing_fails_and_it_is_not_created(
    tmp_path: Path,
) -> None:
    (tmp_path / "sfcrm.toml").write_text("")

    checks = doctor("--offline", code=1)

    assert checks["office"]["detail"].endswith(f"no database at {tmp_path / 'sfcrm.db'} yet")
    assert not (tmp_path / "sfcrm.db").exists()


def test_a_database_at_another_schema_fails_and_is_not_upgraded(
    ready_office: dict[str, str], db: Database
) -> None:
    from sqlalchemy import column, table, update

    with db.write() as session:
        session.execute(
            update(table("alembic_version", column("version_num"))).values(version_num="0099")
        )
    db.close()

    failed = only_failure(doctor("--offline", code=1))

    assert failed["name"] == "office"
    assert "is at schema 0099, not " in failed["detail"]
    assert "sfcrm db upgrade" in failed["fix"]
