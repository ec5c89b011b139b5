"""What every command shares: the error boundary, lazy services, and output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sfcrm.errors import ExitCode, SfcrmError

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from rich.console import Console

    from sfcrm.config import Settings
    from sfcrm.crew import Crew
    from sfcrm.crewmail import CrewMail, Org
    from sfcrm.db import Database
    from sfcrm.events import Events
    from sfcrm.logs import Redactor
    from sfcrm.mail import Mailer
    from sfcrm.payments import Payments
    from sfcrm.people import People
    from sfcrm.render import Renderer

JsonOption = Annotated[
    bool, typer.Option("--json", help="print one JSON document on stdout instead of text")
]


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


def utcnow() -> datetime:
    return datetime.now(UTC)


class Runtime:
    """Built per command; settings, database and services load on first use, inside the
    error boundary, so a bad config is reported like any other error."""

    def __init__(self, options: RootOptions, json_output: bool) -> None:
        self.options = options
        self.json = json_output
        self.clock: Callable[[], datetime] = utcnow
        self._redactor: Redactor | None = None
        self._pending: Any = None  # the --json document, printed when the command ends

    @cached_property
    def settings(self) -> Settings:
        from sfcrm.config import load_settings
        from sfcrm.logs import Redactor, configure_logging

        settings = load_settings(self.options.config)
        self._redactor = Redactor(settings.secret_values())
        configure_logging(settings.log_file, self._redactor)
        return settings

    @cached_property
    def db(self) -> Database:
        from sfcrm.db import Database

        return Database(self.settings.database_path)

    @cached_property
    def tz(self) -> ZoneInfo:
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.settings.timezone)

    @cached_property
    def people(self) -> People:
        from sfcrm.people import People

        return People(self.db, self.clock)

    @cached_property
    def payments(self) -> Payments:
        from sfcrm.payments import Payments, build_daraja_client

        return Payments(
            self.db,
            callback_url=self.settings.mpesa_callback_url,
            clock=self.clock,
            client_factory=lambda: build_daraja_client(self.settings, self.db, self.clock),
            confirm_by_query=self.settings.mpesa_confirm_by_query,
        )

    @cached_property
    def events(self) -> Events:
        from sfcrm.events import Events

        return Events(self.db, self.clock, self.tz)

    @cached_property
    def renderer(self) -> Renderer:
        from sfcrm.render import Renderer

        return Renderer(self.settings.templates_dir)

    @cached_property
    def mailer(self) -> Mailer:
        from sfcrm.mail import Mailer, backend_from_settings

        return Mailer(
            self.db,
            lambda: backend_from_settings(self.settings),
            sender=self.settings.default_from_email,
            clock=self.clock,
        )

    @cached_property
    def org(self) -> Org:
        from sfcrm.crewmail import Org

        settings = self.settings
        return Org(settings.org_name, settings.org_phone, settings.org_email)

    @cached_property
    def crew(self) -> Crew:
        from sfcrm.crew import Crew

        return Crew(self.db, clock=self.clock, tz=self.tz, org=self.org)

    @cached_property
    def crew_mail(self) -> CrewMail:
        """Invitations, reminders and briefings; loads no ORM (cron runs these often)."""
        from sfcrm.crewmail import CrewMail

        return CrewMail(
            self.db,
            clock=self.clock,
            mailer=lambda: self.mailer,
            renderer=lambda: self.renderer,
            org=self.org,
            rsvp=self.rsvp_link,
        )

    def rsvp_link(self, assignment_id: int, bound_to: str, expires: datetime) -> str | None:
        """The personal confirm/decline link, when SFCRM_PUBLIC_URL and the key are set."""
        from sfcrm.rsvp import make_token, rsvp_url

        public, key = self.settings.public_url, self.settings.secret_key
        if not public or not key:
            return None
        return rsvp_url(public, make_token(key, assignment_id, bound_to, expires, self.clock()))

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

        return Console(highlight=False, soft_wrap=True)

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

    def emit(self, doc: Any, render: Callable[[], None], *, now: bool = False) -> None:
        """Data: JSON on stdout under --json, else whatever ``render`` prints.

        Under --json the document is printed when the command ends, so an error raised after
        it (a batch with failures) joins the same document: stdout holds exactly one. ``now``
        prints at once, for servers that announce themselves and keep running.
        """
        if not self.json:
            render()
        elif now:
            self._write(doc)
        else:
            self._pending = doc

    def _write(self, doc: Any) -> None:
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()

    def flush(self) -> None:
        if self._pending is not None:
            doc, self._pending = self._pending, None
            self._write(doc)

    def say(self, text: str) -> None:
        """A message for the person at the terminal (stderr, never under --json)."""
        if not self.json:
            self.err.print(self.redact(text), markup=False)

    def print(self, text: str) -> None:
        """A line of plain text output on stdout."""
        self.out.print(text, markup=False)

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.close()

    # -- errors ----------------------------------------------------------------------------

    def fail(self, error: SfcrmError) -> typer.Exit:
        message = self.redact_error(str(error))
        hint = self.redact(error.hint) if error.hint else None
        if self.json:
            doc: dict[str, Any] = {"error": message, "status": "failed", "code": error.code}
            if hint:
                doc["hint"] = hint
            pending, self._pending = self._pending, None
            if isinstance(pending, dict):
                doc = {**pending, **doc}
            elif pending is not None:
                doc["data"] = pending
            self._write(doc)
        else:
            self.err.print(f"Error: {message}", markup=False, style="red")
            if hint:
                self.err.print(f"Hint: {hint}", markup=False)
        return typer.Exit(int(error.exit_code))


@contextmanager
def command(json_output: bool = False) -> Iterator[Runtime]:
    """The one error boundary: SfcrmError becomes a line and its exit code."""
    options = current_options
    rt = Runtime(options, json_output)
    try:
        yield rt
    except (typer.Exit, typer.Abort):
        raise
    except SfcrmError as exc:
        raise rt.fail(exc) from None
    except KeyboardInterrupt:
        rt.say("Interrupted.")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
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
        rt.close()


def text_cell(value: object) -> Any:
    """A table cell showing user data literally (no rich markup)."""
    from rich.text import Text

    return Text("" if value is None else str(value))
