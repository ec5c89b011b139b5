"""``sfcrm events``: the events Sound Fusion works."""

from typing import TYPE_CHECKING, Annotated

import typer

from sfcrm.cli.runtime import CsvOption, JsonOption, command, id_argument, usage_error

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sfcrm.cli.runtime import Runtime
    from sfcrm.crewmail import EventNotice
    from sfcrm.models import Event

app = typer.Typer(help="Add, list, show, edit and cancel events.", no_args_is_help=True)
Quiet = Annotated[bool, typer.Option("--quiet", help="make the change without emailing the crew")]
Past = Annotated[
    bool,
    typer.Option("--past", help="allow a date already over (to record an event that took place)"),
]


EVENT_CSV = ("id", "name", "date", "time", "end_time", "location", "details", "cancelled",
             "cancel_reason")  # fmt: skip


def events_table(
    rt: "Runtime", events: "Sequence[Event]", *, staffing: "dict[int, str] | None" = None
) -> None:
    """The events, with a ``staffing`` column (each role: confirmed/needed, invited) when given."""
    extra = ["staffing"] if staffing is not None else []
    rt.table(
        ["id", "date", "time", "name", "location", "status", *extra],
        [
            [e.id, e.date, (e.time or "") + (f"–{e.end_time}" if e.end_time else ""), e.name,
             e.location, "CANCELLED" if e.cancelled_at else "",
             *([staffing.get(e.id or 0, "")] if staffing is not None else [])]
            for e in events
        ],
        wrap={"name", "location", "staffing"}, empty="No events found.",
    )  # fmt: skip


def report_notice(rt: "Runtime", notice: "EventNotice", headline: str) -> None:
    """A change to an event or its crew: what changed, the clashes it made, whom it told."""
    from sfcrm.cli.crew import report_mail_run
    from sfcrm.events import event_json

    about = {
        "event": event_json(notice.event),
        "changes": {name: [before, after] for name, (before, after) in notice.changes.items()},
        "clashes": [
            {"assignment_id": mine.crew.id, "name": mine.person.name,
             "other_assignment_id": other.crew.id, "other_event_id": other.event.id,
             "other_event": other.event.name}
            for mine, other in notice.clashes
        ],
        "emailed": notice.told is not None,
    }  # fmt: skip
    if notice.assignment is not None:  # as it is now
        about["assignment"] = {
            **notice.assignment.json(rt.tz),
            "status": notice.changes["status"][1],
        }

    def warn_of_clashes() -> None:
        for mine, other in notice.clashes:
            e = other.event
            rt.warn(
                f"Warning: {mine.person.name} (assignment {mine.crew.id}) is also on {e.name}"
                f" (event {e.id}, {e.date}{' ' + e.time if e.time else ''}), which now overlaps"
                f" {notice.event.name}"
            )

    if rt.json:  # (the text's headline comes first, below)
        warn_of_clashes()

    def lead() -> None:
        rt.print(headline)
        warn_of_clashes()
        if notice.told is None:
            if not notice.changes:
                rt.print("Nothing changed.")
            elif notice.quiet:
                rt.print("Nobody was emailed (--quiet).")
            else:
                rt.print("Only the name or details changed: nobody was emailed.")

    if notice.told is None:
        rt.emit({**about, "queued": [], "sent": [], "failed": [], "skipped": []}, lead)
    else:
        report_mail_run(rt, "Crew told", notice.told, about=about, lead=lead)


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
    past: Past = False,
    json_output: JsonOption = False,
) -> None:
    """Add an event. Dates and times are wall-clock in SFCRM_TIMEZONE. An event already over
    is refused (a typo, most often) unless --past.

    Example: sfcrm events add --name "Safari Rally Gala" --date 2027-03-12 --time 18:00
    --end-time 23:30 --location "KICC, Nairobi"
    """
    with command(json_output) as rt:
        from sfcrm.events import event_json

        event = rt.events.add(
            name, date, location, time=time, end_time=end_time, details=details, past=past
        )
        rt.emit(event_json(event), lambda: events_table(rt, [event]))
        rt.say(f"Added event {event.id}.")


@app.command("edit")
def edit(
    ctx: typer.Context,
    event_id: Annotated[int, id_argument("event id")],
    name: Annotated[str | None, typer.Option("--name", help="event name")] = None,
    date: Annotated[str | None, typer.Option("--date", help="YYYY-MM-DD")] = None,
    time: Annotated[str | None, typer.Option("--time", help='start, HH:MM ("" clears)')] = None,
    end_time: Annotated[
        str | None, typer.Option("--end-time", help='end, HH:MM ("" clears)')
    ] = None,
    location: Annotated[str | None, typer.Option("--location", help="venue")] = None,
    details: Annotated[
        str | None, typer.Option("--details", help='what the crew needs to know ("" clears)')
    ] = None,
    quiet: Quiet = False,
    past: Past = False,
    json_output: JsonOption = False,
) -> None:
    """Correct an event. A change of date, time or place emails every invited or confirmed
    crew member the new details with an updated calendar entry (unless --quiet), re-arms
    their reminders and warns of each confirmed crew member it makes clash with another event.
    Moving it to a time already over is refused unless --past.

    Example: sfcrm events edit 3 --date 2027-03-13 --time 19:00
    """
    if all(v is None for v in (name, date, time, end_time, location, details)):
        raise usage_error(
            ctx, "give at least one of --name, --date, --time, --end-time, --location, --details"
        )
    with command(json_output) as rt:
        changes = rt.events.changes(
            name=name, date=date, time=time, end_time=end_time, location=location,
            details=details, past=past,
        )  # fmt: skip
        notice = rt.crew_mail.edit_event(event_id, changes, quiet=quiet)
        parts = [
            "details" if field == "details" else f"{field} {before or '—'} → {after or '—'}"
            for field, (before, after) in notice.changes.items()
        ]
        report_notice(rt, notice, f"Event {event_id}: {'; '.join(parts) or 'no change'}.")


@app.command("cancel")
def cancel(
    event_id: Annotated[int, id_argument("event id")],
    reason: Annotated[
        str | None, typer.Option("--reason", help="why (kept in the history, not emailed)")
    ] = None,
    quiet: Quiet = False,
    json_output: JsonOption = False,
) -> None:
    """Cancel an event: every assignment on it is cancelled, and every invited or confirmed
    crew member gets a cancellation email that removes it from their calendar (unless --quiet).
    No reminder or briefing goes out for it, and its RSVP links answer that it was cancelled.

    Example: sfcrm events cancel 3 --reason "client postponed to March"
    """
    with command(json_output) as rt:
        notice = rt.crew_mail.cancel_event(event_id, reason=reason, quiet=quiet)
        report_notice(rt, notice, f"Cancelled event {event_id} ({notice.event.name}).")


@app.command("list")
def list_events(
    upcoming: Annotated[
        bool, typer.Option("--upcoming", help="only events that have not ended")
    ] = False,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """List events by date.

    Example: sfcrm events list --upcoming
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.events import event_json

        events = rt.events.find(upcoming=upcoming)
        if not upcoming:
            rt.emit([event_json(e) for e in events], lambda: events_table(rt, events),
                    csv=EVENT_CSV)  # fmt: skip
            return
        # what is coming up shows its staffing too: needed / confirmed / invited per role
        roles = rt.staffing.roles([e.id for e in events if e.id is not None])
        docs = [{**event_json(e), "roles": [r.json() for r in roles.get(e.id or 0, [])]}
                for e in events]  # fmt: skip
        rt.emit(
            docs,
            lambda: events_table(rt, events, staffing={
                e.id or 0: "; ".join(r.shown() for r in roles.get(e.id or 0, [])) for e in events
            }),
            csv=(*EVENT_CSV, "staffing"),
            csv_rows=[{**d, "staffing": "; ".join(r.shown() for r in roles.get(d["id"], []))}
                      for d in docs],
        )  # fmt: skip


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
        from sfcrm.cli.staffing import roles_table
        from sfcrm.events import event_json

        event = rt.events.get(event_id)
        crew = rt.crew.find(event_id=event_id)
        roles = rt.staffing.roles([event_id]).get(event_id, [])
        doc = {**event_json(event), "roles": [r.json() for r in roles],
               "crew": [row.json(rt.tz) for row in crew]}  # fmt: skip

        def render() -> None:
            events_table(rt, [event])
            if event.details:
                rt.print(event.details)
            if roles:
                roles_table(rt, roles, empty="")
            crew_table(rt, crew, empty="No crew on this event yet.")

        rt.emit(doc, render)
