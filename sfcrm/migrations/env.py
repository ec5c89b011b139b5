"""Alembic's entry point. sfcrm runs it on a connection it has opened and locked itself
(:func:`sfcrm.db.upgrade`), inside one transaction: an upgrade is whole or not at all."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import sfcrm.models  # noqa: F401 - registers every table on SQLModel.metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
