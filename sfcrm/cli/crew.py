"""``sfcrm crew``: put crew on events, invite, remind and brief them."""

from typing import TYPE_CHECKING, Annotated, Any

import typer

from sfcrm.cli.runtime import (
    MAX_INT,
    CsvOption,
    JsonOption,
    command,
    id_argument,
    id_option,
    usage_error,
)
from sfcrm.errors import MailError
from sfcrm.wording import plural

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sfcrm.cli.runtime import Runtime
    from sfcrm.crew import CrewRow
    from sfcrm.crewmail import MailRun

app = typer.Typer(help="Assign crew, invite, remind and brief them.", no_args_is_help=True)

DryRun = Annotated[bool, typer.Option("--dry-run", help="show what would be sent; send nothing")]


CREW_CSV = (
    "id", "event_id", "event", "person_id", "name", "email", "role", "status",
    "invitation_sent_at", "reminder_sent_at", "notes",
)  # fmt: skip


def crew_table(rt: "Runtime", rows: "Sequence[CrewRow]", *, empty: str = "No crew found.") -> None:
    rt.table(
        ["id", "event", "name", "role", "status", "invited", "reminded"],
        [
            [r.crew.id, r.event.name, r.person.name, r.crew.role, r.crew.status,
             "yes" if r.crew.invitation_sent else "", "yes" if r.crew.reminder_sent else ""]
            for r in rows
        ],
        wrap={"event", "name", "role"}, empty=empty,
    )  # fmt: skip


def report_mail_run(
    rt: "Runtime",
    what: str,
    run: "MailRun",
    *,
    about: dict[str, Any] | None = None,
    lead: "Callable[[], None] | None" = None,
) -> None:
    """Print a bulk send's result; exit non-zero when any email failed. Under --json it is the
    batch document (``results``, ``counts``, ``total``); a change crew were told of gives
    ``about`` (what changed) and its document keeps the emails' ``queued``, ``sent``,
    ``failed`` and ``skipped`` lists beside it. ``lead`` prints before the summary."""
    result = run.results()
    if run.dry_run:
        rt.emit(result.json(rt.redact), lambda: _render_preview(rt, what, run))
        return
    report = run.report
    failed = result.count("failed")
    doc = result.json(rt.redact) if about is None else {**about, **_told(rt, run)}

    def render() -> None:
        if lead is not None:
            lead()
        for item in result.items:
            if item.outcome == "failed":
                rt.say(f"email {item.email_id} failed: {item.message}")
            elif item.outcome == "skipped":
                rt.say(f"assignment {item.assignment_id} skipped: {item.message}")
            elif item.outcome == "not_sent":  # written, then taken or tried by another sfcrm
                rt.say(f"email {item.email_id} not sent here: {item.message}")
        done = report.delivered if report else "0 sent"
        rt.summary(f"{what}: {done}, {failed} failed, {result.count('skipped')} skipped.")

    rt.emit(doc, render)
    if failed:
        raise MailError(
            f"{failed} of {plural(len(run.queued), 'email')} failed",
            hint="see `sfcrm mail list --failed`; `sfcrm mail retry` sends them again",
        )


def _told(rt: "Runtime", run: "MailRun") -> dict[str, Any]:
    """The emails of a change crew were told of, as `events edit|cancel` and `crew remove`
    print them."""
    report = run.report
    return {
        "queued": run.queued,
        "sent": report.sent if report else [],
        "failed": [{"id": i, "error": rt.redact(e)} for i, e in (report.failed if report else [])],
        "skipped": [{"assignment_id": a, "reason": r} for a, r in run.skipped],
        # what "sent" meant: "sent" (SMTP), "written" (files in outbox), "printed" (console)
        "outcome": report.outcome if report else None,
        "outbox": str(report.outbox) if report and report.outbox is not None else None,
    }


def _render_preview(rt: "Runtime", what: str, run: "MailRun") -> None:
    for preview in run.previews:
        rt.print(f"--- to {preview['recipient']}: {preview['subject']}")
        rt.print(preview["message"])
    for assignment_id, reason in run.skipped:
        rt.say(f"assignment {assignment_id} skipped: {reason}")
    rt.print(f"{what} (dry run): {len(run.previews)} would be sent, {len(run.skipped)} skipped.")


@app.command("assign")
def assign(
    event: Annotated[int, id_option("--event", "event id")],
    person: Annotated[str, typer.Option("--person", help="id, phone or email")],
    role: Annotated[str, typer.Option("--role", help="e.g. Sound Engineer")],
    notes: Annotated[str | None, typer.Option("--notes", help="special instructions")] = None,
    allow_overlap: Annotated[
        bool, typer.Option("--allow-overlap", help="allow a clash with another event")
    ] = False,
    past: Annotated[
        bool,
        typer.Option(
            "--past", help="record who worked an event that is over (confirmed, never invited)"
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Put a person on an event in a role (status: invited). An event that is over takes
    only --past, which records who worked it: confirmed, never invited.

    Example: sfcrm crew assign --event 3 --person 0712345678 --role "Sound Engineer"
    """
    with command(json_output) as rt:
        row = rt.crew.assign(
            event, person, role, notes=notes, allow_overlap=allow_overlap, past=past
        )
        rt.emit(row.json(rt.tz), lambda: crew_table(rt, [row]))
        if past:
            rt.say(
                f"Assignment {row.crew.id}: recorded as confirmed; `sfcrm crew complete --event"
                f" {event}` records the attendance."
            )
        else:
            rt.say(f"Assignment {row.crew.id}: invite with `sfcrm crew invite {row.crew.id}`.")


@app.command("edit")
def edit(
    ctx: typer.Context,
    assignment_id: Annotated[int, id_argument("assignment id")],
    role: Annotated[str | None, typer.Option("--role", help="the corrected role")] = None,
    notes: Annotated[
        str | None, typer.Option("--notes", help="the corrected special instructions")
    ] = None,
    no_notes: Annotated[bool, typer.Option("--no-notes", help="remove the notes")] = False,
    json_output: JsonOption = False,
) -> None:
    """Correct an assignment's role or notes; no email is sent. The change goes to `sfcrm history`.

    Example: sfcrm crew edit 12 --role "Lighting Technician"
    """
    if role is None and notes is None and not no_notes:
        raise usage_error(ctx, "give at least one of --role, --notes, --no-notes")
    if notes is not None and no_notes:
        raise usage_error(ctx, "--notes and --no-notes cannot be given together")
    with command(json_output) as rt:
        row, changes = rt.crew.edit(assignment_id, role=role, notes=notes, remove_notes=no_notes)
        rt.emit(row.json(rt.tz), lambda: crew_table(rt, [row]))
        rt.say(
            f"Assignment {row.crew.id}: changed {', '.join(changes)}; nobody was emailed."
            if changes
            else f"Nothing changed: assignment {row.crew.id} has these already."
        )


@app.command("list")
def list_crew(
    event: Annotated[int | None, id_option("--event", "event id")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status", help="invited, confirmed, declined, completed, cancelled, removed"
        ),
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", help="name, phone, email, event or role")
    ] = None,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """List crew assignments.

    Example: sfcrm crew list --event 3 --status confirmed
    """
    with command(json_output, csv_output) as rt:
        rows = rt.crew.find(event_id=event, status=status, search=search)
        rt.emit([r.json(rt.tz) for r in rows], lambda: crew_table(rt, rows), csv=CREW_CSV)


def _respond(
    assignment_id: int, answer: str, json_output: bool, *, allow_overlap: bool = False
) -> None:
    with command(json_output) as rt:
        row = rt.crew.respond(assignment_id, answer, allow_overlap=allow_overlap)
        rt.emit(
            row.json(rt.tz),
            lambda: rt.print(
                f"{row.person.name} is {row.crew.status} for {row.event.name} ({row.crew.role})."
            ),
        )


@app.command("confirm")
def confirm(
    assignment_id: Annotated[int, id_argument("assignment id")],
    allow_overlap: Annotated[
        bool,
        typer.Option(
            "--allow-overlap",
            help="confirm a declined one even if it now clashes with another event",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Record that a crew member confirmed.

    A declined assignment confirmed again is refused when the person is now on another
    event at that time (named in the error), unless --allow-overlap.

    Example: sfcrm crew confirm 12
    """
    _respond(assignment_id, "confirm", json_output, allow_overlap=allow_overlap)


@app.command("decline")
def decline(
    assignment_id: Annotated[int, id_argument("assignment id")],
    json_output: JsonOption = False,
) -> None:
    """Record that a crew member declined.

    Example: sfcrm crew decline 12
    """
    _respond(assignment_id, "decline", json_output)


@app.command("complete")
def complete(
    event: Annotated[int, id_option("--event", "event id")],
    no_show: Annotated[
        list[str] | None,
        typer.Option(
            "--no-show",
            help="assignment ids of confirmed crew who did not turn up (repeat it, or 12,13)",
            callback=lambda values: _ids(values or []),
        ),
    ] = None,
    everyone: Annotated[
        bool,
        typer.Option("--all", help="count confirmed crew who did not check in as there too"),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """After the event: record who worked it. Confirmed crew who checked in become completed,
    those named by --no-show no_show (kept in their history).

    When check-in was used, the rest are listed to be named: as no-shows, or with --all as
    there. When nobody checked in, every confirmed crew member not named is completed.

    Example: sfcrm crew complete --event 3 --no-show 12
    """
    with command(json_output) as rt:
        ids = [int(i) for i in no_show or []]
        rows, left = rt.crew.complete(event, no_show=ids, everyone=everyone)
        done = sum(r.crew.status == "completed" for r in rows)
        missed = len(rows) - done
        rt.emit(
            [r.json(rt.tz) for r in rows],
            lambda: rt.print(
                f"{plural(done, 'crew member')} marked completed"
                + (f", {missed} as no-show." if missed else ".")
            ),
        )
        if left:
            names = ", ".join(f"{r.person.name} ({r.crew.id})" for r in left)
            ids_text = " ".join(str(r.crew.id) for r in left)
            rt.warn(
                f"{len(left)} confirmed crew did not check in: {names}. Mark them with"
                f" `sfcrm crew complete --event {event} --no-show {ids_text}`, or count them as"
                " there with `--all`."
            )


def _ids(values: list[str]) -> list[str]:
    """Ids given as ``--no-show 12 --no-show 13`` or ``--no-show 12,13``, checked."""
    ids = []
    for value in values:
        for part in value.split(","):
            text = part.strip()
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_INT:
                raise typer.BadParameter(f"not an assignment id: {text!r}")
            ids.append(text)
    return ids


@app.command("assignments")
def assignments(
    person: Annotated[str, typer.Option("--person", help="id, phone or email")],
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """A crew member's own view: pending invitations, confirmed, completed, declined.

    Example: sfcrm crew assignments --person 0712345678
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.people import person_json

        who, groups = rt.crew.assignments_of(person)
        doc = {
            "person": person_json(who, rt.tz),
            **{name: [r.json(rt.tz) for r in rows] for name, rows in groups.items()},
        }

        def render() -> None:
            titles = {
                "pending": "Pending invitations", "confirmed": "Confirmed",
                "completed": "Completed", "declined": "Declined", "no_show": "Did not turn up",
            }  # fmt: skip
            if not any(groups.values()):
                rt.print(f"No assignments found for {who.name}.")
                return
            for name, rows in groups.items():
                if name == "no_show" and not rows:
                    continue
                rt.print(f"{titles[name]} ({len(rows)})")
                for r in rows:
                    rt.print(
                        f"  [{r.crew.id}] {r.event.date} {r.event.name} at {r.event.location}"
                        f" as {r.crew.role}"
                    )

        rows = [{**r.json(rt.tz), "group": name} for name, rs in groups.items() for r in rs]
        rt.emit(doc, render, csv=("group", *CREW_CSV), csv_rows=rows)


@app.command("invite")
def invite(
    ctx: typer.Context,
    assignment_ids: Annotated[list[int] | None, id_argument("assignment ids")] = None,
    event: Annotated[int | None, id_option("--event", "every assignment of it")] = None,
    dry_run: DryRun = False,
    json_output: JsonOption = False,
) -> None:
    """Email invitations (with a calendar entry) to assignments not invited yet.

    Example: sfcrm crew invite --event 3
    """
    if (event is None) == (not assignment_ids):
        raise usage_error(ctx, "give --event or assignment ids (one of the two)")
    with command(json_output) as rt:
        with rt.progress("Invitations") as progress:
            run = rt.crew_mail.invite(
                event_id=event, assignment_ids=assignment_ids or (), dry_run=dry_run,
                progress=progress,
            )  # fmt: skip
        report_mail_run(rt, "Invitations", run)


@app.command("remind")
def remind(
    event: Annotated[int | None, id_option("--event", "only this event")] = None,
    hours: Annotated[
        float, typer.Option("--hours", help="events starting within this many hours (to 8784)")
    ] = 24,
    dry_run: DryRun = False,
    json_output: JsonOption = False,
) -> None:
    """Remind confirmed crew of events starting soon, once each. Meant for cron every hour.

    Example: sfcrm crew remind --hours 24
    """
    with command(json_output) as rt:
        with rt.progress("Reminders") as progress:
            run = rt.crew_mail.remind(
                event_id=event, hours=hours, dry_run=dry_run, progress=progress
            )
        report_mail_run(rt, "Reminders", run)


@app.command("brief")
def brief(
    event: Annotated[int, id_option("--event", "event id")],
    again: Annotated[
        bool, typer.Option("--again", help="also send to those already briefed")
    ] = False,
    dry_run: DryRun = False,
    json_output: JsonOption = False,
) -> None:
    """Email the setup briefing, with the confirmed roster, to every confirmed crew member.

    Example: sfcrm crew brief --event 3
    """
    with command(json_output) as rt:
        with rt.progress("Briefings") as progress:
            run = rt.crew_mail.brief(event, again=again, dry_run=dry_run, progress=progress)
        report_mail_run(rt, "Briefings", run)


@app.command("remove")
def remove(
    assignment_id: Annotated[int, id_argument("assignment id")],
    quiet: Annotated[
        bool, typer.Option("--quiet", help="take them off without emailing them")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Take a crew member off their event (status: removed). One who was invited is told by
    email, with a cancellation of their calendar entry, unless --quiet.

    Example: sfcrm crew remove 12
    """
    with command(json_output) as rt:
        from sfcrm.cli.events import report_notice

        notice = rt.crew_mail.remove(assignment_id, quiet=quiet)
        row = notice.assignment
        assert row is not None
        report_notice(
            rt, notice, f"Removed {row.person.name} ({row.crew.role}) from {row.event.name}."
        )
