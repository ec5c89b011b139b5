"""``sfcrm events``: the events Sound Fusion works."""

from typing import TYPE_CHECKING, Annotated

import typer

from sfcrm.cli.runtime import JsonOption, command, id_argument, text_cell

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sfcrm.cli.runtime import Runtime
    from sfcrm.models import Event

app = typer.Typer(help="Add, list and show events.", no_args_is_help=True)


def events_table(rt: "Runtime", events: "Sequence[Event]") -> None:
    from rich.table import Table

    table = Table("id", "date", "time", "name", "location")
    for e in events:
        when = (e.time or "") + (f"–{e.end_time}" if e.end_time else "")
        table.add_row(
            text_cell(e.id), text_cell(e.date), text_cell(when), text_cell(e.name),
            text_cell(e.location),
        )  # fmt: skip
    rt.out.print(table)


@app.command("add")
def add(
    name: Annotated[str, typer.Option("--name", help="event name")],
    date: Annotated[str, typer.Option("--date", help="YYYY-MM-DD")],
    location: Annotated[str, typer.Option("--location", help="venue")],
    time: Annotated[str | None, typer.Option("--time", help="start, HH:MM")] = None,
    end_time: Annotated[str | None, typer.Option("--end-time", help="end, HH:MM")] = None,
    details: Annotated[
        str | None, typer.Option("--details", help="what the crew needs to know")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Add an event. Dates and times are wall-clock in SFCRM_TIMEZONE.

    Example: sfcrm events add --name "Safari Rally Gala" --date 2026-12-12 --time 18:00
    --end-time 23:30 --location "KICC, Nairobi"
    """
    with command(json_output) as rt:
        from sfcrm.events import event_json

        event = rt.events.add(name, date, location, time=time, end_time=end_time, details=details)
        rt.emit(event_json(event), lambda: events_table(rt, [event]))
        rt.say(f"Added event {event.id}.")


@app.command("list")
def list_events(
    upcoming: Annotated[
        bool, typer.Option("--upcoming", help="only events that have not ended")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """List events by date.

    Example: sfcrm events list --upcoming
    """
    with command(json_output) as rt:
        from sfcrm.events import event_json

        events = rt.events.find(upcoming=upcoming)
        rt.emit([event_json(e) for e in events], lambda: events_table(rt, events))


@app.command("show")
def show(
    event_id: Annotated[int, id_argument("event id")],
    json_output: JsonOption = False,
) -> None:
    """Show an event and its crew roster with each one's status.

    Example: sfcrm events show 3
    """
    with command(json_output) as rt:
        from sfcrm.cli.crew import crew_table
        from sfcrm.events import event_json

        event = rt.events.get(event_id)
        crew = rt.crew.find(event_id=event_id)
        doc = {**event_json(event), "crew": [row.json(rt.tz) for row in crew]}

        def render() -> None:
            events_table(rt, [event])
            if event.details:
                rt.print(event.details)
            crew_table(rt, crew)

        rt.emit(doc, render)
