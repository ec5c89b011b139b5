"""The README's examples, run in order, as written, on one fresh office.

Every fenced ``sh``/``bash``/``console`` block of README.md is read top to bottom, and each of
its ``sfcrm …`` lines (``$ sfcrm …`` in a console block, ``\\``-continued lines joined) is run
through the real CLI, in-process, in one office folder that starts empty: ``sfcrm init`` comes
first because the README starts so. Each must exit 0, or the code its comment names:
``sfcrm doctor   # … (exit 1 until every check passes)``. What the README's lines do besides is
honoured too: ``> FILE`` writes the output to FILE, ``export NAME=VALUE`` sets the environment of
the commands after it, ``NAME=VALUE sfcrm …`` that of one command, and a block right after
``<!-- file: NAME -->`` is a file the office has (the CSV that ``people import`` reads): it is
written to NAME before the story starts. Other lines (``pip``, ``cp``, ``python -c``, ``sudo``)
are for the reader and not run.

Long-running commands (``serve-callback``, ``mpesa emulator``) are started in the background as
processes of their own; once they listen, the story goes on. The ports the README names (8000,
8900) are swapped for free ones, the same one each time a port is named, since other programs
on the machine may hold them; a server started on a port another README server holds replaces
it. Each server is stopped at the end by Ctrl-C, which must exit it with 130.

Not run: blocks of another kind (``text`` shows output, ``cron``, ``ini``, ``nginx``), crontab
lines wherever they appear, and a block right after ``<!-- not run: WHY -->`` (explicit and
rare: the test prints which ones and why).

The office, as its staff would fill in ``.env``: Daraja is the built-in emulator, over real
HTTP, and callbacks come back to a ``serve-callback`` process the office runs from the moment it
exists (as a service would); mail goes to the file backend's ``outbox/``. After a command that
pushes, the story waits, as the office would, until no payment is pending any more.

The README's event dates are static text: when one is no longer in the future the test fails
saying so (move the examples' dates ahead).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest
from support import daraja_env, free_port, run, wait_for

from sfcrm.emulator import DarajaEmulator, EmulatorSettings

README = Path(__file__).resolve().parent.parent / "README.md"

RUN_KINDS = {"sh", "bash", "console", "shell"}
LONG_RUNNING = (("serve-callback",), ("mpesa", "emulator"))
README_PORTS = (8000, 8900)
CRONTAB = re.compile(r"^\s*(@\w+|([-\d*/,]+\s+){5})\S")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
EXPECTED_EXIT = re.compile(r"#.*\(exit (\d+)")
PUSHES = (("mpesa", "request"), ("mpesa", "resend"))


@dataclass
class Block:
    line: int  # README line of the opening fence
    kind: str
    lines: list[tuple[int, str]]  # (README line, text), continuations joined
    not_run: str | None = None  # the reason given by <!-- not run: … -->
    file: str | None = None  # <!-- file: NAME -->


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    marker: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        fence = re.fullmatch(r"```\s*([\w-]*).*", stripped)
        if fence is None:
            if stripped:
                marker = stripped if stripped.startswith("<!--") else None
            i += 1
            continue
        block = Block(line=i + 1, kind=fence.group(1).lower(), lines=[])
        if marker is not None:
            if found := re.fullmatch(r"<!--\s*not run:\s*(.*?)\s*-->", marker):
                block.not_run = found.group(1)
            elif found := re.fullmatch(r"<!--\s*file:\s*(\S+)\s*-->", marker):
                block.file = found.group(1)
        marker = None
        i += 1
        pending: tuple[int, str] | None = None
        while i < len(lines) and lines[i].strip() != "```":
            raw = lines[i]
            if pending is not None:
                pending = (pending[0], pending[1] + " " + raw.strip())
            else:
                pending = (i + 1, raw)
            if not raw.rstrip().endswith("\\"):
                block.lines.append(pending)
                pending = None
            else:
                pending = (pending[0], pending[1].rstrip()[:-1].rstrip())
            i += 1
        if pending is not None:
            block.lines.append(pending)
        blocks.append(block)
        i += 1
    return blocks


@dataclass
class Command:
    line: int
    text: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdout_to: str | None = None
    expected: int = 0

    @property
    def long_running(self) -> bool:
        return any(tuple(self.argv[: len(words)]) == words for words in LONG_RUNNING)

    def is_(self, *words: str) -> bool:
        return tuple(self.argv[: len(words)]) == words


def parse_line(line: int, text: str) -> Command | dict[str, str] | None:
    """A README line as the test runs it: a command, the variables an ``export`` sets, or
    None for a line that is not sfcrm's (a comment, ``pip``, ``cp``, a crontab entry)."""
    stripped = text.strip()
    if stripped.startswith("$ "):
        stripped = stripped[2:]
    if not stripped or stripped.startswith("#") or CRONTAB.match(stripped):
        return None
    words = shlex.split(stripped, comments=True)
    if words and words[0] == "export":
        return dict(word.split("=", 1) for word in words[1:])
    env: dict[str, str] = {}
    while words and ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words or words[0] != "sfcrm":
        return None
    argv = words[1:]
    stdout_to = None
    if ">" in argv:
        at = argv.index(">")
        assert at == len(argv) - 2, f"README line {line}: only `> FILE` at the end is run"
        stdout_to = argv[at + 1]
        argv = argv[:at]
    for operator in ("|", "&&", ";", "<", ">>", "&"):
        assert operator not in argv, (
            f"README line {line}: `{operator}` is not run by this test; keep examples to one "
            "command, or mark the block <!-- not run: why -->"
        )
    expected = EXPECTED_EXIT.search(stripped)
    return Command(
        line=line,
        text=stripped,
        argv=argv,
        env=env,
        stdout_to=stdout_to,
        expected=int(expected.group(1)) if expected else 0,
    )


def test_readme_lines_are_read_as_a_shell_would() -> None:
    text = """
<!-- not run: needs a phone -->
```sh
sfcrm crew remove 12
```

```console
$ sfcrm events add --name "Gala" --date 2027-03-12 \\
    --location "KICC, Nairobi"   # a comment
$ sfcrm doctor        # what is missing (exit 1 until every check passes)
$ sfcrm people list --csv > people.csv
export MPESA_BASE_URL=http://127.0.0.1:8900 MPESA_CONSUMER_KEY=x
SFCRM_LISTENER_THREADS=4 sfcrm serve-callback --port 8000
*/5 * * * *  cd /srv/sfcrm && sfcrm mpesa reconcile
pip install . && sfcrm demo
```
"""
    skipped, shown = readme_blocks(text)
    assert skipped.not_run == "needs a phone"
    parsed = [parse_line(n, t) for n, t in shown.lines]
    add, doctor, csv, export, serve, cron, pip = parsed
    assert isinstance(add, Command) and add.argv[-2:] == ["--location", "KICC, Nairobi"]
    assert add.line == 8 and add.expected == 0
    assert isinstance(doctor, Command) and doctor.expected == 1
    assert isinstance(csv, Command) and csv.stdout_to == "people.csv"
    assert csv.argv == ["people", "list", "--csv"]
    assert export == {"MPESA_BASE_URL": "http://127.0.0.1:8900", "MPESA_CONSUMER_KEY": "x"}
    assert isinstance(serve, Command) and serve.long_running
    assert serve.env == {"SFCRM_LISTENER_THREADS": "4"}
    assert cron is None and pip is None


# -- the office the story runs in -------------------------------------------------------------


class Ports:
    """The README's ports, each swapped for a free one (the same one every time)."""

    def __init__(self) -> None:
        self.map = {port: free_port() for port in README_PORTS}

    def swap(self, text: str) -> str:
        for named, free in self.map.items():
            text = re.sub(rf"(?<![\d.]){named}(?!\d)", str(free), text)
        return text


@dataclass
class Server:
    command: Command
    port: int
    process: subprocess.Popen[str]


def accepting(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_server(
    argv: list[str], port: int, env: dict[str, str], where: str
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", *argv],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip

    def up() -> bool:
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"{where}: exited {process.returncode} instead of serving: {err}")
        return accepting(port)

    wait_for(up, timeout=20)
    return process


def stop_server(process: subprocess.Popen[str], where: str) -> None:
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"{where}: still running 15 s after Ctrl-C") from None
    assert process.returncode == 130, f"{where}: Ctrl-C exited {process.returncode}: {err}"


@pytest.fixture
def readme_emulator() -> Iterator[DarajaEmulator]:
    with DarajaEmulator(EmulatorSettings(callback_delay=0.05, prompt_seconds=1.0)) as running:
        yield running


def check_dates_ahead(command: Command) -> None:
    """An example event must still be ahead: the README's dates are static text."""
    if "--past" in command.argv or "--date" not in command.argv:
        return
    written = command.argv[command.argv.index("--date") + 1]
    assert date.fromisoformat(written) > date.today(), (
        f"README line {command.line}: the example date {written} is no longer in the future; "
        "move the README's example dates ahead (and the ids and dates that follow from them)"
    )


def wait_for_pushes(where: str) -> None:
    """A push's callback comes a moment later: the office waits for it, as staff would."""

    def settled() -> bool:
        result = run("mpesa", "status", "--status", "pending", "--json")
        assert result.exit_code == 0, f"{where}: {result.output}{result.stderr}"
        return json.loads(result.stdout) == []

    wait_for(settled, timeout=20, interval=0.1)


def test_the_readme_examples_run_in_order_on_a_fresh_office(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readme_emulator: DarajaEmulator
) -> None:
    office = tmp_path / "office"
    office.mkdir()
    monkeypatch.chdir(office)
    ports = Ports()
    office_port = free_port()
    callback_url = f"http://127.0.0.1:{office_port}/cb/readme-examples-path-secret"
    for name, value in daraja_env(readme_emulator.url, callback_url, timeout=10).items():
        monkeypatch.setenv(name, value)

    servers: list[Server] = []
    office_listener: subprocess.Popen[str] | None = None
    ran: list[str] = []
    skipped: list[str] = []
    initialised = False
    blocks = readme_blocks(README.read_text())
    for block in blocks:
        if block.file is not None:
            (office / block.file).write_text("\n".join(t for _, t in block.lines) + "\n")
    try:
        for block in blocks:
            if block.file is not None:
                continue
            if block.kind not in RUN_KINDS:
                continue
            parsed = [(n, parse_line(n, t)) for n, t in block.lines]
            if not any(isinstance(p, Command) for _, p in parsed):
                continue
            if block.not_run is not None:
                skipped.append(f"README line {block.line}: {block.not_run}")
                continue
            for line, item in parsed:
                if isinstance(item, dict):
                    for name, value in item.items():
                        monkeypatch.setenv(name, ports.swap(value))
                    continue
                if item is None:
                    continue
                where = f"README line {line}: sfcrm {' '.join(item.argv)}"
                argv = [ports.swap(word) for word in item.argv]
                check_dates_ahead(item)
                if item.long_running:
                    port = next(
                        free for named, free in ports.map.items()
                        if f"--port {free}" in " ".join(argv)
                    )  # fmt: skip
                    for server in [s for s in servers if s.port == port]:
                        stop_server(server.process, f"README line {server.command.line}")
                        servers.remove(server)
                    env = {**os.environ, **{k: ports.swap(v) for k, v in item.env.items()}}
                    servers.append(Server(item, port, start_server(argv, port, env, where)))
                    ran.append(where)
                    continue
                assert not item.env, f"{where}: NAME=VALUE is run only before a server"
                started = time.monotonic()
                result = run(*argv)
                took = time.monotonic() - started
                print(f"$ sfcrm {shlex.join(argv)}  [{took:.2f} s]\n{result.stdout}{result.stderr}")
                assert result.exit_code == item.expected, (
                    f"{where}: exit {result.exit_code}, the README expects {item.expected}\n"
                    f"{result.stdout}{result.stderr}"
                )
                if item.stdout_to is not None:
                    (office / item.stdout_to).write_text(result.stdout)
                ran.append(where)
                if item.is_("init") and not initialised:
                    initialised = True
                    office_listener = start_server(
                        ["serve-callback", "--port", str(office_port)],
                        office_port, dict(os.environ), "the office's listener",
                    )  # fmt: skip
                if any(item.is_(*words) for words in PUSHES):
                    wait_for_pushes(where)
        assert initialised, "the README's examples never run `sfcrm init`"
        for server in reversed(servers):
            stop_server(server.process, f"README line {server.command.line}")
        servers.clear()
    finally:
        for server in servers:
            server.process.kill()
            server.process.communicate()
        if office_listener is not None:
            office_listener.send_signal(signal.SIGINT)
            office_listener.communicate(timeout=15)
    print(f"\n{len(ran)} README examples run; {len(skipped)} blocks not run:")
    for reason in skipped:
        print("  " + reason)
    assert len(ran) > 50
