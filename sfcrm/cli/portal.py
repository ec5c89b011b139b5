"""``sfcrm crew link`` and ``sfcrm crew checkin``: each crew member's own page, and arrival at
an event."""

from typing import Annotated

import typer

from sfcrm.cli.runtime import JsonOption, command, id_argument


def link(
    person: Annotated[
        str, typer.Argument(help="id, phone or email of the crew member", show_default=False)
    ],
    reset: Annotated[
        bool,
        typer.Option("--reset", help="make a new link; the old one stops working at once"),
    ] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="why the link was reset (kept in history)")
    ] = None,
    send: Annotated[
        bool, typer.Option("--email", help="email them the link (logged, like every email)")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Print a crew member's own page link (every event they are on, with Confirm and
    Decline) and their calendar feed.

    The link stays the same until --reset, which kills the old one at once (a lost phone, a
    forwarded email). Needs SFCRM_PUBLIC_URL and SFCRM_SECRET_KEY.

    Example: sfcrm crew link 0712345678 --email
    """
    with command(json_output) as rt:
        from sfcrm.errors import MailError
        from sfcrm.portal import email_link, webcal_url

        keys = rt.services.link_keys
        keys.require()
        if send:
            rt.mailer.check()  # a setting that cannot work fails now, before any change
        links = keys.link(person, reset=reset, reason=reason, need_email=send)
        report = None
        if send:
            report = email_link(rt.db, rt.mailer, rt.renderer, rt.services.org, links,
                                reset=reset)  # fmt: skip
        doc = {**links.json(), "reset": reset,
               "email_id": (report.sent + [i for i, _ in report.failed])[0] if report else None,
               "emailed": report.outcome if report and report.sent else None}  # fmt: skip

        def render() -> None:
            rt.print(f"Page of {links.name}: {links.page}")
            rt.print(f"Calendar feed: {webcal_url(links.feed)}")

        rt.emit(doc, render)
        if reset:
            rt.say(f"The old link of {links.name} no longer works.")
        if report is not None and report.sent:
            rt.say(f"The link's email to {links.email}: {report.delivered}.")
        if report is not None and report.failed:
            raise MailError(
                f"the email to {links.email} failed: {report.failed[0][1]}",
                hint="`sfcrm mail retry` sends it again",
            )


def checkin(
    assignment_id: Annotated[int, id_argument("assignment id")],
    json_output: JsonOption = False,
) -> None:
    """Record that a confirmed crew member has arrived at the event (from two hours before
    the call time to the event's end); `crew complete` then counts them as there.

    Example: sfcrm crew checkin 12
    """
    with command(json_output) as rt:
        from sfcrm.times import iso_in

        row = rt.crew.check_in(assignment_id)
        arrived = iso_in(row.crew.checked_in_at, rt.tz)
        rt.emit(
            {**row.json(rt.tz), "checked_in_at": arrived},
            lambda: rt.print(f"{row.person.name} checked in at {row.event.name} ({arrived})."),
        )


def register(crew_app: typer.Typer) -> None:
    crew_app.command("link")(link)
    crew_app.command("checkin")(checkin)
