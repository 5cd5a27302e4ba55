"""Tunables of the job system (queue name, heartbeat and reaper timings, Celery visibility).

They are read from `Settings` when it defines them (e.g. `settings.job_heartbeat_s`), else from
the same `CXR_*` environment variables, else the defaults below. Reading them here rather than
adding fields to `Settings` keeps the job system's knobs in one place and lets a test point a
worker at its own queue with one environment variable.

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

import os
from dataclasses import dataclass, fields
from typing import Any

_ENV_NAMES: dict[str, str] = {
    "queue": "CXR_JOBS_QUEUE",
    "heartbeat_s": "CXR_JOB_HEARTBEAT_S",
    "stale_after_s": "CXR_JOB_STALE_AFTER_S",
    "requeue_after_s": "CXR_JOB_REQUEUE_AFTER_S",
    "queued_max_age_s": "CXR_JOB_QUEUED_MAX_AGE_S",
    "reap_interval_s": "CXR_JOB_REAP_INTERVAL_S",
    "progress_interval_s": "CXR_JOB_PROGRESS_INTERVAL_S",
    "visibility_timeout_s": "CXR_CELERY_VISIBILITY_TIMEOUT_S",
}


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
    def from_settings(cls, settings: Any | None = None) -> JobOptions:
        """Options from `settings.job_*` attributes, then `CXR_*` variables, then defaults."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            attr = "jobs_queue" if field.name == "queue" else f"job_{field.name}"
            if field.name == "visibility_timeout_s":
                attr = "celery_visibility_timeout_s"
            value = getattr(settings, attr, None) if settings is not None else None
            if value is None:
                value = os.environ.get(_ENV_NAMES[field.name]) or None
            if value is None:
                continue
            try:
                values[field.name] = str(value) if field.name == "queue" else float(value)
            except ValueError:
                raise ValueError(
                    f"{_ENV_NAMES[field.name]}={value!r} is not a number of seconds"
                ) from None
        options = cls(**values)
        if options.stale_after_s <= options.heartbeat_s:
            raise ValueError(
                "CXR_JOB_STALE_AFTER_S must be larger than CXR_JOB_HEARTBEAT_S (a few heartbeats), "
                f"got {options.stale_after_s} <= {options.heartbeat_s}"
            )
        return options
