"""The prediction audit log, read side: what the Models-and-jobs page lists for admins."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import Prediction


def list_predictions(*, session: Session, limit: int = 20, offset: int = 0) -> list[Prediction]:
    """The most recent audit rows, newest first (no image bytes and no patient data in them)."""
    rows = session.execute(
        select(Prediction)
        .order_by(Prediction.created_at.desc(), Prediction.id)
        .limit(limit)
        .offset(offset)
    ).scalars()
    return list(rows)
