"""Retraining through a real Celery worker (`python -m app.jobs.worker`, what `cxr worker`
runs) on the machine's PostgreSQL and Redis: end to end with hot swap and rollback, a worker
killed with SIGKILL mid-training, and a queued job whose broker message was lost.

Each test uses a fresh PostgreSQL schema, its own Celery queue name and its own data dir.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from app.config import Settings
from app.db import Model
from app.jobs.heartbeat import reap_stale_jobs
from app.jobs.options import JobOptions
from app.main import create_app
from tests.app.conftest import new_key
from tests.app.jobs_helpers import (
    TINY,
    enroll,
    make_checkpoint,
    predict_version,
    run_worker,
    unique_queue,
    wait_for_job,
)

pytestmark = pytest.mark.services


@pytest.fixture
def queue(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Celery queue name of this test only (env, so the API and the worker agree); its Redis
    keys, including messages a killed worker left unacknowledged, are deleted afterwards."""
    name = unique_queue()
    monkeypatch.setenv("CXR_JOBS_QUEUE", name)
    monkeypatch.setenv("CXR_JOB_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("CXR_JOB_PROGRESS_INTERVAL_S", "0.2")
    yield name
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(name, f"_kombu.binding.{name}")
        for tag, payload in client.hscan_iter("unacked"):
            if name.encode() in payload:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
    finally:
        client.close()


@pytest.fixture
def service(
    postgres_url: str,
    redis_url: str,
    queue: str,
    make_settings: Callable[..., Settings],
) -> Iterator[tuple[FastAPI, TestClient, dict[str, dict[str, str]], Settings]]:
    """The app on PostgreSQL with the Redis broker (API side only; no worker yet)."""
    settings = make_settings(database_url=postgres_url, broker_url=redis_url, log_json=False)
    app = create_app(settings)
    with TestClient(app) as client:
        headers = {
            role: {"X-API-Key": new_key(app, role)} for role in ("reader", "clinician", "admin")
        }
        yield app, client, headers, settings


def worker_env(settings: Settings, queue: str) -> dict[str, str]:
    return {
        "CXR_DATABASE_URL": settings.database_url,
        "CXR_BROKER_URL": str(settings.broker_url),
        "CXR_DATA_DIR": str(settings.data_dir),
        "CXR_DEVICE": "cpu",
        "CXR_JOBS_QUEUE": queue,
        "CXR_JOB_HEARTBEAT_S": "0.5",
        "CXR_JOB_PROGRESS_INTERVAL_S": "0.2",
        "CXR_LOG_JSON": "false",
        "OMP_NUM_THREADS": "1",
    }


def register(app: FastAPI, path: Path, *, activate: bool) -> str:
    from app.services.models import register_model

    with app.state.sessionmaker() as session:
        return register_model(
            session=session,
            checkpoint=path,
            settings=app.state.settings,
            activate=activate,
            source="test",
        ).version


def model_rows(app: FastAPI) -> dict[str, bool]:
    with app.state.sessionmaker() as session:
        return {m.version: m.active for m in session.execute(select(Model)).scalars()}


def test_worker_retrains_hot_swaps_rolls_back_and_survives_sigkill(
    service: tuple[FastAPI, TestClient, dict[str, dict[str, str]], Settings],
    queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker process (starting one costs seconds of imports) for two stories:

    1. a tiny retrain end to end: the running app predicts with the new version at once, an
       older version can be re-activated (rollback) and back;
    2. a long retrain whose worker gets SIGKILL (the whole process group) mid-training: the job
       ends `failed` with an actionable error, no model row or file appears, the active model
       is untouched, and the slot is free again.
    """
    app, client, headers, settings = service
    admin = headers["admin"]
    n_refs = enroll(client, headers["clinician"], per_class=5)
    baseline = register(app, make_checkpoint(tmp_path / "base.pt"), activate=False)
    models_dir = settings.data_dir / "models"

    with run_worker(worker_env(settings, queue), tmp_path / "worker.log") as worker:

        def debug(exc: AssertionError) -> AssertionError:
            return AssertionError(f"{exc}\n--- worker log ---\n{worker.log()[-6000:]}")

        # -- 1. end to end ---------------------------------------------------------------
        submitted = client.post("/admin/retrain", headers=admin, json=TINY)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        # One at a time, also while the job waits for the worker to start.
        assert client.post("/admin/retrain", headers=admin, json=TINY).status_code == 409
        try:
            job = wait_for_job(client, admin, job_id, timeout=240)
        except AssertionError as exc:
            raise debug(exc) from None
        assert job["status"] == "succeeded", f"{job['error']}\n{worker.log()[-4000:]}"
        version = job["model_version"]
        assert job["metrics"]["activated"] is True and job["metrics"]["n_val"] == 3
        assert job["metrics"]["n_train"] + job["metrics"]["n_val"] == n_refs
        assert model_rows(app) == {baseline: False, version: True}
        # The running app switches to the new model between requests, without a restart.
        assert predict_version(client, headers["reader"]) == version
        # Rollback: re-activating the older version is picked up the same way, and back.
        assert client.post(f"/admin/models/{baseline}/activate", headers=admin).status_code == 200
        assert predict_version(client, headers["reader"]) == baseline
        assert client.post(f"/admin/models/{version}/activate", headers=admin).status_code == 200
        assert predict_version(client, headers["reader"]) == version

        # -- 2. SIGKILL mid-training -----------------------------------------------------
        files_before = sorted(p.name for p in models_dir.iterdir())
        long_run = {**TINY, "epochs": 200}
        killed_id = client.post("/admin/retrain", headers=admin, json=long_run).json()["job_id"]
        try:
            running = wait_for_job(
                client, admin, killed_id, until=("running",), min_progress=0.022, timeout=120
            )
        except AssertionError as exc:
            raise debug(exc) from None
        assert running["heartbeat_at"] is not None
        # Predictions during a retrain keep using the active model.
        assert predict_version(client, headers["reader"]) == version
        worker.kill()  # SIGKILL to the whole process group: main process and pool child
        assert worker.process.poll() is not None

    # Until the heartbeat goes stale the job still reads running ...
    assert client.get(f"/jobs/{killed_id}", headers=admin).json()["status"] == "running"
    # ... then the reaper (a short timeout here) fails it with an actionable error.
    time.sleep(1.5)
    result = reap_stale_jobs(
        app.state.sessionmaker,
        options=JobOptions(heartbeat_s=0.5, stale_after_s=1.0),
        work_root=settings.data_dir / "jobs",
    )
    assert result.failed == [killed_id]
    body = client.get(f"/jobs/{killed_id}", headers=admin).json()
    assert body["status"] == "failed" and body["model_version"] is None
    assert "stopped sending heartbeats" in body["error"]
    assert "POST /admin/retrain" in body["error"]
    # Nothing half-done is visible: no new model row or file, the active model untouched,
    # the job's scratch directory removed.
    assert model_rows(app) == {baseline: False, version: True}
    assert sorted(p.name for p in models_dir.iterdir()) == files_before
    assert not (settings.data_dir / "jobs" / killed_id).exists()
    assert predict_version(client, headers["reader"]) == version
    # The slot is free again.
    monkeypatch.setattr(app.state.settings, "job_requeue_after_s", 3600.0)
    assert client.post("/admin/retrain", headers=admin, json=TINY).status_code == 202


def test_queued_job_whose_message_was_lost_is_republished(
    service: tuple[FastAPI, TestClient, dict[str, dict[str, str]], Settings],
    queue: str,
    redis_url: str,
) -> None:
    """Redis restarted without persistence: the message is gone, the job row is not. No worker
    runs here, so the job stays queued; the reaper hands it to the broker again."""
    import redis

    app, client, headers, _settings = service
    job_id = client.post("/admin/retrain", headers=headers["admin"]).json()["job_id"]
    broker = redis.Redis.from_url(redis_url)
    try:
        assert broker.llen(queue) == 1
        broker.delete(queue)  # the message is lost
        runner = app.state.job_runner
        result = reap_stale_jobs(
            app.state.sessionmaker,
            options=JobOptions(requeue_after_s=0.0),
            republish=runner.submit,
        )
        assert result.republished == [job_id]
        assert broker.llen(queue) == 1
        assert job_id.encode() in (broker.lindex(queue, 0) or b"")
    finally:
        broker.close()
    body = client.get(f"/jobs/{job_id}", headers=headers["admin"]).json()
    assert body["status"] == "queued"


def test_worker_without_broker_explains_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from app.jobs.worker import worker_command

    monkeypatch.delenv("CXR_BROKER_URL", raising=False)
    cli = typer.Typer()
    cli.command()(worker_command)
    result: Any = CliRunner().invoke(cli, [])
    assert result.exit_code == 2
    assert "CXR_BROKER_URL" in result.output


@pytest.mark.usefixtures("restore_thread_policy")
def test_pool_process_start_applies_the_worker_thread_policy() -> None:
    """A prefork pool process's start (Celery's `worker_process_init`) applies the policy the
    worker chose at its start, whatever counts the new process came with."""
    import faiss
    import torch
    from celery.signals import worker_process_init

    import app.jobs.worker  # noqa: F401 - connects the handler, as `cxr worker` does
    from training.threads import ThreadPolicy, apply_thread_policy

    policy = apply_thread_policy(ThreadPolicy.training(torch.get_num_threads() + 1))
    torch.set_num_threads(policy.threads + 1)
    faiss.omp_set_num_threads(policy.threads + 1)
    worker_process_init.send(sender=None)
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (policy.threads,) * 2
