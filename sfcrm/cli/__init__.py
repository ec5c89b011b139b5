"""The ``sfcrm`` command: a thin layer that parses options, calls the core, renders results."""

import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from sfcrm import __version__
from sfcrm.cli import (
    config_cmd,
    crew,
    events,
    history,
    mail,
    mpesa,
    people,
    portal,
    staffing,
    system,
)
from sfcrm.cli.runtime import (
    RootOptions,
    clean_text,
    error_document,
    json_requested,
    set_root_options,
    write_error_document,
)
from sfcrm.errors import ExitCode


class _Root(TyperGroup):
    """sfcrm's root command. Its tree's help reads cleanly: a flag shows no ``<bool>`` (it
    takes no value), and each paragraph of a docstring is one paragraph, which the terminal
    wraps (Typer's rich help keeps the docstring's own line breaks, so a sentence broke where
    the source line did)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        _tidy_help(self, typer.Context(self, **self.context_settings))


def _tidy_help(command: Any, ctx: typer.Context) -> None:
    if command.help:
        command.help = _paragraphs(command.help)
    for param in command.get_params(ctx):  # the help option too, made here once for good
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub, ctx)


def _paragraphs(text: str) -> str:
    """``text`` with each paragraph's lines joined (a paragraph starting ``\\b`` is kept)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


app = typer.Typer(
    cls=_Root,
    name="sfcrm",
    help="Sound Fusion operations: M-Pesa STK Push collections and the event crew CRM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sfcrm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="the office's sfcrm.toml (default: sfcrm.toml here or in a parent folder, "
            "else $SFCRM_CONFIG, else ~/.config/sfcrm/sfcrm.toml)",
        ),
    ] = None,
    traceback: Annotated[
        bool, typer.Option("--traceback", help="show the full traceback of an unexpected error")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Sound Fusion operations: M-Pesa STK Push collections and the event crew CRM."""
    set_root_options(RootOptions(config=config, traceback=traceback))


system.register(app)
app.add_typer(config_cmd.app, name="config")
app.add_typer(people.app, name="people")
app.add_typer(mpesa.app, name="mpesa")
app.add_typer(events.app, name="events")
app.add_typer(crew.app, name="crew")
app.add_typer(mail.app, name="mail")
history.register(app)
staffing.register(events.app, crew.app)
portal.register(crew.app)


def main() -> None:
    # Bytes that are not UTF-8 reach Python as lone surrogates, which no file, database or
    # terminal takes: refuse them before anything runs.
    for arg in sys.argv[1:]:
        if not arg.isascii():
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                message = f"an argument is not UTF-8 text ({os.fsencode(arg)!r})"
                sys.stderr.write(f"Error: {message}\n")
                if json_requested(sys.argv[1:]):
                    value = repr(os.fsencode(arg))
                    write_error_document(error_document(message, "INVALID_INPUT", value=value))
                raise SystemExit(int(ExitCode.INVALID)) from None
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:
        raise SystemExit(_usage_error(exc)) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _usage_error(exc: typer.TyperException) -> int:
    """A usage error (a value out of range, an unknown option, a missing argument) as one line
    like every other error, with its hint, and under --json also the JSON error on stdout;
    help asked for by giving no arguments is shown as Typer shows it."""
    # (Typer exports BadParameter but not its base, UsageError)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, usage_error) and type(exc).__name__ != "NoArgsIsHelpError":
        wants_json = _wants_json(ctx)
        names: list[str] = []
        while ctx is not None and ctx.parent is not None:  # the root's name is the program's
            names.insert(0, ctx.info_name or "")
            ctx = ctx.parent
        where = " ".join(["sfcrm", *names])
        message, hint = exc.format_message(), f"see `{where} --help`"
        sys.stderr.write(f"Error: {clean_text(message)}\nHint: {clean_text(hint)}\n")
        if wants_json:
            write_error_document(error_document(message, "USAGE_ERROR", hint=hint))
        return int(ExitCode.USAGE)
    from typer import rich_utils

    rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
    return int(getattr(exc, "exit_code", ExitCode.USAGE))


def _wants_json(ctx: object) -> bool:
    """--json as the command parsed it, else as it stands on the command line (the error may
    have come before Typer read it)."""
    params = getattr(ctx, "params", None) or {}
    if "json_output" in params:
        return bool(params["json_output"])
    return json_requested(sys.argv[1:])
