"""`GET /predictions` (admin): the most recent answers from the audit log.

Beyond the spec's table (which fixes `/predictions/{id}/sr`); the web page's Models-and-jobs view
shows it. Rows carry the answer's summary only: who asked is an API key id, never a person.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from app.db.session import SessionDep
from app.deps import AdminKey
from app.routes.references import AUTH_ERRORS
from app.services.audit import list_predictions

router = APIRouter(tags=["predict"])


class PredictionAuditPublic(BaseModel):
    """One audit row: what was answered, by which model and index version."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    created_at: datetime
    label: str
    unknown: bool
    confidence: float
    method: str
    model_version: str
    index_version: int


@router.get(
    "/predictions",
    response_model=list[PredictionAuditPublic],
    responses=AUTH_ERRORS,
    summary="Recent predictions from the audit log (newest first)",
)
def read_predictions(
    session: SessionDep,
    _key: AdminKey,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[PredictionAuditPublic]:
    rows = list_predictions(session=session, limit=limit, offset=offset)
    return [PredictionAuditPublic.model_validate(row) for row in rows]
