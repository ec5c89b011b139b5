"""The README's examples, run in order, as written, on one fresh office.

Every fenced ``sh``/``bash``/``console`` block of README.md is read top to bottom, and each of
its ``sfcrm …`` lines (``$ sfcrm …`` too, ``\\``-continued lines joined) is run through the real
CLI, in-process, in one office folder that starts empty, so ``sfcrm init`` must come first. Each
must exit 0, or the code its comment names: ``sfcrm doctor   # … (exit 1 until all pass)``, and
on PostgreSQL, when it differs, ``(on PostgreSQL: exit 3, …)``.
What the README's lines do besides is honoured too: ``> FILE`` writes the output to FILE,
``export NAME=VALUE`` sets the environment of the commands after it, ``NAME=VALUE sfcrm …`` that
of one server, and a block right after ``<!-- file: NAME -->`` is a file the office has (the
CSV that ``people import`` reads), written to NAME before the story starts. Other lines
(``pip``, ``mkdir``, ``cp``, ``python -c``, ``sudo``) are for the reader and not run.

Long-running commands (``serve-callback``, ``mpesa emulator``) are started in the background as
processes of their own; once they listen, the story goes on. The ports the README names (8000,
8900) are swapped for free ones, the same one each time a port is named, since other programs on
the machine may hold them; a server started on a port another README server holds replaces it.
Each is stopped by Ctrl-C, which must end it with 130.

Not run: blocks of another kind (``text`` shows output, ``cron``, ``ini``, ``nginx``), crontab
lines wherever they appear, and a block right after ``<!-- not run: WHY -->`` (explicit and
rare: the test prints which ones and why, and names the commands no example runs).

The office, as its staff would fill in ``.env`` after ``cp .env.example .env``: Daraja is the
built-in emulator over real HTTP, callbacks come back to a ``serve-callback`` process the office
runs from the moment it exists (as a service would), mail goes to the file backend's
``outbox/``. After a command that pushes, the story waits, as staff would, until no payment is
pending any more. The README's dates are static text: when an example event is no longer ahead
the test fails saying so. The story runs on SQLite, and again on a new, empty PostgreSQL
database when ``SFCRM_TEST_DATABASE_URL`` names a server.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

import pytest
from support import daraja_env, free_port, run, wait_for

from sfcrm.emulator import DarajaEmulator

README = Path(__file__).resolve().parent.parent / "README.md"

RUN_KINDS = {"sh", "bash", "console", "shell"}
LONG_RUNNING = (("serve-callback",), ("mpesa", "emulator"))
PUSHING = (("mpesa", "request"), ("mpesa", "resend"))
README_PORTS = (8000, 8900)
# Commands no example can run on a fresh office, each in a block marked <!-- not run: … -->
# (or, for demo, after `pip install . &&`: it makes an office of its own and is tested as such).
NOT_RUN_COMMANDS = {"demo", "db copy", "mpesa resolve", "mpesa refund-done", "crew checkin"}

CRONTAB = re.compile(r"^(@\w+|([-\d*/,]+\s+){5})\S")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
EXPECTED_EXIT = re.compile(r"\s#.*\(exit (\d+)")
EXPECTED_EXIT_ON_POSTGRESQL = re.compile(r"\s#.*\(on PostgreSQL: exit (\d+)")
SHELL_OPERATORS = ("|", "||", "&&", ";", "<", ">>", "&", "2>&1")


# -- reading the README ---------------------------------------------------------------------


@dataclass
class Block:
    line: int  # README line of the opening fence
    kind: str  # sh, text, cron, …
    lines: list[tuple[int, str]]  # (README line, text), continued lines joined
    not_run: str | None = None  # the reason a <!-- not run: … --> before it gives
    file: str | None = None  # the name a <!-- file: … --> before it gives


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the marker comment just before each."""
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
        start: int | None = None
        joined = ""
        while i < len(lines) and lines[i].strip() != "```":
            raw = lines[i].rstrip()
            start = i + 1 if start is None else start
            joined = f"{joined} {raw.strip()}" if joined else raw
            if raw.endswith("\\"):
                joined = joined[:-1].rstrip()
            else:
                block.lines.append((start, joined))
                start, joined = None, ""
            i += 1
        if start is not None:
            block.lines.append((start, joined))
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
    expected_on_postgresql: int | None = None  # when it differs

    def expected_on(self, engine: str) -> int:
        differs = self.expected_on_postgresql
        return differs if engine == "postgresql" and differs is not None else self.expected

    def is_(self, *words: str) -> bool:
        return tuple(self.argv[: len(words)]) == words

    @property
    def long_running(self) -> bool:
        return any(self.is_(*words) for words in LONG_RUNNING)

    @property
    def where(self) -> str:
        return f"README line {self.line}: sfcrm {shlex.join(self.argv)}"


def parse_line(line: int, text: str) -> Command | dict[str, str] | None:
    """A README line as the test runs it: a command, the variables an ``export`` sets, or
    None for a line that is not sfcrm's (a comment, ``pip``, ``cp``, a crontab entry)."""
    stripped = text.strip().removeprefix("$ ")
    if not stripped or stripped.startswith("#") or CRONTAB.match(stripped):
        return None
    words = shlex.split(stripped, comments=True)
    if words[:1] == ["export"]:
        return dict(word.split("=", 1) for word in words[1:])
    env: dict[str, str] = {}
    while words and ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if words[:1] != ["sfcrm"]:
        return None
    argv = words[1:]
    stdout_to = None
    if ">" in argv:
        at = argv.index(">")
        assert at == len(argv) - 2, f"README line {line}: only `> FILE` at the end is run"
        argv, stdout_to = argv[:at], argv[at + 1]
    for operator in SHELL_OPERATORS:
        assert operator not in argv, (
            f"README line {line}: `{operator}` is not run by this test; keep an example to one "
            "command, or mark its block <!-- not run: why -->"
        )
    expected = EXPECTED_EXIT.search(stripped)
    on_postgresql = EXPECTED_EXIT_ON_POSTGRESQL.search(stripped)
    return Command(
        line=line,
        text=stripped,
        argv=argv,
        env=env,
        stdout_to=stdout_to,
        expected=int(expected.group(1)) if expected else 0,
        expected_on_postgresql=int(on_postgresql.group(1)) if on_postgresql else None,
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
$ sfcrm doctor        # what is missing (exit 1 until all pass)
$ sfcrm people list --csv > people.csv
sfcrm backup copy.db   # the SQLite file (on PostgreSQL: exit 3, use pg_dump)
export MPESA_BASE_URL=http://127.0.0.1:8900 MPESA_CONSUMER_KEY=x
SFCRM_LISTENER_THREADS=4 sfcrm serve-callback --port 8000
*/5 * * * *  cd /srv/sfcrm && sfcrm mpesa reconcile
pip install . && sfcrm demo
```
"""
    skipped, shown = readme_blocks(text)
    assert skipped.not_run == "needs a phone" and skipped.lines == [(4, "sfcrm crew remove 12")]
    assert shown.kind == "console" and shown.not_run is None
    add, doctor, csv, backup, export, serve, cron, pip = (parse_line(n, t) for n, t in shown.lines)
    assert isinstance(add, Command) and add.line == 8 and add.expected == 0
    assert add.argv == [
        "events", "add", "--name", "Gala", "--date", "2027-03-12", "--location", "KICC, Nairobi"
    ]  # fmt: skip
    assert isinstance(doctor, Command) and doctor.argv == ["doctor"] and doctor.expected == 1
    assert isinstance(csv, Command) and csv.argv == ["people", "list", "--csv"]
    assert csv.stdout_to == "people.csv" and csv.expected_on("postgresql") == 0
    assert isinstance(backup, Command) and backup.expected_on("sqlite") == 0
    assert backup.expected_on("postgresql") == 3
    assert export == {"MPESA_BASE_URL": "http://127.0.0.1:8900", "MPESA_CONSUMER_KEY": "x"}
    assert isinstance(serve, Command) and serve.long_running
    assert serve.env == {"SFCRM_LISTENER_THREADS": "4"}
    assert cron is None and pip is None


def test_a_pipe_in_an_example_is_refused_by_name() -> None:
    with pytest.raises(AssertionError, match=r"README line 3: `\|` is not run"):
        parse_line(3, "sfcrm mpesa status --json | jq .")


# -- the office the story runs in ------------------------------------------------------------


class Ports:
    """The README's ports, each swapped for a free one (the same one every time)."""

    def __init__(self) -> None:
        self.free = {named: free_port() for named in README_PORTS}

    def in_url(self, text: str) -> str:
        for named, free in self.free.items():
            text = re.sub(rf":{named}(?!\d)", f":{free}", text)
        return text

    def in_argv(self, argv: list[str]) -> list[str]:
        return [
            str(self.free.get(int(word), word)) if before == "--port" and word.isdigit() else word
            for before, word in zip(["", *argv], argv, strict=False)
        ]


def test_only_the_readme_ports_are_swapped() -> None:
    ports = Ports()
    swapped = ports.in_argv(["doctor", "--port", "8000", "--amount", "8000"])
    assert swapped == ["doctor", "--port", str(ports.free[8000]), "--amount", "8000"]
    url = ports.in_url("http://127.0.0.1:8900 http://127.0.0.1:8000/cb/x http://h:80001/")
    assert url.split() == [
        f"http://127.0.0.1:{ports.free[8900]}",
        f"http://127.0.0.1:{ports.free[8000]}/cb/x",
        "http://h:80001/",
    ]


@dataclass
class Server:
    """A long-running sfcrm in the background; its output goes to a file."""

    where: str
    port: int
    process: subprocess.Popen[str]
    output: IO[str]

    @classmethod
    def start(cls, where: str, argv: list[str], env: dict[str, str], log: Path) -> Server:
        port = int(argv[argv.index("--port") + 1])
        output = log.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "sfcrm", *argv],
            env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        server = cls(where, port, process, output)

        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"{where}: exited {process.returncode} instead of serving:\n" + log.read_text()
                )
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        try:
            wait_for(listening, timeout=30)
        except BaseException:
            server.kill()
            raise
        return server

    def stop(self) -> None:
        """Ctrl-C, as staff stop it: the README says it exits 130."""
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.where}: still running 15 s after Ctrl-C") from None
        self.output.close()
        log = Path(self.output.name).read_text()
        assert code == 130, f"{self.where}: Ctrl-C ended it with {code}, not 130:\n{log}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.output.close()


def check_dates_ahead(command: Command, today: date) -> None:
    """An example event must still be ahead: the README's dates are static text."""
    if "--past" in command.argv or "--date" not in command.argv:
        return
    written = command.argv[command.argv.index("--date") + 1]
    assert date.fromisoformat(written) > today, (
        f"README line {command.line}: the example date {written} is no longer in the future; "
        "move the README's example dates ahead"
    )


def test_an_example_date_gone_by_fails_saying_so() -> None:
    gala = parse_line(9, 'sfcrm events add --name Gala --date 2027-03-12 --location "KICC"')
    agm = parse_line(10, "sfcrm events add --name AGM --date 2025-11-20 --location O --past")
    assert isinstance(gala, Command) and isinstance(agm, Command)
    check_dates_ahead(gala, date(2027, 3, 11))
    check_dates_ahead(agm, date(2027, 3, 11))
    with pytest.raises(AssertionError, match="README line 9: the example date 2027-03-12 is no"):
        check_dates_ahead(gala, date(2027, 3, 12))


def wait_for_pushes(where: str) -> None:
    """A push's callback comes a moment later: the office waits for it, as staff would."""

    def settled() -> bool:
        result = run("mpesa", "status", "--status", "pending", "--json")
        assert result.exit_code == 0, f"{where}: {result.output}{result.stderr}"
        return json.loads(result.stdout) == []

    wait_for(settled, timeout=20, interval=0.1)


def cli_commands() -> set[str]:
    import typer.main

    from sfcrm.cli import app

    found: set[str] = set()

    def walk(command: Any, prefix: list[str]) -> None:
        subcommands = getattr(command, "commands", None)
        if not subcommands:
            found.add(" ".join(prefix))
        for name, sub in (subcommands or {}).items():
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return found


@dataclass
class Office:
    folder: Path
    engine: str
    listener_port: int  # where the office's own listener takes Daraja's callbacks


@pytest.fixture
def office(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    emulator: DarajaEmulator,
    engine_name: str,
    request: pytest.FixtureRequest,
) -> Iterator[Office]:
    """An empty office folder, the current directory, with the settings its staff would put in
    .env: Daraja is the emulator, and callbacks go to the listener the office will run. On
    PostgreSQL its database is a new, empty one on the tests' server (``init`` makes the
    tables); on SQLite, the ``sfcrm.db`` that ``init`` makes beside ``sfcrm.toml``."""
    folder = tmp_path / "office"
    folder.mkdir()
    monkeypatch.chdir(folder)
    port = free_port()
    callback_url = f"http://127.0.0.1:{port}/cb/readme-examples-secret-path"
    for name, value in daraja_env(emulator.url, callback_url, timeout=10).items():
        monkeypatch.setenv(name, value)
    if engine_name == "sqlite":
        yield Office(folder, engine_name, port)
        return
    server = request.getfixturevalue("postgres_server")
    url = server.new_empty_database()
    monkeypatch.setenv("SFCRM_DATABASE_URL", url)
    yield Office(folder, engine_name, port)
    server.drop(url)


class Story:
    """The README's examples, played in order in one office."""

    def __init__(self, office: Office, monkeypatch: pytest.MonkeyPatch) -> None:
        self.office = office
        self.monkeypatch = monkeypatch
        self.ports = Ports()
        self.today = date.today()
        self.servers: list[Server] = []
        self.ran: list[Command] = []
        self.not_run: list[str] = []

    def play(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.file is not None:
                (self.office.folder / block.file).write_text(
                    "".join(text + "\n" for _, text in block.lines)
                )
        try:
            for block in blocks:
                if block.kind in RUN_KINDS and block.file is None:
                    self.block(block)
            while self.servers:
                self.servers.pop().stop()
        finally:
            for server in self.servers:
                server.kill()

    def block(self, block: Block) -> None:
        items = [parse_line(n, text) for n, text in block.lines]
        if not any(isinstance(item, Command) for item in items):
            return
        if block.not_run is not None:
            self.not_run.append(f"README line {block.line}: {block.not_run}")
            return
        for item in items:
            if isinstance(item, dict):
                for name, value in item.items():
                    self.monkeypatch.setenv(name, self.ports.in_url(value))
            elif isinstance(item, Command):
                assert self.ran or item.is_("init"), f"{item.where}: runs before `sfcrm init`"
                check_dates_ahead(item, self.today)
                if item.long_running:
                    self.serve(item)
                else:
                    self.command(item)
                self.ran.append(item)

    def command(self, item: Command) -> None:
        assert not item.env, f"{item.where}: NAME=VALUE is run only before a server"
        argv = self.ports.in_argv(item.argv)
        result = run(*argv)
        print(f"$ sfcrm {shlex.join(argv)}\n{result.stdout}{result.stderr}")
        expected = item.expected_on(self.office.engine)
        assert result.exit_code == expected, (
            f"{item.where}: exit {result.exit_code}, the README expects {expected} "
            f"on {self.office.engine}:\n{result.stdout}{result.stderr}"
        )
        if item.stdout_to is not None:
            (self.office.folder / item.stdout_to).write_text(result.stdout)
        if item.is_("init") and not self.ran:
            # the office's own listener, running as a service from now on
            port = str(self.office.listener_port)
            self.start("the office's listener", ["serve-callback", "--port", port], {})
        if any(item.is_(*words) for words in PUSHING):
            wait_for_pushes(item.where)

    def serve(self, item: Command) -> None:
        argv = self.ports.in_argv(item.argv)
        assert "--port" in argv, f"{item.where}: name the port it listens on"
        port = int(argv[argv.index("--port") + 1])
        for replaced in [s for s in self.servers if s.port == port]:
            replaced.stop()
            self.servers.remove(replaced)
        self.start(item.where, argv, {k: self.ports.in_url(v) for k, v in item.env.items()})

    def start(self, where: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.office.folder.parent / f"server-{len(self.servers) + len(self.ran)}.log"
        self.servers.append(Server.start(where, argv, {**os.environ, **env}, log))


@pytest.mark.slow
def test_the_readme_examples_run_in_order_on_a_fresh_office(
    office: Office, monkeypatch: pytest.MonkeyPatch, record_property: Any
) -> None:
    story = Story(office, monkeypatch)
    story.play(readme_blocks(README.read_text()))

    every_command = cli_commands()
    never_run = {c for c in every_command if not any(i.is_(*c.split()) for i in story.ran)}
    print(f"\n{len(story.ran)} README examples run; {len(story.not_run)} blocks not run:")
    print("".join(f"  {reason}\n" for reason in story.not_run), end="")
    print(f"commands no example runs: {', '.join(sorted(never_run))}")
    record_property("readme_blocks_not_run", story.not_run)
    assert story.ran, "no README example was run"
    assert never_run == NOT_RUN_COMMANDS, (
        "every command needs an example the README's story runs; not run now: "
        f"{sorted(never_run)}, expected only {sorted(NOT_RUN_COMMANDS)}"
    )
