"""Retraining jobs without a broker: the in-process runner, the HTTP contract (202/409/422/404),
the one-at-a-time rule (also under concurrent submitters on PostgreSQL), the reaper, and the
retrain task's building blocks. Worker (Celery) tests are in test_worker.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import Embedding, Job, Model, Reference, utcnow
from app.jobs.heartbeat import reap_stale_jobs
from app.jobs.options import JobOptions
from app.jobs.tasks import run_retrain
from app.services.jobs import JobConflictError, submit_retrain
from app.services.retrain import (
    Decision,
    RefSnapshot,
    RetrainError,
    Scores,
    Split,
    decide_activation,
    embed_snapshot,
    split_for_validation,
    validation_scores,
)
from app.serving.embeddings import Embedder
from tests.app.conftest import new_key
from tests.app.jobs_helpers import (
    LABELS,
    TINY,
    class_png,
    enroll,
    make_checkpoint,
    predict_version,
    wait_for_job,
)


class StubRunner:
    """A runner that records hand-overs and runs nothing (the job stays queued)."""

    name = "stub"

    def __init__(self, fail: bool = False) -> None:
        self.submitted: list[str] = []
        self.fail = fail

    def submit(self, job_id: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.submitted.append(job_id)

    def shutdown(self, *, wait: bool = False) -> None:
        pass


def register(app: FastAPI, path: Path, *, activate: bool) -> str:
    from app.services.models import register_model

    with app.state.sessionmaker() as session:
        row = register_model(
            session=session,
            checkpoint=path,
            settings=app.state.settings,
            activate=activate,
            source="test",
        )
        return row.version


def active_version(app: FastAPI) -> str | None:
    with app.state.sessionmaker() as session:
        return session.execute(select(Model.version).where(Model.active.is_(True))).scalar()


# -- building blocks --------------------------------------------------------------------------


def _refs(
    counts: dict[str, int], *, duplicate: bool = False, source: str = ""
) -> list[RefSnapshot]:
    refs = []
    for label, n in counts.items():
        for i in range(n):
            digest = f"{label}-{i // 2 if duplicate else i}"
            ref_id = f"{source}{label}{i}"
            path = Path(f"{ref_id}.png")
            refs.append(RefSnapshot(ref_id, label, digest, path, source))
    return refs


def test_split_is_the_training_split_stratified_grouped_by_hash_per_source() -> None:
    refs = _refs({"A": 10, "B": 5, "C": 1})
    split = split_for_validation(refs, val_fraction=0.2, seed=0)
    val = [r.label for r in split.val]
    assert val.count("A") == 2 and val.count("B") == 1 and val.count("C") == 0
    assert {r.label for r in split.train} == {"A", "B", "C"}
    assert split == split_for_validation(refs, val_fraction=0.2, seed=0)  # deterministic
    # Identical images (same hash) never straddle train and validation.
    grouped = split_for_validation(_refs({"A": 8, "B": 8}, duplicate=True), seed=3)
    assert grouped.val and not {r.sha256 for r in grouped.train} & {r.sha256 for r in grouped.val}
    # Each source is held out on its own: a small site gets validation images of every class.
    sites = _refs({"A": 5, "B": 5}, source="vendor") + _refs({"A": 3, "B": 3}, source="site")
    held = sorted((r.source, r.label) for r in split_for_validation(sites, seed=0).val)
    assert held == [("site", "A"), ("site", "B"), ("vendor", "A"), ("vendor", "B")]


def test_validation_scores_answer_as_the_service_and_weigh_sources_equally() -> None:
    """Two sources; the vendor's queries are all answered right, one of the site's two classes
    wrong: per source 1.0 and 0.5, the promotion metric their mean 0.75 (not the pooled
    0.83 of five right answers in six, where the vendor's numbers would hide the site)."""
    train = _refs({"A": 3, "B": 3}, source="vendor") + _refs({"A": 3, "B": 3}, source="site")
    val = _refs({"A": 2, "B": 2}, source="vendor")
    val += [RefSnapshot(id="qa", label="A", sha256="qa", path=Path("qa"), source="site")]
    val += [RefSnapshot(id="qb", label="B", sha256="qb", path=Path("qb"), source="site")]
    val = [RefSnapshot(f"q{r.id}", r.label, r.sha256, r.path, r.source) for r in val]
    a, b = np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)
    rng = np.random.default_rng(0)

    def near(v: np.ndarray) -> np.ndarray:
        w = v + rng.normal(0, 0.05, 2).astype(np.float32)
        return w / np.linalg.norm(w)

    vectors = {r.id: near(a if r.label == "A" else b) for r in train + val}
    vectors["qqb"] = near(a)  # the site's B query looks like an A
    score, per_source = validation_scores(vectors, Split(train=train, val=val), k=3)
    assert per_source == {"site": pytest.approx(0.5), "vendor": pytest.approx(1.0)}
    assert score == pytest.approx(0.75)
    # A query without a vector is left out, not counted as wrong.
    del vectors["qqb"]
    assert validation_scores(vectors, Split(train=train, val=val), k=3)[0] == pytest.approx(1.0)


def test_an_unreadable_reference_is_named_with_what_to_do(tmp_path: Path) -> None:
    import torch

    from training.checkpoint import load_checkpoint

    loaded = load_checkpoint(make_checkpoint(tmp_path / "m.pt"))
    model = Embedder.from_checkpoint(loaded, version="v", device=torch.device("cpu"))
    good = tmp_path / "good.png"
    good.write_bytes(class_png(LABELS[0], 1))
    bad = tmp_path / "abc123.png"
    bad.write_bytes(b"not an image at all")
    refs = [
        RefSnapshot(id="good", label=LABELS[0], sha256="g", path=good),
        RefSnapshot(id="abc123", label=LABELS[0], sha256="b", path=bad),
    ]
    with pytest.raises(RetrainError, match="DELETE /references/abc123"):
        embed_snapshot(model, refs)
    vectors = embed_snapshot(model, refs[:1])
    assert list(vectors) == ["good"]
    assert np.linalg.norm(vectors["good"]) == pytest.approx(1.0, abs=1e-5)


def test_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_JOBS_QUEUE", "q1")
    monkeypatch.setenv("CXR_JOB_STALE_AFTER_S", "7")
    monkeypatch.setenv("CXR_JOB_HEARTBEAT_S", "1")
    options = JobOptions.from_settings(None)
    assert (options.queue, options.stale_after_s, options.heartbeat_s) == ("q1", 7.0, 1.0)
    monkeypatch.setenv("CXR_JOB_HEARTBEAT_S", "9")
    with pytest.raises(ValueError, match="CXR_JOB_STALE_AFTER_S must be larger"):
        JobOptions.from_settings(None)


def test_job_options_are_fields_of_the_one_settings(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_JOBS_QUEUE", "from-env")
    monkeypatch.setenv("CXR_CELERY_VISIBILITY_TIMEOUT_S", "123")
    settings = make_settings(job_heartbeat_s=2, job_reap_interval_s=5)
    assert (settings.jobs_queue, settings.celery_visibility_timeout_s) == ("from-env", 123.0)
    options = JobOptions.from_settings(settings)
    assert (options.queue, options.heartbeat_s, options.reap_interval_s) == ("from-env", 2.0, 5.0)
    assert options.visibility_timeout_s == 123.0
    monkeypatch.setenv("CXR_JOB_HEARTBEAT_S", "soon")
    with pytest.raises(ValueError, match="job_heartbeat_s"):
        make_settings()


# -- HTTP contract ----------------------------------------------------------------------------


def test_retrain_http_contract_and_one_at_a_time(
    app: FastAPI, client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    runner = StubRunner()
    app.state.job_runner = runner  # the lifespan's runner, swapped for one that runs nothing
    admin = headers["admin"]

    assert client.post("/admin/retrain", headers=headers["clinician"]).status_code == 403
    bad = client.post("/admin/retrain", headers=admin, json={"encoder": "nope"})
    assert bad.status_code == 422
    assert "sepconv" in bad.json()["detail"] and "resnet9_half" in bad.json()["detail"]
    bad_loss = client.post("/admin/retrain", headers=admin, json={"loss": "nope"})
    assert bad_loss.status_code == 422 and "contrastive" in bad_loss.json()["detail"]
    assert client.post("/admin/retrain", headers=admin, json={"epochs": 0}).status_code == 422
    assert client.post("/admin/retrain", headers=admin, json={"lr": 1}).status_code == 422

    first = client.post("/admin/retrain", headers=admin, json={"epochs": 2})
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    assert runner.submitted == [job_id]
    second = client.post("/admin/retrain", headers=admin)  # no body: defaults
    assert second.status_code == 409
    assert job_id in second.json()["detail"]

    body = client.get(f"/jobs/{job_id}", headers=admin).json()
    assert {k: body[k] for k in ("id", "kind", "status", "progress", "model_version")} == {
        "id": job_id,
        "kind": "retrain",
        "status": "queued",
        "progress": 0.0,
        "model_version": None,
    }
    assert body["params"] == {"epochs": 2} and body["error"] is None and "metrics" in body
    assert client.get(f"/jobs/{job_id}", headers=headers["reader"]).status_code == 403
    missing = client.get("/jobs/nope", headers=admin)
    assert missing.status_code == 404 and "POST /admin/retrain" in missing.json()["detail"]
    assert [j["id"] for j in client.get("/jobs", headers=admin).json()] == [job_id]


def test_unreachable_runner_fails_the_job_and_frees_the_slot(
    app: FastAPI, client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    app.state.job_runner = StubRunner(fail=True)
    response = client.post("/admin/retrain", headers=headers["admin"])
    assert response.status_code == 503
    assert "CXR_BROKER_URL" in response.json()["detail"]
    with app.state.sessionmaker() as session:
        job = session.execute(select(Job)).scalar_one()
        assert job.status == "failed" and "broker down" in (job.error or "")
    app.state.job_runner = StubRunner()
    assert client.post("/admin/retrain", headers=headers["admin"]).status_code == 202


def test_concurrent_submitters_on_postgres_admit_exactly_one(
    postgres_url: str, make_settings: Callable[..., Settings]
) -> None:
    from app.db.migrate import upgrade_to_head
    from app.db.session import create_db_engine, create_sessionmaker

    settings = make_settings(database_url=postgres_url)
    upgrade_to_head(postgres_url)
    engine = create_db_engine(postgres_url)
    factory = create_sessionmaker(engine)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def submit() -> None:
        with factory() as session:
            barrier.wait()
            try:
                submit_retrain(session=session, settings=settings, params={}, runner=StubRunner())
                outcomes.append("accepted")
            except JobConflictError:
                outcomes.append("conflict")

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert sorted(outcomes) == ["accepted", "conflict", "conflict", "conflict"]
        with factory() as session:
            assert len(session.execute(select(Job)).scalars().all()) == 1
    finally:
        engine.dispose()


# -- reaper -----------------------------------------------------------------------------------


def test_reaper_fails_silent_jobs_and_republishes_lost_queued_ones(
    app: FastAPI,
    client: TestClient,
    headers: dict[str, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app.state.job_runner = StubRunner()
    now = utcnow()
    old = now - timedelta(minutes=10)
    with app.state.sessionmaker() as session:
        session.add_all(
            [
                Job(
                    id="dead",
                    kind="retrain",
                    status="running",
                    created_at=old,
                    started_at=old,
                    heartbeat_at=old,
                    worker="w:1",
                ),
                Job(
                    id="alive",
                    kind="retrain",
                    status="running",
                    created_at=old,
                    started_at=old,
                    heartbeat_at=now,
                    worker="w:2",
                ),
                Job(id="lost", kind="retrain", status="queued", created_at=old, heartbeat_at=old),
                Job(
                    id="ancient",
                    kind="retrain",
                    status="queued",
                    created_at=now - timedelta(days=3),
                    heartbeat_at=old,
                ),
            ]
        )
        session.commit()
    republished: list[str] = []
    result = reap_stale_jobs(
        app.state.sessionmaker,
        options=JobOptions(stale_after_s=60, requeue_after_s=60, queued_max_age_s=86_400),
        republish=republished.append,
        work_root=app.state.settings.data_dir / "jobs",
    )
    assert sorted(result.failed) == ["ancient", "dead"]
    assert republished == result.republished == ["lost"]
    with app.state.sessionmaker() as session:
        jobs = {j.id: j for j in session.execute(select(Job)).scalars()}
    assert jobs["dead"].status == "failed" and "stopped sending heartbeats" in jobs["dead"].error
    assert "POST /admin/retrain" in jobs["dead"].error
    assert jobs["ancient"].status == "failed" and "cxr worker" in jobs["ancient"].error
    assert jobs["alive"].status == "running"
    assert jobs["lost"].status == "queued" and jobs["lost"].heartbeat_at > old
    # A second pass right after does not publish the same job again.
    again = reap_stale_jobs(app.state.sessionmaker, options=JobOptions(), republish=print)
    assert again.republished == [] and again.failed == []

    # GET /jobs/{id} reaps lazily: the alive job's worker goes silent, the API notices at once.
    # (job tunables are Settings fields: change the running app's settings, not the environment)
    monkeypatch.setattr(app.state.settings, "job_stale_after_s", 0.5)
    monkeypatch.setattr(app.state.settings, "job_heartbeat_s", 0.1)
    with app.state.sessionmaker() as session:
        session.get(Job, "alive").heartbeat_at = now - timedelta(seconds=5)  # type: ignore[union-attr]
        session.commit()
    body = client.get("/jobs/alive", headers=headers["admin"]).json()
    assert body["status"] == "failed" and "w:2" in body["error"]


def test_duplicate_delivery_of_a_finished_job_does_nothing(
    app: FastAPI, client: TestClient
) -> None:
    with app.state.sessionmaker() as session:
        session.add(Job(id="done", kind="retrain", status="succeeded", progress=1.0))
        session.commit()
    run_retrain("done", settings=app.state.settings, factory=app.state.sessionmaker)
    run_retrain("does-not-exist", settings=app.state.settings, factory=app.state.sessionmaker)
    with app.state.sessionmaker() as session:
        job = session.get(Job, "done")
        assert job is not None and job.status == "succeeded" and job.started_at is None


# -- the in-process runner, end to end --------------------------------------------------------


def test_in_process_retrain_activates_hot_swaps_and_rolls_back(
    app: FastAPI, client: TestClient, headers: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """No broker: the API's own thread trains on the enrolled references; the new version is
    activated (there was no active model), predictions switch to it without a restart, and an
    older version can be re-activated (rollback)."""
    admin = headers["admin"]
    n_refs = enroll(client, headers["clinician"], per_class=6)
    baseline = register(app, make_checkpoint(tmp_path / "base.pt"), activate=False)

    response = client.post("/admin/retrain", headers=admin, json=TINY)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, admin, response.json()["job_id"], timeout=240)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0
    version = job["model_version"]
    assert version and version != baseline
    metrics = job["metrics"]
    assert metrics["activated"] is True and metrics["decision"] == "no active model"
    assert metrics["n_train"] + metrics["n_val"] == n_refs and metrics["n_val"] == len(LABELS)
    assert 0.0 <= metrics["validation"]["new"] <= 1.0
    assert set(metrics["classes"]) == set(LABELS)

    models = {m["version"]: m for m in client.get("/models", headers=admin).json()}
    assert models[version]["active"] is True and models[baseline]["active"] is False
    with app.state.sessionmaker() as session:
        row = session.get(Model, version)
        assert row is not None and row.source == "retrain"
        assert (app.state.settings.data_dir / row.file_path).is_file()
        stored = session.execute(
            select(Embedding.reference_id).where(Embedding.model_version == version)
        ).all()
        assert len(stored) == session.query(Reference).count() == n_refs
    assert not (app.state.settings.data_dir / "jobs" / job["id"]).exists()  # scratch removed
    assert predict_version(client, headers["reader"]) == version

    rollback = client.post(f"/admin/models/{baseline}/activate", headers=admin)
    assert rollback.status_code == 200, rollback.text
    assert predict_version(client, headers["reader"]) == baseline


@pytest.mark.parametrize("outcome", ["tie", "beats"])
def test_activation_decision_compares_with_the_active_model_on_the_same_split(
    outcome: str,
    app: FastAPI,
    client: TestClient,
    headers: dict[str, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Training is replaced by a stand-in that writes a constant-embedding checkpoint. "tie":
    the real metric scores it and the (also constant) active model exactly 1/3 on the same
    split; a tie is no improvement, so it stays a candidate an admin can promote. "beats": the
    metric is stubbed to favour the new model, which is then activated by the job itself."""
    import app.services.retrain as retrain_service
    import training.train as training_train

    def fake_train(config: Any, *, samples: Any = None, progress: Any = None) -> Any:
        assert set(samples) == {"train", "val"} and samples["val"]
        assert all(s.patient_id is None and s.path.is_file() for s in samples["train"])
        progress(0.5)
        out = Path(config.out)
        checkpoint = make_checkpoint(out / "encoder.pt", constant=True, bias=2.0)
        return training_train.TrainResult(run_dir=out, checkpoint=checkpoint, metrics={})

    monkeypatch.setattr(training_train, "train", fake_train)
    if outcome == "beats":
        scores = iter([(0.9, {"": 0.9}), (0.2, {"": 0.2})])  # new model first, then the active
        monkeypatch.setattr(retrain_service, "validation_scores", lambda *a, **k: next(scores))
    active = register(app, make_checkpoint(tmp_path / "a.pt", constant=True), activate=True)
    enroll(client, headers["clinician"], per_class=4)

    job_id = client.post("/admin/retrain", headers=headers["admin"]).json()["job_id"]
    job = wait_for_job(client, headers["admin"], job_id, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    candidate = job["model_version"]
    validation = job["metrics"]["validation"]
    assert validation["active_version"] == active
    listed = client.get("/models", headers=headers["admin"]).json()
    models = {m["version"]: m["active"] for m in listed}
    if outcome == "tie":
        assert validation["new"] == pytest.approx(1 / 3) == validation["active"]
        assert job["metrics"]["activated"] is False
        assert "kept as a candidate" in job["metrics"]["decision"]
        assert models == {active: True, candidate: False}
        promoted = client.post(f"/admin/models/{candidate}/activate", headers=headers["admin"])
        assert promoted.status_code == 200 and active_version(app) == candidate
    else:
        assert (validation["new"], validation["active"]) == (0.9, 0.2)
        assert job["metrics"]["activated"] is True
        assert job["metrics"]["decision"].startswith(f"beats {active}")
        assert models == {active: False, candidate: True}
        assert predict_version(client, headers["reader"]) == candidate


def test_api_shutdown_interrupts_an_in_process_retrain_and_fails_it(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping the API (lifespan exit) stops its in-process job at the next training step and
    records why, instead of holding the process open or leaving the job `running`."""
    import time

    import training.train as training_train

    started = threading.Event()

    def endless_train(config: Any, *, samples: Any = None, progress: Any = None) -> Any:
        for step in range(2000):
            progress(step / 2000)
            started.set()
            time.sleep(0.01)
        raise AssertionError("training was not interrupted")

    monkeypatch.setattr(training_train, "train", endless_train)
    with TestClient(app) as client:
        admin = {"X-API-Key": new_key(app, "admin")}
        enroll(client, {"X-API-Key": new_key(app, "clinician")}, per_class=3)
        job_id = client.post("/admin/retrain", headers=admin).json()["job_id"]
        assert started.wait(timeout=60)
        runner = app.state.job_runner
    runner.wait(timeout=30)  # the lifespan has stopped it; the thread ends promptly
    with app.state.sessionmaker() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "failed"
        assert "was shut down" in (job.error or "") and job.model_version is None
        assert session.execute(select(Model)).first() is None


def test_retrain_fine_tunes_the_active_model_and_validates_every_source(
    app: FastAPI, client: TestClient, headers: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """With an active model, a retrain adapts it (same architecture and pixels) on the
    references of every source, and reports the validation of each source."""
    admin = headers["admin"]
    enroll(client, headers["clinician"], per_class=5, source="vendor")
    enroll(client, headers["clinician"], per_class=3, seed0=50, source="st-mary")
    active = register(app, make_checkpoint(tmp_path / "active.pt"), activate=True)
    with app.state.sessionmaker() as session:
        assert {r.source for r in session.query(Reference)} == {"vendor", "st-mary"}

    response = client.post("/admin/retrain", headers=admin, json=TINY)
    job = wait_for_job(client, admin, response.json()["job_id"], timeout=240)
    assert job["status"] == "succeeded", job["error"]
    metrics = job["metrics"]
    assert metrics["mode"] == f"fine-tuned from {active}"
    per_source = metrics["validation"]["per_source"]
    assert set(per_source["new"]) == set(per_source["active"]) == {"vendor", "st-mary"}
    assert metrics["training"]["splits"]["val"]["total"] == metrics["n_val"] >= 2 * len(LABELS)

    from training.checkpoint import load_checkpoint

    with app.state.sessionmaker() as session:
        row = session.get(Model, job["model_version"])
        assert row is not None
        tuned = load_checkpoint(app.state.settings.data_dir / row.file_path)
    base = load_checkpoint(tmp_path / "active.pt")
    assert tuned.encoder_name == base.encoder_name
    assert tuned.preprocessing == base.preprocessing
    assert tuned.config["init_from"]


def test_an_invalid_source_name_is_refused(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    files = [("file", ("a.png", class_png(LABELS[0], 1), "image/png"))]
    response = client.post(
        "/references", headers=headers["clinician"],
        data={"label": LABELS[0], "source": "<script>"}, files=files,
    )  # fmt: skip
    assert response.status_code == 422
    assert "source must be" in response.json()["detail"]


@pytest.mark.parametrize(
    ("new", "active", "current", "expected", "why"),
    [
        (Scores(0.5, {"a": 0.5}), None, None, True, "no active model"),
        (Scores(0.80, {"a": 0.9, "b": 0.7}), Scores(0.75, {"a": 0.8, "b": 0.7}), "m1", True,
         "beats"),
        # the mean improves but one source loses more than the tolerance: a candidate
        (Scores(0.80, {"a": 0.97, "b": 0.63}), Scores(0.75, {"a": 0.8, "b": 0.7}), "m1", False,
         "worse than m1 on a source (b 0.630 < 0.700)"),
        # a loss within the tolerance does not block
        (Scores(0.80, {"a": 0.91, "b": 0.69}), Scores(0.75, {"a": 0.8, "b": 0.7}), "m1", True,
         "beats"),
        # a tie is no improvement
        (Scores(0.75, {"a": 0.8, "b": 0.7}), Scores(0.75, {"a": 0.8, "b": 0.7}), "m1", False,
         "does not beat m1"),
        # an admin switched models during training: the comparison is void
        (Scores(0.9, {"a": 0.9}), Scores(0.1, {"a": 0.1}), "m2", False,
         "the active model changed to m2"),
    ],
)  # fmt: skip
def test_decide_activation(
    new: Scores, active: Scores | None, current: str | None, expected: bool, why: str
) -> None:
    active_version = None if active is None else "m1"
    decision = decide_activation(
        new=new, active=active, active_version=active_version,
        current_version=current if active is not None else None, version="m3",
    )  # fmt: skip
    assert isinstance(decision, Decision)
    assert decision.activate is expected
    assert why in decision.reason
    if not expected:
        assert "POST /admin/models/m3/activate" in decision.reason
