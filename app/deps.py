"""FastAPI dependencies shared by every router, as `Annotated` aliases.

`SessionDep` (one session per request), `SettingsDep` (the app's settings), `CurrentKey` (the
authenticated API key, any role) and `ReaderKey` / `ClinicianKey` / `AdminKey` (at least that
role); and the objects `create_app` and the lifespans hang off `app.state`: `ServiceDep` (the
prediction state; 503 while it is not started), `MaybeServiceDep` (None then),
`SessionFactoryDep`, `MetricsDep`, `ThumbnailCacheDep`, `OutboxDep` and `JobRunnerDep`.
Routes only declare the alias they need and never read `app.state` themselves.

Every dependency here is `async def` although none awaits: FastAPI runs a plain `def`
dependency in the worker-thread pool, one thread hand-off each, and `POST /predict` paid seven
of them (settings, service, metrics, key, role, session enter and exit) for attribute reads.
Reading `app.state` cannot block the event loop; only the database work is sent to a thread
(`app.auth.get_current_key`, `app.db.session.get_session`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from app.auth import CurrentKey, require_role
from app.config import Settings
from app.db import ApiKey
from app.db.session import SessionDep
from app.dicom.outbox import OutboxWorker
from app.jobs.runner import JobRunner
from app.metrics import Metrics
from app.services.thumbnails import ThumbnailCache
from app.serving.state import ServiceState


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (not re-read from the environment)."""
    return request.app.state.settings


async def get_maybe_service(request: Request) -> ServiceState | None:
    """This process's prediction state (None before the lifespan built it)."""
    return request.app.state.service


async def get_service(request: Request) -> ServiceState:
    """This process's prediction state; 503 when it is not started."""
    service = await get_maybe_service(request)
    if service is None:
        raise HTTPException(
            status_code=503,
            detail="The prediction service is not started; check the server log.",
        )
    return service


async def get_session_factory(request: Request) -> sessionmaker[Session]:
    """The app's sessionmaker, for a route that opens (and guards) its own session."""
    return request.app.state.sessionmaker


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_thumbnail_cache(request: Request) -> ThumbnailCache:
    return request.app.state.thumbnail_cache


async def get_outbox(request: Request) -> OutboxWorker | None:
    """The DICOM outbox worker of this process (None without a configured destination)."""
    return request.app.state.dicom_outbox


async def get_job_runner(request: Request) -> JobRunner:
    """The job runner the jobs router's lifespan started; 503 when it is not running."""
    runner = request.app.state.job_runner
    if runner is None:
        raise HTTPException(
            status_code=503, detail="The job runner is not started; check the server log."
        )
    return runner


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
JobRunnerDep = Annotated[JobRunner, Depends(get_job_runner)]
ServiceDep = Annotated[ServiceState, Depends(get_service)]
MaybeServiceDep = Annotated[ServiceState | None, Depends(get_maybe_service)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ThumbnailCacheDep = Annotated[ThumbnailCache, Depends(get_thumbnail_cache)]
OutboxDep = Annotated[OutboxWorker | None, Depends(get_outbox)]
ReaderKey = Annotated[ApiKey, Depends(require_role("reader"))]
ClinicianKey = Annotated[ApiKey, Depends(require_role("clinician"))]
AdminKey = Annotated[ApiKey, Depends(require_role("admin"))]


def single_form_fields(*names: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing (422) a multipart body that repeats one of `names`.

    FastAPI binds a scalar form field to the *last* occurrence, so two `file` parts to /predict
    or two `label` fields to /references would silently answer for one of them. The form is
    already parsed (and cached on the request) when dependencies run, so this costs nothing.
    """

    async def dependency(request: Request) -> None:
        form = await request.form()
        for name in names:
            count = len(form.getlist(name))
            if count > 1:
                raise HTTPException(
                    status_code=422,
                    detail=f"{count} '{name}' fields in one request; send exactly one "
                    f"(it is ambiguous which one you meant)",
                )

    return dependency


__all__ = [
    "AdminKey",
    "ClinicianKey",
    "CurrentKey",
    "JobRunnerDep",
    "MaybeServiceDep",
    "MetricsDep",
    "OutboxDep",
    "ReaderKey",
    "ServiceDep",
    "SessionDep",
    "SessionFactoryDep",
    "SettingsDep",
    "ThumbnailCacheDep",
    "get_app_settings",
    "get_service",
    "single_form_fields",
]
