"""The crew's own page and the staffing board: each person's revocable link key, the
headcount an event needs per role, and when a crew member checked in.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("person", sa.Column("link_key", sa.String))
    op.add_column("event_crew", sa.Column("checked_in_at", sa.DateTime))
    op.create_table(
        "role_need",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.Integer, sa.ForeignKey("event.id"), nullable=False),
        sa.Column("role", sa.String, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_index("ux_role_need_event_role", "role_need", ["event_id", "role"], unique=True)


def downgrade() -> None:
    raise NotImplementedError("sfcrm upgrades only; restore a backup to go back")
