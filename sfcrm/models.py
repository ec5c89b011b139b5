"""The tables. Money is stored as integers (payment amounts in whole shillings, balances in
cents) and every timestamp as UTC; both are converted only when shown."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Index, LargeBinary
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out; stored as naive UTC text."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable)


class PaymentStatus:
    INITIATED = "initiated"  # row written, push not answered yet
    PENDING = "pending"  # Daraja accepted the push; waiting for the outcome
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # 1031 / 1032
    NEEDS_REVIEW = "needs_review"  # paid, but not the amount asked for
    UNKNOWN = "unknown"  # the push may have reached Daraja but its answer never came

    ALL = (INITIATED, PENDING, COMPLETED, FAILED, CANCELLED, NEEDS_REVIEW, UNKNOWN)
    OPEN = (PENDING, UNKNOWN)


class Person(SQLModel, table=True):
    __tablename__ = "person"

    id: int | None = Field(default=None, primary_key=True)
    name: str
    phone: str = Field(unique=True)
    email: str | None = Field(default=None, unique=True)
    balance_cents: int = 0
    created_at: datetime = _ts(nullable=False)


class MpesaPayment(SQLModel, table=True):
    __tablename__ = "mpesa_payment"
    __table_args__ = (Index("ix_mpesa_payment_person_status", "person_id", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="person.id")
    phone_number: str
    amount: int  # whole shillings
    payment_purpose: str
    account_reference: str | None = None
    status: str = Field(default=PaymentStatus.INITIATED, index=True)
    # the latest CheckoutRequestID; every one ever issued is in mpesa_checkout
    checkout_request_id: str | None = Field(default=None, unique=True)
    merchant_request_id: str | None = None
    result_code: str | None = None
    result_desc: str | None = None
    receipt_number: str | None = None
    transaction_date: datetime | None = _ts()
    initiated_at: datetime = _ts(nullable=False)
    completed_at: datetime | None = _ts()
    last_pushed_at: datetime | None = _ts()
    push_count: int = 0
    balance_applied: bool = False
    refund_due: bool = False
    resend_claimed_until: datetime | None = _ts()


class MpesaCheckout(SQLModel, table=True):
    """One STK push of a payment: its IDs and, once known, its outcome."""

    __tablename__ = "mpesa_checkout"

    id: int | None = Field(default=None, primary_key=True)
    payment_id: int = Field(foreign_key="mpesa_payment.id", index=True)
    checkout_request_id: str = Field(unique=True)
    merchant_request_id: str | None = None
    pushed_at: datetime = _ts(nullable=False)
    result_code: str | None = None
    result_desc: str | None = None
    result_source: str | None = None  # "callback" or "query"
    result_at: datetime | None = _ts()
    receipt_number: str | None = None
    paid_amount: str | None = None  # as Daraja sent it, a decimal string


class CallbackOutcome:
    RECEIVED = "received"  # stored, not yet acted on
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"  # superseded or out of order; nothing changed
    UNMATCHED = "unmatched"  # no payment has this CheckoutRequestID (yet)
    NEEDS_QUERY = "needs_query"  # waits for an STK Push Query to confirm it
    REVIEW = "needs_review"
    REFUND = "refund_due"
    REJECTED = "rejected"  # not a Daraja callback
    ERROR = "error"  # acting on it failed; reconcile retries

    RETRYABLE = (RECEIVED, UNMATCHED, NEEDS_QUERY, ERROR)


class MpesaCallback(SQLModel, table=True):
    """The inbox: every body posted to the callback path, stored before it is acted on."""

    __tablename__ = "mpesa_callback"

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = _ts(nullable=False)
    source_addr: str | None = None
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    checkout_request_id: str | None = Field(default=None, index=True)
    result_code: str | None = None
    # false when it came from outside the allowlist: a "paid" then needs a query to confirm it
    trusted: bool = True
    outcome: str = Field(default=CallbackOutcome.RECEIVED, index=True)
    detail: str | None = None
    payment_id: int | None = Field(default=None, foreign_key="mpesa_payment.id")
    processed_at: datetime | None = _ts()


class DarajaToken(SQLModel, table=True):
    """The cached OAuth token, one per (Daraja host, consumer key); the key is hashed."""

    __tablename__ = "daraja_token"

    cache_key: str = Field(primary_key=True)
    access_token: str
    expires_at: datetime = _ts(nullable=False)
    fetched_at: datetime = _ts(nullable=False)
