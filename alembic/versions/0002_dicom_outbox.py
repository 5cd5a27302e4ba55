"""DICOM: received-instance ledger (idempotence) and the delivery outbox.

Revision ID: 0002_dicom_outbox
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002_dicom_outbox"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "dicom_instances",
        sa.Column("uid_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("prediction_id", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("uid_hash", name=op.f("pk_dicom_instances")),
    )
    op.create_table(
        "dicom_deliveries",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("prediction_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=512), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("claimed_until", TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("delivered_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dicom_deliveries")),
    )
    op.create_index(
        op.f("ix_dicom_deliveries_prediction_id"), "dicom_deliveries", ["prediction_id"]
    )
    op.create_index(op.f("ix_dicom_deliveries_status"), "dicom_deliveries", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_dicom_deliveries_status"), table_name="dicom_deliveries")
    op.drop_index(op.f("ix_dicom_deliveries_prediction_id"), table_name="dicom_deliveries")
    op.drop_table("dicom_deliveries")
    op.drop_table("dicom_instances")
