"""Model versions (admin): `GET /models`, `POST /admin/models/{version}/activate`.

Activation is promotion and rollback alike; both go through `app.services.models.activate_model`,
the single place the active model changes. This process reloads at once; every other process at
its next request (the activation bumps `index_version`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException

from app.db.session import SessionDep
from app.deps import AdminKey, MaybeServiceDep, SettingsDep
from app.schemas import ErrorPublic
from app.schemas_predict import ModelPublic
from app.services.models import (
    ModelFileMissingError,
    ModelNotFoundError,
    activate_model,
    list_models,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["models"])

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorPublic, "description": "The key's role is too low (admin only)"},
}


@router.get(
    "/models",
    response_model=list[ModelPublic],
    responses=AUTH_ERRORS,
    summary="List registered model versions (newest first)",
)
def read_models(session: SessionDep, _key: AdminKey) -> list[ModelPublic]:
    return [ModelPublic.model_validate(row) for row in list_models(session=session)]


@router.post(
    "/admin/models/{version}/activate",
    response_model=ModelPublic,
    responses={
        **AUTH_ERRORS,
        404: {"model": ErrorPublic, "description": "Unknown model version"},
        409: {"model": ErrorPublic, "description": "The model's checkpoint file is missing"},
    },
    summary="Serve this model version from the next request on (promotion or rollback)",
)
def activate(
    version: str,
    session: SessionDep,
    settings: SettingsDep,
    _key: AdminKey,
    service: MaybeServiceDep,
) -> ModelPublic:
    try:
        row = activate_model(session=session, version=version, settings=settings)
    except ModelNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except ModelFileMissingError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    if service is not None:
        try:
            service.refresh(wait=True)  # load it now rather than in the next prediction
        except Exception:  # committed anyway; the next prediction retries the load
            logger.exception("could not load the activated model now")
    return ModelPublic.model_validate(row)
