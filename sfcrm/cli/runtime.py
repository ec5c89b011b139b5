"""What every command shares: the error boundary, lazy services, and output."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sfcrm.errors import ExitCode, SfcrmError
from sfcrm.services import utcnow

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from rich.console import Console

    from sfcrm.audit import History
    from sfcrm.config import Settings
    from sfcrm.crew import Crew
    from sfcrm.crewmail import CrewMail
    from sfcrm.db import Database
    from sfcrm.events import Events
    from sfcrm.logs import Redactor
    from sfcrm.mail import Mailer
    from sfcrm.payments import Payments
    from sfcrm.people import People
    from sfcrm.render import Renderer
    from sfcrm.services import Services
    from sfcrm.staffing import Staffing

JsonOption = Annotated[
    bool, typer.Option("--json", help="print one JSON document on stdout instead of text")
]
CsvOption = Annotated[
    bool,
    typer.Option(
        "--csv", help="print the rows as CSV on stdout (one header row), for a spreadsheet"
    ),
]

# The bounds every whole-number option and argument declares (``min=``/``max=``), so a value
# SQLite cannot hold, or one that means nothing, is a usage error (exit 2) naming the option.
# SQLite's INTEGER is a signed 64-bit number: no id, count or offset can be larger.
MAX_INT = 2**63 - 1
WRAP_MIN = 12  # a table's wrapping column (a name, a purpose) is never narrower than this
MAX_PORT = 65535


def id_argument(help: str) -> Any:
    """A record id typed on the command line: 1 up to the largest SQLite integer."""
    return typer.Argument(help=help, min=1, max=MAX_INT, show_default=False)


def id_option(name: str, help: str) -> Any:
    return typer.Option(name, help=help, min=1, max=MAX_INT)


def port_option(help: str = "port to listen on (1-65535)") -> Any:
    return typer.Option("--port", help=help, min=1, max=MAX_PORT)


def _listen_host(value: str) -> str:
    from sfcrm.config import valid_host

    if not valid_host(value.strip().removeprefix("[").removesuffix("]")):
        raise typer.BadParameter(f"not an address or host name: {clean_text(value)!r}")
    return value.strip().removeprefix("[").removesuffix("]")


def host_option(help: str = "address to bind") -> Any:
    return typer.Option("--host", help=help, callback=_listen_host)


def usage_error(ctx: typer.Context, message: str) -> Exception:
    """A usage error (exit 2, as Typer's own) for options that go together or not at all."""
    # (Typer exports BadParameter but not its base, UsageError)
    usage = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    error: Exception = usage(message, ctx)
    return error


@dataclass
class RootOptions:
    config: Path | None = None
    traceback: bool = False


# Set by the root callback for the command about to run (one command per process or
# CliRunner invocation).
current_options = RootOptions()


def set_root_options(options: RootOptions) -> None:
    global current_options
    current_options = options


# Terminal control sequences (CSI, OSC, DCS and the other ESC forms, 7- and 8-bit), then any
# C0/C1 control left: text from a callback or a typed name must not move the cursor, recolour
# or retitle the terminal of whoever reads it.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI ... final byte
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)"  # strings up to ST
    r"|\x1b[ -/]*[0-~]?",  # the other escapes, and a lone ESC
    re.DOTALL,
)
_BREAKS = re.compile(r"\r\n|[\n\r\v\f\x85\u2028\u2029]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(value: object, *, lines: bool = False) -> str:
    """``value`` as text safe to show on a terminal: escape sequences and control characters
    removed, line breaks made spaces (with ``lines``: plain newlines, and tabs kept)."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    text = _BREAKS.sub("\n" if lines else " ", _ESCAPES.sub("", text))
    return _CONTROLS.sub("", text if lines else text.replace("\t", " "))


class StdoutError(Exception):
    """Standard output could not be written (a closed pipe, a full disk): the command's
    result did not reach its reader. Raised by :class:`_Stdout`, handled in :func:`command`."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.errno = error.errno


class _Stdout:
    """``sys.stdout`` (looked up at each write: tests swap it) for the output console and the
    JSON writer; a failed write raises StdoutError, which no other error can be taken for."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except OSError as exc:
            raise StdoutError(exc) from None

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except OSError as exc:
            raise StdoutError(exc) from None

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


def _service(name: str) -> Any:
    """A property reading the service ``name`` of the runtime's services."""
    return property(lambda rt: getattr(rt.services, name))


class Runtime:
    """Built per command; settings, database and services load on first use, inside the
    error boundary, so a bad config is reported like any other error."""

    def __init__(self, options: RootOptions, json_output: bool, csv_output: bool = False) -> None:
        self.options = options
        self.json = json_output
        self.csv = csv_output
        self.clock: Callable[[], datetime] = utcnow
        self._redactor: Redactor | None = None
        self._pending: Any = None  # the --json document, printed when the command ends
        self._wrote = False  # a --json document is on stdout already (a server's start-up)
        self._clean_ups: list[Callable[[], None]] = []

    @cached_property
    def settings(self) -> Settings:
        from sfcrm.config import load_settings
        from sfcrm.logs import Redactor, configure_logging

        settings = load_settings(self.options.config)
        self._redactor = Redactor(settings.secret_values())
        for warning in settings.warnings:  # on stderr, under --json too
            self.err.print(f"Warning: {clean_text(warning)}", markup=False)
        try:
            configure_logging(settings.log_file, self._redactor, tz=settings.timezone)
        except OSError as exc:
            from sfcrm.errors import ConfigError

            raise ConfigError(
                f"SFCRM_LOG_FILE cannot be opened for writing: {exc.strerror or exc}",
                value=str(settings.log_file),
                hint="point SFCRM_LOG_FILE at a file in a folder that exists and sfcrm may write",
            ) from None
        return settings

    @cached_property
    def services(self) -> Services:
        """Everything the command runs, built from the settings by sfcrm's composition root."""
        from sfcrm.services import Services

        return Services(self.settings, clock=self.clock, notify=self.warn)

    # The services, where commands (and tests) have always found them.
    db: Database = _service("db")
    tz: ZoneInfo = _service("tz")
    people: People = _service("people")
    payments: Payments = _service("payments")
    events: Events = _service("events")
    staffing: Staffing = _service("staffing")
    renderer: Renderer = _service("renderer")
    mailer: Mailer = _service("mailer")
    crew: Crew = _service("crew")
    crew_mail: CrewMail = _service("crew_mail")
    history: History = _service("history")

    @contextmanager
    def progress(self, label: str) -> Iterator[Callable[[int, int], None] | None]:
        """A progress bar on a terminal; nothing for cron logs or --json."""
        if self.json or not sys.stderr.isatty():
            yield None
            return
        from rich.progress import Progress

        with Progress(console=self.err, transient=True) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update

    # -- output ----------------------------------------------------------------------------

    @cached_property
    def out(self) -> Console:
        from rich.console import Console

        stdout = _Stdout()
        # Into a pipe or a file nothing is cut: tables take the width their cells need.
        width = None if stdout.isatty() else 100_000
        return Console(file=stdout, highlight=False, soft_wrap=True, width=width)  # type: ignore[arg-type]

    @cached_property
    def err(self) -> Console:
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True)

    def redact(self, text: str) -> str:
        return self._redactor(text) if self._redactor else text

    def redact_error(self, text: str) -> str:
        """``redact`` for an error's text, which may come before the settings were read: read
        them now, when they can be, so that the secrets they hold are known."""
        if self._redactor is None and "settings" not in self.__dict__:
            with suppress(Exception):
                _ = self.settings
        return self.redact(text)

    def emit(
        self,
        doc: Any,
        render: Callable[[], None],
        *,
        now: bool = False,
        csv: Sequence[str] | None = None,
        csv_rows: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        """Data: JSON on stdout under --json, CSV under --csv, else whatever ``render`` prints.

        Under --json the document is printed when the command ends, so an error raised after
        it (a batch with failures) joins the same document: stdout holds exactly one. ``now``
        prints at once, for servers that announce themselves and keep running.

        ``csv`` names the fields of each row (keys of the JSON rows: the JSON's ISO times and
        plain decimals); the rows are ``doc`` itself (a list) unless ``csv_rows`` gives them.
        """
        if self.csv and csv is not None:
            write_csv(csv, doc if csv_rows is None else csv_rows)
        elif not self.json:
            render()
        elif now:
            self._write(doc)
        else:
            self._pending = doc

    def _write(self, doc: Any) -> None:
        self._wrote = True
        out = _Stdout()
        out.write(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
        out.flush()

    def flush(self) -> None:
        if self._pending is not None:
            doc, self._pending = self._pending, None
            self._write(doc)

    def say(self, text: str) -> None:
        """A message for the person at the terminal (stderr, never under --json)."""
        if not self.json:
            self.err.print(clean_text(self.redact(text), lines=True), markup=False)

    def warn(self, text: str) -> None:
        """A warning or note the person must not miss (a guessable callback path, a number
        that may not be Safaricom's, a push waiting on a busy database): stderr, under --json
        too, where it leaves the document on stdout alone."""
        self.err.print(clean_text(self.redact(text), lines=True), markup=False)

    def summary(self, text: str) -> None:
        """A batch command's last line (what cron mails or logs), stamped with the time in
        SFCRM_TIMEZONE: ``2026-12-01T09:00:00+03:00 Reminders: 3 sent, 0 failed.``"""
        from sfcrm.times import iso_in

        self.print(f"{iso_in(self.clock(), self.tz)} {text}")

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[object]],
        *,
        wrap: Collection[str] = (),
        empty: str,
    ) -> None:
        """Print ``rows`` as a table, or ``empty`` ("No people found.") when there are none.

        The ``wrap`` columns (names, purposes, subjects, locations, details, errors) wrap on a
        narrow terminal; every other column (ids, phones, amounts, statuses, receipts, times)
        keeps its full width and is never cut. Into a pipe or a file nothing wraps (see
        ``out``).
        """
        from rich.table import Table

        cells = [[clean_text(value) for value in row] for row in rows]
        if not cells:
            self.print(empty)
            return
        table = Table()
        needed = 1  # the left border; each column adds its padding and a border
        for i, header in enumerate(columns):
            widest = max(cell_len(header), *(cell_len(row[i]) for row in cells))
            if header in wrap:  # at least its header, and a few words a line
                least = min(widest, max(cell_len(header), WRAP_MIN))
                table.add_column(header, overflow="fold", min_width=least)
            else:
                least = widest
                table.add_column(header, no_wrap=True, min_width=least)
            needed += least + 3
        if needed > self.out.width:  # too narrow even so: wider than the terminal, not cut
            table.width = needed
        for row in cells:
            table.add_row(*map(text_cell, row))
        self.out.print(table)

    def print(self, text: str) -> None:
        """A line of plain text output on stdout (control sequences removed)."""
        self.out.print(clean_text(text, lines=True), markup=False)

    def on_close(self, clean_up: Callable[[], None]) -> None:
        """Run ``clean_up`` when the command ends, however it ends."""
        self._clean_ups.append(clean_up)

    def close(self) -> None:
        for clean_up in reversed(self._clean_ups):
            clean_up()
        self._clean_ups.clear()
        if "services" in self.__dict__:
            self.services.close()

    # -- errors ----------------------------------------------------------------------------

    def fail(self, error: SfcrmError) -> typer.Exit:
        message = self.redact_error(str(error))
        hint = self.redact(error.hint) if error.hint else None
        if self.json:
            value = self.redact(str(error.value)) if error.value is not None else None
            doc = error_document(message, error.code, hint=hint, value=value)
            pending, self._pending = self._pending, None
            if isinstance(pending, dict):
                doc = {**pending, **doc}
            elif pending is not None:
                doc["data"] = pending
            self._write(doc)
        else:
            self.err.print(f"Error: {clean_text(message)}", markup=False, style="red")
            if hint:
                self.err.print(f"Hint: {clean_text(hint)}", markup=False)
        return typer.Exit(int(error.exit_code))

    def output_failed(self, error: StdoutError) -> typer.Exit:
        """stdout is gone: a closed pipe (``| head``) ends quietly as SIGPIPE would, with
        141; anything else (a full disk) is one line on stderr and exit 74."""
        self._pending = None
        # Point the descriptor at /dev/null so that Python's own flush at exit neither fails
        # again nor prints "Exception ignored" (there is no descriptor under CliRunner).
        with suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)
        if error.errno == errno.EPIPE:
            return typer.Exit(int(ExitCode.BROKEN_PIPE))
        with suppress(OSError):
            self.err.print(
                f"Error: cannot write to standard output: {error}", markup=False, style="red"
            )
        return typer.Exit(int(ExitCode.OUTPUT))


# The keys of every JSON error, whatever raised it, in this order; ``hint`` and ``value`` are
# null when the error has none. A batch that failed adds them to its own document.
ERROR_KEYS = ("error", "status", "code", "hint", "value")


def error_document(
    message: str, code: str, *, hint: str | None = None, value: str | None = None
) -> dict[str, Any]:
    """The JSON of an error under --json: ``message`` is the line text mode prints after
    ``Error:`` (the value in brackets included), ``value`` the offending value alone."""
    return {"error": message, "status": "failed", "code": code, "hint": hint, "value": value}


def json_requested(args: Sequence[str]) -> bool:
    """Whether the command line asks for --json, wherever it stands (for an error raised
    before Typer has parsed the options); nothing after ``--`` is an option."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def write_error_document(doc: dict[str, Any]) -> None:
    """An error's JSON on stdout, outside a command's boundary (a usage error); a stdout that
    is gone is let go: the error's line is on stderr."""
    with suppress(OSError):
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def _current_context() -> Any:
    """The Typer context of the command running (for a usage error that names it)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # (a Typer that moved it: the error then names no command)
        return None
    return get_current_context(silent=True)


@contextmanager
def command(json_output: bool = False, csv_output: bool = False) -> Iterator[Runtime]:
    """The one error boundary: SfcrmError becomes a line and its exit code."""
    if json_output and csv_output:
        raise usage_error(_current_context(), "--csv and --json cannot be given together")
    options = current_options
    rt = Runtime(options, json_output, csv_output)
    try:
        try:
            yield rt
        except (typer.Exit, typer.Abort, StdoutError):
            raise
        except SfcrmError as exc:
            raise rt.fail(exc) from None
        except KeyboardInterrupt as exc:
            # (a push cut short says which payment may be on a phone, and what not to do)
            message = getattr(exc, "message", None) or "Interrupted."
            if not rt.json or rt._wrote:  # (a server stopped: its one document is out)
                rt.say(message)
                raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
            interrupted = SfcrmError(message)
            interrupted.exit_code = ExitCode.INTERRUPTED
            interrupted.code = "INTERRUPTED"
            raise rt.fail(interrupted) from None
        except Exception as exc:
            if options.traceback or os.environ.get("SFCRM_TRACEBACK") == "1":
                # The whole traceback, as Python prints it, but through the redactor: an
                # exception's text can carry a request it was given (a header, a push body).
                import traceback

                sys.stderr.write(rt.redact_error("".join(traceback.format_exception(exc))))
                sys.stderr.flush()
                raise typer.Exit(int(ExitCode.INTERNAL)) from None
            error = SfcrmError(
                f"unexpected {type(exc).__name__}: {exc}",
                hint="rerun with --traceback and report it",
            )
            error.exit_code = ExitCode.INTERNAL
            error.code = "INTERNAL_ERROR"
            raise rt.fail(error) from None
        finally:
            rt.flush()
    except StdoutError as exc:
        raise rt.output_failed(exc) from None
    finally:
        rt.close()


def text_cell(value: object) -> Any:
    """A table cell showing user data literally: no rich markup, no terminal control
    sequences, one line."""
    from rich.text import Text

    return Text(clean_text(value))


def started(service: str, url: str, **details: object) -> dict[str, object]:
    """What a server (``serve-callback``, the emulator) prints under --json once it listens:
    one shape for each."""
    return {"service": service, "listening": url, "pid": os.getpid(), "details": details}


def cell_len(text: str) -> int:
    """The columns ``text`` takes on a terminal (wide characters take two)."""
    from rich.cells import cell_len as length

    return length(text)


# A cell a spreadsheet would run as a formula (=, +, -, @, or a tab or return first) unless it
# is a plain number: it is written with a leading apostrophe, which spreadsheets show as text.
_FORMULA = re.compile(r"[=+\-@\t\r]")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def csv_value(value: object) -> str:
    """One CSV cell: text as JSON gives it (ISO times, plain decimals), ``true``/``false``, an
    empty cell for null, nested data as JSON; no terminal control sequences."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False, default=str)
    text = clean_text(value, lines=True)
    if _FORMULA.match(text) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def write_csv(fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """The rows as CSV on stdout: one header row, then each row's ``fields``."""
    import csv

    out = _Stdout()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow([csv_value(row.get(field)) for field in fields])
    out.flush()
