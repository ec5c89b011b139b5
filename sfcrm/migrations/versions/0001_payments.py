"""People, payments, their pushes, the callback inbox and the token cache.

Revision ID: 0001
Revises:
Create Date: the first release (``PRAGMA user_version = 1``)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "person",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("phone", sa.String, nullable=False, unique=True),
        sa.Column("email", sa.String, unique=True),
        sa.Column("balance_cents", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "mpesa_payment",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("person_id", sa.Integer, sa.ForeignKey("person.id"), nullable=False),
        sa.Column("phone_number", sa.String, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
        sa.Column("payment_purpose", sa.String, nullable=False),
        sa.Column("account_reference", sa.String),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("checkout_request_id", sa.String, unique=True),
        sa.Column("merchant_request_id", sa.String),
        sa.Column("result_code", sa.String),
        sa.Column("result_desc", sa.String),
        sa.Column("receipt_number", sa.String),
        sa.Column("transaction_date", sa.DateTime),
        sa.Column("initiated_at", sa.DateTime, nullable=False),
        sa.Column("completed_at", sa.DateTime),
        sa.Column("last_pushed_at", sa.DateTime),
        sa.Column("push_count", sa.Integer, nullable=False),
        sa.Column("balance_applied", sa.Boolean, nullable=False),
        sa.Column("refund_due", sa.Boolean, nullable=False),
        sa.Column("resend_claimed_until", sa.DateTime),
    )
    op.create_index("ix_mpesa_payment_person_status", "mpesa_payment", ["person_id", "status"])
    op.create_index("ix_mpesa_payment_status", "mpesa_payment", ["status"])
    op.create_table(
        "mpesa_checkout",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("payment_id", sa.Integer, sa.ForeignKey("mpesa_payment.id"), nullable=False),
        sa.Column("checkout_request_id", sa.String, nullable=False, unique=True),
        sa.Column("merchant_request_id", sa.String),
        sa.Column("pushed_at", sa.DateTime, nullable=False),
        sa.Column("result_code", sa.String),
        sa.Column("result_desc", sa.String),
        sa.Column("result_source", sa.String),
        sa.Column("result_at", sa.DateTime),
        sa.Column("receipt_number", sa.String),
        sa.Column("paid_amount", sa.String),
    )
    op.create_index("ix_mpesa_checkout_payment_id", "mpesa_checkout", ["payment_id"])
    op.create_table(
        "mpesa_callback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("source_addr", sa.String),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("checkout_request_id", sa.String),
        sa.Column("result_code", sa.String),
        sa.Column("trusted", sa.Boolean, nullable=False),
        sa.Column("outcome", sa.String, nullable=False),
        sa.Column("detail", sa.String),
        sa.Column("payment_id", sa.Integer, sa.ForeignKey("mpesa_payment.id")),
        sa.Column("processed_at", sa.DateTime),
    )
    op.create_index(
        "ix_mpesa_callback_checkout_request_id", "mpesa_callback", ["checkout_request_id"]
    )
    op.create_index("ix_mpesa_callback_outcome", "mpesa_callback", ["outcome"])
    op.create_table(
        "daraja_token",
        sa.Column("cache_key", sa.String, primary_key=True),
        sa.Column("access_token", sa.String, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("fetched_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("sfcrm upgrades only; restore a backup to go back")
