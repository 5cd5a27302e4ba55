"""`cxr worker`: a Celery worker for retraining jobs.

Registered as `cxr worker` by `app/commands.py`; also runnable as `python -m app.jobs.worker`.
Before consuming, it brings the schema up to date when `CXR_AUTO_MIGRATE` allows (the same
idempotent, locked upgrade the API runs) and runs one reaper pass, so jobs orphaned by a
previous crash of this worker are failed (running) or re-published (queued) right away.

Threads: the worker applies the training thread policy at its start (`training/threads.py`:
the idle cores then, shared by `--concurrency` jobs), and every prefork pool process applies it
again at its own start (Celery's `worker_process_init`), so a retrain runs with that count.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import typer
from celery.signals import worker_process_init

from app.config import Settings
from app.jobs.heartbeat import Republish, reap_stale_jobs
from app.jobs.options import JobOptions

logger = logging.getLogger(__name__)


def worker_command(
    concurrency: int = typer.Option(
        1, "--concurrency", "-c", min=1, help="Jobs run at once by this worker (processes)."
    ),
    pool: str = typer.Option(
        "prefork",
        "--pool",
        help="Celery pool: prefork (a child process per job; survives a crashed job) or solo.",
    ),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="DEBUG, INFO, WARNING..."),
    hostname: str | None = typer.Option(
        None, "--hostname", "-n", help="Worker name (default: cxr@<host>)."
    ),
    ping: bool = typer.Option(
        False,
        "--ping",
        help="Do not start a worker: exit 0 if the worker --hostname answers a ping within 5 s "
        "(the container health check), else 1.",
    ),
) -> None:
    """Run a Celery worker for retraining jobs (needs CXR_BROKER_URL, e.g. redis://redis:6379/0)."""
    from app.config import get_settings
    from app.jobs.celery_app import create_celery_app, publish_retrain

    settings = get_settings()
    try:
        from app.logging import configure_logging

        configure_logging(loglevel.upper(), json_logs=settings.log_json)
    except Exception:  # pragma: no cover - logging setup is a convenience here
        logging.basicConfig(level=loglevel.upper())
    if not settings.broker_url:
        logger.error("CXR_BROKER_URL is not set")
        typer.echo(
            "cxr worker needs a broker: set CXR_BROKER_URL (e.g. redis://localhost:6379/0) to "
            "the same value as the API's. Without a broker the API runs retrains itself and no "
            "worker is needed.",
            err=True,
        )
        raise typer.Exit(code=2)

    options = JobOptions.from_settings(settings)
    name = hostname or f"cxr@{socket.gethostname()}"
    if ping:
        celery_app = create_celery_app(settings, options=options)
        replies = celery_app.control.ping(destination=[name], timeout=5.0)
        if not replies:
            typer.echo(f"worker {name} did not answer a ping on {options.queue}", err=True)
            raise typer.Exit(code=1)
        typer.echo(f"worker {name} is alive")
        return
    if getattr(settings, "auto_migrate", False):
        from app.db.migrate import upgrade_to_head

        upgrade_to_head(settings.database_url)
    celery_app = create_celery_app(settings, options=options)
    _apply_worker_threads(concurrency=1 if pool == "solo" else concurrency)
    _warm_imports()
    _reap_at_start(
        settings, options, lambda job_id: publish_retrain(celery_app, job_id, options=options)
    )

    argv = [
        "worker",
        f"--loglevel={loglevel.upper()}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={options.queue}",
        f"--hostname={name}",
        "--without-gossip",
        "--without-mingle",
    ]
    logger.info("starting Celery worker on queue %s", options.queue)
    celery_app.worker_main(argv)


def _apply_worker_threads(*, concurrency: int) -> None:
    """The worker's thread policy, chosen once at its start: a job trains, so the training
    policy, the idle cores shared by the jobs that may run at once. The solo pool runs jobs in
    this process; prefork children inherit it and `_pool_process_start` applies it again."""
    from training.threads import ThreadPolicy, apply_thread_policy

    apply_thread_policy(ThreadPolicy.training(concurrent=concurrency))


@worker_process_init.connect
def _pool_process_start(**_: Any) -> None:
    """A prefork pool process's start: apply the policy its parent chose (a forked copy of the
    parent's state is not relied on: torch and OpenMP counts are made this process's
    explicitly), or the training policy's default when no parent chose one."""
    from training.threads import ThreadPolicy, apply_thread_policy, current_thread_policy

    policy = current_thread_policy()
    apply_thread_policy(policy if policy.kind != "unset" else ThreadPolicy.training())


def _warm_imports() -> None:
    """Import the training stack once in the parent: pool processes fork with it loaded, so a
    job starts training at once instead of spending its first seconds importing torch."""
    import importlib

    for module in ("app.jobs.tasks", "app.services.retrain", "training.train"):
        try:
            importlib.import_module(module)
        except Exception:  # the job will report the real error when it runs
            logger.warning("could not pre-import %s", module, exc_info=True)


def _reap_at_start(settings: Settings, options: JobOptions, republish: Republish) -> None:
    """One reaper pass before consuming: orphans of a previous crash are settled at once."""
    from app.db.session import create_db_engine, create_sessionmaker

    engine = create_db_engine(settings)
    try:
        result = reap_stale_jobs(
            create_sessionmaker(engine),
            options=options,
            republish=republish,
            work_root=settings.data_dir / "jobs",
        )
        if result.failed or result.republished:
            logger.warning(
                "reaper at worker start: failed %s, re-published %s",
                result.failed,
                result.republished,
            )
    except Exception:  # the worker can still serve; the API's reaper will retry
        logger.warning("reaper pass at worker start failed", exc_info=True)
    finally:
        engine.dispose()


if __name__ == "__main__":  # pragma: no cover
    typer.run(worker_command)
