"""The balance ledger: the one place a person's balance changes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlmodel import Session, col, select

from sfcrm.models import BalanceEntry, Person


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
    session is brought up to date with it. The database refuses a second entry for one payment
    (``ux_balance_entry_payment``), so no payment can move a balance twice.
    """
    if type(amount_cents) is not int:  # a float (or bool) would make the column inexact
        raise TypeError(f"a balance moves by whole cents, not {type(amount_cents).__name__}")
    session.execute(
        update(Person)
        .where(col(Person.id) == person_id)
        .values(balance_cents=col(Person.balance_cents) + amount_cents)
    )
    after = session.exec(select(Person.balance_cents).where(col(Person.id) == person_id)).one()
    entry = BalanceEntry(
        person_id=person_id,
        amount_cents=amount_cents,
        balance_after_cents=after,
        kind=kind,
        reason=reason,
        payment_id=payment_id,
        created_at=now,
    )
    session.add(entry)
    session.flush()
    return entry
