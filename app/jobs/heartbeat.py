"""Liveness of jobs: the heartbeat a running job writes, and the reaper that acts on silence.

Why: a worker can die without running any cleanup (SIGKILL, OOM killer, a node lost). Its job
row would then say `running` forever and, since only one retrain may be queued or running at a
time, block every later retrain with 409. So a running job writes `jobs.heartbeat_at` every
`heartbeat_s` from a small thread, and the reaper marks a `running` job whose heartbeat is older
than `stale_after_s` as **failed** with an error saying what happened and what to do. We fail
rather than re-run: a job that killed its worker (e.g. out of memory) would kill the next one
too, and the administrator can resubmit in one call. Nothing a dead job produced is visible: a
model row is inserted only after its file is complete, and activation is the job's last step.

For `queued` jobs, `heartbeat_at` records when the job was last handed to the runner (published
to Celery, or submitted to the in-process executor). A queued job nobody started within
`requeue_after_s` is handed over again (the Celery message may have been lost with a Redis
restart, or the API process holding the in-process queue died); duplicates are harmless because
a task only claims a job whose status is still `queued`. After `queued_max_age_s` it is failed
with an error telling the operator to start `cxr worker`.

The reaper runs: periodically in every API process (`Reaper`, started by the app's lifespan), once
when `cxr worker` starts, and lazily for one job in `GET /jobs/{id}`. All its writes are
conditional `UPDATE ... WHERE status = ...`, so any number of reapers can run at once.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, utcnow
from app.jobs.options import JobOptions

logger = logging.getLogger(__name__)

#: Called with a job id to hand a queued job to the runner again.
Republish = Callable[[str], None]


class Heartbeat:
    """Context manager: a daemon thread writing `heartbeat_at` for one running job.

    `lost` becomes true when a beat finds the job no longer `running` under this worker (the
    reaper failed it, e.g. after the database was unreachable for longer than the stale timeout);
    the job then stops instead of publishing a model for a job the API already reports failed.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: str,
        *,
        worker: str,
        interval_s: float,
    ) -> None:
        self._factory = factory
        self._job_id = job_id
        self._worker = worker
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"cxr-heartbeat-{job_id[:8]}", daemon=True
        )
        self.lost = False

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 5)

    def beat(self) -> None:
        """Write one heartbeat now; sets `lost` when the job is no longer ours."""
        with self._factory() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == self._job_id, Job.status == "running", Job.worker == self._worker)
                .values(heartbeat_at=utcnow())
            )
            session.commit()
        if result.rowcount == 0:  # type: ignore[attr-defined]
            if not self.lost:
                logger.error(
                    "job %s is no longer running under this worker (reaped?); stopping it",
                    self._job_id,
                )
            self.lost = True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception:  # the database may be briefly unreachable; keep trying
                logger.warning("heartbeat for job %s failed", self._job_id, exc_info=True)


@dataclass
class ReapResult:
    """What one reaper pass did (job ids)."""

    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)


def stale_error(job: Job, options: JobOptions) -> str:
    """The error text of a job whose worker went silent: what happened and what to do."""
    last = job.heartbeat_at or job.started_at
    when = last.isoformat(timespec="seconds") if last else "unknown time"
    return (
        f"The worker running this job ({job.worker or 'unknown'}) stopped sending heartbeats at "
        f"{when} and was presumed dead after {options.stale_after_s:g} s (killed, out of memory, "
        "or lost its database connection). No model was registered from this job and the active "
        "model is unchanged. Check the worker's logs, then submit POST /admin/retrain again."
    )


def queued_too_long_error(options: JobOptions) -> str:
    """The error text of a job no worker ever started."""
    return (
        f"No worker started this job within {options.queued_max_age_s:g} s. Check that "
        "`cxr worker` is running with the same CXR_BROKER_URL and CXR_JOBS_QUEUE as the API, "
        "then submit POST /admin/retrain again."
    )


def reap_stale_jobs(
    factory: sessionmaker[Session],
    *,
    options: JobOptions,
    republish: Republish | None = None,
    job_id: str | None = None,
    work_root: Path | None = None,
    now: datetime | None = None,
) -> ReapResult:
    """One reaper pass over all unfinished jobs (or just `job_id`); safe to run concurrently.

    `republish` hands a queued job to the runner again (None: only fail, never re-publish).
    `work_root` (`data_dir/jobs`) lets the reaper delete a failed job's scratch directory.
    """
    now = now or utcnow()
    result = ReapResult()
    stale_cutoff = now - timedelta(seconds=options.stale_after_s)
    requeue_cutoff = now - timedelta(seconds=options.requeue_after_s)
    age_cutoff = now - timedelta(seconds=options.queued_max_age_s)

    with factory() as session:
        query = select(Job).where(Job.status.in_(("queued", "running")))
        if job_id is not None:
            query = query.where(Job.id == job_id)
        jobs = list(session.execute(query).scalars())

        for job in jobs:
            if job.status == "running":
                silent = or_(
                    Job.heartbeat_at < stale_cutoff,
                    and_(Job.heartbeat_at.is_(None), Job.started_at < stale_cutoff),
                )
                error = stale_error(job, options)
                updated = session.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == "running", silent)
                    .values(status="failed", error=error, finished_at=now)
                )
                session.commit()
                if updated.rowcount:  # type: ignore[attr-defined]
                    logger.error("job %s failed by the reaper: %s", job.id, error)
                    result.failed.append(job.id)
                    _remove_scratch(work_root, job.id)
            elif job.created_at < age_cutoff:
                error = queued_too_long_error(options)
                updated = session.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == "queued")
                    .values(status="failed", error=error, finished_at=now)
                )
                session.commit()
                if updated.rowcount:  # type: ignore[attr-defined]
                    logger.error("job %s failed by the reaper: %s", job.id, error)
                    result.failed.append(job.id)
            elif republish is not None:
                waiting = or_(
                    Job.heartbeat_at < requeue_cutoff,
                    and_(Job.heartbeat_at.is_(None), Job.created_at < requeue_cutoff),
                )
                # Claim the re-publication first, so concurrent reapers publish it once.
                updated = session.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == "queued", waiting)
                    .values(heartbeat_at=now)
                )
                session.commit()
                if updated.rowcount:  # type: ignore[attr-defined]
                    logger.warning(
                        "job %s still queued after %g s; handing it to the runner again "
                        "(is `cxr worker` running? was the broker restarted?)",
                        job.id,
                        options.requeue_after_s,
                    )
                    try:
                        republish(job.id)
                    except Exception:
                        logger.exception("could not re-publish job %s; will retry", job.id)
                    else:
                        result.republished.append(job.id)
    return result


def _remove_scratch(work_root: Path | None, job_id: str) -> None:
    if work_root is None:
        return
    scratch = work_root / job_id
    if scratch.exists():
        shutil.rmtree(scratch, ignore_errors=True)


class Reaper:
    """A daemon thread running `reap_stale_jobs` every `options.reap_interval_s` (API lifespan)."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        options: JobOptions,
        republish: Republish | None,
        work_root: Path | None = None,
    ) -> None:
        self._factory = factory
        self._options = options
        self._republish = republish
        self._work_root = work_root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cxr-job-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def run_once(self) -> ReapResult:
        return reap_stale_jobs(
            self._factory,
            options=self._options,
            republish=self._republish,
            work_root=self._work_root,
        )

    def _run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # a database hiccup must not kill the reaper
                logger.warning("job reaper pass failed; will retry", exc_info=True)
            if self._stop.wait(self._options.reap_interval_s):
                return
