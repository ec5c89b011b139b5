"""People: the crew, clients and anyone else who owes Sound Fusion money."""

from __future__ import annotations

import csv
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import cached_property
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import exists, func, insert, literal, or_
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from sfcrm import audit
from sfcrm.db import Database
from sfcrm.errors import ConflictError, NotFoundError, SfcrmError, ValidationError
from sfcrm.ledger import change_balance
from sfcrm.models import BalanceEntry, BalanceKind, Person, UTCDateTime
from sfcrm.money import format_cents, parse_kes
from sfcrm.phone import normalise_phone

log = logging.getLogger("sfcrm.people")

MAX_NAME = 120
MAX_REASON = 500
CSV_HEADER = ["name", "phone", "email", "balance"]

# `people import` checks a whole file before it writes anything, so what one file may hold is
# bounded: past any of these it is refused at once, with nothing imported, instead of being
# read on until the memory runs out (an endless stream, one line with no end).
MAX_IMPORT_ROWS = 200_000
MAX_IMPORT_BYTES = 50_000_000
MAX_IMPORT_LINE_BYTES = 1_000_000
MAX_REPORTED = 20  # bad rows named in the error; the rest are counted
_IN_BATCH = 500  # values per IN (...): SQLite before 3.32 takes at most 999 in one statement
_WRITE_BATCH = 5000  # rows per INSERT of an import: its memory stays small


def person_json(person: Person, tz: tzinfo = UTC) -> dict[str, Any]:
    return {
        "id": person.id,
        "name": person.name,
        "phone": person.phone,
        "email": person.email,
        "balance": format_cents(person.balance_cents),
        "archived_at": (
            person.archived_at.astimezone(tz).isoformat(timespec="seconds")
            if person.archived_at
            else None
        ),
    }


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


# What staff type inside a phone number: 0722 111 002, +254 722-111-002, (0722) 111002.
_PHONE_TYPING = re.compile(r"[\s\-().+]")


def phone_digits(search: str) -> str | None:
    """The digits a search typed as a phone number looks for in a stored ``2547XXXXXXXX``:
    ``0722 111 002`` -> ``722111002``, ``+254 722-111-002`` -> ``254722111002``; None when
    the search is not a phone number (letters, or no digits)."""
    cleaned = _PHONE_TYPING.sub("", search)
    if not cleaned.isascii() or not cleaned.isdigit():
        return None
    return cleaned.removeprefix("0") or None  # the trunk 0 is never stored


def search_condition(search: str, *texts: Any, phone: Any = None) -> Any:
    """The rows whose ``texts`` hold ``search`` (any case, ``%`` and ``_`` meaning
    themselves), or whose ``phone`` holds the number typed in any form staff type."""
    search = search.strip()
    conditions = [col(c).icontains(search, autoescape=True) for c in texts]
    digits = phone_digits(search) if phone is not None else None
    if digits is not None:
        conditions.append(col(phone).contains(digits, autoescape=True))
    return or_(*conditions)


def printable_line(text: str) -> str:
    """Typed text as one line: no control, format (invisible) or line-break characters, and
    single spaces. Names and payment purposes end up in emails, logs and terminals."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def clean_name(name: str) -> str:
    cleaned = printable_line(name)
    if not cleaned:
        raise ValidationError("name must not be empty")
    if len(cleaned) > MAX_NAME:
        raise ValidationError(f"name is longer than {MAX_NAME} characters")
    return cleaned


def clean_reason(reason: str | None) -> str | None:
    """A reason for the audit log, as one line; None when blank."""
    if reason is None:
        return None
    cleaned = printable_line(reason)
    if len(cleaned) > MAX_REASON:
        raise ValidationError(f"reason is longer than {MAX_REASON} characters")
    return cleaned or None


def clean_email(email: str | None) -> str | None:
    """A plain address sfcrm can send to, lower-cased; None when blank."""
    if email is None or not email.strip():
        return None
    from sfcrm.mail import validate_address

    return validate_address(email.strip().lower())


def find_person(session: Session, ref: str) -> Person:
    """REF is an id, a phone number in any accepted form, or an email address.

    A phone is tried before an id: a short number like 712345678 is a phone first. An archived
    person is found too: named directly, their history stays at hand.
    """
    text = ref.strip()
    person: Person | None = None
    if "@" in text:
        person = session.exec(select(Person).where(col(Person.email) == text.lower())).first()
    else:
        try:
            phone: str | None = normalise_phone(text)
        except ValidationError:
            phone = None
        if phone:
            person = session.exec(select(Person).where(col(Person.phone) == phone)).first()
        if person is None and text.isdigit() and len(text) < 10:
            person = session.get(Person, int(text))
        if person is None and phone is None and not text.isdigit():
            raise NotFoundError(
                "no such person", value=ref, hint="give an id, a phone number or an email"
            )
    if person is None:
        raise NotFoundError("no such person", value=ref, hint="see `sfcrm people list`")
    return person


@dataclass(frozen=True, slots=True)
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
        try:
            return self._add(new)
        except _Overtaken:
            pass
        # Another writer stored this phone or email after the check (on PostgreSQL checks and
        # writes go side by side): the check, run again, names who has it.
        try:
            return self._add(new)
        except _Overtaken:
            raise ConflictError(
                "a person with this phone or email was added at the same time",
                value=new.phone,
                hint="see `sfcrm people show` for the phone and the email",
            ) from None

    def _add(self, new: NewPerson) -> Person:
        with self.db.write() as session, _overtaken_on_duplicate():
            self._check_unique(session, new)
            return self._create(session, new, self.clock())

    def _create(self, session: Session, new: NewPerson, now: datetime) -> Person:
        person = Person(name=new.name, phone=new.phone, email=new.email, created_at=now)
        session.add(person)
        session.flush()
        assert person.id is not None
        if new.balance_cents:
            change_balance(session, person.id, new.balance_cents, kind=BalanceKind.OPENING, now=now)
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
            assert person.id is not None
            entry = change_balance(
                session, person.id, signed, kind=kind, now=self.clock(), reason=why
            )
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
            if clash.phone == new.phone:
                raise _taken(clash.id, clash.name, "phone", new.phone)
            raise _taken(clash.id, clash.name, "email", new.email)

    def show(self, ref: str) -> Person:
        with self.db.read() as session:
            return find_person(session, ref)

    # -- corrections -----------------------------------------------------------------------

    def edit(
        self,
        ref: str,
        *,
        name: str | None = None,
        phone: str | None = None,
        email: str | None = None,
        remove_email: bool = False,
    ) -> tuple[Person, dict[str, tuple[Any, Any]]]:
        """Correct a person's name, phone or email (None keeps it; ``remove_email`` leaves
        them without one), checked as a new person's are: no other person may hold the phone
        or email. Returns the person and what changed (field: (before, after)), which goes to
        the audit log in the same transaction; nothing changed writes nothing."""
        if name is None and phone is None and email is None and not remove_email:
            raise ValidationError(
                "nothing to change", hint="give --name, --phone, --email or --no-email"
            )
        if email is not None and remove_email:
            raise ValidationError("give --email or --no-email, not both")
        wanted: dict[str, str | None] = {}
        if name is not None:
            wanted["name"] = clean_name(name)
        if phone is not None:
            wanted["phone"] = normalise_phone(phone)
        if remove_email:
            wanted["email"] = None
        elif email is not None:
            wanted["email"] = clean_email(email)
            if wanted["email"] is None:
                raise ValidationError(
                    "email must not be empty", hint="--no-email removes the person's email"
                )
        try:
            return self._edit(ref, wanted)
        except _Overtaken:
            pass
        # Another writer stored this phone or email after the check: the check, run again,
        # names who has it.
        try:
            return self._edit(ref, wanted)
        except _Overtaken:
            raise ConflictError(
                "another person was given this phone or email at the same time",
                value=ref,
                hint="see `sfcrm people list --search` for the phone and the email",
            ) from None

    def _edit(
        self, ref: str, wanted: dict[str, str | None]
    ) -> tuple[Person, dict[str, tuple[Any, Any]]]:
        with self.db.write() as session, _overtaken_on_duplicate():
            person = _locked(session, ref)
            changes = audit.changed({k: getattr(person, k) for k in wanted}, wanted)
            if not changes:
                return person, changes
            for what in ("phone", "email"):
                value = wanted.get(what)
                if what in changes and value is not None:
                    clash = session.exec(
                        select(Person).where(
                            col(getattr(Person, what)) == value, col(Person.id) != person.id
                        )
                    ).first()
                    if clash is not None:
                        raise _taken(clash.id, clash.name, what, value)
            for what, (_before, after) in changes.items():
                setattr(person, what, after)
            session.add(person)
            session.flush()
            audit.record(
                session, "person.edit", now=self.clock(), changes=changes, person_id=person.id
            )
        log.info("person %s edited: %s", person.id, ", ".join(changes))
        return person, changes

    def archive(self, ref: str, reason: str | None = None) -> Person:
        """Take a person out of lists, searches and every email, and out of reach of money
        requests; their history, payments and assignments stay. Nobody is ever deleted."""
        why = clean_reason(reason)
        with self.db.write() as session:
            person = _locked(session, ref)
            if person.archived_at is not None:
                raise ConflictError(
                    f"person {person.id} ({person.name}) is already archived",
                    hint=f"`sfcrm people unarchive {person.id}` brings them back",
                )
            now = self.clock()
            person.archived_at = now
            session.add(person)
            session.flush()
            audit.record(
                session, "person.archive", now=now, changes={"archived_at": (None, now)},
                reason=why, person_id=person.id,
            )  # fmt: skip
        log.info("person %s archived", person.id)
        return person

    def unarchive(self, ref: str) -> Person:
        """Bring an archived person back into lists, searches and emails."""
        with self.db.write() as session:
            person = _locked(session, ref)
            archived_at = person.archived_at
            if archived_at is None:
                raise ConflictError(f"person {person.id} ({person.name}) is not archived")
            person.archived_at = None
            session.add(person)
            session.flush()
            audit.record(
                session, "person.unarchive", now=self.clock(),
                changes={"archived_at": (archived_at, None)}, person_id=person.id,
            )  # fmt: skip
        log.info("person %s unarchived", person.id)
        return person

    def find(
        self, search: str | None = None, limit: int = 500, *, archived: bool = False
    ) -> Sequence[Person]:
        """People by name: those not archived, or with ``archived`` the archived ones."""
        archived_at = col(Person.archived_at)
        with self.db.read() as session:
            query = (
                select(Person)
                .where(archived_at.is_not(None) if archived else archived_at.is_(None))
                .order_by(col(Person.name), col(Person.id))
                .limit(limit)
            )
            if search:
                query = query.where(
                    search_condition(search, Person.name, Person.email, phone=Person.phone)
                )
            return session.exec(query).all()

    def names(self, ids: Iterable[int | None]) -> dict[int, str]:
        """The names of the people with these ids (archived or not), for tables that show
        whose a row is."""
        wanted = {i for i in ids if i is not None}
        if not wanted:
            return {}
        with self.db.read() as session:
            rows = session.exec(select(Person.id, Person.name).where(col(Person.id).in_(wanted)))
            return {pid: name for pid, name in rows if pid is not None}

    def import_csv(self, path: Path) -> ImportedPeople:
        """All rows or none: every bad row is reported by its line number.

        The file is read and checked first, holding no lock; then every row is written in one
        short transaction, so the listener and other commands wait for the write lock a moment
        at most.
        """
        checked = check_people_csv(path)
        self._report_taken(checked)
        checked.refuse(path)
        now = self.clock()
        if not checked.people:
            return ImportedPeople([], now, self._stored_ids)
        started = time.perf_counter()
        try:
            with self.db.write() as session, _overtaken_on_duplicate():
                self._insert(session, checked.people, now)
        except _Overtaken:
            # A phone or email of the file was added by someone else since it was checked.
            self._report_taken(checked)
            checked.refuse(path)
            raise ConflictError(
                "a person with a phone or email of this file was added during the import",
                value=str(path),
                hint="import the file again; nothing was added",
            ) from None
        took = time.perf_counter() - started
        log.info(
            "imported %d people from %s; the write took %.2f s", len(checked.people), path, took
        )
        return ImportedPeople(checked.people, now, self._stored_ids)

    def _report_taken(self, checked: CheckedRows) -> None:
        """A problem for each checked row whose phone or email a stored person already has,
        in the file's order; a few hundred rows per query."""
        with self.db.read() as session:
            for start in range(0, len(checked.people), _IN_BATCH):
                batch = checked.people[start : start + _IN_BATCH]
                phones = {p.phone for p in batch}
                emails = {p.email for p in batch if p.email}
                by_phone = {
                    phone: (person_id, name)
                    for person_id, name, phone in session.exec(
                        select(Person.id, Person.name, Person.phone).where(
                            col(Person.phone).in_(phones)
                        )
                    )
                }
                by_email = {
                    email: (person_id, name)
                    for person_id, name, email in session.exec(
                        select(Person.id, Person.name, Person.email).where(
                            col(Person.email).in_(emails)
                        )
                    )
                }
                for new in batch:
                    if new.phone in by_phone:
                        taken = _taken(*by_phone[new.phone], "phone", new.phone)
                    elif new.email in by_email:
                        taken = _taken(*by_email[new.email], "email", new.email)
                    else:
                        continue
                    checked.problem(f"line {checked.phones[new.phone]}: {taken}")

    def _insert(self, session: Session, people: list[NewPerson], now: datetime) -> None:
        """Write checked people and their opening balances.

        The write lock (SQLite) is held for this alone: Core statements on the session's
        connection, a few thousand rows each (the ORM's bulk path took a minute for 20,000
        rows where Core takes a fraction of a second).
        """
        conn = session.connection()
        before = conn.execute(sa_select(func.max(Person.id))).scalar() or 0
        for start in range(0, len(people), _WRITE_BATCH):
            conn.execute(
                insert(Person),
                [
                    {"name": new.name, "phone": new.phone, "email": new.email,
                     "balance_cents": new.balance_cents, "created_at": now}
                    for new in people[start : start + _WRITE_BATCH]
                ],
            )  # fmt: skip
        # Each opening entry is the whole balance, so every balance is still the sum of its
        # entries. On PostgreSQL another writer's people may hold ids past ``before``: they
        # have their entries already, which is how they are told apart.
        conn.execute(
            insert(BalanceEntry).from_select(
                ["person_id", "amount_cents", "balance_after_cents", "kind", "created_at"],
                sa_select(
                    col(Person.id),
                    col(Person.balance_cents),
                    col(Person.balance_cents),
                    literal(BalanceKind.OPENING),
                    literal(now, UTCDateTime()),
                )
                .where(
                    col(Person.id) > before,
                    col(Person.balance_cents) != 0,
                    ~exists().where(col(BalanceEntry.person_id) == col(Person.id)),
                )
                .order_by(col(Person.id)),
            )
        )

    def _stored_ids(self, people: list[NewPerson]) -> list[int | None]:
        """The ids written people were stored under, in their order, by their phones (None
        for a phone `people edit` changed since); a few hundred at a time, holding no lock."""
        ids: list[int | None] = []
        with self.db.read() as session:
            for start in range(0, len(people), _IN_BATCH):
                batch = people[start : start + _IN_BATCH]
                id_of = dict(
                    session.execute(
                        sa_select(col(Person.phone), col(Person.id)).where(
                            col(Person.phone).in_([new.phone for new in batch])
                        )
                    ).all()
                )
                ids.extend(cast("int | None", id_of.get(new.phone)) for new in batch)
        return ids


def _locked(session: Session, ref: str) -> Person:
    """The person REF names, locked for this write (PostgreSQL has no file lock)."""
    person = find_person(session, ref)
    session.refresh(person, with_for_update=True)
    return person


def _taken(person_id: int | None, name: str, what: str, value: str | None) -> ConflictError:
    return ConflictError(f"person {person_id} ({name}) already has this {what}", value=value)


class _Overtaken(Exception):
    """The database refused a row as a duplicate: it changed since the check."""


@contextmanager
def _overtaken_on_duplicate() -> Iterator[None]:
    """Inside a write: the UNIQUE phone and email columns refusing a row is ``_Overtaken``."""
    try:
        yield
    except IntegrityError:
        raise _Overtaken from None


@dataclass(frozen=True)
class ImportedPeople:
    """The people one import added, in the file's order. The ids they were stored under are
    read back when first asked for (a count needs none), by their phones: a phone is stored
    once. One changed by `people edit` in the meantime is not read back, and that person is
    left out of the listing."""

    rows: list[NewPerson]
    created_at: datetime
    read_ids: Callable[[list[NewPerson]], list[int | None]] = field(repr=False)

    @cached_property
    def ids(self) -> list[int | None]:
        return self.read_ids(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Person]:
        for person_id, new in zip(self.ids, self.rows, strict=True):
            if person_id is None:
                continue
            yield Person(
                id=person_id,
                name=new.name,
                phone=new.phone,
                email=new.email,
                balance_cents=new.balance_cents,
                created_at=self.created_at,
            )


@dataclass
class CheckedRows:
    """A CSV file's rows once checked: the good ones, and what is wrong with the others."""

    people: list[NewPerson] = field(default_factory=list)
    phones: dict[str, int] = field(default_factory=dict)  # each good row's phone: its line
    emails: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the first MAX_REPORTED
    bad: int = 0

    def add(self, line: int, row: list[str]) -> None:
        if len(row) != len(CSV_HEADER):
            self.problem(f"line {line}: expected 4 columns, found {len(row)}")
            return
        try:
            new = validate_new_person(*row)
        except SfcrmError as exc:
            self.problem(f"line {line}: {exc}")
            return
        if new.phone in self.phones:
            self.problem(f"line {line}: phone repeats line {self.phones[new.phone]}")
            return
        if new.email and new.email in self.emails:
            self.problem(f"line {line}: email repeats line {self.emails[new.email]}")
            return
        self.phones[new.phone] = line
        if new.email:
            self.emails[new.email] = line
        self.people.append(new)

    def problem(self, text: str) -> None:
        self.bad += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(text)

    def refuse(self, path: Path) -> None:
        """Raise the one error naming every bad row, if there is one."""
        if self.bad:
            more = self.bad - len(self.problems)
            raise ValidationError(
                f"{path.name} was not imported: "
                + "; ".join(self.problems)
                + (f"; and {more} more" if more else ""),
                hint="fix the lines named and import the file again; nothing was added",
            )


def check_people_csv(path: Path) -> CheckedRows:
    """Read a people CSV as a stream and check every row, without touching the database.

    Raises at once for what makes the file unreadable (not UTF-8, past the import's limits,
    broken CSV, no header); collects the problems of single rows for the caller.
    """
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise NotFoundError("file not found", value=str(path)) from None
    except OSError as exc:
        raise ValidationError(f"cannot read file: {exc.strerror}", value=str(path)) from None
    with file:
        info = os.fstat(file.fileno())
        if stat.S_ISREG(info.st_mode) and info.st_size > MAX_IMPORT_BYTES:
            raise _too_large(path)
        try:
            return _check_rows(_records(file, path), path)
        except OSError as exc:
            raise ValidationError(f"cannot read file: {exc.strerror}", value=str(path)) from None


def _check_rows(records: Iterator[tuple[int, list[str]]], path: Path) -> CheckedRows:
    header = next(records, None)
    if header is None or [h.strip().lower() for h in header[1]] != CSV_HEADER:
        raise ValidationError(
            "the first line must be the header name,phone,email,balance", value=str(path)
        )
    checked = CheckedRows()
    rows = 0
    for line, row in records:
        if not any(cell.strip() for cell in row):
            continue
        rows += 1
        if rows > MAX_IMPORT_ROWS:
            raise ValidationError(
                f"more than {MAX_IMPORT_ROWS:,} rows, the most one import takes",
                value=str(path),
                hint="split the file and import each part; nothing was added",
            )
        checked.add(line, row)
    return checked


def _records(file: IO[bytes], path: Path) -> Iterator[tuple[int, list[str]]]:
    """The file's CSV rows with their line numbers (a row's number, header = 1, as a
    spreadsheet shows it); one clear error for a row that cannot be read."""
    reader = csv.reader(_lines(file, path))
    line = 0
    while True:
        line += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except _Unreadable as exc:
            raise _unreadable(path, line, exc.reason, exc.hint) from None
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                reason = f"a field is longer than {csv.field_size_limit():,} characters"
            elif "new-line character seen in unquoted field" in str(exc):
                reason = "a line ends in a lone carriage return"
            else:
                reason = f"not readable as CSV: {exc}"
            raise _unreadable(path, line, reason) from None
        yield line, row


def _lines(file: IO[bytes], path: Path) -> Iterator[str]:
    """The file's lines, decoded one at a time, within the import's limits."""
    read = 0
    encoding = "utf-8-sig"  # a byte-order mark, as spreadsheets write, is not part of the header
    while raw := file.readline(MAX_IMPORT_LINE_BYTES + 1):
        read += len(raw)
        if read > MAX_IMPORT_BYTES:
            raise _too_large(path)
        if len(raw) > MAX_IMPORT_LINE_BYTES:
            raise _Unreadable(f"the line is longer than {MAX_IMPORT_LINE_BYTES:,} bytes")
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            raise _Unreadable(
                "not UTF-8 text", "save the file as CSV UTF-8 and import it again"
            ) from None
        encoding = "utf-8"
        yield text


class _Unreadable(Exception):
    """A line that is not given to the CSV reader, and why."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def _unreadable(path: Path, line: int, reason: str, hint: str | None = None) -> ValidationError:
    return ValidationError(
        f"line {line}: {reason}",
        value=str(path),
        hint=(hint or "fix that line and import the file again") + "; nothing was added",
    )


def _too_large(path: Path) -> ValidationError:
    return ValidationError(
        f"larger than {MAX_IMPORT_BYTES // 1_000_000} MB, the most one import takes",
        value=str(path),
        hint="split the file and import each part; nothing was added",
    )
