"""sfcrm's benchmark: every figure as a ratio against a baseline measured in the same run.

    pip install '.[test]' && python benchmarks/run.py        # every figure on SQLite
    python benchmarks/run.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python benchmarks/run.py --only startup,listener --runs 9  # a subset, more runs

Each figure is the median of several runs, sfcrm's and the baseline's taken in turn. SQLite
always; PostgreSQL too when a server is given (--postgres or SFCRM_BENCH_DATABASE_URL): each
figure then gets a database of its own there, created and dropped by the run. sfcrm is measured
only from outside, as an office runs it: `sfcrm` processes, `serve-callback`, and sfcrm's
Database and models to fill the databases. Nothing here is part of the test suite: timings
depend on the machine, so the suite guards behaviour and this script measures speed. All
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import data
from data import POSTGRES, SQLITE, Engines, Target
from procs import (
    PY,
    SFCRM,
    Failed,
    Peaks,
    blast,
    clean_env,
    free_port,
    label_of,
    post_until,
    run_process,
    serving,
)

# -- figures -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """sfcrm's measurements and the baseline's, taken in turn in the same run."""

    name: str
    engine: str  # "sqlite", "postgresql", or "-" where no database is involved
    against: str  # the baseline, in a few words
    unit: str
    goal: str  # "<= 1.2x" or ">= 0.35x"
    values: list[float] = field(default_factory=list)
    baselines: list[float] = field(default_factory=list)

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def baseline(self) -> float:
        return statistics.median(self.baselines)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool:
        op, limit = self.goal.split()
        bound = float(limit.rstrip("x"))
        return self.ratio <= bound if op == "<=" else self.ratio >= bound

    def cells(self) -> list[str]:
        spread = ""
        if len(self.values) > 1:
            spread = f" ({_number(min(self.values))}–{_number(max(self.values))})"
        return [
            f"{_number(self.value)} {self.unit}{spread}",
            f"{_number(self.baseline)} {self.unit}, {self.against}",
            f"{self.ratio:.2f}x",
            self.goal,
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "baseline": self.baseline,
            "against": self.against,
            "ratio": round(self.ratio, 4),
            "unit": self.unit,
            "goal": self.goal,
            "values": self.values,
            "baselines": self.baselines,
        }


@dataclass
class Bound:
    """A figure with a fixed limit rather than a baseline: peak memory, a longest wait."""

    name: str
    engine: str
    value: float
    unit: str
    limit: float

    @property
    def met(self) -> bool:
        return self.value < self.limit

    def cells(self) -> list[str]:
        return [f"{_number(self.value)} {self.unit}", "—", "—", f"< {self.limit:g} {self.unit}"]

    def as_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "limit": self.limit}


@dataclass
class Check:
    """A yes-or-no figure: what a process loaded, say."""

    name: str
    engine: str
    met: bool
    detail: str

    def cells(self) -> list[str]:
        return [self.detail, "—", "—", "yes"]

    def as_json(self) -> dict[str, Any]:
        return {"detail": self.detail}


@dataclass
class Missing:
    """A figure that could not be measured: what failed, or why it was skipped."""

    name: str
    engine: str
    reason: str
    skipped: bool = False

    @property
    def met(self) -> bool:
        return False

    def cells(self) -> list[str]:
        return [("skipped: " if self.skipped else "FAILED: ") + self.reason]

    def as_json(self) -> dict[str, Any]:
        return {"skipped" if self.skipped else "failed": self.reason}


Result = Figure | Bound | Check | Missing


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


@dataclass
class Bench:
    """One run: its folder, its databases, its number of runs per figure, the peaks seen."""

    work: Path
    engines: Engines
    runs: int
    peaks: Peaks = field(default_factory=Peaks)
    begun: list[Figure] = field(default_factory=list)  # the figures of the step running

    @property
    def rounds(self) -> int:
        """Runs of a figure that takes seconds each time (a burst, a thousand emails)."""
        return max(3, self.runs // 2)

    def sfcrm(self, engine: str, args: list[str], env: dict[str, str]) -> float:
        """One whole ``sfcrm`` process: its wall time; its peak memory is recorded."""
        cmd = [*SFCRM, *args]
        elapsed, kib = run_process(cmd, env, self.work)
        self.peaks.record(engine, label_of(cmd), kib)
        return elapsed

    def figure(self, name: str, engine: str, against: str, unit: str, goal: str) -> Figure:
        """A figure about to be measured: should sfcrm fail, its baseline is still reported."""
        figure = Figure(name, engine, against, unit, goal)
        self.begun.append(figure)
        return figure

    def timed(self, cmd: list[str], env: dict[str, str]) -> Callable[[], float]:
        """A baseline process to time again and again."""
        return lambda: run_process(cmd, env, self.work)[0]

    def time_pair(
        self, figure: Figure, baseline: Callable[[], float], ours: list[str], env: dict[str, str]
    ) -> Result:
        """Wall times of the baseline and of an sfcrm command, in turn, after one warm-up run
        of each (the file cache); or what failed."""
        try:
            baseline()
            self.sfcrm(figure.engine, ours, env)
            for _ in range(self.runs):
                figure.baselines.append(baseline())
                figure.values.append(self.sfcrm(figure.engine, ours, env))
        except Failed as exc:
            return missing(figure, exc)
        return figure


# -- 1. start-up -------------------------------------------------------------------------------

HEAVY = ("sqlalchemy", "sqlmodel")


def bare_typer_app(folder: Path) -> Path:
    """A Typer app shaped like sfcrm (same groups, same commands), each command doing nothing."""
    import typer.main

    from sfcrm.cli import app

    root = typer.main.get_command(app)
    lines = ["import typer", "app = typer.Typer(add_completion=False)"]
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        sub = getattr(cmd, "commands", None)
        if not sub:
            lines += _bare_command("app", name, f"c_{name}")
            continue
        group = f"g_{name}"
        lines += [f"{group} = typer.Typer()", f"app.add_typer({group}, name={name!r})"]
        for inner in sub:
            lines += _bare_command(group, inner, f"c_{name}_{inner}")
    lines += ["app()"]
    path = folder / "bare_app.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def _bare_command(parent: str, name: str, function: str) -> list[str]:
    function = function.replace("-", "_")
    return [
        f"@{parent}.command({name!r})",
        f"def {function}(json: bool = False) -> None:",
        f"    '''Command {name}.'''",
    ]


def loaded_heavy(args: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    """The heavy libraries a real ``sfcrm`` process imports (``python -X importtime``)."""
    import subprocess

    result = subprocess.run(
        [PY, "-X", "importtime", "-m", "sfcrm", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    modules = {
        line.rpartition("|")[2].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return sorted(modules & set(HEAVY))


def bench_startup(bench: Bench) -> list[Result]:
    env = clean_env(str(bench.work / "startup.db"))
    bare = bare_typer_app(bench.work)
    results: list[Result] = []
    for args in (["--help"], ["mpesa", "--help"]):
        figure = bench.figure(f"sfcrm {' '.join(args)}, whole process", "-", "bare Typer app",
                              "s", "<= 1.2x")  # fmt: skip
        results.append(bench.time_pair(figure, bench.timed([PY, str(bare), *args], env), args, env))
        heavy = loaded_heavy(args, env, bench.work)
        results.append(
            Check(
                f"sfcrm {' '.join(args)}: SQLAlchemy not imported",
                "-",
                not heavy,
                "none loaded" if not heavy else "loaded " + ", ".join(heavy),
            )
        )
    return results


# -- 2. reads on a small database --------------------------------------------------------------

READS = (["mpesa", "status", "--json"], ["people", "list", "--json"], ["crew", "list", "--json"])

SELECT = "import typer, sqlmodel + engine + select"
ONE_SELECT = """
import sys, typer, sqlmodel
from sqlalchemy import column, create_engine, select, table
engine = create_engine(sys.argv[1])
with engine.connect() as conn:
    conn.execute(
        select(column("id"), column("status"), column("amount"))
        .select_from(table("mpesa_payment")).order_by(column("id").desc()).limit(50)
    ).all()
"""


def sqlalchemy_url(target: Target) -> str:
    return f"sqlite:///{target.url}" if target.engine == SQLITE else target.url


def small_database(bench: Bench, engine: str) -> Target:
    from sfcrm.models import CrewStatus

    target = bench.engines.fresh(engine, "small")
    data.crew(target, people=20, events=2, per_event=10, status=CrewStatus.INVITED)
    data.pending_payments(target, 50, person=21)
    return target


def bench_read(bench: Bench, engine: str) -> list[Result]:
    target = small_database(bench, engine)
    env = clean_env(target.url)
    script = bench.work / "one_select.py"
    script.write_text(ONE_SELECT)
    baseline = bench.timed([PY, str(script), sqlalchemy_url(target)], env)
    figures = [
        bench.figure(f"sfcrm {' '.join(args)}, small database", engine, SELECT, "s", "<= 1.25x")
        for args in READS
    ]
    results = [
        bench.time_pair(figure, baseline, args, env)
        for figure, args in zip(figures, READS, strict=True)
    ]
    bench.engines.drop(target)
    return results


# -- 3. listener throughput --------------------------------------------------------------------

CALLBACKS = 2000
CLIENTS = 20
PAYERS = 200  # a burst settles many people's payments, not one person's 2,000
# worker threads of serve-callback, and of the baseline's waitress: SQLite takes one writer
# at a time; PostgreSQL takes writers at once
THREADS = {SQLITE: 1, POSTGRES: 4}
CALLBACK_PATH = "/cb/bench-secret-path-0123456789"


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
                            {"Name": "PhoneNumber", "Value": int(data.PHONE)},
                        ]
                    },
                }
            }
        }
    ).encode()


# The baseline: the same server with the same threads, an app that parses the JSON and stores
# the raw body, one connection per thread.
MINIMAL_APP = textwrap.dedent("""
    import json, sys, threading
    from waitress import serve
    url, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    local = threading.local()
    if url.startswith("postgresql"):
        import psycopg
        def connect():
            c = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
            c.execute("CREATE TABLE IF NOT EXISTS inbox (id serial PRIMARY KEY, body bytea)")
            return c
        INSERT = "INSERT INTO inbox (body) VALUES (%s)"
    else:
        import sqlite3
        def connect():
            c = sqlite3.connect(url, timeout=60, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY, body BLOB)")
            return c
        INSERT = "INSERT INTO inbox (body) VALUES (?)"
    connect().close()
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        json.loads(body)
        if not hasattr(local, "c"):
            local.c = connect()
        local.c.execute(INSERT, (body,))
        out = b'{"ResultCode": 0, "ResultDesc": "Accepted"}'
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(out)))])
        return [out]
    serve(app, host="127.0.0.1", port=port, threads=threads, _quiet=True)
""")


def listener_env(target: Target, port: int) -> dict[str, str]:
    return clean_env(
        target.url,
        MPESA_CALLBACK_URL=f"http://127.0.0.1:{port}{CALLBACK_PATH}",
        SFCRM_LISTENER_THREADS=str(THREADS[target.engine]),
    )


def serve_sfcrm(bench: Bench, target: Target, port: int) -> Any:
    return serving(
        [*SFCRM, "serve-callback", "--port", str(port)],
        listener_env(target, port),
        bench.work,
        port,
    )


def minimal_app(bench: Bench) -> Path:
    app = bench.work / "minimal_app.py"
    app.write_text(MINIMAL_APP)
    return app


def bench_listener(bench: Bench, engine: str) -> list[Result]:
    from sfcrm.models import MpesaPayment, PaymentStatus

    threads = f"{THREADS[engine]} thread{'s' if THREADS[engine] > 1 else ''}"
    figure = bench.figure(
        f"listener: {CALLBACKS:,} success callbacks of {PAYERS} people, {CLIENTS} clients, "
        f"{threads}",
        engine,
        "waitress, same threads: parse + insert",
        "req/s",
        ">= 0.35x",
    )
    app = minimal_app(bench)
    bodies = [callback_body(i) for i in data.checkout_ids(CALLBACKS)]
    for _ in range(bench.rounds):
        inbox = bench.engines.fresh(engine, "minimal", schema=False)
        port = free_port()
        cmd = [PY, str(app), inbox.url, str(port), str(THREADS[engine])]
        with serving(cmd, clean_env(inbox.url), bench.work, port):
            figure.baselines.append(blast(f"http://127.0.0.1:{port}/cb", bodies, CLIENTS))
        bench.engines.drop(inbox)
        target = bench.engines.fresh(engine, "listener")
        data.pending_payments(target, CALLBACKS, people=PAYERS)
        port = free_port()
        with serve_sfcrm(bench, target, port) as served:
            try:
                rate = blast(f"http://127.0.0.1:{port}{CALLBACK_PATH}", bodies, CLIENTS)
            except Failed as exc:
                raise Failed(f"{exc} (the listener: {served.tail()})") from None
        bench.peaks.record(engine, "sfcrm serve-callback", served.peak_kib)
        done = data.count(target, MpesaPayment, status=PaymentStatus.COMPLETED)
        if done != CALLBACKS:
            raise Failed(f"the listener completed {done} of {CALLBACKS} payments")
        figure.values.append(rate)
        bench.engines.drop(target)
    return [figure]


# -- 4. invitations ----------------------------------------------------------------------------

INVITES = 1000

SMTPLIB = """
import json, smtplib, sys
rows = json.loads(open(sys.argv[1], "rb").read())
with smtplib.SMTP("127.0.0.1", int(sys.argv[2]), timeout=15) as smtp:
    for recipient, mime in rows:
        smtp.sendmail("office@soundfusion.invalid", [recipient], mime.encode("latin-1"))
"""


class Sink:
    """An SMTP server's handler that counts what it is given."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 OK"


def bench_invitations(bench: Bench, engine: str) -> list[Result]:
    from aiosmtpd.controller import Controller

    from sfcrm.models import CrewStatus

    figure = bench.figure(
        f"sfcrm crew invite: {INVITES:,} invitations over SMTP, whole process",
        engine,
        "smtplib, one connection",
        "s",
        "<= 2.5x",
    )
    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    script = bench.work / "smtplib_send.py"
    script.write_text(SMTPLIB)
    messages = bench.work / "messages.json"
    try:
        for _ in range(bench.rounds):
            target = bench.engines.fresh(engine, "invite")
            data.crew(
                target, people=INVITES, events=1, per_event=INVITES, status=CrewStatus.INVITED
            )
            env = clean_env(
                target.url, EMAIL_BACKEND="smtp", EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(port)
            )
            before = sink.count
            figure.values.append(bench.sfcrm(engine, ["crew", "invite", "--event", "1"], env))
            if sink.count - before != INVITES:
                raise Failed(f"the SMTP server got {sink.count - before} of {INVITES} invitations")
            # the baseline sends the very messages sfcrm logged, over one connection
            write_messages(target, messages)
            figure.baselines.append(
                run_process([PY, str(script), str(messages), str(port)], env, bench.work)[0]
            )
            bench.engines.drop(target)
    finally:
        controller.stop()
    return [figure]


def write_messages(target: Target, path: Path) -> None:
    """The emails sfcrm logged, exactly as it sent them, for the baseline to send again."""
    from sqlalchemy import select
    from sqlmodel import col

    from sfcrm.models import EmailNotification as Mail

    rows = data.query(target, select(col(Mail.recipient), col(Mail.mime)).order_by(col(Mail.id)))
    path.write_text(json.dumps([[r, bytes(m).decode("latin-1")] for r, m in rows]))


# -- 5. growth ---------------------------------------------------------------------------------


def growth_commands(event_id: int) -> dict[str, list[str]]:
    """The README's three growth commands."""
    return {
        "mpesa status --status pending": ["mpesa", "status", "--status", "pending", "--json"],
        "crew remind --dry-run": ["crew", "remind", "--dry-run", "--json"],
        "crew list --event ID": ["crew", "list", "--event", str(event_id), "--json"],
    }


def bench_growth(bench: Bench, engine: str) -> list[Result]:
    empty = bench.engines.fresh(engine, "empty")
    data.one_event(empty)
    large = bench.engines.fresh(engine, "large")
    say(f"  filling the large database ({data.PAYMENTS:,} payments)...")
    started = time.perf_counter()
    event_id = data.large(large)
    say(f"  filled in {time.perf_counter() - started:.1f} s")
    size = f"{data.PAYMENTS:,} payments / {data.EVENTS * data.PER_EVENT:,} assignments"
    commands = list(
        zip(growth_commands(event_id).items(), growth_commands(1).values(), strict=True)
    )
    figures = [
        bench.figure(f"sfcrm {label}, {size}", engine, "empty database", "s", "<= 1.5x")
        for (label, _), _ in commands
    ]
    big_env, small_env = clean_env(large.url), clean_env(empty.url)
    results = [
        bench.time_pair(figure, partial(bench.sfcrm, engine, small, small_env), big, big_env)
        for figure, ((_, big), small) in zip(figures, commands, strict=True)
    ]
    bench.engines.drop(large)
    bench.engines.drop(empty)
    return results


# -- 6. people import --------------------------------------------------------------------------

IMPORT_ROWS = 100_000
IMPORT_CALLBACKS = 30_000  # pending payments whose callbacks arrive during the import

# the baseline: the same rows straight into the table, with no checks, no ids and no ledger
PLAIN_IMPORT = textwrap.dedent("""
    import csv, sys
    from datetime import datetime
    url, source = sys.argv[1], sys.argv[2]
    if url.startswith("postgresql"):
        import psycopg
        conn = psycopg.connect(url.replace("+psycopg", ""))
        mark, now = "%s", datetime(2026, 1, 1)
    else:
        import sqlite3
        conn = sqlite3.connect(url, timeout=60, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        mark, now = "?", "2026-01-01 00:00:00.000000"
    with open(source, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        conn.cursor().executemany(
            "INSERT INTO person (name, phone, email, balance_cents, created_at) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark})",
            [(n, p, e or None, int(b or 0) * 100, now) for n, p, e, b in rows],
        )
    conn.commit()
""")


def people_csv(path: Path, rows: int) -> None:
    """A crew list as an office exports it: every other row with an email, most with a balance."""
    with path.open("w") as out:
        out.write("name,phone,email,balance\n")
        for i in range(rows):
            email = f"crew{i}@example.co.ke" if i % 2 == 0 else ""
            balance = f"{(i % 50) * 100}" if i % 3 else ""
            out.write(f"Crew Member {i},07{i:08d},{email},{balance}\n")


def import_beside_listener(
    bench: Bench, engine: str, cmd: list[str], target: Target
) -> tuple[float, list[float]]:
    """Run an import into ``target`` while ``serve-callback`` takes Daraja's callbacks for it,
    one after another: the import's wall time and each callback's answer time."""
    from sfcrm.models import Person

    data.pending_payments(target, IMPORT_CALLBACKS)
    bodies = [callback_body(i) for i in data.checkout_ids(IMPORT_CALLBACKS)]
    port = free_port()
    env = listener_env(target, port)
    finished = threading.Event()
    with serve_sfcrm(bench, target, port) as served, ThreadPoolExecutor(1) as pool:
        posting = pool.submit(
            post_until, f"http://127.0.0.1:{port}{CALLBACK_PATH}", bodies, finished.is_set
        )
        try:
            if cmd[: len(SFCRM)] == SFCRM:
                elapsed = bench.sfcrm(engine, cmd[len(SFCRM) :], env)
            else:
                elapsed = run_process(cmd, env, bench.work)[0]
        finally:
            finished.set()
        try:
            waits = posting.result()
        except Failed as exc:
            raise Failed(f"{exc} (the listener: {served.tail()})") from None
    bench.peaks.record(engine, "sfcrm serve-callback", served.peak_kib)
    if len(waits) == len(bodies):
        raise Failed("the import outlasted the callbacks: raise IMPORT_CALLBACKS")
    added = data.count(target, Person) - 1
    if added != IMPORT_ROWS:
        raise Failed(f"`{label_of(cmd)}` added {added} of {IMPORT_ROWS} people")
    return elapsed, waits


def bench_import(bench: Bench, engine: str) -> list[Result]:
    rows = f"{IMPORT_ROWS:,} rows"
    figure = bench.figure(
        f"sfcrm people import: {rows} beside the listener, whole process",
        engine,
        "csv + executemany, no checks",
        "s",
        "<= 8x",
    )
    source = bench.work / "people.csv"
    people_csv(source, IMPORT_ROWS)
    script = bench.work / "plain_import.py"
    script.write_text(PLAIN_IMPORT)
    waits: list[float] = []
    plain_waits: list[float] = []
    for _ in range(bench.rounds):
        target = bench.engines.fresh(engine, "plain")
        elapsed, answered = import_beside_listener(
            bench, engine, [PY, str(script), target.url, str(source)], target
        )
        figure.baselines.append(elapsed)
        plain_waits.extend(answered)
        bench.engines.drop(target)
        target = bench.engines.fresh(engine, "import")
        elapsed, answered = import_beside_listener(
            bench, engine, [*SFCRM, "people", "import", str(source)], target
        )
        figure.values.append(elapsed)
        waits.extend(answered)
        bench.engines.drop(target)
    say(
        f"  callbacks answered during sfcrm's imports: {len(waits)}, median "
        f"{statistics.median(waits) * 1000:.0f} ms; during the plain inserts: slowest "
        f"{max(plain_waits):.2f} s"
    )
    return [
        figure,
        Bound(f"sfcrm people import of {rows}: slowest run", engine, max(figure.values), "s", 15),
        Bound("callbacks answered during the import: slowest", engine, max(waits), "s", 2),
    ]


# -- the report --------------------------------------------------------------------------------

STEPS: dict[str, Callable[..., list[Result]]] = {
    "startup": bench_startup,
    "read": bench_read,
    "listener": bench_listener,
    "invitations": bench_invitations,
    "growth": bench_growth,
    "import": bench_import,
}
PER_ENGINE = ("read", "listener", "invitations", "growth", "import")
MEMORY_LIMIT_MB = 150
REASON_WIDTH = 160


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine(engines: Engines) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": _os_name(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": engines.server_version() or "not given",
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


def _os_name() -> str:
    try:
        release = Path("/etc/os-release").read_text()
    except OSError:
        return platform.platform(terse=True)
    names = [line.partition("=")[2].strip('"') for line in release.splitlines()
             if line.startswith("PRETTY_NAME=")]  # fmt: skip
    return f"{names[0] if names else platform.system()}, kernel {platform.release()}"


def table(results: Sequence[Result]) -> str:
    """The results as a text table; a figure that could not be measured says why on its row."""
    header = ["figure", "engine", "value", "baseline", "ratio", "goal", "met"]
    rows = [[r.name, r.engine, *r.cells(), "yes" if r.met else "NO"]
            for r in results if not isinstance(r, Missing)]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    widths[0] = max([widths[0], *(len(r.name) for r in results)])
    widths[1] = max([widths[1], *(len(r.engine) for r in results)])

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    for r in results:
        if isinstance(r, Missing):
            out.append(line([r.name, r.engine, r.cells()[0]]))
        else:
            out.append(line([r.name, r.engine, *r.cells(), "yes" if r.met else "NO"]))
    return "\n".join(out)


def memory(bench: Bench, engine: str) -> Result:
    worst = bench.peaks.worst(engine)
    assert worst is not None
    label, kib = worst
    return Bound(
        f"peak memory of any sfcrm process (the largest: {label})",
        engine,
        kib / 1024,
        "MB",
        MEMORY_LIMIT_MB,
    )


def run_step(
    bench: Bench, name: str, step: Callable[[], list[Result]], engine: str
) -> list[Result]:
    """A step's figures; when it fails, a line for each of its figures saying what failed (and
    the baseline, if measured): a failure ends only that step."""
    say(f"- {name}{'' if engine == '-' else f' ({engine})'}...")
    started = time.perf_counter()
    bench.begun.clear()
    try:
        results = step()
    except Exception as exc:  # every other step still runs
        reason = why(exc)
        say(f"  FAILED: {reason}")
        return [missing(f, exc) for f in bench.begun] or [Missing(name, engine, reason)]
    for result in results:
        say(f"  {result.name}: {' | '.join(c for c in result.cells() if c)}"
            f" {'ok' if result.met else 'MISSED'}")  # fmt: skip
    say(f"  ({time.perf_counter() - started:.0f} s)")
    return results


def why(exc: Exception) -> str:
    """An exception in one line, short enough for the table."""
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    return reason if len(reason) <= REASON_WIDTH else reason[: REASON_WIDTH - 1] + "…"


def missing(figure: Figure, exc: Exception) -> Missing:
    """A figure whose sfcrm side failed, with its baseline if that was measured."""
    reason = why(exc)
    if figure.baselines:
        reason += f" (baseline: {_number(figure.baseline)} {figure.unit}, {figure.against})"
    return Missing(figure.name, figure.engine, reason)


def compile_sfcrm() -> None:
    """sfcrm's modules compiled to bytecode now, as ``pip install`` leaves them: an editable
    install under PYTHONDONTWRITEBYTECODE would otherwise compile them again in every process
    measured, while every baseline library has its bytecode."""
    import compileall

    import sfcrm

    compileall.compile_dir(Path(sfcrm.__file__).parent, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median); default 7")
    parser.add_argument(
        "--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=os.environ.get("SFCRM_BENCH_DATABASE_URL"),
        help="a PostgreSQL server on this machine to measure too "
        "(postgresql+psycopg://user@127.0.0.1:5432/postgres; default $SFCRM_BENCH_DATABASE_URL)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as one JSON document"
    )
    args = parser.parse_args()
    wanted = [name for name in args.only.split(",") if name]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown or args.runs < 1:
        parser.error(f"unknown figure {unknown[0]}" if unknown else "--runs must be at least 1")
    if args.postgres and (why := data.check_postgres_url(args.postgres)):
        parser.error(f"--postgres: {why}")
    compile_sfcrm()
    work = Path(tempfile.mkdtemp(prefix="sfcrm-bench-"))
    engines = Engines(work, args.postgres)
    try:
        about = machine(engines)
    except Exception as exc:  # the server named does not answer
        shutil.rmtree(work, ignore_errors=True)
        parser.error(f"--postgres: {str(exc).strip().splitlines()[0]}")
    bench = Bench(work, engines, args.runs)
    results: list[Result] = []
    try:
        say("sfcrm benchmark on " + "; ".join(f"{k} {v}" for k, v in about.items()))
        for name, step in STEPS.items():
            if name not in wanted:
                continue
            if name not in PER_ENGINE:
                results += run_step(bench, name, partial(step, bench), "-")
                continue
            for engine in (SQLITE, POSTGRES):
                if engine not in engines.available:
                    results.append(
                        Missing(name, engine, "no PostgreSQL server given (--postgres)", True)
                    )
                    continue
                results += run_step(bench, name, partial(step, bench, engine), engine)
        for engine in ("-", *engines.available):
            if bench.peaks.worst(engine):
                results.append(memory(bench, engine))
        about["load after"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    finally:
        engines.close()
        shutil.rmtree(work, ignore_errors=True)
    missed = [r for r in results if not r.met and not (isinstance(r, Missing) and r.skipped)]
    if args.json:
        print(json.dumps({
            "machine": about,
            "runs": args.runs,
            "figures": [{"figure": r.name, "engine": r.engine, "met": r.met, **r.as_json()}
                        for r in results],
            "peak_mb": {f"{engine}: {label}": round(kib / 1024, 1)
                        for (engine, label), kib in sorted(bench.peaks.kib.items())},
        }, indent=2))  # fmt: skip
    else:
        print("Machine: " + "; ".join(f"{k} {v}" for k, v in about.items()))
        print(table(results))
        measured = [r for r in results if not (isinstance(r, Missing) and r.skipped)]
        print(f"{len(measured) - len(missed)} of {len(measured)} figures met their goal.")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
