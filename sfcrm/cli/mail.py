"""``sfcrm mail``: the log of every email sent, and retrying the failed ones."""

from typing import Annotated

import typer

from sfcrm.cli.runtime import MAX_INT, CsvOption, JsonOption, clean_text, command, id_argument
from sfcrm.errors import MailError
from sfcrm.wording import plural

app = typer.Typer(help="The mail log: list, show and retry failed emails.", no_args_is_help=True)


@app.command("list")
def list_mail(
    failed: Annotated[
        bool, typer.Option("--failed", help="only emails tried and not sent")
    ] = False,
    unsent: Annotated[
        bool, typer.Option("--unsent", help="everything not sent: queued, sending, failed, …")
    ] = False,
    notification_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="crew_invitation, crew_reminder, crew_briefing, crew_change, crew_cancellation,"
            " crew_removed or crew_link",
        ),
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="YYYY-MM-DD")] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10000, help="at most this many")
    ] = 200,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """List logged emails, newest first, each with its state: queued (written, never tried, no
    sfcrm sending it: `mail retry` sends it), sending, sent, failed (`mail retry` tries again),
    refused (for good, by the server) or interrupted (may have been delivered).

    Example: sfcrm mail list --unsent
    """
    with command(json_output, csv_output) as rt:
        from datetime import datetime

        from sfcrm.events import parse_date
        from sfcrm.mail import notification_json

        start = (
            datetime.combine(parse_date(since), datetime.min.time(), tzinfo=rt.tz)
            if since
            else None
        )
        rows = rt.mailer.list(
            failed=failed, unsent=unsent, notification_type=notification_type, since=start,
            limit=limit,
        )  # fmt: skip
        states = rt.mailer.states([n.id for n in rows if n.id is not None])
        docs = [notification_json(n, rt.tz, states.get(n.id or 0, ("sent", None))[0]) for n in rows]

        def render() -> None:
            rt.table(
                ["id", "to", "type", "subject", "state", "sent", "attempts", "last error"],
                [
                    [d["id"], d["recipient"], d["notification_type"], d["subject"], d["state"],
                     d["sent_at"] or "", d["failed_attempts"], d["last_error"] or ""]
                    for d in docs
                ],
                wrap={"to", "subject", "last error"}, empty="No emails found.",
            )  # fmt: skip

        rt.emit(docs, render, csv=("id", "recipient", "person_id", "notification_type",
                                   "subject", "state", "sent_at", "failed_attempts",
                                   "last_error"))  # fmt: skip


@app.command("show")
def show(
    email_id: Annotated[int, id_argument("email id")],
    json_output: JsonOption = False,
) -> None:
    """Show one logged email with its text.

    Example: sfcrm mail show 7
    """
    with command(json_output) as rt:
        from sfcrm.mail import notification_json
        from sfcrm.models import EmailState

        n = rt.mailer.get(email_id)
        state, error = rt.mailer.states([email_id]).get(email_id, ("sent", None))
        doc = {**notification_json(n, rt.tz, state), "message": n.message}

        def render() -> None:
            for key in ("id", "recipient", "notification_type", "subject", "state", "is_sent",
                        "sent_at", "failed_attempts", "last_error"):  # fmt: skip
                rt.print(f"{key}: {clean_text(doc[key])}")
            if state != EmailState.SENT:
                rt.print(f"next: {EmailState.outlook(state, email_id, error)}")
            rt.print("")
            rt.print(n.message)

        rt.emit(doc, render)


@app.command("retry")
def retry(
    email_ids: Annotated[
        list[int] | None, id_argument("email ids (default: every failed one)")
    ] = None,
    max_attempts: Annotated[
        int,
        typer.Option("--max-attempts", min=1, max=MAX_INT, help="give up after this many attempts"),
    ] = 5,
    json_output: JsonOption = False,
) -> None:
    """Send queued and failed emails; never one already sent or being sent. Safe for cron.

    Without ids it sends every queued email (written, never tried, the run that wrote it gone)
    and every failed one, and names what it left alone and why. Permanent refusals (SMTP 5xx)
    are retried only when named by id, and so are emails that may have been delivered (the
    server took the message but its answer never came).

    Example: sfcrm mail retry --max-attempts 5
    """
    with command(json_output) as rt:
        from sfcrm.mail.sender import force_command

        with rt.progress("Retrying") as progress:
            report = rt.mailer.retry(
                email_ids or None, max_attempts=max_attempts, progress=progress
            )
        groups = report.left_alone()
        result = report.results(rt.mailer.assignments(report.ids))

        def render() -> None:
            for email_id, error in report.failed:
                rt.say(f"email {email_id} failed: {error}")
            rt.summary(
                f"Retry: {report.delivered}, {len(report.failed)} failed, "
                f"{len(report.skipped)} not retried."
            )
            for reason, ids in groups.items():
                force = force_command(reason, ids)
                told = f"`{force}` to force" if force else _ids(ids)
                rt.print(f"{len(ids)} not retried: {reason} — {told}")

        rt.emit(result.json(rt.redact), render)
        if report.failed:
            raise MailError(
                f"{plural(len(report.failed), 'email')} failed again",
                hint="see `sfcrm mail list --failed`",
            )


def _ids(ids: list[int]) -> str:
    return f"email {ids[0]}" if len(ids) == 1 else "emails " + " ".join(map(str, ids))
