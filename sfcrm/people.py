"""People: the crew, clients and anyone else who owes Sound Fusion money."""

from __future__ import annotations

import csv
import io
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from sfcrm.db import Database, db_time, raw_connection
from sfcrm.errors import ConflictError, NotFoundError, SfcrmError, ValidationError
from sfcrm.models import BalanceEntry, BalanceKind, Person
from sfcrm.money import format_cents, parse_kes
from sfcrm.phone import normalise_phone
from sfcrm.reads import resolve_person_id

log = logging.getLogger("sfcrm.people")

MAX_NAME = 120
CSV_HEADER = ["name", "phone", "email", "balance"]


def person_json(person: Person) -> dict[str, Any]:
    return {
        "id": person.id,
        "name": person.name,
        "phone": person.phone,
        "email": person.email,
        "balance": format_cents(person.balance_cents),
    }


def record_balance_change(
    conn: sqlite3.Connection,
    person_id: int,
    amount_cents: int,
    *,
    kind: str,
    now: datetime,
    reason: str | None = None,
    payment_id: int | None = None,
) -> int:
    """Move a balance and write its ledger entry, in the caller's write transaction.

    The one place a balance changes. Returns the balance after the change.
    """
    if type(amount_cents) is not int:  # a float (or bool) would make the column inexact
        raise TypeError(f"a balance moves by whole cents, not {type(amount_cents).__name__}")
    # (UPDATE ... RETURNING would need SQLite 3.35; older ones are still in the field)
    conn.execute(
        "UPDATE person SET balance_cents = balance_cents + ? WHERE id = ?",
        (amount_cents, person_id),
    )
    (after,) = conn.execute(
        "SELECT balance_cents FROM person WHERE id = ?", (person_id,)
    ).fetchone()
    conn.execute(
        "INSERT INTO balance_entry (person_id, amount_cents, balance_after_cents, kind, reason, "
        "payment_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (person_id, amount_cents, after, kind, reason, payment_id, db_time(now)),
    )
    return int(after)


def change_balance(
    session: Session,
    person: Person,
    amount_cents: int,
    *,
    kind: str,
    now: datetime,
    reason: str | None = None,
) -> BalanceEntry:
    """``record_balance_change`` for code working with a session and a Person."""
    from sqlalchemy.orm.attributes import set_committed_value

    assert person.id is not None
    session.flush()
    conn = raw_connection(session)
    after = record_balance_change(conn, person.id, amount_cents, kind=kind, now=now, reason=reason)
    set_committed_value(person, "balance_cents", after)
    entry = session.exec(
        select(BalanceEntry)
        .where(BalanceEntry.person_id == person.id)
        .order_by(col(BalanceEntry.id).desc())
        .limit(1)
    ).one()
    return entry


def entry_json(entry: BalanceEntry, tz: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "person_id": entry.person_id,
        "amount": format_cents(entry.amount_cents),
        "balance_after": format_cents(entry.balance_after_cents),
        "kind": entry.kind,
        "reason": entry.reason,
        "payment_id": entry.payment_id,
        "created_at": entry.created_at.astimezone(tz).isoformat(timespec="seconds"),
    }


def clean_name(name: str) -> str:
    # Names end up in emails and logs: one line, no control characters.
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in name).split())
    if not cleaned:
        raise ValidationError("name must not be empty")
    if len(cleaned) > MAX_NAME:
        raise ValidationError(f"name is longer than {MAX_NAME} characters")
    return cleaned


def clean_email(email: str | None) -> str | None:
    """A plain address sfcrm can send to, lower-cased; None when blank."""
    if email is None or not email.strip():
        return None
    from sfcrm.mail import validate_address

    return validate_address(email.strip().lower())


def find_person(session: Session, ref: str) -> Person:
    """REF is an id, a phone number in any accepted form, or an email address."""
    session.flush()  # as a query would: people added in this session count
    person = session.get(Person, resolve_person_id(raw_connection(session), ref))
    assert person is not None  # just found, in this transaction
    return person


@dataclass(frozen=True)
class NewPerson:
    name: str
    phone: str
    email: str | None
    balance_cents: int


def validate_new_person(
    name: str, phone: str, email: str | None = None, balance: str | None = None
) -> NewPerson:
    return NewPerson(
        name=clean_name(name),
        phone=normalise_phone(phone),
        email=clean_email(email),
        balance_cents=parse_kes(balance, what="balance") if balance not in (None, "") else 0,
    )


class People:
    def __init__(self, db: Database, clock: Callable[[], datetime]) -> None:
        self.db = db
        self.clock = clock

    def add(
        self, name: str, phone: str, email: str | None = None, balance: str | None = None
    ) -> Person:
        new = validate_new_person(name, phone, email, balance)
        with self.db.write() as session:
            self._check_unique(session, new)
            person = self._create(session, new, self.clock())
        return person

    def _create(self, session: Session, new: NewPerson, now: datetime) -> Person:
        person = Person(name=new.name, phone=new.phone, email=new.email, created_at=now)
        session.add(person)
        session.flush()
        if new.balance_cents:
            change_balance(session, person, new.balance_cents, kind=BalanceKind.OPENING, now=now)
        return person

    def charge(self, ref: str, amount: str, reason: str) -> tuple[Person, BalanceEntry]:
        """The person owes more (an advance, a deposit due, ...)."""
        return self._adjust(ref, amount, reason, BalanceKind.CHARGE)

    def credit(self, ref: str, amount: str, reason: str) -> tuple[Person, BalanceEntry]:
        """The person owes less, paid some way other than M-Pesa STK Push."""
        return self._adjust(ref, amount, reason, BalanceKind.CREDIT)

    def _adjust(self, ref: str, amount: str, reason: str, kind: str) -> tuple[Person, BalanceEntry]:
        cents = parse_kes(amount)
        if cents <= 0:
            raise ValidationError("amount must be more than 0", value=amount)
        why = " ".join("".join(ch if ch.isprintable() else " " for ch in reason).split())
        if not why:
            raise ValidationError("a reason is required, for the ledger")
        with self.db.write() as session:
            person = find_person(session, ref)
            signed = cents if kind == BalanceKind.CHARGE else -cents
            entry = change_balance(session, person, signed, kind=kind, now=self.clock(), reason=why)
            session.flush()
        log.info("person %s %s %s: %s", person.id, kind, format_cents(cents), why)
        return person, entry

    def history(self, ref: str, limit: int = 200) -> tuple[Person, Sequence[BalanceEntry]]:
        with self.db.read() as session:
            person = find_person(session, ref)
            entries = session.exec(
                select(BalanceEntry)
                .where(BalanceEntry.person_id == person.id)
                .order_by(col(BalanceEntry.id).desc())
                .limit(limit)
            ).all()
            return person, entries

    def _check_unique(self, session: Session, new: NewPerson) -> None:
        same = [col(Person.phone) == new.phone]
        if new.email is not None:
            same.append(col(Person.email) == new.email)
        clash = session.exec(select(Person).where(or_(*same))).first()
        if clash is not None:
            what = "phone" if clash.phone == new.phone else "email"
            raise ConflictError(
                f"person {clash.id} ({clash.name}) already has this {what}",
                value=new.phone if what == "phone" else new.email,
            )

    def show(self, ref: str) -> Person:
        with self.db.read() as session:
            return find_person(session, ref)

    def find(self, search: str | None = None, limit: int = 500) -> Sequence[Person]:
        with self.db.read() as session:
            query = select(Person).order_by(col(Person.name), col(Person.id)).limit(limit)
            if search:
                pattern = f"%{search.lower()}%"
                query = query.where(
                    or_(
                        func.lower(Person.name).like(pattern),
                        col(Person.phone).like(pattern),
                        func.lower(Person.email).like(pattern),
                    )
                )
            return session.exec(query).all()

    def import_csv(self, path: Path) -> list[Person]:
        """All rows or none: every bad row is reported by its line number."""
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise NotFoundError("file not found", value=str(path)) from None
        except UnicodeDecodeError:
            raise ValidationError("file is not UTF-8 text", value=str(path)) from None
        except OSError as exc:
            raise ValidationError(f"cannot read file: {exc.strerror}", value=str(path)) from None
        reader = csv.reader(io.StringIO(text))
        rows = list(enumerate(reader, start=1))
        if not rows or [h.strip().lower() for h in rows[0][1]] != CSV_HEADER:
            raise ValidationError(
                "the first line must be the header name,phone,email,balance", value=str(path)
            )
        problems: list[str] = []
        parsed: list[tuple[int, NewPerson]] = []
        seen_phone: dict[str, int] = {}
        seen_email: dict[str, int] = {}
        for line, row in rows[1:]:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(CSV_HEADER):
                problems.append(f"line {line}: expected 4 columns, found {len(row)}")
                continue
            try:
                new = validate_new_person(*row)
            except SfcrmError as exc:
                problems.append(f"line {line}: {exc}")
                continue
            if new.phone in seen_phone:
                problems.append(f"line {line}: phone repeats line {seen_phone[new.phone]}")
                continue
            if new.email and new.email in seen_email:
                problems.append(f"line {line}: email repeats line {seen_email[new.email]}")
                continue
            seen_phone[new.phone] = line
            if new.email:
                seen_email[new.email] = line
            parsed.append((line, new))
        created: list[Person] = []
        with self.db.write() as session:
            for line, new in parsed:
                try:
                    self._check_unique(session, new)
                except ConflictError as exc:
                    problems.append(f"line {line}: {exc}")
            if problems:
                raise ValidationError(
                    f"{path.name} was not imported: "
                    + "; ".join(problems[:20])
                    + (f"; and {len(problems) - 20} more" if len(problems) > 20 else ""),
                    hint="fix the lines named and import the file again; nothing was added",
                )
            now = self.clock()
            for _line, new in parsed:
                created.append(self._create(session, new, now))
        return created
