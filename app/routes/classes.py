"""`GET /classes` (reader): enrolled class labels with their reference counts."""

from __future__ import annotations

from fastapi import APIRouter

from app.db.session import SessionDep
from app.deps import ReaderKey
from app.routes.references import AUTH_ERRORS
from app.schemas import ClassPublic
from app.services.references import list_classes

router = APIRouter(prefix="/classes", tags=["references"])


@router.get("", response_model=list[ClassPublic], responses=AUTH_ERRORS, summary="Enrolled classes")
def read_classes(session: SessionDep, _key: ReaderKey) -> list[ClassPublic]:
    return [ClassPublic(label=c.label, count=c.count) for c in list_classes(session=session)]
