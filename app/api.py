"""The HTTP API: one router that includes every resource's router, listed here statically.

`create_app` includes `api_router` once; a router's lifespan (the job runner, the DICOM
outbox) is merged into the app's through it. `ROUTERS` are the routers as declared, which the
auth-before-body guard matches requests against.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.routes import audit, classes, dicom, health, jobs, models, predict, references
from app.web import router as web_router

__all__ = ["ONE_FILE_ROUTERS", "ROUTERS", "api_router"]

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    references.router,
    classes.router,
    audit.router,
    web_router,
    predict.router,
    models.router,
    jobs.router,
    dicom.router,
)

#: Routers whose requests carry one file: their whole body is held to the per-file limit.
ONE_FILE_ROUTERS: tuple[APIRouter, ...] = (predict.router,)

api_router = APIRouter()
for _router in ROUTERS:
    api_router.include_router(_router)
