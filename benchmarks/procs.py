"""Running things to measure them: whole processes (wall time and peak memory), servers on
127.0.0.1, and bursts of HTTP requests from many clients."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

PY = sys.executable
SFCRM = [PY, "-m", "sfcrm"]
TIMED = Path(__file__).with_name("timed.py")
TIMEOUT = 300.0  # no command of the benchmark takes a tenth of this


class Failed(Exception):
    """A command or server of a figure did not do what the figure needs."""


@dataclass
class Peaks:
    """The largest resident memory of every sfcrm process, by engine and command."""

    kib: dict[tuple[str, str], int] = field(default_factory=dict)

    def record(self, engine: str, label: str, kib: int) -> None:
        key = (engine, label)
        self.kib[key] = max(self.kib.get(key, 0), kib)

    def worst(self, engine: str) -> tuple[str, int] | None:
        mine = [(label, kib) for (e, label), kib in self.kib.items() if e == engine]
        return max(mine, key=lambda item: item[1]) if mine else None


def clean_env(database_url: str, **extra: str) -> dict[str, str]:
    """This process's environment without any sfcrm setting, pointed at one database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFCRM_", "MPESA_", "EMAIL_"))}
    env["SFCRM_DATABASE_URL"] = database_url
    env.update(extra)
    return env


def label_of(cmd: list[str]) -> str:
    """A command as the report names it: ``sfcrm people import people.csv``."""
    if cmd[: len(SFCRM)] == SFCRM:
        cmd = ["sfcrm", *cmd[len(SFCRM) :]]
    return " ".join(Path(c).name if c.startswith("/") else c for c in cmd)


def timed(cmd: list[str], result: Path) -> list[str]:
    """``cmd`` started by the small process that measures it (see timed.py)."""
    return [PY, "-S", str(TIMED), str(result), "--", *cmd]


@dataclass(frozen=True)
class Usage:
    seconds: float
    kib: int  # peak resident memory
    code: int


def usage_in(result: Path) -> Usage | None:
    try:
        return Usage(**json.loads(result.read_text()))
    except (OSError, ValueError):
        return None


def run_process(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """Wall time in seconds and peak memory in KiB of one whole process, which must succeed."""
    with (
        tempfile.TemporaryDirectory(dir=cwd) as folder,
        (Path(folder) / "out").open("w+b") as out,
        (Path(folder) / "err").open("w+b") as err,
    ):
        result = Path(folder) / "usage.json"
        proc = subprocess.Popen(
            timed(cmd, result), env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True
        )
        killer = threading.Timer(TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
        killer.start()
        try:
            proc.wait()
        except BaseException:  # Ctrl-C: the command is in a session of its own
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            killer.cancel()
        usage = usage_in(result)
        if usage is None or usage.code != 0:
            out.seek(0)
            err.seek(0)
            why = complaint(err.read()) or complaint(out.read()) or "no output"
            code = "was killed" if usage is None else f"exited {usage.code}"
            raise Failed(f"`{label_of(cmd)}` {code}: {why}")
    return usage.seconds, usage.kib


def complaint(output: bytes) -> str:
    """What a failed process said, in one line: sfcrm's ``--json`` error, its ``Error:`` line,
    or the end of its last line (a logged traceback's exception)."""
    text = output.decode(errors="replace").strip()
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])
    lines = text.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    if errors:
        return errors[-1].removeprefix("Error: ")
    last = lines[-1].split(" | ") if lines else []
    return next((part.strip() for part in reversed(last) if part.strip()), "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"the server exited {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise Failed(f"nothing listening on port {port} after {timeout:.0f} s")


@dataclass
class Served:
    """A server process while it runs; ``peak_kib`` once it has stopped."""

    proc: subprocess.Popen[bytes]
    log: Path
    peak_kib: int = 0

    def tail(self) -> str:
        return complaint(self.log.read_bytes()) or "no output"


@contextmanager
def serving(cmd: list[str], env: dict[str, str], cwd: Path, port: int) -> Iterator[Served]:
    """A server started, waited for on ``port``, and stopped (SIGTERM) after the block."""
    with tempfile.TemporaryDirectory(dir=cwd) as folder:
        log, result = Path(folder) / "server.log", Path(folder) / "usage.json"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                timed(cmd, result), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        served = Served(proc, log)
        try:
            try:
                wait_port(port, proc)
            except Failed as exc:
                raise Failed(f"{exc}: {served.tail()}") from None
            yield served
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            usage = usage_in(result)
            served.peak_kib = usage.kib if usage else 0


def blast(url: str, bodies: list[bytes], clients: int) -> float:
    """Post every body with ``clients`` concurrent keep-alive clients; requests per second."""
    parts = urlsplit(url)
    chunks = [bodies[i::clients] for i in range(clients)]
    failures: list[str] = []

    def client(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        try:
            for body in chunk:
                conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"HTTP {response.status}")
        except OSError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, chunks))
    elapsed = time.perf_counter() - started
    if failures:
        raise Failed(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return len(bodies) / elapsed


def post_until(url: str, bodies: list[bytes], done: Callable[[], bool]) -> list[float]:
    """Post one body after another until ``done()``; each one's answer time in seconds."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    waits: list[float] = []
    try:
        for body in bodies:
            if done():
                break
            started = time.perf_counter()
            conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            waits.append(time.perf_counter() - started)
            if response.status != 200:
                raise Failed(f"the listener answered HTTP {response.status}")
    finally:
        conn.close()
    return waits


@contextmanager
def alongside(work: Callable[[], list[float]]) -> Iterator[Callable[[], list[float]]]:
    """``work`` on a thread while the block runs; the block's result getter joins it."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(work)
        yield future.result
