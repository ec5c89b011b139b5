"""sfcrm's benchmark: every figure as a ratio against a baseline measured in the same run.

    pip install '.[test]' && python benchmarks/run.py          # all figures, about 3 minutes
    python benchmarks/run.py --only startup,listener --runs 5   # a subset

Each figure is the median of several runs. Nothing here is part of the test suite: timings
depend on the machine, so the suite guards behaviour and this script measures speed. All
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PY = sys.executable
SFCRM = [PY, "-m", "sfcrm"]


@dataclass
class Figure:
    name: str
    value: float
    baseline: float
    unit: str
    goal: str  # e.g. "<= 1.3x"
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool:
        op, limit = self.goal.split()
        bound = float(limit.rstrip("x"))
        return self.ratio <= bound if op == "<=" else self.ratio >= bound


@dataclass
class Bound:
    """A figure with a fixed limit rather than a baseline: peak memory, a longest wait."""

    name: str
    value: float
    unit: str
    limit: float

    @property
    def met(self) -> bool:
        return self.value < self.limit


# -- measuring ---------------------------------------------------------------------------------


def run_process(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """Wall time in seconds and peak memory in KiB of one whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{err}")
    return elapsed, usage.ru_maxrss


def median_time(cmd: list[str], env: dict[str, str], cwd: Path, runs: int) -> tuple[float, int]:
    run_process(cmd, env, cwd)  # warm the file cache
    samples = [run_process(cmd, env, cwd) for _ in range(runs)]
    return statistics.median(s[0] for s in samples), max(s[1] for s in samples)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on port {port}")


def base_env(db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFCRM_", "MPESA_", "EMAIL_"))}
    env["SFCRM_DATABASE_URL"] = str(db)
    return env


# -- 1. start-up -------------------------------------------------------------------------------


def bare_typer_app(folder: Path) -> Path:
    """A Typer app shaped like sfcrm (same groups, same number of commands), doing nothing."""
    import typer.main

    from sfcrm.cli import app

    root = typer.main.get_command(app)
    groups: dict[str, list[str]] = {}
    top: list[str] = []
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        sub = getattr(cmd, "commands", None)
        if sub:
            groups[name] = list(sub)
        else:
            top.append(name)
    lines = ["import typer", "app = typer.Typer(add_completion=False)"]
    for name in top:
        lines += [
            f"@app.command({name!r})",
            f"def c_{name.replace('-', '_')}(json: bool = False) -> None:",
            f"    '''Command {name}.'''",
        ]
    for group, names in groups.items():
        var = f"g_{group}"
        lines += [f"{var} = typer.Typer()", f"app.add_typer({var}, name={group!r})"]
        for name in names:
            fn = f"c_{group}_{name.replace('-', '_')}"
            lines += [
                f"@{var}.command({name!r})",
                f"def {fn}(json: bool = False) -> None:",
                f"    '''Command {group} {name}.'''",
            ]
    lines += ["app()"]
    path = folder / "bare_app.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_startup(work: Path, runs: int) -> list[Figure]:
    env = base_env(work / "startup.db")
    bare = bare_typer_app(work)
    figures = []
    for args in (["--help"], ["mpesa", "--help"]):
        ours, _ = median_time([*SFCRM, *args], env, work, runs)
        theirs, _ = median_time([PY, str(bare), *args], env, work, runs)
        figures.append(
            Figure(f"sfcrm {' '.join(args)} (whole process)", ours, theirs, "s", "<= 1.3x")
        )
    return figures


# -- 2. a read command -------------------------------------------------------------------------


def bench_read(work: Path, runs: int) -> list[Figure]:
    db = work / "small.db"
    env = base_env(db)
    subprocess.run(
        [*SFCRM, "people", "add", "--name", "A", "--phone", "0712345678"],
        env=env,
        cwd=work,
        check=True,
        capture_output=True,
    )
    ours, _ = median_time([*SFCRM, "mpesa", "status", "--json"], env, work, runs)
    query = (
        f"import typer, sqlmodel, sqlite3; c = sqlite3.connect({str(db)!r}); "
        "c.execute('SELECT * FROM mpesa_payment ORDER BY id DESC LIMIT 50').fetchall()"
    )
    theirs, _ = median_time([PY, "-c", query], env, work, runs)
    return [Figure("sfcrm mpesa status --json (small database)", ours, theirs, "s", "<= 1.3x")]


# -- 3. listener throughput --------------------------------------------------------------------

CALLBACKS = 2000
CLIENTS = 20


def seed_pending_payments(db: Path, count: int) -> list[str]:
    """``count`` pending payments with their pushes, written straight into a fresh database."""
    from sfcrm.db import Database

    Database(db).engine.dispose()  # create the schema
    now = datetime.now(UTC).replace(tzinfo=None)
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO person (name, phone, email, balance_cents, created_at) "
        "VALUES ('Bench', '254708374149', NULL, 0, ?)",
        (now,),
    )
    ids = [f"ws_CO_bench_{i:06d}" for i in range(count)]
    conn.executemany(
        "INSERT INTO mpesa_payment (id, person_id, phone_number, amount, payment_purpose, "
        "account_reference, status, checkout_request_id, initiated_at, last_pushed_at, "
        "push_count, balance_applied, refund_due) "
        "VALUES (?, 1, '254708374149', 10, 'Bench', ?, 'pending', ?, ?, ?, 1, 0, 0)",
        [(i + 1, f"SF-{i + 1}", cid, now, now) for i, cid in enumerate(ids)],
    )
    conn.executemany(
        "INSERT INTO mpesa_checkout (payment_id, checkout_request_id, pushed_at) VALUES (?, ?, ?)",
        [(i + 1, cid, now) for i, cid in enumerate(ids)],
    )
    conn.commit()
    conn.close()
    return ids


def callback_body(checkout_id: str) -> bytes:
    return json.dumps(
        {
            "Body": {
                "stkCallback": {
                    "MerchantRequestID": "bench",
                    "CheckoutRequestID": checkout_id,
                    "ResultCode": 0,
                    "ResultDesc": "The service request is processed successfully.",
                    "CallbackMetadata": {
                        "Item": [
                            {"Name": "Amount", "Value": 10.0},
                            {"Name": "MpesaReceiptNumber", "Value": "BENCH00001"},
                            {"Name": "Balance"},
                            {"Name": "TransactionDate", "Value": 20261127120000},
                            {"Name": "PhoneNumber", "Value": 254708374149},
                        ]
                    },
                }
            }
        }
    ).encode()


def blast(url: str, bodies: list[bytes]) -> float:
    """Post every body with CLIENTS concurrent keep-alive clients; returns requests per second."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    chunks = [bodies[i::CLIENTS] for i in range(CLIENTS)]
    failures: list[int] = []

    def client(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        for body in chunk:
            conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
        conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, chunks))
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"listener answered {len(failures)} non-200s, e.g. {failures[0]}")
    return len(bodies) / elapsed


MINIMAL_APP = textwrap.dedent("""
    import json, sqlite3, sys, threading
    from waitress import serve
    db = sys.argv[1]
    local = threading.local()
    def conn():
        if not hasattr(local, "c"):
            local.c = sqlite3.connect(db, timeout=60, isolation_level=None)
            local.c.execute("PRAGMA journal_mode=WAL")
            local.c.execute("PRAGMA synchronous=NORMAL")
            local.c.execute("CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY, body BLOB)")
        return local.c
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        json.loads(body)
        conn().execute("INSERT INTO inbox (body) VALUES (?)", (body,))
        out = b'{"ResultCode": 0, "ResultDesc": "Accepted"}'
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(out)))])
        return [out]
    serve(app, host="127.0.0.1", port=int(sys.argv[2]), threads=8, _quiet=True)
""")


@contextmanager
def serving(
    cmd: list[str], env: dict[str, str], cwd: Path, port: int
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def bench_listener(work: Path, runs: int) -> list[Figure]:
    ours: list[float] = []
    theirs: list[float] = []
    for round_ in range(max(1, runs // 2)):
        db = work / f"listener-{round_}.db"
        ids = seed_pending_payments(db, CALLBACKS)
        port = free_port()
        env = base_env(db)
        env["MPESA_CALLBACK_URL"] = f"http://127.0.0.1:{port}/cb/bench-secret-path-0123456789"
        with serving([*SFCRM, "serve-callback", "--port", str(port)], env, work, port):
            ours.append(blast(env["MPESA_CALLBACK_URL"], [callback_body(i) for i in ids]))
        check = sqlite3.connect(db)
        done = check.execute(
            "SELECT count(*) FROM mpesa_payment WHERE status='completed'"
        ).fetchone()[0]
        check.close()
        if done != CALLBACKS:
            raise SystemExit(f"listener completed {done} of {CALLBACKS} payments")
        app = work / "minimal_app.py"
        app.write_text(MINIMAL_APP)
        port = free_port()
        with serving(
            [PY, str(app), str(work / f"minimal-{round_}.db"), str(port)], env, work, port
        ):
            theirs.append(blast(f"http://127.0.0.1:{port}/cb", [callback_body(i) for i in ids]))
    return [
        Figure(
            f"listener: {CALLBACKS} success callbacks, {CLIENTS} clients",
            statistics.median(ours),
            statistics.median(theirs),
            "req/s",
            ">= 0.5x",
            higher_is_better=True,
        )
    ]


# -- 4. invitations ----------------------------------------------------------------------------

INVITES = 1000


def bench_invitations(work: Path, runs: int) -> list[Figure]:
    from aiosmtpd.controller import Controller

    class Sink:
        def __init__(self) -> None:
            self.count = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.count += 1
            return "250 OK"

    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        ours: list[float] = []
        theirs: list[float] = []
        for round_ in range(max(1, runs // 2)):
            db = work / f"invite-{round_}.db"
            event_id = seed_crew(db, people=INVITES, events=1, per_event=INVITES, confirmed=False)
            env = base_env(db)
            env.update(
                {"EMAIL_BACKEND": "smtp", "EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)}
            )
            before = sink.count
            elapsed, _ = run_process(
                [*SFCRM, "crew", "invite", "--event", str(event_id)], env, work
            )
            if sink.count - before != INVITES:
                raise SystemExit(f"server got {sink.count - before} of {INVITES} invitations")
            ours.append(elapsed)
            # the baseline sends the very messages sfcrm logged, over one connection
            messages = work / "messages.bin"
            conn = sqlite3.connect(db)
            rows = conn.execute("SELECT recipient, mime FROM email_notification").fetchall()
            conn.close()
            messages.write_bytes(json.dumps([[r, m.decode("latin-1")] for r, m in rows]).encode())
            script = textwrap.dedent(f"""
                import json, smtplib
                rows = json.loads(open({str(messages)!r}, "rb").read())
                with smtplib.SMTP("127.0.0.1", {port}, timeout=15) as smtp:
                    for recipient, mime in rows:
                        data = mime.encode("latin-1")
                        smtp.sendmail("office@soundfusion.invalid", [recipient], data)
            """)
            elapsed, _ = run_process([PY, "-c", script], env, work)
            theirs.append(elapsed)
    finally:
        controller.stop()
    return [
        Figure(
            f"crew invite: {INVITES} invitations over SMTP (whole process)",
            statistics.median(ours),
            statistics.median(theirs),
            "s",
            "<= 2x",
        )
    ]


def seed_crew(
    db: Path,
    *,
    people: int,
    events: int,
    per_event: int,
    confirmed: bool,
    start: datetime | None = None,
    spread_days: float = 0.0,
) -> int:
    """People with emails, events and assignments, straight into a fresh database."""
    from sfcrm.db import Database

    Database(db).engine.dispose()
    now = datetime.now(UTC)
    first = start or (now + timedelta(days=3))
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    naive = now.replace(tzinfo=None)
    conn.executemany(
        "INSERT INTO person (id, name, phone, email, balance_cents, created_at) "
        "VALUES (?,?,?,?,0,?)",
        [
            (i, f"Crew {i}", f"2547{i:08d}", f"crew{i}@example.co.ke", naive)
            for i in range(1, people + 1)
        ],
    )
    step = timedelta(days=spread_days / events) if events > 1 and spread_days else timedelta(0)
    event_rows = []
    for e in range(1, events + 1):
        starts = (first + step * (e - 1)).astimezone(UTC)
        day = starts.astimezone(UTC).date().isoformat()
        event_rows.append(
            (
                e,
                f"Event {e}",
                day,
                "18:00",
                "23:00",
                "KICC, Nairobi",
                starts.replace(tzinfo=None),
                (starts + timedelta(hours=5)).replace(tzinfo=None),
                naive,
            )
        )
    conn.executemany(
        "INSERT INTO event (id, name, date, time, end_time, location, details, starts_at, ends_at, "
        "created_at) VALUES (?,?,?,?,?,?,NULL,?,?,?)",
        event_rows,
    )
    status = "confirmed" if confirmed else "invited"
    crew_rows = []
    for e in range(1, events + 1):
        for k in range(per_event):
            person = ((e - 1) * per_event + k) % people + 1
            crew_rows.append((e, person, "Sound Engineer", status, naive))
    conn.executemany(
        "INSERT OR IGNORE INTO event_crew (event_id, person_id, role, status, invitation_sent, "
        "reminder_sent, created_at) VALUES (?,?,?,?,0,0,?)",
        crew_rows,
    )
    conn.commit()
    conn.close()
    return 1


# -- 5. growth ---------------------------------------------------------------------------------


def seed_large(db: Path) -> int:
    """1,000,000 payments, 20,000 events and 200,000 assignments; returns a busy event's id."""
    now = datetime.now(UTC)
    # events every ~10.5 hours from two years back to a few months ahead
    seed_crew(
        db,
        people=20_000,
        events=20_000,
        per_event=10,
        confirmed=True,
        start=now - timedelta(days=730),
        spread_days=20_000 * 10.5 / 24,
    )
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    naive = now.replace(tzinfo=None)
    statuses = ["completed"] * 90 + ["failed"] * 6 + ["cancelled"] * 3 + ["pending"]
    batch = []
    for i in range(1, 1_000_001):
        status = statuses[i % len(statuses)]
        batch.append(
            (
                i,
                (i % 20_000) + 1,
                f"2547{(i % 20_000) + 1:08d}",
                100,
                "Bench",
                status,
                f"ws_CO_large_{i:07d}",
                naive,
                naive,
            )
        )
        if len(batch) == 50_000:
            conn.executemany(
                "INSERT INTO mpesa_payment (id, person_id, phone_number, amount, payment_purpose, "
                "status, checkout_request_id, initiated_at, last_pushed_at, push_count, "
                "balance_applied, refund_due) VALUES (?,?,?,?,?,?,?,?,?,1,0,0)",
                batch,
            )
            batch.clear()
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()
    # an event starting within the next day, for `crew list --event`
    conn = sqlite3.connect(db)
    row = conn.execute(
        "SELECT id FROM event WHERE starts_at > ? ORDER BY starts_at LIMIT 1", (naive,)
    ).fetchone()
    conn.close()
    return int(row[0])


def bench_growth(work: Path, runs: int) -> list[Figure | Bound]:
    empty = work / "empty.db"
    from sfcrm.db import Database

    Database(empty).engine.dispose()
    large = work / "large.db"
    print("  building the large database (1,000,000 payments)...", flush=True)
    event_id = seed_large(large)
    commands = {
        "mpesa status --status pending": ["mpesa", "status", "--status", "pending", "--json"],
        "crew remind --dry-run": ["crew", "remind", "--dry-run", "--json"],
        "crew list --event ID": ["crew", "list", "--event", str(event_id), "--json"],
    }
    figures: list[Figure | Bound] = []
    peak = 0
    for label, args in commands.items():
        big, big_mem = median_time([*SFCRM, *args], base_env(large), work, runs)
        small_args = [a if a != str(event_id) else "1" for a in args]
        if label == "crew list --event ID":
            Database(empty).engine.dispose()
            conn = sqlite3.connect(empty)
            conn.execute(
                "INSERT OR IGNORE INTO event (id, name, date, location, starts_at, ends_at, "
                "created_at) VALUES (1, 'E', '2030-01-01', 'X', '2030-01-01 00:00:00', "
                "'2030-01-02 00:00:00', '2030-01-01 00:00:00')"
            )
            conn.commit()
            conn.close()
        small, _ = median_time([*SFCRM, *small_args], base_env(empty), work, runs)
        peak = max(peak, big_mem)
        figures.append(Figure(f"{label}: large vs empty database", big, small, "s", "<= 1.5x"))
    figures.append(Bound("peak memory of a command on the large database", peak / 1024, "MB", 150))
    return figures


# -- 6. people import --------------------------------------------------------------------------

IMPORT_ROWS = 100_000
IMPORT_CALLBACKS = 5000  # pending payments whose callbacks arrive during the import

# the baseline: the same rows straight into the table, with no checks, no ids and no ledger
PLAIN_IMPORT = textwrap.dedent("""
    import csv, sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    with open(sys.argv[2], newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        conn.executemany(
            "INSERT INTO person (name, phone, email, balance_cents, created_at) "
            "VALUES (?, ?, ?, ?, '2026-01-01 00:00:00')",
            ((n, p, e or None, int(b or 0) * 100) for n, p, e, b in rows),
        )
    conn.execute("COMMIT")
""")


def people_csv(path: Path, rows: int) -> None:
    """A crew list as an office exports it: every other row with an email, most with a balance."""
    with path.open("w") as out:
        out.write("name,phone,email,balance\n")
        for i in range(rows):
            email = f"crew{i}@example.co.ke" if i % 2 == 0 else ""
            balance = f"{(i % 50) * 100}" if i % 3 else ""
            out.write(f"Crew Member {i},07{i:08d},{email},{balance}\n")


def post_until(url: str, bodies: list[bytes], done: Callable[[], bool]) -> list[float]:
    """Post one callback after another until ``done()``; each one's answer time in seconds."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    waits: list[float] = []
    for body in bodies:
        if done():
            break
        started = time.perf_counter()
        conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        waits.append(time.perf_counter() - started)
        if response.status != 200:
            raise SystemExit(f"listener answered {response.status} during the import")
    conn.close()
    return waits


def import_beside_listener(cmd: list[str], db: Path, work: Path) -> tuple[float, int, list[float]]:
    """Run an import on ``db`` while ``serve-callback`` takes Daraja's callbacks for it, one
    after another: the import's wall time and peak KiB, and each callback's answer time."""
    ids = seed_pending_payments(db, IMPORT_CALLBACKS)
    port = free_port()
    env = base_env(db)
    env["MPESA_CALLBACK_URL"] = f"http://127.0.0.1:{port}/cb/bench-secret-path-0123456789"
    with serving([*SFCRM, "serve-callback", "--port", str(port)], env, work, port):
        proc = subprocess.Popen(
            cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        started = time.perf_counter()
        finished = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            posting = pool.submit(
                post_until,
                env["MPESA_CALLBACK_URL"],
                [callback_body(i) for i in ids],
                finished.is_set,
            )
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - started
            finished.set()
            waits = posting.result()
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{err}")
    if len(waits) == len(ids):
        raise SystemExit("the import outlasted the callbacks: raise IMPORT_CALLBACKS")
    with closing(sqlite3.connect(db)) as check:
        (added,) = check.execute("SELECT count(*) FROM person").fetchone()
    if added != IMPORT_ROWS + 1:
        raise SystemExit(f"{' '.join(cmd)} added {added - 1} of {IMPORT_ROWS} people")
    return elapsed, usage.ru_maxrss, waits


def bench_import(work: Path, runs: int) -> list[Figure | Bound]:
    source = work / "people.csv"
    people_csv(source, IMPORT_ROWS)
    script = work / "plain_import.py"
    script.write_text(PLAIN_IMPORT)
    ours: list[float] = []
    theirs: list[float] = []
    peak = 0
    waits: list[float] = []
    plain_waits: list[float] = []
    for round_ in range(max(1, runs // 2)):
        elapsed, kib, answered = import_beside_listener(
            [*SFCRM, "people", "import", str(source)], work / f"import-{round_}.db", work
        )
        ours.append(elapsed)
        peak = max(peak, kib)
        waits.extend(answered)
        elapsed, _, answered = import_beside_listener(
            [PY, str(script), str(work / f"plain-{round_}.db"), str(source)],
            work / f"plain-{round_}.db",
            work,
        )
        theirs.append(elapsed)
        plain_waits.extend(answered)
    print(
        f"  callbacks answered during sfcrm's imports: {len(waits)}, median "
        f"{statistics.median(waits) * 1000:.0f} ms; during the plain inserts: slowest "
        f"{max(plain_waits):.2f} s",
        flush=True,
    )
    return [
        Figure(
            f"people import: {IMPORT_ROWS:,} rows beside the listener (whole process)",
            statistics.median(ours),
            statistics.median(theirs),
            "s",
            "<= 8x",
        ),
        Bound(f"people import of {IMPORT_ROWS:,} rows: slowest wall time", max(ours), "s", 15),
        Bound(f"people import of {IMPORT_ROWS:,} rows: peak memory", peak / 1024, "MB", 150),
        Bound("slowest callback answer during the import", max(waits), "s", 2),
    ]


# -- report ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores{mem}; Python {python}, SQLite {sqlite3.sqlite_version}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median); default 7")
    parser.add_argument(
        "--only",
        default="startup,read,listener,invitations,growth,import",
        help="comma-separated subset",
    )
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="sfcrm-bench-"))
    figures: list[Figure | Bound] = []
    steps: list[tuple[str, Callable[[], Sequence[Figure | Bound]]]] = [
        ("startup", lambda: bench_startup(work, args.runs)),
        ("read", lambda: bench_read(work, args.runs)),
        ("listener", lambda: bench_listener(work, args.runs)),
        ("invitations", lambda: bench_invitations(work, args.runs)),
        ("growth", lambda: bench_growth(work, args.runs)),
        ("import", lambda: bench_import(work, args.runs)),
    ]
    print(f"sfcrm benchmark on {machine()}")
    try:
        for name, step in steps:
            if name not in wanted:
                continue
            print(f"- {name}...", flush=True)
            for figure in step():
                figures.append(figure)
                if isinstance(figure, Bound):
                    print(
                        f"  {figure.name}: {figure.value:.{0 if figure.unit == 'MB' else 2}f} "
                        f"{figure.unit} (goal < {figure.limit:g} {figure.unit}) "
                        f"{'ok' if figure.met else 'MISSED'}",
                        flush=True,
                    )
                    continue
                print(
                    f"  {figure.name}: {figure.value:.3f} {figure.unit} vs {figure.baseline:.3f} "
                    f"{figure.unit} = {figure.ratio:.2f}x (goal {figure.goal}) "
                    f"{'ok' if figure.met else 'MISSED'}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missed = [f for f in figures if not f.met]
    print(f"{len(figures) - len(missed)} of {len(figures)} figures met their goal.")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
