"""The retrain task: one function run by both runners (Celery worker or in-process thread).

`run_retrain(job_id, settings=...)`:

1. **Claim** the job: `UPDATE jobs SET status='running' WHERE id=? AND status='queued'`. A
   duplicate or late delivery (Celery redelivery, reaper re-publication) finds nothing to claim
   and returns, so handing a job over twice never trains twice.
2. **Snapshot** the enrolled references (rows and image files, hard-linked or copied into the
   job's scratch directory `data_dir/jobs/<id>/`), so deletions during training cannot break it.
3. **Split** for validation with `training.data.split_samples` (the split training uses):
   per source, stratified by label, grouped by image hash. No patient ids are stored for
   references, so the grouping can only keep identical images on one side; different images of
   one patient may land on both sides and make the validation metric optimistic. Every class
   keeps its first image in train; a class with one image is train-only.
4. **Train** with `training.train.train(config, samples=..., progress=...)`; parameters from the
   request, else `TrainConfig` defaults. Progress is written to the job row (throttled).
5. **Evaluate** on the job's validation split with `training.evaluate` (the train split in the
   service's `ReferenceIndex`, each validation image answered as `/predict` answers it): k-NN
   balanced accuracy per source and their mean, for the new model *and* the active one, so
   both are compared on the same images. The new model embeds the snapshot through
   `training.embedding`; the active model's vectors come from the embeddings store (computed
   and stored only where missing).
6. **Register** the new version (`register_model`, source `retrain`: file written atomically,
   row inserted after the file is complete), then **store every reference's vector** for it
   in the embeddings store (references enrolled since the snapshot are embedded now), so
   activation is instant for every API process.
7. **Activate** (`activate_model`) when it beats the active model on that metric, or when there
   is no active model; otherwise it stays a candidate that an admin may activate. If an admin
   switched the active model meanwhile, the comparison is void and it stays a candidate.

Failures set `status='failed'` with an error saying what to do. A worker killed mid-way leaves
no model row and the active model untouched; the reaper fails the job (`heartbeat.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, Model, Reference, utcnow
from app.files import resolve_data_path
from app.jobs.heartbeat import Heartbeat
from app.jobs.options import JobOptions
from app.serving.embeddings import Embedder, compute_embeddings, ensure_embeddings
from training.devices import resolve_device

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)

#: Share of each class's images held out for validation.
VAL_FRACTION = 0.2
#: Progress milestones: training fills [TRAIN_START, TRAIN_END], the rest is evaluation/embedding.
TRAIN_START, TRAIN_END = 0.02, 0.85
VALIDATION_METRIC = "knn_balanced_accuracy"
# A source may lose at most this much balanced accuracy for the new model to be activated
# (validation sets of a few images per class move in steps of that size by chance).
SOURCE_TOLERANCE = 0.02
# Parameters whose change needs training from scratch (a fine-tune keeps the architecture).
_ARCHITECTURE_PARAMS = ("encoder", "image_size", "embedding_dim")


class RetrainError(RuntimeError):
    """A retrain cannot proceed; the message tells the administrator what to do."""


class JobInterruptedError(RetrainError):
    """The process running the job is shutting down (in-process runner)."""


class JobLostError(RuntimeError):
    """This worker no longer owns the job (the reaper failed it); stop without publishing."""


@dataclass(frozen=True)
class RefSnapshot:
    """One enrolled reference as the job saw it when it started."""

    id: str
    label: str
    sha256: str
    path: Path
    source: str = ""


@dataclass
class Split:
    """Validation split of a snapshot."""

    train: list[RefSnapshot] = field(default_factory=list)
    val: list[RefSnapshot] = field(default_factory=list)


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
                _retrain(
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


def _retrain(
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
    from training.train import TrainConfig, finetune_config, train

    progress = ProgressWriter(
        factory,
        job_id,
        worker=worker,
        heartbeat=heartbeat,
        interval_s=options.progress_interval_s,
        stop=stop,
    )
    progress(0.0, force=True)
    with factory() as session:
        snapshot = snapshot_references(session, settings=settings, scratch=scratch / "images")
        active = session.execute(select(Model).where(Model.active.is_(True))).scalars().first()
        active_version = active.version if active is not None else None
        active_path = resolve_data_path(active.file_path, settings) if active is not None else None
    fixed = {
        "out": str(scratch / "run"),
        "device": train_device(settings.device),
        # No terminal to draw on (a server or worker log).
        "progress_bar": False,
        # The images are decoded and cached in memory before training, so loader processes
        # would only augment; and a Celery prefork child is daemonic, which may not fork.
        "workers": 0,
    }
    # Adapt the active model (minutes on a CPU; the label x source sampler gives a site's few
    # references the weight of a vendor's thousands) unless the request asks for another
    # architecture or input size, which only training from scratch can give.
    finetune_from = active_path if _can_finetune(active_path, params) else None
    if finetune_from is not None:
        config = finetune_config(finetune_from, **params, **fixed)
    else:
        config = TrainConfig(**{**params, **fixed})
    seed = int(getattr(config, "seed", 0) or 0)
    split = split_for_validation(snapshot, val_fraction=VAL_FRACTION, seed=seed)
    check_split(split)
    logger.info(
        "job %s: %d references, %d train / %d validation, classes %s",
        job_id,
        len(snapshot),
        len(split.train),
        len(split.val),
        sorted({r.label for r in snapshot}),
    )

    import torch

    threads = torch.get_num_threads()
    try:
        result = train(
            config,
            samples=to_samples(split),
            progress=progress.stage(TRAIN_START, TRAIN_END),
        )
    finally:
        # train() sets the process-wide torch thread count; the in-process runner shares the
        # process with request threads, whose setting must survive the job.
        torch.set_num_threads(threads)
    progress(TRAIN_END, force=True)

    # -- validation: new model vs active model, same split, the service's decision rule ------
    from training.checkpoint import load_checkpoint

    device = resolve_device(settings.device)
    new_model = Embedder.from_checkpoint(
        load_checkpoint(Path(result.checkpoint), map_location=device),
        version=f"job-{job_id}",
        device=device,
    )
    new_vectors = embed_snapshot(new_model, snapshot)
    k = int(getattr(settings, "default_k", 5) or 5)
    new_score, new_sources = validation_scores(new_vectors, split, k=k)
    progress(0.88, force=True)

    active_score: float | None = None
    active_sources: dict[str, float] = {}
    if active_path is not None and active_version is not None:
        try:
            old_model = Embedder.from_checkpoint(
                load_checkpoint(active_path, map_location=device),
                version=active_version,
                device=device,
            )
            where = {r.id: r.path for r in snapshot}
            with factory() as session:
                old_vectors = ensure_embeddings(session, old_model, list(where), where.__getitem__)
            active_score, active_sources = validation_scores(old_vectors, split, k=k)
        except Exception:  # a broken active model must not block its replacement
            logger.warning("job %s: could not evaluate active model", job_id, exc_info=True)
    progress(0.9, force=True)

    losers = {
        src: (new_sources[src], old)
        for src, old in active_sources.items()
        if src in new_sources and new_sources[src] < old - SOURCE_TOLERANCE
    }
    better = (
        active_version is None or active_score is None or (new_score > active_score and not losers)
    )
    metrics: dict[str, Any] = {
        "validation": {
            "metric": VALIDATION_METRIC,
            "k": k,
            "new": new_score,
            "active": active_score,
            "active_version": active_version,
            "per_source": {"new": new_sources, "active": active_sources or None},
        },
        "mode": (
            f"fine-tuned from {active_version}" if finetune_from is not None else "from scratch"
        ),
        "training": _jsonable(result.metrics),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "classes": _class_counts(snapshot),
        "params": {key: _jsonable(value) for key, value in params.items()},
    }

    # -- register (file complete before the row), re-embed everything, then activate ----------
    progress.check()
    from app.services.models import register_model

    with factory() as session:
        registered = register_model(
            session=session,
            checkpoint=Path(result.checkpoint),
            settings=settings,
            activate=False,
            source="retrain",
            metrics=model_metrics(result.metrics, new_score=new_score, job_id=job_id),
        )
        version = registered if isinstance(registered, str) else registered.version
    logger.info(
        "job %s registered model %s (%s=%.4f)", job_id, version, VALIDATION_METRIC, new_score
    )

    with factory() as session:
        where = {
            ref_id: resolve_data_path(image_path, settings)
            for ref_id, image_path in session.execute(select(Reference.id, Reference.image_path))
        }
        ensure_embeddings(
            session,
            dataclasses.replace(new_model, version=version),
            list(where),
            where.__getitem__,
            known=new_vectors,
            progress=progress.stage(0.9, 0.98),
        )

    activated, reason = False, ""
    with factory() as session:
        current = session.execute(select(Model.version).where(Model.active.is_(True))).scalar()
        if current != active_version:
            reason = (
                f"the active model changed to {current} during training; kept as a candidate "
                "(activate it with POST /admin/models/{version}/activate)"
            )
        elif better:
            reason = (
                "no active model"
                if active_version is None
                else f"beats {active_version}: {new_score:.4f} > {active_score}"
            )
            activated = True
        elif losers:
            worse = ", ".join(f"{s or 'unnamed'} {n:.3f} < {o:.3f}" for s, (n, o) in losers.items())
            reason = (
                f"worse than {active_version} on a source ({worse}); kept as a candidate "
                f"(activate it with POST /admin/models/{version}/activate)"
            )
        else:
            reason = (
                f"does not beat {active_version} ({new_score:.4f} <= {active_score:.4f}); kept "
                f"as a candidate (activate it with POST /admin/models/{version}/activate)"
            )
    metrics["activated"] = activated
    metrics["decision"] = reason
    if heartbeat.lost:  # not `check()`: a shutdown now should not waste the finished model
        raise JobLostError("the job was marked failed by the reaper while it ran")
    if activated:
        from app.services.models import activate_model

        with factory() as session:
            activate_model(session=session, version=version)
        logger.info("job %s activated model %s (%s)", job_id, version, reason)
    else:
        logger.info("job %s kept model %s as a candidate: %s", job_id, version, reason)

    with factory() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker)
            .values(
                status="succeeded",
                progress=1.0,
                metrics=metrics,
                model_version=version,
                finished_at=utcnow(),
                error=None,
            )
        )
        session.commit()
    logger.info("retrain job %s succeeded", job_id)


# -- building blocks (pure or nearly so; unit-tested) ---------------------------------------


def _can_finetune(active_path: Path | None, params: dict[str, Any]) -> bool:
    """Fine-tune the active model unless the request changes what a fine-tune must keep."""
    if active_path is None or not active_path.is_file():
        return False
    from training.checkpoint import read_checkpoint

    try:
        meta = read_checkpoint(active_path)
    except (OSError, ValueError):
        return False
    current = {
        "encoder": meta["encoder_name"],
        "image_size": meta["preprocessing"]["image_size"],
        "embedding_dim": meta["embedding_dim"],
    }
    return all(params.get(name, current[name]) == current[name] for name in _ARCHITECTURE_PARAMS)


def train_device(device: str) -> str:
    """`TrainConfig.device` from `CXR_DEVICE` (training takes auto, cpu or cuda)."""
    return "cuda" if device.startswith("cuda") else device if device in ("auto", "cpu") else "auto"


def model_metrics(
    train_metrics: dict[str, Any], *, new_score: float, job_id: str
) -> dict[str, Any]:
    """The `models.metrics` of a retrained version: the compact, comparable numbers."""
    keep = ("encoder", "loss", "classes", "best_epoch", "epochs_run", "minutes", "val", "splits")
    out = {key: _jsonable(train_metrics[key]) for key in keep if key in train_metrics}
    out[VALIDATION_METRIC] = new_score
    out["job_id"] = job_id
    return out


def snapshot_references(
    session: Session, *, settings: Settings, scratch: Path
) -> list[RefSnapshot]:
    """Rows and files of every enrolled reference, frozen into `scratch` (hard links if possible).

    A reference whose file is missing is skipped with a warning naming it.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    rows = session.execute(
        select(
            Reference.id, Reference.label, Reference.sha256, Reference.image_path, Reference.source
        ).order_by(Reference.id)
    ).all()
    snapshot: list[RefSnapshot] = []
    missing: list[str] = []
    for ref_id, label, sha256, image_path, ref_source in rows:
        source = resolve_data_path(image_path, settings)
        target = scratch / f"{ref_id}{source.suffix}"
        try:
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        except FileNotFoundError:
            missing.append(ref_id)
            continue
        snapshot.append(
            RefSnapshot(id=ref_id, label=label, sha256=sha256, path=target, source=ref_source or "")
        )
    if missing:
        logger.warning(
            "%d reference image(s) missing from %s, skipped: %s",
            len(missing),
            settings.data_dir,
            ", ".join(missing[:20]),
        )
    return snapshot


def split_for_validation(
    refs: Sequence[RefSnapshot], *, val_fraction: float = VAL_FRACTION, seed: int = 0
) -> Split:
    """`training.data.split_samples` of the snapshot: per source, stratified by label, grouped
    by image hash (standing in for the patient, which references do not record).

    Deterministic for a given snapshot and seed. With `val_fraction` below 0.5 the first image
    of every class goes to train, so a class with one image is train-only.
    """
    from training.data import Sample, split_samples

    by_path = {str(r.path): r for r in refs}
    if len(by_path) != len(refs):
        raise ValueError("every reference of a snapshot needs its own file")
    splits = split_samples(
        [
            Sample(path=r.path, label=r.label, patient_id=f"sha256:{r.sha256}", source=r.source)
            for r in refs
        ],
        val_fraction=val_fraction,
        test_fraction=0.0,
        seed=seed,
    )
    return Split(
        train=[by_path[str(s.path)] for s in splits["train"]],
        val=[by_path[str(s.path)] for s in splits["val"]],
    )


def check_split(split: Split) -> None:
    """Refuse a retrain that could not be trained or validated, saying what to enroll."""
    classes = {r.label for r in split.train}
    if len(classes) < 2:
        raise RetrainError(
            f"Retraining needs references of at least 2 classes, found {len(classes)} "
            f"({', '.join(sorted(classes)) or 'none'}). Enroll more with POST /references."
        )
    if not split.val:
        raise RetrainError(
            "Retraining needs at least 2 distinct images in some class to hold one out for "
            "validation. Enroll more references with POST /references."
        )


def to_samples(split: Split) -> dict[str, list[Any]]:
    """The `samples` argument of `training.train.train` (no patient ids are stored)."""
    from training.data import Sample

    return {
        name: [
            Sample(path=r.path, label=r.label, split=name, patient_id=None, source=r.source)
            for r in refs
        ]
        for name, refs in (("train", split.train), ("val", split.val))
    }


def embed_snapshot(model: Embedder, refs: Sequence[RefSnapshot]) -> dict[str, np.ndarray]:
    """Vectors of the snapshot's images under `model` (the one embedding path), by reference id.

    An unreadable image raises `RetrainError` naming its reference and what to do.
    """
    vectors, unreadable = compute_embeddings(model, [r.id for r in refs], [r.path for r in refs])
    if unreadable:
        ref_id, why = next(iter(unreadable.items()))
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise RetrainError(
            f"Reference {ref_id} cannot be read ({why}){more}. Delete it with "
            f"DELETE /references/{ref_id} (or enroll it again), then submit the retrain again."
        )
    return vectors


def validation_scores(
    vectors: Mapping[str, np.ndarray], split: Split, *, k: int = 5
) -> tuple[float, dict[str, float]]:
    """The promotion metric and its parts: k-NN balanced accuracy of each source's validation
    images, and their mean (so a site's few images weigh as much as a vendor's thousands).

    Decided by `training.evaluate.evaluate_embeddings`: the train split in the service's
    `ReferenceIndex`, each validation image answered by its calibrated k-NN vote, exactly as
    `/predict` would answer it. A model is promoted only if no source loses: a retrain that
    learns a new site by forgetting the vendor's data (or the reverse) must not replace the
    active model. References without a vector are left out.
    """
    from training.evaluate import evaluate_embeddings

    train = [r for r in split.train if r.id in vectors]
    val = [r for r in split.val if r.id in vectors]
    if not train or not val:
        return 0.0, {}
    report = evaluate_embeddings(
        np.stack([vectors[r.id] for r in train]),
        [r.label for r in train],
        np.stack([vectors[r.id] for r in val]),
        [r.label for r in val],
        k=k,
        episodes=0,
        query_sources=[r.source for r in val],
    )
    per_source = {
        name: float(part["knn"]["balanced_accuracy"]) for name, part in report["per_source"].items()
    }
    return float(report["source_balanced_accuracy"]), per_source


def _class_counts(refs: Sequence[RefSnapshot]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for ref in refs:
        counts[ref.label] += 1
    return dict(sorted(counts.items()))


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON types (numpy scalars and arrays, paths, tuples converted)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
