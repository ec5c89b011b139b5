"""``sfcrm people``: the people who owe Sound Fusion money, and the crew."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sfcrm.cli.runtime import CsvOption, JsonOption, command, usage_error
from sfcrm.wording import plural

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sfcrm.cli.runtime import Runtime
    from sfcrm.models import BalanceEntry, Person

app = typer.Typer(help="Add, list, show, import, correct and archive people.", no_args_is_help=True)

RefArgument = Annotated[str, typer.Argument(help="id, phone number or email")]


PERSON_CSV = ("id", "name", "phone", "email", "balance", "archived_at")


def _table(rt: "Runtime", people: "Sequence[Person]") -> None:
    from sfcrm.money import balance_words
    from sfcrm.phone import display
    from sfcrm.times import iso_in

    archived = any(p.archived_at for p in people)  # the column shows only when it says something
    columns = ["id", "name", "phone", "email", "balance (KES)", *(["archived"] * archived)]
    rows = []
    for p in people:
        cells = [p.id, p.name, display(p.phone), p.email or "", balance_words(p.balance_cents)]
        if archived:
            cells.append(iso_in(p.archived_at, rt.tz) or "")
        rows.append(cells)
    rt.table(columns, rows, wrap={"name", "email"}, empty="No people found.")


@app.command("add")
def add(
    name: Annotated[str, typer.Option("--name", help="full name")],
    phone: Annotated[str, typer.Option("--phone", help="Kenyan mobile, e.g. 0712345678")],
    email: Annotated[str | None, typer.Option("--email", help="email address")] = None,
    balance: Annotated[
        str | None, typer.Option("--balance", help="what the person owes, in KES")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Add a person.

    Example: sfcrm people add --name "Achieng Otieno" --phone 0712345678 --balance 1500
    """
    with command(json_output) as rt:
        from sfcrm.people import person_json

        person = rt.people.add(name, phone, email, balance)
        from sfcrm.cli.mpesa import warn_if_not_safaricom

        warn_if_not_safaricom(rt, person.phone)
        rt.emit(person_json(person, rt.tz), lambda: _table(rt, [person]))
        rt.say(f"Added person {person.id}.")


@app.command("list")
def list_people(
    search: Annotated[
        str | None, typer.Option("--search", help="part of a name, phone or email")
    ] = None,
    archived: Annotated[
        bool, typer.Option("--archived", help="list the archived people instead")
    ] = False,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """List people, by name. Archived people are left out unless --archived. A phone number
    is found however it is typed (0722 111 002, +254 722-111-002, 722111002).

    Example: sfcrm people list --search achieng
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.people import person_json

        people = rt.people.find(search, archived=archived)
        docs = [person_json(p, rt.tz) for p in people]
        rt.emit(docs, lambda: _table(rt, people), csv=PERSON_CSV)


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="id, phone number or email")],
    json_output: JsonOption = False,
) -> None:
    """Show one person, archived or not.

    Example: sfcrm people show 0712345678
    """
    with command(json_output) as rt:
        from sfcrm.people import person_json

        person = rt.people.show(ref)
        rt.emit(person_json(person, rt.tz), lambda: _table(rt, [person]))
        if person.archived_at:
            rt.say(f"{person.name} is archived: `sfcrm people unarchive {person.id}` to undo.")


@app.command("edit")
def edit(
    ctx: typer.Context,
    ref: RefArgument,
    name: Annotated[str | None, typer.Option("--name", help="the corrected full name")] = None,
    phone: Annotated[
        str | None, typer.Option("--phone", help="the corrected Kenyan mobile")
    ] = None,
    email: Annotated[str | None, typer.Option("--email", help="the corrected email")] = None,
    no_email: Annotated[bool, typer.Option("--no-email", help="remove the email address")] = False,
    json_output: JsonOption = False,
) -> None:
    """Correct a person's name, phone or email; the change goes to `sfcrm history`.

    Example: sfcrm people edit 0712345678 --email achieng.otieno@example.com
    """
    if name is None and phone is None and email is None and not no_email:
        raise usage_error(ctx, "give at least one of --name, --phone, --email, --no-email")
    if email is not None and no_email:
        raise usage_error(ctx, "--email and --no-email cannot be given together")
    with command(json_output) as rt:
        from sfcrm.people import person_json

        person, changes = rt.people.edit(
            ref, name=name, phone=phone, email=email, remove_email=no_email
        )
        if "phone" in changes:
            from sfcrm.cli.mpesa import warn_if_not_safaricom

            warn_if_not_safaricom(rt, person.phone)
        rt.emit(person_json(person, rt.tz), lambda: _table(rt, [person]))
        rt.say(
            f"Person {person.id}: changed {', '.join(changes)}."
            if changes
            else f"Nothing changed: person {person.id} has these already."
        )


@app.command("archive")
def archive(
    ref: RefArgument,
    reason: Annotated[str | None, typer.Option("--reason", help="why, for the history")] = None,
    json_output: JsonOption = False,
) -> None:
    """Archive a person: out of lists, searches, crew emails and money requests, history kept.

    Their payments, ledger and assignments stay; nobody is ever deleted.

    Example: sfcrm people archive 0712345678 --reason "Moved to Mombasa"
    """
    with command(json_output) as rt:
        from sfcrm.people import person_json

        person = rt.people.archive(ref, reason)
        rt.emit(
            person_json(person, rt.tz),
            lambda: rt.print(f"Archived person {person.id} ({person.name})."),
        )


@app.command("unarchive")
def unarchive(ref: RefArgument, json_output: JsonOption = False) -> None:
    """Bring an archived person back into lists, searches and crew emails.

    Example: sfcrm people unarchive 0712345678
    """
    with command(json_output) as rt:
        from sfcrm.people import person_json

        person = rt.people.unarchive(ref)
        rt.emit(
            person_json(person, rt.tz),
            lambda: rt.print(f"Person {person.id} ({person.name}) is back from the archive."),
        )


@app.command("import")
def import_csv(
    file: Annotated[Path, typer.Argument(help="CSV with the header name,phone,email,balance")],
    json_output: JsonOption = False,
) -> None:
    """Import people from a CSV file: every row, or none when any row is bad.

    A file of more than 200,000 rows or 50 MB is refused; split it.

    Example: sfcrm people import crew.csv
    """
    with command(json_output) as rt:
        from sfcrm.people import person_json

        people = rt.people.import_csv(file)
        # built only for --json: one import may add 200,000 people
        doc = (
            {"imported": len(people), "people": [person_json(p, rt.tz) for p in people]}
            if rt.json
            else None
        )
        rt.emit(
            doc,
            lambda: rt.print(f"Imported {plural(len(people), 'person', 'people')} from {file}."),
        )


def _adjusted(rt: "Runtime", person: "Person", entry: "BalanceEntry") -> None:
    from sfcrm.money import owes_words
    from sfcrm.people import entry_json, person_json

    rt.emit(
        {**person_json(person, rt.tz), "entry": entry_json(entry, rt.tz)},
        lambda: rt.print(
            f"{person.name}: {entry.kind} of KES {entry_json(entry, rt.tz)['amount'].lstrip('-')}"
            f"; now {owes_words(person.balance_cents)}."
        ),
    )


@app.command("charge")
def charge(
    ref: Annotated[str, typer.Argument(help="id, phone number or email")],
    amount: Annotated[str, typer.Option("--amount", help="KES the person now owes on top")],
    reason: Annotated[str, typer.Option("--reason", help="why, for the ledger")],
    json_output: JsonOption = False,
) -> None:
    """Add to what a person owes (an advance, a deposit due), with a reason for the ledger.

    Example: sfcrm people charge 0712345678 --amount 2000 --reason "Advance for Rally weekend"
    """
    with command(json_output) as rt:
        person, entry = rt.people.charge(ref, amount, reason)
        _adjusted(rt, person, entry)


@app.command("credit")
def credit(
    ref: Annotated[str, typer.Argument(help="id, phone number or email")],
    amount: Annotated[str, typer.Option("--amount", help="KES to take off what they owe")],
    reason: Annotated[str, typer.Option("--reason", help="why, for the ledger")],
    json_output: JsonOption = False,
) -> None:
    """Take off what a person owes when they paid another way (cash, bank), with a reason.

    Example: sfcrm people credit 0712345678 --amount 500 --reason "Cash at the office"
    """
    with command(json_output) as rt:
        person, entry = rt.people.credit(ref, amount, reason)
        _adjusted(rt, person, entry)


@app.command("history")
def history(
    ref: Annotated[str, typer.Argument(help="id, phone number or email")],
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """Show a person's balance ledger, newest first: every charge, credit and payment.

    Example: sfcrm people history 0712345678
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.money import owes_words
        from sfcrm.people import entry_json, person_json

        person, entries = rt.people.history(ref)
        docs = [entry_json(e, rt.tz) for e in entries]

        def render() -> None:
            rt.print(f"{person.name} {owes_words(person.balance_cents)}")
            rt.table(
                ["when", "kind", "amount", "balance", "payment", "reason"],
                [
                    [d["created_at"], d["kind"], d["amount"], d["balance_after"],
                     d["payment_id"] or "", d["reason"] or ""]
                    for d in docs
                ],
                wrap={"reason"}, empty="No ledger entries found.",
            )  # fmt: skip

        rt.emit(
            {"person": person_json(person, rt.tz), "entries": docs}, render, csv_rows=docs,
            csv=("id", "created_at", "person_id", "kind", "amount", "balance_after",
                 "payment_id", "reason"),
        )  # fmt: skip
