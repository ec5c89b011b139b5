"""A payment left "initiated" by an older release may have been pushed (that release recorded
the push only once Daraja answered): its outcome is unknown, not "never sent". Pushes are found
by when they were sent (a "paid" callback no push holds).

Revision ID: 0004
Revises: 0003
Create Date: ``PRAGMA user_version = 4``
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    payment = sa.table(
        "mpesa_payment",
        sa.column("status", sa.String),
        sa.column("last_pushed_at", sa.DateTime),
        sa.column("initiated_at", sa.DateTime),
        sa.column("result_desc", sa.String),
    )
    op.execute(
        payment.update()
        .where(payment.c.status == "initiated")
        .values(
            status="unknown",
            last_pushed_at=sa.func.coalesce(payment.c.last_pushed_at, payment.c.initiated_at),
            result_desc=sa.func.coalesce(
                payment.c.result_desc,
                sa.literal("left initiated by an older sfcrm: the push may have been sent"),
            ),
        )
    )
    op.create_index("ix_mpesa_payment_last_pushed_at", "mpesa_payment", ["last_pushed_at"])


def downgrade() -> None:
    raise NotImplementedError("sfcrm upgrades only; restore a backup to go back")
