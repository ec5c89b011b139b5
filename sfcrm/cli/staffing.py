"""``sfcrm events needs``, ``sfcrm crew gaps`` and ``sfcrm crew suggest``: how many people each
event needs per role, the roles still short, and who could fill one."""

from typing import TYPE_CHECKING, Annotated

import typer

from sfcrm.cli.runtime import CsvOption, JsonOption, command, id_argument, id_option

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sfcrm.cli.runtime import Runtime
    from sfcrm.staffing import RoleCount


def roles_table(rt: "Runtime", roles: "Sequence[RoleCount]", *, empty: str) -> None:
    rt.table(
        ["role", "needed", "confirmed", "invited", "missing"],
        [[r.role, r.needed, r.confirmed, r.invited, r.missing or ""] for r in roles],
        wrap={"role"}, empty=empty,
    )  # fmt: skip


def needs(
    event_id: Annotated[int, id_argument("event id")],
    specs: Annotated[
        list[str],
        typer.Argument(
            help='ROLE=COUNT, one or more: "Sound Engineer=2" "Stagehand=4" (0 removes a role)',
            show_default=False,
        ),
    ],
    json_output: JsonOption = False,
) -> None:
    """Set how many people an event needs in each role given; other roles keep theirs.

    `events show` and `crew gaps` then show how many are still missing. The change goes to
    `sfcrm history`.

    Example: sfcrm events needs 3 "Sound Engineer=2" "Stagehand=4"
    """
    with command(json_output) as rt:
        event, roles = rt.staffing.set_needs(event_id, specs)
        rt.emit(
            {"event_id": event.id, "name": event.name, "roles": [r.json() for r in roles]},
            lambda: roles_table(rt, roles, empty=f"{event.name} needs nobody yet."),
        )
        rt.say(f"Needs of event {event.id} ({event.name}) set.")


def gaps(
    days: Annotated[
        int, typer.Option("--days", help="look this many days ahead (1-366)", min=1, max=366)
    ] = 14,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """The office's main screen: every upcoming event with a role still short, how many are
    missing, how many were invited and have not answered, and how long until it starts.

    A report: it exits 0 whatever it finds, and ends with a one-line summary (for cron).

    Example: sfcrm crew gaps --days 14
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.staffing import starts_in_text
        from sfcrm.wording import plural

        found = rt.staffing.gaps(days)
        missing = sum(r.missing for g in found for r in g.roles)
        unanswered = sum(r.invited for g in found for r in g.roles)
        roles = sum(len(g.roles) for g in found)
        rows = [
            {"event_id": g.event.id, "event": g.event.name, "date": g.event.date,
             "time": g.event.time, "starts_in_hours": doc["starts_in_hours"], **r.json()}
            for g in found
            for doc in [g.json(rt.tz)]
            for r in g.roles
        ]  # fmt: skip
        doc = {
            "days": days,
            "events": [g.json(rt.tz) for g in found],
            "counts": {"events": len(found), "roles": roles, "missing": missing,
                       "unanswered": unanswered},
        }  # fmt: skip

        def render() -> None:
            rt.table(
                ["event", "name", "when", "starts in", "role", "needed", "confirmed",
                 "invited", "missing"],
                [[g.event.id, g.event.name, f"{g.event.date} {g.event.time or ''}".strip(),
                  starts_in_text(g.starts_in), r.role, r.needed, r.confirmed, r.invited,
                  r.missing] for g in found for r in g.roles],
                wrap={"name", "role"}, empty=f"No gaps: every role is filled for the next "
                f"{plural(days, 'day')}.",
            )  # fmt: skip
            if found:
                rt.summary(
                    f"Gaps: {plural(missing, 'person', 'people')} missing in "
                    f"{plural(roles, 'role')} of {plural(len(found), 'event')} in the next "
                    f"{plural(days, 'day')}; {plural(unanswered, 'invitation')} not answered."
                )
            else:
                rt.summary(f"Gaps: none in the next {plural(days, 'day')}.")

        rt.emit(
            doc, render, csv=("event_id", "event", "date", "time", "starts_in_hours", "role",
                              "needed", "confirmed", "invited", "missing"), csv_rows=rows,
        )  # fmt: skip


def suggest(
    event: Annotated[int, id_option("--event", "event id")],
    role: Annotated[str, typer.Option("--role", help="the role to fill", show_default=False)],
    limit: Annotated[
        int, typer.Option("--limit", help="at most this many people", min=1, max=1000)
    ] = 10,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """People free to fill a role on an event: not archived, not on the event, with no
    confirmed event at that time; those who worked the role most, then those who turn up most
    reliably, first.

    Example: sfcrm crew suggest --event 3 --role "Sound Engineer"
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.phone import display

        found_event, found = rt.staffing.suggest(event, role, limit=limit)
        docs = [s.json() for s in found]

        def render() -> None:
            rt.table(
                ["id", "name", "phone", "in role", "completed", "no-shows", "reliability",
                 "note"],
                [[s.person.id, s.person.name, display(s.person.phone), s.in_role, s.completed,
                  s.no_shows, "—" if s.reliability is None else f"{s.reliability:.0%}",
                  "; ".join(f"invited to {e.name} (event {e.id}) at that time"
                            for e in s.invited_elsewhere)]
                 for s in found],
                wrap={"name", "note"}, empty=f"Nobody is free for {found_event.name}.",
            )  # fmt: skip

        rt.emit(docs, render, csv=("person_id", "name", "phone", "email", "in_role",
                                   "completed", "no_shows", "reliability"))  # fmt: skip


def register(events_app: typer.Typer, crew_app: typer.Typer) -> None:
    events_app.command("needs")(needs)
    crew_app.command("gaps")(gaps)
    crew_app.command("suggest")(suggest)
