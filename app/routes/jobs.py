"""Retraining jobs over HTTP: `POST /admin/retrain`, `GET /jobs/{id}`, `GET /jobs` (admin).

The router carries its own lifespan (FastAPI merges it into the app's when the router is
included): it creates the app's job runner (Celery publisher or the in-process thread) and the
periodic reaper, keeps them on `app.state`, and shuts them down with the app. So the job system
has no module-level state and needs nothing from `create_app` beyond including the router.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field

from app.config import Settings
from app.deps import AdminKey, JobRunnerDep, SessionDep, SessionFactoryDep, SettingsDep
from app.jobs.heartbeat import Reaper, reap_stale_jobs
from app.jobs.options import JobOptions
from app.jobs.runner import JobRunner, create_runner
from app.services.jobs import (
    InvalidRetrainParamsError,
    JobConflictError,
    JobSubmitError,
    get_job,
    job_to_dict,
    list_jobs,
    submit_retrain,
)

logger = logging.getLogger(__name__)


def start_jobs(app: FastAPI) -> JobRunner:
    """Create the app's runner and reaper (idempotent); returns the runner."""
    if app.state.job_runner is not None:
        return app.state.job_runner
    settings: Settings = app.state.settings
    options = JobOptions.from_settings(settings)
    factory = app.state.sessionmaker
    runner = create_runner(settings, factory=factory, options=options)
    app.state.job_runner = runner
    app.state.job_options = options
    reaper = Reaper(
        factory, options=options, republish=runner.submit, work_root=settings.data_dir / "jobs"
    )
    app.state.job_reaper = reaper
    reaper.start()
    logger.info("job runner started: %s", runner.name)
    return runner


def stop_jobs(app: FastAPI) -> None:
    """Stop the reaper and the runner started by `start_jobs`."""
    reaper: Reaper | None = app.state.job_reaper
    if reaper is not None:
        reaper.stop()
        app.state.job_reaper = None
    runner: JobRunner | None = app.state.job_runner
    if runner is not None:
        runner.shutdown(wait=False)
        app.state.job_runner = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the job runner and reaper with the app, stop them with it."""
    start_jobs(app)
    try:
        yield
    finally:
        stop_jobs(app)


router = APIRouter(tags=["jobs"], lifespan=lifespan)


class RetrainRequest(BaseModel):
    """Optional overrides of `TrainConfig`'s defaults for one retrain."""

    model_config = ConfigDict(extra="forbid")

    encoder: str | None = Field(default=None, description="Encoder name (see the 422 list).")
    loss: str | None = Field(default=None, description="Loss name (see the 422 list).")
    epochs: int | None = Field(default=None, ge=1, le=1000)
    image_size: int | None = Field(default=None, ge=16, le=1024)


class JobAccepted(BaseModel):
    job_id: str


class JobPublic(BaseModel):
    id: str
    kind: str
    status: str
    progress: float
    metrics: dict[str, Any] | None = None
    model_version: str | None = None
    error: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    heartbeat_at: str | None = None


@router.post(
    "/admin/retrain",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={409: {"description": "A retrain is already queued or running"}},
)
def retrain(
    session: SessionDep,
    settings: SettingsDep,
    runner: JobRunnerDep,
    _key: AdminKey,
    body: Annotated[RetrainRequest | None, Body()] = None,
) -> JobAccepted:
    """Start a retrain on the enrolled references; poll `GET /jobs/{job_id}`."""
    params = (body or RetrainRequest()).model_dump(exclude_none=True)
    try:
        job = submit_retrain(session=session, settings=settings, params=params, runner=runner)
    except InvalidRetrainParamsError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    except JobConflictError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except JobSubmitError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
    return JobAccepted(job_id=job.id)


@router.get("/jobs", response_model=list[JobPublic])
def jobs(
    session: SessionDep, _key: AdminKey, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[dict[str, Any]]:
    """The most recent jobs, newest first."""
    return [job_to_dict(job) for job in list_jobs(session=session, limit=limit)]


@router.get("/jobs/{job_id}", response_model=JobPublic)
def job(
    job_id: str,
    session: SessionDep,
    sessions: SessionFactoryDep,
    settings: SettingsDep,
    _key: AdminKey,
) -> dict[str, Any]:
    """Status, progress (0..1), metrics, model version and error of one job."""
    found = get_job(session=session, job_id=job_id)
    if found is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"no job {job_id!r}; job ids are returned by POST /admin/retrain",
        )
    if found.status == "running":
        # Lazy reaping: a job whose worker died reads `failed` at once, not after the next pass.
        result = reap_stale_jobs(
            sessions,
            options=JobOptions.from_settings(settings),
            job_id=job_id,
            work_root=settings.data_dir / "jobs",
        )
        if result.failed:
            session.expire_all()
            found = get_job(session=session, job_id=job_id) or found
    return job_to_dict(found)
