"""Job services: submit a retrain (one at a time, enforced in the database), read jobs.

Keyword-only functions shared by the HTTP routes, the CLI, workers and tests.

One retrain at a time: several API processes may receive `POST /admin/retrain` at the same
moment, so an in-memory flag is not enough. `submit_retrain` first takes a row lock on the
single `service_state` row (a no-op `UPDATE`: a row lock on PostgreSQL, the write lock on
SQLite), then looks for a queued or running retrain and inserts the new job in that same
transaction. Two submitters are thus serialised by the database and the second sees the first's
committed row. No schema change is needed for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import Job, ServiceStateRow, new_id, utcnow

if TYPE_CHECKING:
    from app.config import Settings
    from app.jobs.runner import JobRunner

logger = logging.getLogger(__name__)

RETRAIN_KIND = "retrain"
ACTIVE_STATUSES = ("queued", "running")
#: Request fields a retrain accepts (everything else keeps `TrainConfig`'s default).
RETRAIN_FIELDS = ("encoder", "loss", "epochs", "image_size")


class JobConflictError(RuntimeError):
    """A retrain is already queued or running; `job` is that job."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(
            f"retrain job {job.id} is already {job.status} "
            f"({round(100 * (job.progress or 0.0))}% done); only one retrain runs at a time. "
            f"Follow it with GET /jobs/{job.id} and submit again when it has finished."
        )


class InvalidRetrainParamsError(ValueError):
    """A retrain parameter names an unknown encoder or loss (the message lists valid ones)."""


class JobSubmitError(RuntimeError):
    """The job was recorded but could not be handed to the runner (e.g. broker unreachable)."""


@dataclass(frozen=True)
class RetrainChoices:
    """Names a retrain may use, from training's registries."""

    encoders: list[str]
    losses: list[str]


def retrain_choices() -> RetrainChoices:
    """The encoder and loss names training knows (its registries are the single source)."""
    from training.encoders import list_encoders
    from training.losses import list_losses

    return RetrainChoices(encoders=list(list_encoders()), losses=list(list_losses()))


def validate_retrain_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop unset values and check names against training's registries.

    Raises `InvalidRetrainParamsError` naming the valid choices, so the caller can fix the
    request without reading the docs.
    """
    clean = {key: value for key, value in params.items() if value is not None}
    unknown = sorted(set(clean) - set(RETRAIN_FIELDS))
    if unknown:
        raise InvalidRetrainParamsError(
            f"unknown retrain field(s) {', '.join(unknown)}; accepted: {', '.join(RETRAIN_FIELDS)}"
        )
    choices = retrain_choices()
    problems = []
    if "encoder" in clean and clean["encoder"] not in choices.encoders:
        problems.append(
            f"unknown encoder {clean['encoder']!r}; choose one of: {', '.join(choices.encoders)}"
        )
    if "loss" in clean and clean["loss"] not in choices.losses:
        problems.append(
            f"unknown loss {clean['loss']!r}; choose one of: {', '.join(choices.losses)}"
        )
    if problems:
        raise InvalidRetrainParamsError("; ".join(problems))
    return clean


def active_retrain(session: Session) -> Job | None:
    """The queued or running retrain, if any."""
    return (
        session.execute(
            select(Job)
            .where(Job.kind == RETRAIN_KIND, Job.status.in_(ACTIVE_STATUSES))
            .order_by(Job.created_at)
            .limit(1)
        )
        .scalars()
        .first()
    )


def _lock_submissions(session: Session) -> None:
    """Serialise submitters on the `service_state` row (see the module docstring)."""
    session.execute(
        update(ServiceStateRow)
        .where(ServiceStateRow.id == 1)
        .values(index_version=ServiceStateRow.index_version)
    )


def submit_retrain(
    *,
    session: Session,
    settings: Settings,
    params: dict[str, Any],
    runner: JobRunner,
) -> Job:
    """Record a `queued` retrain job and hand it to `runner`; returns the job row.

    Raises `JobConflictError` while another retrain is queued or running (checked under a
    database lock, so it holds across API processes), `InvalidRetrainParamsError` for unknown
    names, and `JobSubmitError` when the runner refuses it (the job is then marked failed with
    the reason, so it does not block later retrains).
    """
    clean = validate_retrain_params(params)
    _reap_before_submit(session, settings)
    _lock_submissions(session)
    existing = active_retrain(session)
    if existing is not None:
        session.rollback()
        raise JobConflictError(existing)
    now = utcnow()
    # heartbeat_at of a queued job = when it was last handed to the runner (see the reaper).
    job = Job(
        id=new_id(),
        kind=RETRAIN_KIND,
        status="queued",
        progress=0.0,
        params=clean,
        created_at=now,
        heartbeat_at=now,
    )
    session.add(job)
    session.commit()
    logger.info("retrain job %s queued with %s via %s", job.id, clean or "defaults", runner.name)
    try:
        runner.submit(job.id)
    except Exception as exc:
        error = (
            f"Could not hand the job to the {runner.name} runner: {exc.__class__.__name__}: "
            f"{exc}. Check that the broker at CXR_BROKER_URL is reachable, then submit again."
        )
        logger.error("retrain job %s not submitted: %s", job.id, error)
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued")
            .values(status="failed", error=error, finished_at=utcnow())
        )
        session.commit()
        raise JobSubmitError(error) from exc
    return job


def _reap_before_submit(session: Session, settings: Settings) -> None:
    """Fail a retrain whose worker died before checking for a conflict (no 409 on a corpse)."""
    job = active_retrain(session)
    session.rollback()
    if job is None or job.status != "running":
        return
    from sqlalchemy.orm import sessionmaker

    from app.jobs.heartbeat import reap_stale_jobs
    from app.jobs.options import JobOptions

    bind = session.get_bind()
    reap_stale_jobs(
        sessionmaker(bind=bind, expire_on_commit=False),
        options=JobOptions.from_settings(settings),
        job_id=job.id,
        work_root=settings.data_dir / "jobs",
    )
    session.expire_all()


def get_job(*, session: Session, job_id: str) -> Job | None:
    """The job `job_id`, or None."""
    return session.get(Job, job_id)


def list_jobs(*, session: Session, limit: int = 50) -> list[Job]:
    """The most recent jobs, newest first."""
    return list(session.execute(select(Job).order_by(Job.created_at.desc()).limit(limit)).scalars())


def job_to_dict(job: Job) -> dict[str, Any]:
    """The public view of a job (the spec's `GET /jobs/{id}` fields plus timestamps)."""

    def iso(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "progress": float(job.progress or 0.0),
        "metrics": job.metrics,
        "model_version": job.model_version,
        "error": job.error,
        "params": job.params or {},
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "heartbeat_at": iso(job.heartbeat_at),
    }
