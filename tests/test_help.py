"""Every command's help, walked over the whole command tree: every option and argument is
described, a flag shows no value, and a docstring's paragraphs read as paragraphs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from sfcrm.cli import app


def _tree(
    command: Any, path: tuple[str, ...], parent: typer.Context | None
) -> Iterator[tuple[str, Any, typer.Context]]:
    ctx = typer.Context(command, info_name=path[-1], parent=parent, **command.context_settings)
    yield " ".join(path), command, ctx
    for name, sub in getattr(command, "commands", {}).items():
        yield from _tree(sub, (*path, name), ctx)


COMMANDS = list(_tree(typer.main.get_command(app), ("sfcrm",), None))
IDS = [name for name, _, _ in COMMANDS]


def test_the_walk_reaches_every_group_and_command() -> None:
    names = set(IDS)
    assert {"sfcrm", "sfcrm mpesa", "sfcrm mpesa request", "sfcrm crew invite"} <= names
    assert len(names) > 50


@pytest.mark.parametrize(("name", "command", "ctx"), COMMANDS, ids=IDS)
def test_every_option_and_argument_is_described_and_no_flag_shows_a_value(
    name: str, command: Any, ctx: typer.Context
) -> None:
    params = command.get_params(ctx)
    assert any(p.name == "help" for p in params)  # the help option is walked too
    for param in params:
        assert (getattr(param, "help", None) or "").strip(), f"{name}: {param.name} has no help"
        if getattr(param, "is_flag", False):
            shown = param.display_type_rich(ctx)
            assert not shown, f"{name}: the flag {param.opts} shows {shown!r}"


@pytest.mark.parametrize(("name", "command", "ctx"), COMMANDS, ids=IDS)
def test_every_paragraph_of_help_is_one_paragraph(
    name: str, command: Any, ctx: typer.Context
) -> None:
    for paragraph in (command.help or "").split("\n\n"):
        assert "\n" not in paragraph, f"{name}: a line break inside {paragraph!r}"


def test_a_flag_shows_no_bool_and_a_sentence_is_not_broken_where_the_source_line_was() -> None:
    result = CliRunner().invoke(app, ["mpesa", "request", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    [line] = [li for li in result.output.splitlines() if "More than the person owes" in li]
    assert line.rstrip().endswith("an archived person is never asked.")
    [help_option] = [li for li in result.output.splitlines() if "--help" in li]
    assert "-h" in help_option and "Show this message and exit." in help_option


def test_the_root_help_shows_no_bool_either() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "--traceback" in result.output
