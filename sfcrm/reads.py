"""Reads for the commands the office runs most (`mpesa status`), in plain SQL: they start
without loading the ORM. Writes stay in :mod:`sfcrm.payments` and :mod:`sfcrm.people`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sfcrm.db import from_db_time
from sfcrm.errors import NotFoundError, ValidationError
from sfcrm.money import format_kes
from sfcrm.status import PaymentStatus
from sfcrm.times import iso_in

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sfcrm.db import Database


# -- payments ----------------------------------------------------------------------------------


class PaymentLike(Protocol):
    """What a payment shows: an ORM row or a :class:`PaymentView`."""

    @property
    def id(self) -> int | None: ...
    @property
    def person_id(self) -> int: ...
    @property
    def phone_number(self) -> str: ...
    @property
    def amount(self) -> int: ...
    @property
    def payment_purpose(self) -> str: ...
    @property
    def account_reference(self) -> str | None: ...
    @property
    def status(self) -> str: ...
    @property
    def checkout_request_id(self) -> str | None: ...
    @property
    def merchant_request_id(self) -> str | None: ...
    @property
    def result_code(self) -> str | None: ...
    @property
    def result_desc(self) -> str | None: ...
    @property
    def receipt_number(self) -> str | None: ...
    @property
    def transaction_date(self) -> datetime | None: ...
    @property
    def initiated_at(self) -> datetime: ...
    @property
    def completed_at(self) -> datetime | None: ...
    @property
    def push_count(self) -> int: ...
    @property
    def refund_due(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class PaymentView:
    id: int
    person_id: int
    phone_number: str
    amount: int
    payment_purpose: str
    account_reference: str | None
    status: str
    checkout_request_id: str | None
    merchant_request_id: str | None
    result_code: str | None
    result_desc: str | None
    receipt_number: str | None
    transaction_date: datetime | None
    initiated_at: datetime
    completed_at: datetime | None
    push_count: int
    refund_due: bool


_COLUMNS = (
    "id, person_id, phone_number, amount, payment_purpose, account_reference, status, "
    "checkout_request_id, merchant_request_id, result_code, result_desc, receipt_number, "
    "transaction_date, initiated_at, completed_at, push_count, refund_due"
)


def _view(row: tuple[Any, ...]) -> PaymentView:
    (pid, person_id, phone, amount, purpose, reference, status, checkout_id, merchant_id,
     code, desc, receipt, paid_at, initiated_at, completed_at, pushes, refund) = row  # fmt: skip
    initiated = from_db_time(initiated_at)
    assert initiated is not None  # NOT NULL
    return PaymentView(
        pid, person_id, phone, amount, purpose, reference, status, checkout_id, merchant_id,
        code, desc, receipt, from_db_time(paid_at), initiated, from_db_time(completed_at), pushes,
        bool(refund),
    )  # fmt: skip


def find_payments(
    db: Database,
    *,
    status: str | None = None,
    person_ref: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[PaymentView]:
    """Payments newest first, by status and payer; each filter follows an index."""
    if status is not None and status not in PaymentStatus.ALL:
        raise ValidationError(
            "unknown status", value=status, hint="one of " + ", ".join(PaymentStatus.ALL)
        )
    where: list[str] = []
    params: list[Any] = []
    person_id: int | None = None
    if person_ref:
        from sfcrm.people import find_person

        with db.read() as session:
            person_id = find_person(session, person_ref).id
    with db.raw_read() as conn:
        if status:
            where.append("status = ?")
            params.append(status)
        if person_id is not None:
            where.append("person_id = ?")
            params.append(person_id)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM mpesa_payment {clause}"  # noqa: S608
            "ORDER BY id DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ).fetchall()
    return [_view(row) for row in rows]


def get_payment(db: Database, payment_id: int) -> PaymentView:
    with db.raw_read() as conn:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM mpesa_payment WHERE id = ?",  # noqa: S608
            (payment_id,),
        ).fetchone()
    if row is None:
        raise NotFoundError("no such payment", value=str(payment_id))
    return _view(row)


def payment_json(payment: PaymentLike, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "payment_id": payment.id,
        "status": payment.status,
        "amount": format_kes(payment.amount),
        "receipt_number": payment.receipt_number,
        "completed_at": iso_in(payment.completed_at, tz),
        "person_id": payment.person_id,
        "phone_number": payment.phone_number,
        "payment_purpose": payment.payment_purpose,
        "account_reference": payment.account_reference,
        "checkout_request_id": payment.checkout_request_id,
        "merchant_request_id": payment.merchant_request_id,
        "result_code": payment.result_code,
        "result_desc": payment.result_desc,
        "transaction_date": iso_in(payment.transaction_date, tz),
        "initiated_at": iso_in(payment.initiated_at, tz),
        "push_count": payment.push_count,
        "refund_due": payment.refund_due,
    }
