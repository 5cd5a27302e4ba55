"""references.source: which hospital or collection a reference came from.

The retrain balances label x source (a site's five enrolled images per class weigh as much as a
vendor's thousands) and validates per source; this records the source at enrollment.

Revision ID: 0003_reference_source
Revises: 0002_dicom_outbox
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003_reference_source"
down_revision: str | Sequence[str] | None = "0002_dicom_outbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("references") as batch:
        batch.add_column(sa.Column("source", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("references") as batch:
        batch.drop_column("source")
