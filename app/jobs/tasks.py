"""The retrain job's transport: one function run by both runners (Celery worker or thread).

`run_retrain(job_id, settings=...)` **claims** the job (`UPDATE jobs SET status='running' WHERE
id=? AND status='queued'`: a duplicate or late delivery, from a Celery redelivery or the reaper's
re-publication, finds nothing to claim and returns, so handing a job over twice never trains
twice), keeps its **heartbeat**, writes its **progress** (throttled), runs the retrain's stages
(`app.services.retrain.retrain`: snapshot, split, train, score, decide, register, activate) and
records the **outcome** on the job row. Failures set `status='failed'` with an error saying what
to do. A worker killed mid-way leaves no model row and the active model untouched; the reaper
fails the job (`heartbeat.py`).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, utcnow
from app.jobs.heartbeat import Heartbeat
from app.jobs.options import JobOptions
from app.services.retrain import RetrainError, retrain

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)


class JobInterruptedError(RetrainError):
    """The process running the job is shutting down (in-process runner)."""


class JobLostError(RuntimeError):
    """This worker no longer owns the job (the reaper failed it); stop without publishing."""


def worker_name() -> str:
    """`host:pid` recorded in `jobs.worker` (who holds the job)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_retrain(
    job_id: str,
    *,
    settings: Settings,
    options: JobOptions | None = None,
    factory: sessionmaker[Session] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run retrain job `job_id` to completion, recording the outcome on its row.

    Never raises for a job failure (it is recorded as `failed`), so a Celery worker acknowledges
    the message; it raises only when the database itself is unusable. `stop` (set by the
    in-process runner when the API shuts down) interrupts training at the next step and fails
    the job at once, instead of leaving it for the reaper.
    """
    from app.db.session import create_db_engine, create_sessionmaker

    options = options or JobOptions.from_settings(settings)
    engine = None
    if factory is None:
        engine = create_db_engine(settings)
        factory = create_sessionmaker(engine)
    worker = worker_name()
    scratch = settings.data_dir / "jobs" / job_id
    try:
        job = _claim(factory, job_id, worker)
        if job is None:
            return
        logger.info("retrain job %s started on %s with %s", job_id, worker, job.params or {})
        try:
            with Heartbeat(
                factory, job_id, worker=worker, interval_s=options.heartbeat_s
            ) as heartbeat:
                _run(
                    job_id,
                    params=dict(job.params or {}),
                    settings=settings,
                    options=options,
                    factory=factory,
                    worker=worker,
                    scratch=scratch,
                    heartbeat=heartbeat,
                    stop=stop,
                )
        except JobLostError as exc:
            logger.error("retrain job %s abandoned: %s", job_id, exc)
        except Exception as exc:
            logger.exception("retrain job %s failed", job_id)
            _fail(factory, job_id, worker, _error_text(exc))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if engine is not None:
            engine.dispose()


def _run(
    job_id: str,
    *,
    params: dict[str, Any],
    settings: Settings,
    options: JobOptions,
    factory: sessionmaker[Session],
    worker: str,
    scratch: Path,
    heartbeat: Heartbeat,
    stop: threading.Event | None = None,
) -> None:
    progress = ProgressWriter(
        factory,
        job_id,
        worker=worker,
        heartbeat=heartbeat,
        interval_s=options.progress_interval_s,
        stop=stop,
    )

    def still_ours() -> None:
        if heartbeat.lost:
            raise JobLostError("the job was marked failed by the reaper while it ran")

    outcome = retrain(
        job_id,
        params=params,
        settings=settings,
        factory=factory,
        scratch=scratch,
        progress=progress,
        before_activation=still_ours,
    )
    with factory() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker)
            .values(
                status="succeeded",
                progress=1.0,
                metrics=outcome.metrics,
                model_version=outcome.version,
                finished_at=utcnow(),
                error=None,
            )
        )
        session.commit()
    logger.info("retrain job %s succeeded", job_id)


def _claim(factory: sessionmaker[Session], job_id: str, worker: str) -> Job | None:
    now = utcnow()
    with factory() as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(
                status="running",
                started_at=now,
                heartbeat_at=now,
                worker=worker,
                progress=0.0,
                error=None,
            )
        )
        session.commit()
        job = session.get(Job, job_id)
        if not claimed.rowcount:  # type: ignore[attr-defined]
            state = "does not exist" if job is None else f"is {job.status}"
            logger.warning("retrain job %s %s; nothing to do (duplicate delivery?)", job_id, state)
            return None
        return job


def _fail(factory: sessionmaker[Session], job_id: str, worker: str, error: str) -> None:
    with factory() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.worker == worker)
            .values(status="failed", error=error, finished_at=utcnow())
        )
        session.commit()


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, RetrainError):
        return str(exc)
    return (
        f"{exc.__class__.__name__}: {exc}. The active model is unchanged. Check the worker's "
        "logs for the traceback; fix the cause (e.g. the retrain parameters) and submit again."
    )


class ProgressWriter:
    """Throttled writer of `jobs.progress`; also notices when the job was taken from us."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: str,
        *,
        worker: str,
        heartbeat: Heartbeat,
        interval_s: float,
        stop: threading.Event | None = None,
    ) -> None:
        self._stop = stop
        self._factory = factory
        self._job_id = job_id
        self._worker = worker
        self._heartbeat = heartbeat
        self._interval = interval_s
        self._last_time = 0.0
        self._last_value = -1.0
        self._lock = threading.Lock()

    def __call__(self, fraction: float, *, force: bool = False) -> None:
        self.check()
        value = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        with self._lock:
            if not force and (
                now - self._last_time < self._interval or value - self._last_value < 0.005
            ):
                return
            self._last_time, self._last_value = now, value
        try:
            with self._factory() as session:
                session.execute(
                    update(Job)
                    .where(
                        Job.id == self._job_id,
                        Job.status == "running",
                        Job.worker == self._worker,
                    )
                    .values(progress=value, heartbeat_at=utcnow())
                )
                session.commit()
        except Exception:  # progress is informative; the heartbeat thread detects real loss
            logger.warning("could not record progress of job %s", self._job_id, exc_info=True)

    def check(self) -> None:
        """Raise when the job must stop: taken from us by the reaper, or process shutdown."""
        if self._heartbeat.lost:
            raise JobLostError("the job was marked failed by the reaper while it ran")
        if self._stop is not None and self._stop.is_set():
            raise JobInterruptedError(
                "The API process running this job (in-process runner) was shut down during the "
                "retrain. No model was registered and the active model is unchanged; submit "
                "POST /admin/retrain again (or run `cxr worker` with CXR_BROKER_URL so retrains "
                "do not depend on API restarts)."
            )

    def stage(self, start: float, end: float) -> Callable[[float], None]:
        """A callback mapping a stage's own 0..1 onto [start, end] of the job's progress."""
        return lambda fraction: self(start + (end - start) * min(max(fraction, 0.0), 1.0))
