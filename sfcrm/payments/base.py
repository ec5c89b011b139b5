"""What every part of :class:`~sfcrm.payments.Payments` shares: its dependencies, and reading
payments."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from sfcrm.errors import ConfigError, DatabaseConflictError, NotFoundError, ValidationError
from sfcrm.models import MpesaPayment, PaymentStatus
from sfcrm.people import find_person

if TYPE_CHECKING:
    from sfcrm.daraja import DarajaClient
    from sfcrm.db import Database


class PaymentsBase:
    """The dependencies, passed in; the Daraja client is built on first use."""

    def __init__(
        self,
        db: Database,
        *,
        callback_url: str | None,
        clock: Callable[[], datetime],
        client_factory: Callable[[], DarajaClient],
        confirm_by_query: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.notify: Callable[[str], None] = notify or (lambda _text: None)
        self.callback_url = callback_url
        self.clock = clock
        self._client_factory = client_factory
        self._client: DarajaClient | None = None
        self.confirm_by_query = confirm_by_query

    @property
    def client(self) -> DarajaClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _require_callback_url(self) -> str:
        if not self.callback_url:
            raise ConfigError(
                "MPESA_CALLBACK_URL is not set",
                hint="set MPESA_CALLBACK_URL in the environment or .env to the public URL of "
                "`sfcrm serve-callback`, with a long random secret in its path",
            )
        return self.callback_url

    # -- reading ---------------------------------------------------------------------------

    def get(self, payment_id: int) -> MpesaPayment:
        with self.db.read() as session:
            payment = session.get(MpesaPayment, payment_id)
            if payment is None:
                raise NotFoundError("no such payment", value=str(payment_id))
            return payment

    def find(
        self,
        *,
        status: str | None = None,
        person_ref: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[MpesaPayment]:
        """Payments newest first, by status and payer; each filter follows an index."""
        if status is not None and status not in PaymentStatus.ALL:
            raise ValidationError(
                "unknown status", value=status, hint="one of " + ", ".join(PaymentStatus.ALL)
            )
        with self.db.read() as session:
            query = select(MpesaPayment)
            if status:
                query = query.where(MpesaPayment.status == status)
            if person_ref:
                query = query.where(MpesaPayment.person_id == find_person(session, person_ref).id)
            query = query.order_by(col(MpesaPayment.id).desc()).limit(limit).offset(offset)
            return list(session.exec(query).all())

    def pending_ids(self) -> list[int]:
        with self.db.read() as session:
            rows = session.exec(
                select(MpesaPayment.id)
                .where(MpesaPayment.status == PaymentStatus.PENDING)
                .order_by(col(MpesaPayment.id))
            ).all()
            return [r for r in rows if r is not None]

    def person_ids(self, payment_ids: list[int]) -> dict[int, int]:
        """Whose each of these payments is: payment id -> person id."""
        if not payment_ids:
            return {}
        with self.db.read() as session:
            rows = session.exec(
                select(MpesaPayment.id, MpesaPayment.person_id).where(
                    col(MpesaPayment.id).in_(payment_ids)
                )
            ).all()
            return {pid: person for pid, person in rows if pid is not None}


@contextmanager
def inserting_unique() -> Iterator[None]:
    """Around the insert of a row with a unique key another writer may be inserting at this
    moment (on PostgreSQL no lock covers a row that does not exist yet): losing that race runs
    the whole transaction again (``Database.transaction``), which then finds the row."""
    try:
        yield
    except IntegrityError as exc:
        orig = exc.orig
        if getattr(orig, "sqlstate", None) != "23505" and "UNIQUE" not in str(orig):
            raise
        raise DatabaseConflictError(
            "another writer stored the same row meanwhile; nothing was written",
            hint="run the command again",
        ) from None
