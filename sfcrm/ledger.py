"""The balance ledger: the one place a person's balance changes."""

from __future__ import annotations

from datetime import datetime
from functools import cache

from sqlalchemy import Executable, bindparam, insert, select, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session

from sfcrm.models import BalanceEntry, Person, table


@cache
def _statements() -> tuple[Executable, Executable, Executable]:
    """Built once, on first use: moving a balance, reading it back, writing the entry."""
    people, entries = table(Person), table(BalanceEntry)
    this_person = people.c.id == bindparam("person_id")
    return (
        update(people)
        .where(this_person)
        .values(balance_cents=people.c.balance_cents + bindparam("amount_cents")),
        select(people.c.balance_cents).where(this_person),
        insert(entries),
    )


def change_balance(
    session: Session,
    person_id: int,
    amount_cents: int,
    *,
    kind: str,
    now: datetime,
    reason: str | None = None,
    payment_id: int | None = None,
) -> BalanceEntry:
    """Move a balance and write its ledger entry, in the caller's write transaction.

    The balance moves by an UPDATE of itself (``balance_cents + amount``), never by a value read
    earlier, so two changes at once both count on any engine; a Person already loaded in the
    session is given the balance the database now holds. The database refuses a second entry for
    one payment (``ux_balance_entry_payment``), so no payment can move a balance twice. Three
    Core statements: this runs for every payment a callback completes.
    """
    if type(amount_cents) is not int:  # a float (or bool) would make the column inexact
        raise TypeError(f"a balance moves by whole cents, not {type(amount_cents).__name__}")
    move, read, write = _statements()
    session.flush()  # what the session holds is written first, as a query would
    conn = session.connection()
    conn.execute(move, {"person_id": person_id, "amount_cents": amount_cents})
    after = conn.execute(read, {"person_id": person_id}).scalar_one()
    values = {
        "person_id": person_id,
        "amount_cents": amount_cents,
        "balance_after_cents": after,
        "kind": kind,
        "reason": reason,
        "payment_id": payment_id,
        "created_at": now,
    }
    written = conn.execute(write, values).inserted_primary_key
    assert written is not None
    # the row as written: built without validating again what the statement just stored
    entry = BalanceEntry.model_construct(id=written[0], **values)
    loaded = session.identity_map.get(identity_key(Person, person_id))
    if loaded is not None:
        set_committed_value(loaded, "balance_cents", after)
    return entry
