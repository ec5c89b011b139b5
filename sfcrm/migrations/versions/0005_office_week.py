"""A real office's week: people archived, events cancelled or changed (the calendar entry's
SEQUENCE), payments resolved by hand, and the audit log of every such change.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("person", sa.Column("archived_at", sa.DateTime))
    op.add_column("event", sa.Column("cancelled_at", sa.DateTime))
    op.add_column("event", sa.Column("cancel_reason", sa.String))
    op.add_column("event", sa.Column("sequence", sa.Integer, nullable=False, server_default="0"))
    for name, kind in (
        ("settled_by", sa.String),
        ("resolved_at", sa.DateTime),
        ("resolution", sa.String),
        ("refund_done_at", sa.DateTime),
    ):
        op.add_column("mpesa_payment", sa.Column(name, kind))
    # an email written before a change that made it untrue is never sent
    op.add_column("email_notification", sa.Column("superseded_at", sa.DateTime))
    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String, nullable=False),
        sa.Column("action", sa.String, nullable=False),
        sa.Column("person_id", sa.Integer),
        sa.Column("event_id", sa.Integer),
        sa.Column("assignment_id", sa.Integer),
        sa.Column("payment_id", sa.Integer),
        sa.Column("changes", sa.String),
        sa.Column("reason", sa.String),
    )
    for column in ("at", "person_id", "event_id", "payment_id"):
        op.create_index(f"ix_audit_entry_{column}", "audit_entry", [column])


def downgrade() -> None:
    raise NotImplementedError("sfcrm upgrades only; restore a backup to go back")
