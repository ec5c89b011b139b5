"""End to end, as separate processes: the CLI, `sfcrm mpesa emulator` and `sfcrm serve-callback`
talking over loopback HTTP to each other and to one SQLite file."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import wait_for

from sfcrm.emulator import SANDBOX_PASSKEY, SANDBOX_SHORTCODE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    def accepting() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(accepting, timeout=timeout)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    listener_port = free_port()
    return {
        **os.environ,
        "MPESA_CONSUMER_KEY": "e2e-key",
        "MPESA_CONSUMER_SECRET": "e2e-secret",
        "MPESA_PASS_KEY": SANDBOX_PASSKEY,
        "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
        "MPESA_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "MPESA_CALLBACK_URL": f"http://127.0.0.1:{listener_port}/cb/e2e-path-secret-31337",
        "SFCRM_DATABASE_URL": str(tmp_path / "sfcrm.db"),
        "SFCRM_LOG_FILE": str(tmp_path / "sfcrm.log"),
        "LISTENER_PORT": str(listener_port),
    }


def sfcrm(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "sfcrm", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def servers(env: dict[str, str]) -> Iterator[dict[str, subprocess.Popen[str]]]:
    emulator_port = env["MPESA_BASE_URL"].rsplit(":", 1)[1]
    procs = {
        "emulator": subprocess.Popen(
            [sys.executable, "-m", "sfcrm", "mpesa", "emulator", "--port", emulator_port,
             "--callback-delay", "0.2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
        "listener": subprocess.Popen(
            [sys.executable, "-m", "sfcrm", "serve-callback", "--port", env["LISTENER_PORT"]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
    }  # fmt: skip
    try:
        wait_for_port(int(emulator_port))
        wait_for_port(int(env["LISTENER_PORT"]))
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def status(env: dict[str, str], payment_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(sfcrm(env, "mpesa", "status", payment_id, "--json").stdout)
    return doc


def test_payment_goes_from_cli_to_emulator_to_listener_to_database(
    env: dict[str, str], servers: dict[str, subprocess.Popen[str]], tmp_path: Path
) -> None:
    sfcrm(env, "people", "add", "--name", "Kamau", "--phone", "0708374149", "--balance", "2000")
    answer = json.loads(
        sfcrm(env, "mpesa", "request", "--person", "0708374149", "--amount", "750",
              "--purpose", "Advance repayment", "--json").stdout
    )  # fmt: skip
    pid = str(answer["payment_id"])
    done = wait_for(lambda: (s := status(env, pid))["status"] == "completed" and s, timeout=20)
    assert done["amount"] == "750.00"
    person = json.loads(sfcrm(env, "people", "show", "0708374149", "--json").stdout)
    assert person["balance"] == "1250.00"

    # The listener logged the callback; no secret reached its output or the log file.
    servers["listener"].send_signal(signal.SIGINT)
    out, err = servers["listener"].communicate(timeout=10)
    assert servers["listener"].returncode == 130  # stopped by Ctrl-C
    log = (tmp_path / "sfcrm.log").read_text()
    assert f"payment {pid} completed" in log
    for text in (out, err, log):
        for secret in ("e2e-path-secret-31337", "e2e-secret", SANDBOX_PASSKEY):
            assert secret not in text


def test_listener_without_callback_url_exits_3(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k != "MPESA_CALLBACK_URL"}
    result = sfcrm(env, "serve-callback", "--port", str(free_port()), check=False)
    assert result.returncode == 3
    assert result.stderr.splitlines()[0] == "Error: MPESA_CALLBACK_URL is not set"


def test_demo_runs_on_embedded_defaults_in_well_under_a_minute(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "SFCRM_", "EMAIL_"))}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sfcrm", "demo", "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    doc = json.loads(result.stdout)
    assert doc["payment"]["status"] == "completed"
    assert doc["person_before"]["balance"] == "1500.00"
    assert doc["person_after"]["balance"] == "1000.00"
    assert doc["crew_status"] == "confirmed"
    email_file = Path(doc["email"])
    assert email_file.parent.name == "outbox"
    assert b"You are invited to work on: Safari Rally Gala" in email_file.read_bytes()
    assert list(tmp_path.iterdir()) == []  # nothing lands in the current directory
    import shutil

    shutil.rmtree(doc["folder"])


def test_demo_clean_removes_its_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "SFCRM_", "EMAIL_"))}
    result = subprocess.run(
        [sys.executable, "-m", "sfcrm", "demo", "--clean"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "confirmed through the RSVP link" in result.stdout
    folder = re.search(r"written to (\S+)/outbox/", result.stderr)
    assert folder is not None
    assert not Path(folder.group(1)).exists()


def test_listener_warns_when_the_callback_path_is_guessable(env: dict[str, str]) -> None:
    port = free_port()
    env = {**env, "MPESA_CALLBACK_URL": f"http://127.0.0.1:{port}/callback/"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", "serve-callback", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    first_lines = [proc.stderr.readline(), proc.stderr.readline()]
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=10)
    assert proc.returncode == 130, rest  # stopped by Ctrl-C
    assert "looks guessable" in "".join(first_lines)


def test_listener_acts_on_callbacks_left_stored_when_it_starts(env: dict[str, str]) -> None:
    from support import utcnow

    from sfcrm.db import Database
    from sfcrm.payments import Payments

    sfcrm(env, "people", "add", "--name", "Kamau", "--phone", "0708374149", "--balance", "900")
    db = Database(Path(env["SFCRM_DATABASE_URL"]))
    payments = Payments(db, callback_url=None, clock=utcnow, client_factory=lambda: None)  # type: ignore[arg-type,return-value]
    from sfcrm.models import MpesaCheckout, MpesaPayment

    with db.write() as session:
        payment = MpesaPayment(
            person_id=1, phone_number="254708374149", amount=400, payment_purpose="x",
            status="pending", checkout_request_id="ws_CO_left_behind", initiated_at=utcnow(),
        )  # fmt: skip
        session.add(payment)
        session.flush()
        assert payment.id is not None
        session.add(MpesaCheckout(payment_id=payment.id, checkout_request_id="ws_CO_left_behind",
                                  pushed_at=utcnow()))  # fmt: skip
    body = json.dumps({"Body": {"stkCallback": {
        "CheckoutRequestID": "ws_CO_left_behind", "ResultCode": 0, "ResultDesc": "ok",
        "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": 400}]}}}}).encode()  # fmt: skip
    payments.store_callback(body, "127.0.0.1", trusted=True)  # stored, then the listener died
    db.close()
    port = int(env["LISTENER_PORT"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", "serve-callback", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(port)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert "Applied 1 stored callback left from the last run." in err
    assert status(env, "1")["status"] == "completed"
    assert json.loads(sfcrm(env, "people", "show", "1", "--json").stdout)["balance"] == "500.00"
