"""Tunables of the job system (queue name, heartbeat and reaper timings, Celery visibility).

They are fields of the one `app.config.Settings` (so the usual `CXR_*` variables set them);
`JobOptions.from_settings` gathers them into one frozen object the job code passes around, and
checks that they agree with each other.

| variable | default | meaning |
|---|---|---|
| `CXR_JOBS_QUEUE` | `cxr.jobs` | Celery queue the API publishes to and `cxr worker` consumes |
| `CXR_JOB_HEARTBEAT_S` | 10 | how often a running job writes `jobs.heartbeat_at` |
| `CXR_JOB_STALE_AFTER_S` | 120 | a `running` job silent this long is marked `failed` |
| `CXR_JOB_REQUEUE_AFTER_S` | 300 | a `queued` job nobody started is re-published this often |
| `CXR_JOB_QUEUED_MAX_AGE_S` | 86400 | a `queued` job older than this is marked `failed` |
| `CXR_JOB_REAP_INTERVAL_S` | 30 | how often each API process runs the reaper |
| `CXR_JOB_PROGRESS_INTERVAL_S` | 1 | minimum seconds between two progress writes |
| `CXR_CELERY_VISIBILITY_TIMEOUT_S` | 21600 | Redis redelivers an unacked message after this |
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings, get_settings


@dataclass(frozen=True)
class JobOptions:
    """Resolved job-system tunables (see the module docstring for the variables)."""

    queue: str = "cxr.jobs"
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0
    requeue_after_s: float = 300.0
    queued_max_age_s: float = 86_400.0
    reap_interval_s: float = 30.0
    progress_interval_s: float = 1.0
    # Must exceed the longest retrain: Redis hands an unacknowledged message to another worker
    # after this long. A duplicate delivery is harmless (the task only claims `queued` jobs), but
    # a short timeout would make every long retrain look lost.
    visibility_timeout_s: float = 6 * 3600.0

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> JobOptions:
        """Options from `settings` (default: `get_settings()`, i.e. the environment)."""
        settings = settings if settings is not None else get_settings()
        options = cls(
            queue=settings.jobs_queue,
            heartbeat_s=settings.job_heartbeat_s,
            stale_after_s=settings.job_stale_after_s,
            requeue_after_s=settings.job_requeue_after_s,
            queued_max_age_s=settings.job_queued_max_age_s,
            reap_interval_s=settings.job_reap_interval_s,
            progress_interval_s=settings.job_progress_interval_s,
            visibility_timeout_s=settings.celery_visibility_timeout_s,
        )
        if options.stale_after_s <= options.heartbeat_s:
            raise ValueError(
                "CXR_JOB_STALE_AFTER_S must be larger than CXR_JOB_HEARTBEAT_S (a few heartbeats), "
                f"got {options.stale_after_s} <= {options.heartbeat_s}"
            )
        return options
