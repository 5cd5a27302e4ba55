"""Job runners: where a submitted job's task function actually runs.

One task function (`app.jobs.tasks.run_retrain`), two runners:

- `CeleryRunner` (when `CXR_BROKER_URL` is set): publishes a message; `cxr worker` runs it.
- `InProcessRunner` (embedded default): a single background thread in the API process.

A runner is created and shut down by the app's lifespan (`app.routes.jobs.lifespan`) and kept on
`app.state.job_runner`; there is no module-level runner, so several apps (tests, uvicorn workers)
never share one. Runners only *hand over* job ids: the job row (status, progress, errors) is in
the database and the task claims it there, so handing the same id over twice is harmless.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from app.jobs.options import JobOptions

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from app.config import Settings

logger = logging.getLogger(__name__)


class JobRunner(Protocol):
    """Hands job ids to whatever executes them."""

    name: str

    def submit(self, job_id: str) -> None:
        """Hand the (already committed, `queued`) job over; raises if that is impossible now."""
        ...

    def shutdown(self, *, wait: bool = False) -> None:
        """Release threads / connections (called by the app's lifespan)."""
        ...


class InProcessRunner:
    """Runs jobs one at a time on a single background thread of this process.

    For the embedded default (no broker): `cxr serve` alone is a complete service. A job still
    queued when the process stops is re-submitted by a reaper (this process's after a restart,
    or another API process's) after `CXR_JOB_REQUEUE_AFTER_S`.
    """

    name = "in-process"

    def __init__(
        self,
        settings: Settings,
        *,
        factory: sessionmaker[Session] | None = None,
        options: JobOptions | None = None,
    ) -> None:
        self._settings = settings
        self._factory = factory
        self._options = options or JobOptions.from_settings(settings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-job")
        self._futures: list[Future[None]] = []
        self._stop = threading.Event()

    def submit(self, job_id: str) -> None:
        future = self._executor.submit(self._run, job_id)
        self._futures = [f for f in self._futures if not f.done()] + [future]
        logger.info("job %s handed to the in-process runner", job_id)

    def _run(self, job_id: str) -> None:
        from app.jobs.tasks import run_retrain

        try:
            run_retrain(
                job_id,
                settings=self._settings,
                options=self._options,
                factory=self._factory,
                stop=self._stop,
            )
        except Exception:  # run_retrain records failures itself; this is a last resort
            logger.exception("in-process job %s crashed", job_id)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the jobs handed over so far are done (tests, graceful shutdown)."""
        for future in list(self._futures):
            future.result(timeout=timeout)

    def shutdown(self, *, wait: bool = False) -> None:
        # A running job stops at its next training step and is recorded as failed with the
        # reason (rather than holding the process open for the rest of the retrain); queued
        # hand-overs are dropped, their rows stay `queued` for the next reaper to re-submit.
        self._stop.set()
        self._executor.shutdown(wait=wait, cancel_futures=True)


class CeleryRunner:
    """Publishes jobs to the Celery queue consumed by `cxr worker`."""

    name = "celery"

    def __init__(
        self,
        settings: Settings,
        *,
        celery_app: Celery | None = None,
        options: JobOptions | None = None,
    ) -> None:
        from app.jobs.celery_app import create_celery_app

        self._options = options or JobOptions.from_settings(settings)
        self.celery_app = celery_app or create_celery_app(settings, options=self._options)

    def submit(self, job_id: str) -> None:
        from app.jobs.celery_app import publish_retrain

        publish_retrain(self.celery_app, job_id, options=self._options)

    def shutdown(self, *, wait: bool = False) -> None:
        try:
            self.celery_app.close()
        except Exception:  # pragma: no cover - best effort on shutdown
            logger.debug("closing the Celery app failed", exc_info=True)


def create_runner(
    settings: Settings,
    *,
    factory: sessionmaker[Session] | None = None,
    options: JobOptions | None = None,
) -> JobRunner:
    """`CeleryRunner` when `settings.broker_url` is set, else `InProcessRunner`."""
    if settings.broker_url:
        return CeleryRunner(settings, options=options)
    return InProcessRunner(settings, factory=factory, options=options)
