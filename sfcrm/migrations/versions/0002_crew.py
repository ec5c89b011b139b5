"""Events, crew assignments and the mail log.

Revision ID: 0002
Revises: 0001
Create Date: ``PRAGMA user_version = 2``
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The mail log and the assignments point at each other. SQLite takes a reference to a table
    # not made yet; elsewhere the email's reference to its assignment is added once both exist.
    inline = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "event",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("date", sa.String, nullable=False),
        sa.Column("time", sa.String),
        sa.Column("end_time", sa.String),
        sa.Column("location", sa.String, nullable=False),
        sa.Column("details", sa.String),
        sa.Column("starts_at", sa.DateTime, nullable=False),
        sa.Column("ends_at", sa.DateTime, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_event_starts_at", "event", ["starts_at"])
    assignment = [sa.ForeignKey("event_crew.id")] if inline else []
    op.create_table(
        "email_notification",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("recipient", sa.String, nullable=False),
        sa.Column("person_id", sa.Integer, sa.ForeignKey("person.id")),
        sa.Column("assignment_id", sa.Integer, *assignment),
        sa.Column("notification_type", sa.String, nullable=False),
        sa.Column("subject", sa.String, nullable=False),
        sa.Column("message", sa.String, nullable=False),
        sa.Column("mime", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("is_sent", sa.Boolean, nullable=False),
        sa.Column("sent_at", sa.DateTime),
        sa.Column("failed_attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String),
        sa.Column("permanent_failure", sa.Boolean, nullable=False),
        sa.Column("claimed_until", sa.DateTime),
        sa.Column("claim_token", sa.String),
    )
    for column in ("person_id", "notification_type", "created_at", "is_sent"):
        op.create_index(f"ix_email_notification_{column}", "email_notification", [column])
    op.create_table(
        "event_crew",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.Integer, sa.ForeignKey("event.id"), nullable=False),
        sa.Column("person_id", sa.Integer, sa.ForeignKey("person.id"), nullable=False),
        sa.Column("role", sa.String, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("notes", sa.String),
        sa.Column("invitation_sent", sa.Boolean, nullable=False),
        sa.Column("invitation_sent_at", sa.DateTime),
        sa.Column("invitation_email_id", sa.Integer, sa.ForeignKey("email_notification.id")),
        sa.Column("reminder_sent", sa.Boolean, nullable=False),
        sa.Column("reminder_sent_at", sa.DateTime),
        sa.Column("reminder_email_id", sa.Integer, sa.ForeignKey("email_notification.id")),
        sa.Column("responded_at", sa.DateTime),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index(
        "ux_event_crew_event_person", "event_crew", ["event_id", "person_id"], unique=True
    )
    op.create_index("ix_event_crew_event_status", "event_crew", ["event_id", "status"])
    op.create_index("ix_event_crew_person_status", "event_crew", ["person_id", "status"])
    if not inline:
        op.create_foreign_key(
            "email_notification_assignment_id_fkey",
            "email_notification",
            "event_crew",
            ["assignment_id"],
            ["id"],
        )


def downgrade() -> None:
    raise NotImplementedError("sfcrm upgrades only; restore a backup to go back")
