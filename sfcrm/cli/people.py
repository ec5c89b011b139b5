"""``sfcrm people``: the people who owe Sound Fusion money, and the crew."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sfcrm.cli.runtime import JsonOption, command, text_cell

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sfcrm.cli.runtime import Runtime
    from sfcrm.models import BalanceEntry, Person

app = typer.Typer(help="Add, list, show and import people.", no_args_is_help=True)


def _table(rt: "Runtime", people: "Sequence[Person]") -> None:
    from rich.table import Table

    from sfcrm.money import balance_words

    table = Table("id", "name", "phone", "email", "balance (KES)")
    for p in people:
        table.add_row(
            text_cell(p.id),
            text_cell(p.name),
            text_cell(p.phone),
            text_cell(p.email or ""),
            text_cell(balance_words(p.balance_cents)),
        )
    rt.out.print(table)


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
        rt.emit(person_json(person), lambda: _table(rt, [person]))
        rt.say(f"Added person {person.id}.")


@app.command("list")
def list_people(
    search: Annotated[
        str | None, typer.Option("--search", help="part of a name, phone or email")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """List people, by name.

    Example: sfcrm people list --search achieng
    """
    with command(json_output) as rt:
        from sfcrm.people import person_json

        people = rt.people.find(search)
        rt.emit([person_json(p) for p in people], lambda: _table(rt, people))


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="id, phone number or email")],
    json_output: JsonOption = False,
) -> None:
    """Show one person.

    Example: sfcrm people show 0712345678
    """
    with command(json_output) as rt:
        from sfcrm.people import person_json

        person = rt.people.show(ref)
        rt.emit(person_json(person), lambda: _table(rt, [person]))


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
            {"imported": len(people), "people": [person_json(p) for p in people]}
            if rt.json
            else None
        )
        rt.emit(doc, lambda: rt.print(f"Imported {len(people)} people from {file}."))


def _adjusted(rt: "Runtime", person: "Person", entry: "BalanceEntry") -> None:
    from sfcrm.money import owes_words
    from sfcrm.people import entry_json, person_json

    rt.emit(
        {**person_json(person), "entry": entry_json(entry, rt.tz)},
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
    json_output: JsonOption = False,
) -> None:
    """Show a person's balance ledger, newest first: every charge, credit and payment.

    Example: sfcrm people history 0712345678
    """
    with command(json_output) as rt:
        from rich.table import Table

        from sfcrm.money import owes_words
        from sfcrm.people import entry_json, person_json

        person, entries = rt.people.history(ref)
        docs = [entry_json(e, rt.tz) for e in entries]

        def render() -> None:
            rt.print(f"{person.name} {owes_words(person.balance_cents)}")
            table = Table("when", "kind", "amount", "balance", "reason")
            for d in docs:
                table.add_row(
                    text_cell(d["created_at"]), text_cell(d["kind"]), text_cell(d["amount"]),
                    text_cell(d["balance_after"]), text_cell(d["reason"] or ""),
                )  # fmt: skip
            rt.out.print(table)

        rt.emit({"person": person_json(person), "entries": docs}, render)
