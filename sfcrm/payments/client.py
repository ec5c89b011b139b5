"""The office's Daraja client, built from the settings, and the token cache every sfcrm process
on one database shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlmodel import Session

from sfcrm.daraja import DarajaClient
from sfcrm.models import DarajaToken

if TYPE_CHECKING:
    from sfcrm.config import Settings
    from sfcrm.db import Database


class DatabaseTokenCache:
    """Keeps the Daraja token in the database so short CLI runs do not knock each other's out."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self, key: str) -> tuple[str, datetime] | None:
        with self.db.read() as session:
            row = session.get(DarajaToken, key)
            return (row.access_token, row.expires_at) if row else None

    def store(self, key: str, token: str, expires_at: datetime) -> None:
        fetched_at = datetime.now(UTC)

        def save(session: Session) -> None:
            row = session.get(DarajaToken, key, with_for_update=True)
            if row is None:
                row = DarajaToken(
                    cache_key=key, access_token=token, expires_at=expires_at, fetched_at=fetched_at
                )
            row.access_token = token
            row.expires_at = expires_at
            row.fetched_at = fetched_at
            session.add(row)

        self.db.transaction(save)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One token fetch at a time across threads, processes and machines on this database."""
        with self.db.exclusive("token"):
            yield


def build_daraja_client(
    settings: Settings, db: Database, clock: Callable[[], datetime]
) -> DarajaClient:
    """The client for the configured Daraja; a missing credential fails here, before any call."""
    settings.require(
        "mpesa_consumer_key", "mpesa_consumer_secret", "mpesa_business_short_code", "mpesa_pass_key"
    )
    if settings.mpesa_transaction_type == "CustomerBuyGoodsOnline":
        settings.require("mpesa_till_number")
    import requests

    return DarajaClient(
        settings.daraja_base_url,
        settings.mpesa_consumer_key,
        settings.mpesa_consumer_secret,
        str(settings.mpesa_business_short_code),
        settings.mpesa_pass_key,
        session=requests.Session(),
        timeout=settings.mpesa_timeout,
        clock=clock,
        token_cache=DatabaseTokenCache(db),
        transaction_type=settings.mpesa_transaction_type,
        till_number=settings.mpesa_till_number,
    )
