"""``sfcrm history``: the audit log of corrections, cancellations and resolutions."""

from typing import Annotated

import typer

from sfcrm.cli.runtime import CsvOption, JsonOption, command, id_option


def history(
    person: Annotated[
        str | None, typer.Option("--person", help="only this person (id, phone or email)")
    ] = None,
    event: Annotated[int | None, id_option("--event", "only this event (its id)")] = None,
    payment: Annotated[int | None, id_option("--payment", "only this payment (its id)")] = None,
    limit: Annotated[
        int, typer.Option("--limit", help="at most this many entries", min=1, max=100_000)
    ] = 200,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """List what was changed by hand, newest first: who changed what (before and after), when,
    and why.

    Example: sfcrm history --person 0712345678
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.audit import entry_json
        from sfcrm.people import find_person

        person_id = None
        if person is not None:
            with rt.db.read() as session:
                person_id = find_person(session, person).id
        entries = rt.history.find(
            person_id=person_id, event_id=event, payment_id=payment, limit=limit
        )
        docs = [entry_json(e, rt.tz) for e in entries]

        def render() -> None:
            rows = []
            for d in docs:
                about = ", ".join(
                    f"{name} {d[name + '_id']}" for name in _SUBJECTS if d[name + "_id"] is not None
                )
                changes = "; ".join(
                    f"{field}: {_shown(before)} → {_shown(after)}"
                    for field, (before, after) in d["changes"].items()
                )
                rows.append([d["at"], d["actor"], d["action"], about, changes, d["reason"] or ""])
            rt.table(
                ["when", "who", "what", "about", "changes", "reason"], rows,
                wrap={"who", "about", "changes", "reason"}, empty="No changes found.",
            )  # fmt: skip

        rt.emit(docs, render, csv=("id", "at", "actor", "action", *(f"{n}_id" for n in _SUBJECTS),
                                   "changes", "reason"))  # fmt: skip


_SUBJECTS = ("person", "event", "assignment", "payment")


def _shown(value: object) -> str:
    return "—" if value is None or value == "" else str(value)


def register(app: typer.Typer) -> None:
    app.command("history")(history)
