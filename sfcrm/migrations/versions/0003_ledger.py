"""The balance ledger; balances held before it become opening entries.

Revision ID: 0003
Revises: 0002
Create Date: ``PRAGMA user_version = 3``
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    entry = op.create_table(
        "balance_entry",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("person_id", sa.Integer, sa.ForeignKey("person.id"), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
        sa.Column("balance_after_cents", sa.Integer, nullable=False),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("reason", sa.String),
        sa.Column("payment_id", sa.Integer, sa.ForeignKey("mpesa_payment.id")),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_balance_entry_person_id", "balance_entry", ["person_id"])
    op.create_index(
        "ux_balance_entry_payment",
        "balance_entry",
        ["payment_id"],
        unique=True,
        sqlite_where=sa.text("payment_id IS NOT NULL"),
        postgresql_where=sa.text("payment_id IS NOT NULL"),
    )
    person = sa.table("person", sa.column("id", sa.Integer), sa.column("balance_cents", sa.Integer))
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    op.execute(
        entry.insert().from_select(
            ["person_id", "amount_cents", "balance_after_cents", "kind", "reason", "created_at"],
            sa.select(
                person.c.id,
                person.c.balance_cents,
                person.c.balance_cents,
                sa.literal("opening"),
                sa.literal("balance before the ledger"),
                sa.literal(now, sa.DateTime),
            ).where(person.c.balance_cents != 0),
        )
    )


def downgrade() -> None:
    raise NotImplementedError("sfcrm upgrades only; restore a backup to go back")
