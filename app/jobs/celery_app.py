"""The Celery application, built from `Settings` by a function (nothing baked in at import).

Why a factory: the broker URL, queue and database come from `CXR_*` settings, which tests and
deployments set per process; a module-level `Celery("...", broker=...)` would freeze whatever
the environment held at import time.

Delivery guarantees (the database, not Redis, is the record of every job):

- `task_acks_late=True`: the message is acknowledged only after the task returns, so a worker
  that dies mid-job leaves the message unacknowledged instead of silently consuming it.
- `task_reject_on_worker_lost=True`: when a pool process dies (SIGKILL, OOM) the message is
  re-queued rather than acknowledged. The redelivered task finds the job no longer `queued` and
  does nothing; the reaper fails the job (see `app/jobs/heartbeat.py`).
- `worker_prefetch_multiplier=1`: a busy worker holds no extra messages, so a second worker can
  take the next job, and a killed worker strands at most the message it was running.
- `visibility_timeout` (`CXR_CELERY_VISIBILITY_TIMEOUT_S`, default 6 h): Redis redelivers a
  message not acknowledged within this time. It must exceed the longest retrain, or a still
  running job gets a duplicate delivery (harmless, it is ignored, but noisy). A message whose
  worker vanished comes back after this time; by then the reaper has already failed the job.
- No result backend: status, progress, metrics and errors live in the `jobs` table.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from celery import Celery

from app.jobs.options import JobOptions

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)

#: The registered name of the retrain task (stable: it travels in broker messages).
RETRAIN_TASK = "cxr.retrain"


def create_celery_app(settings: Settings, *, options: JobOptions | None = None) -> Celery:
    """A Celery app for `settings.broker_url`, with the retrain task registered on it."""
    if not settings.broker_url:
        raise ValueError(
            "CXR_BROKER_URL is not set: Celery jobs need a broker (e.g. redis://redis:6379/0). "
            "Without it the API runs retrains in process and no `cxr worker` is needed."
        )
    options = options or JobOptions.from_settings(settings)
    app = Celery("cxr", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=options.queue,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": int(options.visibility_timeout_s)},
        broker_connection_retry_on_startup=True,
        # Publishing from an API request must not hang when Redis is down: fail fast, the job
        # row stays `queued` and the reaper re-publishes it once the broker is back.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )

    @app.task(name=RETRAIN_TASK, bind=True, ignore_result=True)
    def retrain(self: object, job_id: str) -> None:  # pragma: no cover - runs in the worker
        """Celery entry point: the same task function the in-process runner calls."""
        from app.jobs.tasks import run_retrain

        run_retrain(job_id, settings=settings, options=options)

    return app


def publish_retrain(app: Celery, job_id: str, *, options: JobOptions) -> None:
    """Send the retrain message for `job_id` to the jobs queue (raises when the broker is down)."""
    app.send_task(RETRAIN_TASK, args=[job_id], queue=options.queue)
    logger.info("published job %s to queue %s", job_id, options.queue)
