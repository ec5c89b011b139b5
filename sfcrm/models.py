"""The tables. Money is stored as integers (payment amounts in whole shillings, balances in
cents) and every timestamp as UTC; both are converted only when shown."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ConfigDict
from sqlalchemy import (
    Column,
    ColumnElement,
    ForeignKey,
    Index,
    LargeBinary,
    Table,
    and_,
    case,
    column,
    not_,
    or_,
)
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, SQLModel, col

# re-exported: the statuses live apart from the ORM, for commands that never load it
from sfcrm.status import CrewStatus as CrewStatus
from sfcrm.status import PaymentStatus as PaymentStatus


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


# a payment in one of these has moved money, or holds it for review (MpesaPayment.settled)
_MONEY_MOVED = (PaymentStatus.COMPLETED, PaymentStatus.NEEDS_REVIEW)


def table(model: type[SQLModel]) -> Table:
    """The table a model maps, for the Core statements of hot paths."""
    return SQLModel.metadata.tables[str(model.__tablename__)]


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable)


class Person(SQLModel, table=True):
    __tablename__ = "person"

    id: int | None = Field(default=None, primary_key=True)
    name: str
    phone: str = Field(unique=True)
    email: str | None = Field(default=None, unique=True)
    balance_cents: int = 0
    created_at: datetime = _ts(nullable=False)
    # archived: out of lists, searches and every email, never asked for money; history kept
    archived_at: datetime | None = _ts()
    # signs the person's own page link (`crew link`); a new key kills the old link at once
    link_key: str | None = None


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
    last_pushed_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    push_count: int = 0
    balance_applied: bool = False
    refund_due: bool = False
    resend_claimed_until: datetime | None = _ts()
    # how its outcome was learnt: "callback", "query" (an STK Push Query), "manual" (resolved)
    settled_by: str | None = None
    resolved_at: datetime | None = _ts()  # settled by hand (`mpesa resolve`)
    resolution: str | None = None  # the reason given for it
    refund_done_at: datetime | None = _ts()  # a refund made outside sfcrm, recorded

    # the rules below work on a loaded row and inside a query alike
    model_config = ConfigDict(ignored_types=(hybrid_property,))  # type: ignore[assignment]

    @hybrid_property
    def settled(self) -> bool:
        """Money moved for this payment (or is held for review): its status never goes back,
        and it is never pushed again. (``completed`` always comes with ``balance_applied``.)"""
        return self.balance_applied or self.status in _MONEY_MOVED

    @settled.inplace.expression
    @classmethod
    def _settled_expression(cls) -> ColumnElement[bool]:
        return or_(col(cls.balance_applied), col(cls.status).in_(_MONEY_MOVED))

    @hybrid_property
    def unanswered(self) -> bool:
        """Its latest push was sent and Daraja's answer to it never recorded: the prompt may be
        on the phone, and only a callback matched by phone and amount can settle it."""
        return self.status == PaymentStatus.UNKNOWN and self.checkout_request_id is None

    @unanswered.inplace.expression
    @classmethod
    def _unanswered_expression(cls) -> ColumnElement[bool]:
        return and_(
            col(cls.status) == PaymentStatus.UNKNOWN, col(cls.checkout_request_id).is_(None)
        )


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

    ALL = (
        RECEIVED, APPLIED, DUPLICATE, IGNORED, UNMATCHED, NEEDS_QUERY, REVIEW, REFUND, REJECTED,
        ERROR,
    )  # fmt: skip
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
    expires_at: datetime = _ts(nullable=False)  # when sfcrm stops using it, a bit before Daraja
    fetched_at: datetime = _ts(nullable=False)


class Event(SQLModel, table=True):
    """An event Sound Fusion works. ``date``/``time`` are wall-clock in SFCRM_TIMEZONE as typed;
    ``starts_at``/``ends_at`` are the same moments in UTC, for overlap and reminder queries."""

    __tablename__ = "event"

    id: int | None = Field(default=None, primary_key=True)
    name: str
    date: str  # YYYY-MM-DD
    time: str | None = None  # HH:MM
    end_time: str | None = None  # HH:MM
    location: str
    details: str | None = None
    starts_at: datetime = Field(sa_type=UTCDateTime, nullable=False, index=True)
    ends_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    created_at: datetime = _ts(nullable=False)
    cancelled_at: datetime | None = _ts()
    cancel_reason: str | None = None
    # the calendar entry's SEQUENCE: raised with each change crew are told of
    sequence: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class RoleNeed(SQLModel, table=True):
    """How many people an event needs in one role (`events needs`)."""

    __tablename__ = "role_need"
    __table_args__ = (Index("ux_role_need_event_role", "event_id", "role", unique=True),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: int = Field(foreign_key="event.id")
    role: str
    count: int


class EventCrew(SQLModel, table=True):
    """One person on one event, in one role."""

    __tablename__ = "event_crew"
    __table_args__ = (
        Index("ux_event_crew_event_person", "event_id", "person_id", unique=True),
        Index("ix_event_crew_event_status", "event_id", "status"),
        Index("ix_event_crew_person_status", "person_id", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    event_id: int = Field(foreign_key="event.id")
    person_id: int = Field(foreign_key="person.id")
    role: str
    status: str = CrewStatus.INVITED
    notes: str | None = None
    invitation_sent: bool = False
    invitation_sent_at: datetime | None = _ts()
    # the email written for the invitation/reminder: set when it is queued, so two runs at
    # once cannot both queue one
    invitation_email_id: int | None = Field(default=None, foreign_key="email_notification.id")
    reminder_sent: bool = False
    reminder_sent_at: datetime | None = _ts()
    reminder_email_id: int | None = Field(default=None, foreign_key="email_notification.id")
    responded_at: datetime | None = _ts()
    created_at: datetime = _ts(nullable=False)
    checked_in_at: datetime | None = _ts()  # arrival at the event (`crew checkin`)

    def invitation_refusal(self, email: tuple[str, str | None] | None = None) -> str | None:
        """Why this assignment gets no invitation now, or None. ``email``: the state and last
        error of the invitation already written, when there is one, so that the reason says
        when and how it will go."""
        if self.invitation_sent:
            return "invitation already sent"
        if self.invitation_email_id is not None:
            written = f"invitation already written (email {self.invitation_email_id})"
            if email is None:
                return f"{written}; see `sfcrm mail list --unsent`"
            state, error = email
            return f"{written}: {EmailState.outlook(state, self.invitation_email_id, error)}"
        if self.status in (CrewStatus.DECLINED, CrewStatus.COMPLETED, *CrewStatus.CLOSED):
            return f"assignment is {self.status}"
        return None

    def notice_refusal(self) -> str | None:
        """Why this assignment is not told that its event changed or was cancelled, or that
        it was removed, or None: only invited or confirmed crew who know of the event are."""
        if self.status not in (CrewStatus.INVITED, CrewStatus.CONFIRMED):
            return f"assignment is {self.status}"
        if self.status == CrewStatus.INVITED and not (
            self.invitation_sent or self.invitation_email_id is not None
        ):
            return "not invited yet"
        return None

    @classmethod
    def awaiting_reminder(cls) -> ColumnElement[bool]:
        """Confirmed, and no reminder sent or written yet."""
        return and_(
            col(cls.status) == CrewStatus.CONFIRMED,
            col(cls.reminder_sent).is_(False),
            col(cls.reminder_email_id).is_(None),
        )


# the last error of an email whose send stopped after its message may have gone out
INTERRUPTED = "interrupted while sending; it may have been delivered"


class EmailState:
    """Where an email is (:meth:`EmailNotification.state`)."""

    QUEUED = "queued"  # written, never tried, and no sender holds it: `mail retry` sends it
    SENDING = "sending"  # a sender holds it (the run that wrote it, or a retry)
    SENT = "sent"
    FAILED = "failed"  # tried and not delivered: `mail retry` tries again
    REFUSED = "refused"  # refused for good by the server (5xx): sent again only when named
    INTERRUPTED = "interrupted"  # stopped mid-send, may have been delivered: only when named
    # never sent: the event changed, was cancelled or its crew member removed after it was
    # written, so it says what is no longer true (its last error says by what)
    SUPERSEDED = "superseded"

    ALL = (QUEUED, SENDING, SENT, FAILED, REFUSED, INTERRUPTED, SUPERSEDED)

    @staticmethod
    def outlook(state: str, email_id: int, error: str | None = None) -> str:
        """When and how an email in ``state`` will go, for the person at the terminal."""
        retry = f"`sfcrm mail retry {email_id}`"
        because = f" ({error})" if error else ""
        return {
            EmailState.QUEUED: "not sent yet and no sfcrm is sending it: `sfcrm mail retry` "
            "sends it",
            EmailState.SENDING: "being sent now by another sfcrm",
            EmailState.SENT: "sent",
            EmailState.FAILED: f"sending it failed{because}; `sfcrm mail retry` tries again",
            EmailState.REFUSED: f"the server refused it for good{because}; {retry} to force",
            EmailState.INTERRUPTED: "interrupted mid-send, it may have been delivered: ask them, "
            f"then {retry} to send it again",
            EmailState.SUPERSEDED: f"never sent: {error or 'superseded'}",
        }.get(state, state)


class EmailNotification(SQLModel, table=True):
    """The mail log: every email is written here before it is sent, as the exact bytes sent."""

    __tablename__ = "email_notification"

    id: int | None = Field(default=None, primary_key=True)
    recipient: str
    person_id: int | None = Field(default=None, foreign_key="person.id", index=True)
    # (the assignment points back at its emails: this reference is added after both tables)
    assignment_id: int | None = Field(
        default=None,
        sa_column_args=[
            ForeignKey(
                "event_crew.id", use_alter=True, name="email_notification_assignment_id_fkey"
            )
        ],
    )
    notification_type: str = Field(index=True)
    subject: str
    message: str  # the plain-text body, for people reading the log
    mime: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False, index=True)
    is_sent: bool = Field(default=False, index=True)
    sent_at: datetime | None = _ts()
    failed_attempts: int = 0
    last_error: str | None = None
    permanent_failure: bool = False  # a 5xx refusal: not retried without being named
    claimed_until: datetime | None = _ts()  # a sender holds it until then
    claim_token: str | None = None
    # written before a change that made it untrue: never sent (see EmailState.SUPERSEDED)
    superseded_at: datetime | None = _ts()

    # Its sending state, as conditions on the table's columns, for the statements of
    # sfcrm.mail.claims (which makes the moves). Each is true or false, never NULL, so that its
    # negation holds too. ``now`` is a time or a bound parameter.

    @classmethod
    def held(cls, now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
        """A sender holds it: its claim has not expired. (The hold of the run that wrote it,
        a claim with no token, counts only while nobody has tried it.)"""
        c = table(cls).c
        return and_(
            c.claimed_until.is_not(None),
            c.claimed_until >= now,
            or_(c.claim_token.is_not(None), c.failed_attempts == 0),
        )

    @classmethod
    def abandoned(cls, now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
        """Claimed, and the claim expired without a result: the sender died or hung mid-send,
        so it may have been delivered."""
        c = table(cls).c
        return and_(c.is_sent.is_(False), c.claim_token.is_not(None), not_(cls.held(now)))

    @classmethod
    def state(cls, now: datetime | ColumnElement[datetime]) -> ColumnElement[str]:
        """Its state at ``now``, one of :class:`EmailState`: the one definition that
        ``mail list``, ``mail retry`` and ``crew invite``'s hints all read.

        The run that writes an email holds it from the moment it is written (its claim, with no
        token, lasts a lease and is renewed while the run sends; the run lets go of what it did
        not send when it ends). So an email no sender holds and nobody tried is *queued*: its
        writer is gone, and ``mail retry`` sends it.
        """
        c = table(cls).c
        return case(
            (c.is_sent.is_(True), EmailState.SENT),
            (c.superseded_at.is_not(None), EmailState.SUPERSEDED),
            (cls.held(now), EmailState.SENDING),
            (c.claim_token.is_not(None), EmailState.INTERRUPTED),  # the claim lapsed mid-send
            (c.permanent_failure.is_(True), EmailState.REFUSED),
            (c.last_error.is_not_distinct_from(INTERRUPTED), EmailState.INTERRUPTED),
            (c.failed_attempts > 0, EmailState.FAILED),
            else_=EmailState.QUEUED,
        )


class AuditEntry(SQLModel, table=True):
    """The audit log: every correction, cancellation and resolution, written in the transaction
    that makes it: what changed (before and after), when, by whom, and why."""

    __tablename__ = "audit_entry"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_type=UTCDateTime, nullable=False, index=True)
    actor: str  # the OS user and host: "wanjiru@office-laptop"
    action: str  # "person.edit", "event.cancel", "payment.resolve", …
    # what it is about (plain ids: the log outlives nothing, and refers to rows never deleted)
    person_id: int | None = Field(default=None, index=True)
    event_id: int | None = Field(default=None, index=True)
    assignment_id: int | None = None
    payment_id: int | None = Field(default=None, index=True)
    changes: str | None = None  # JSON: {"field": [before, after], …}
    reason: str | None = None


class BalanceKind:
    OPENING = "opening"  # the balance a person was added with
    CHARGE = "charge"  # owes more: an advance, a deposit due, a damaged cable
    CREDIT = "credit"  # owes less, paid some other way
    PAYMENT = "payment"  # an M-Pesa payment completed

    ALL = (OPENING, CHARGE, CREDIT, PAYMENT)


class BalanceEntry(SQLModel, table=True):
    """The ledger: every change of a balance, written in the transaction that makes it.

    A person's balance is always the sum of their entries. The database itself refuses a second
    entry for one payment, so no payment can reduce a balance twice.
    """

    __tablename__ = "balance_entry"
    __table_args__ = (
        Index(
            "ux_balance_entry_payment",
            "payment_id",
            unique=True,
            sqlite_where=column("payment_id").is_not(None),
            postgresql_where=column("payment_id").is_not(None),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="person.id", index=True)
    amount_cents: int  # positive: owes more; negative: owes less
    balance_after_cents: int
    kind: str
    reason: str | None = None
    payment_id: int | None = Field(default=None, foreign_key="mpesa_payment.id")
    created_at: datetime = _ts(nullable=False)
