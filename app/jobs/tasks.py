"""The retrain task: one function run by both runners (Celery worker or in-process thread).

`run_retrain(job_id, settings=...)`:

1. **Claim** the job: `UPDATE jobs SET status='running' WHERE id=? AND status='queued'`. A
   duplicate or late delivery (Celery redelivery, reaper re-publication) finds nothing to claim
   and returns, so handing a job over twice never trains twice.
2. **Snapshot** the enrolled references (rows and image files, hard-linked or copied into the
   job's scratch directory `data_dir/jobs/<id>/`), so deletions during training cannot break it.
3. **Split** for validation, stratified by label and grouped by image hash. No patient ids are
   stored for references, so the grouping can only keep identical images on one side; different
   images of one patient may land on both sides and make the validation metric optimistic.
   Every class keeps at least one group in train; a class with one image is train-only.
4. **Train** with `training.train.train(config, samples=..., progress=...)`; parameters from the
   request, else `TrainConfig` defaults. Progress is written to the job row (throttled).
5. **Evaluate** on the job's validation split: k-NN balanced accuracy with the train split as
   references, for the new model *and* the active one (embedded with each model), so both are
   compared on the same images.
6. **Register** the new version (`register_model`, source `retrain`: file written atomically,
   row inserted after the file is complete), then **re-embed every reference** with it and
   store the `embeddings` rows, so activation is instant for every API process.
7. **Activate** (`activate_model`) when it beats the active model on that metric, or when there
   is no active model; otherwise it stays a candidate that an admin may activate. If an admin
   switched the active model meanwhile, the comparison is void and it stays a candidate.

Failures set `status='failed'` with an error saying what to do. A worker killed mid-way leaves
no model row and the active model untouched; the reaper fails the job (`heartbeat.py`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import insert_embeddings_ignoring_duplicates
from app.db.models import Embedding, Job, Model, Reference, utcnow
from app.jobs.heartbeat import Heartbeat
from app.jobs.options import JobOptions

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
EMBED_BATCH = 64


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

    # -- validation: new model vs active model, same split --------------------------------
    from training.checkpoint import load_checkpoint

    device = resolve_device(settings.device)
    new_model = load_checkpoint(Path(result.checkpoint), map_location=device)
    new_train, new_val = (
        embed_paths(new_model, [r.path for r in split.train], device=device),
        embed_paths(new_model, [r.path for r in split.val], device=device),
    )
    k = int(getattr(settings, "default_k", 5) or 5)
    new_score = knn_balanced_accuracy(new_train, split.train, new_val, split.val, k=k)
    progress(0.88, force=True)

    new_sources = per_source_accuracy(new_train, split.train, new_val, split.val, k=k)
    active_score: float | None = None
    active_sources: dict[str, float] = {}
    if active_path is not None:
        try:
            old_model = load_checkpoint(active_path, map_location=device)
            old_train = embed_paths(old_model, [r.path for r in split.train], device=device)
            old_val = embed_paths(old_model, [r.path for r in split.val], device=device)
            active_score = knn_balanced_accuracy(old_train, split.train, old_val, split.val, k=k)
            active_sources = per_source_accuracy(old_train, split.train, old_val, split.val, k=k)
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

    known = {r.id: vec for r, vec in zip(split.train, new_train, strict=True)}
    known.update({r.id: vec for r, vec in zip(split.val, new_val, strict=True)})
    store_embeddings(
        factory,
        model=new_model,
        model_version=version,
        settings=settings,
        known=known,
        device=device,
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


def resolve_data_path(path: str, settings: Settings) -> Path:
    """Stored paths are relative to `data_dir` (the inference side's rule; absolute kept)."""
    from app.state import resolve_data_path as resolve

    return resolve(path, settings)


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
    """Stratified by label x source, grouped by image hash; every class keeps a group in train.

    Deterministic for a given snapshot and seed. A class with n >= 2 groups sends
    `max(1, round(n * val_fraction))` groups (at most n - 1) to validation.
    """
    groups: dict[tuple[str, str], dict[str, list[RefSnapshot]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for ref in refs:  # each source's classes are held out on their own
        groups[(ref.label, ref.source)][ref.sha256].append(ref)
    rng = random.Random(seed)
    split = Split()
    for label in sorted(groups):
        hashes = sorted(groups[label])
        rng.shuffle(hashes)
        n_val = 0
        if len(hashes) >= 2:
            n_val = min(len(hashes) - 1, max(1, round(len(hashes) * val_fraction)))
        for i, digest in enumerate(hashes):
            (split.val if i < n_val else split.train).extend(groups[label][digest])
    return split


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


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when available, else `cpu` (the inference side's rule)."""
    from app.state import resolve_device as resolve

    return str(resolve(device))


def embed_paths(
    loaded: Any, paths: Sequence[Path], *, device: str, skip_unreadable: bool = False
) -> np.ndarray:
    """L2-normalised float32 embeddings `(n, dim)` of image files with a loaded checkpoint.

    An unreadable image raises `RetrainError` naming its reference, unless `skip_unreadable`,
    in which case its row is NaN (callers drop it).
    """
    import torch

    from training.imaging import ImageError, decode_image
    from training.preprocess import preprocess

    dim = int(loaded.embedding_dim)
    encoder = loaded.encoder.to(device).eval()
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(paths), EMBED_BATCH):
            rows, tensors = [], []
            for row in range(start, min(start + EMBED_BATCH, len(paths))):
                try:
                    image = decode_image(paths[row])
                except (ImageError, OSError) as exc:
                    if skip_unreadable:
                        logger.warning("skipping unreadable reference image %s", paths[row].name)
                        continue
                    raise RetrainError(
                        f"Reference {paths[row].stem} cannot be read ({exc}). Delete it with "
                        f"DELETE /references/{paths[row].stem} (or enroll it again), then "
                        "submit the retrain again."
                    ) from exc
                rows.append(row)
                tensors.append(preprocess(image, loaded.preprocessing))
            if tensors:
                emb = encoder(torch.stack(tensors).to(device)).float().cpu().numpy()
                out[rows] = emb
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def per_source_accuracy(
    ref_emb: np.ndarray,
    refs: Sequence[RefSnapshot],
    query_emb: np.ndarray,
    queries: Sequence[RefSnapshot],
    *,
    k: int = 5,
) -> dict[str, float]:
    """k-NN balanced accuracy of each source's validation queries against all references.

    A model is promoted only if no source loses: a retrain that learns a new site by
    forgetting the vendor's data (or the reverse) must not replace the active model.
    """
    rows: dict[str, list[int]] = defaultdict(list)
    for i, query in enumerate(queries):
        rows[query.source].append(i)
    return {
        source: _knn_balanced_accuracy(
            ref_emb, refs, query_emb[idx], [queries[i] for i in idx], k=k
        )
        for source, idx in sorted(rows.items())
    }


def knn_balanced_accuracy(
    ref_emb: np.ndarray,
    refs: Sequence[RefSnapshot],
    query_emb: np.ndarray,
    queries: Sequence[RefSnapshot],
    *,
    k: int = 5,
) -> float:
    """The validation metric: mean over sources of their k-NN balanced accuracy, so a site's
    few images weigh as much as a vendor's thousands (one source: plain balanced accuracy)."""
    scores = per_source_accuracy(ref_emb, refs, query_emb, queries, k=k)
    return float(np.mean(list(scores.values()))) if scores else 0.0


def _knn_balanced_accuracy(
    ref_emb: np.ndarray,
    refs: Sequence[RefSnapshot],
    query_emb: np.ndarray,
    queries: Sequence[RefSnapshot],
    *,
    k: int = 5,
) -> float:
    """Balanced accuracy of the distance-weighted k-NN vote.

    Mean over the query classes of per-class recall; a class's recall counts its queries whose
    vote, among the `k` nearest references, weighted by 1/(distance + 1e-6), is its label.
    """
    if len(queries) == 0 or len(refs) == 0:
        return 0.0
    ref_labels = np.array([r.label for r in refs])
    sims = query_emb @ ref_emb.T
    dists = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims))
    k = max(1, min(k, len(refs)))
    nearest = np.argsort(dists, axis=1, kind="stable")[:, :k]
    recalls: dict[str, list[bool]] = defaultdict(list)
    for row, query in enumerate(queries):
        votes: dict[str, float] = defaultdict(float)
        for j in nearest[row]:
            votes[str(ref_labels[j])] += 1.0 / (float(dists[row, j]) + 1e-6)
        predicted = max(sorted(votes), key=lambda label: votes[label])
        recalls[query.label].append(predicted == query.label)
    return float(np.mean([np.mean(hits) for hits in recalls.values()]))


def store_embeddings(
    factory: sessionmaker[Session],
    *,
    model: Any,
    model_version: str,
    settings: Settings,
    known: dict[str, np.ndarray],
    device: str,
    progress: Callable[[float], None] | None = None,
) -> int:
    """Store `embeddings` rows of every current reference for `model_version`.

    References enrolled since the snapshot are embedded now; deleted ones are skipped. Returns
    the number of rows written.
    """
    with factory() as session:
        rows = session.execute(select(Reference.id, Reference.image_path)).all()
        done = set(
            session.execute(
                select(Embedding.reference_id).where(Embedding.model_version == model_version)
            ).scalars()
        )
    vectors: dict[str, np.ndarray] = {}
    todo: list[tuple[str, Path]] = []
    for ref_id, image_path in rows:
        if ref_id in done:
            continue
        if ref_id in known:
            vectors[ref_id] = known[ref_id]
        else:
            todo.append((ref_id, resolve_data_path(image_path, settings)))
    for start in range(0, len(todo), EMBED_BATCH):
        chunk = todo[start : start + EMBED_BATCH]
        emb = embed_paths(model, [path for _, path in chunk], device=device, skip_unreadable=True)
        vectors.update(
            {
                ref_id: vec
                for (ref_id, _), vec in zip(chunk, emb, strict=True)
                if np.isfinite(vec).all()
            }
        )
        if progress is not None:
            progress((start + len(chunk)) / len(todo))
    with factory() as session:
        still_there = set(session.execute(select(Reference.id)).scalars())
        rows = [
            {
                "reference_id": ref_id,
                "model_version": model_version,
                "vector": np.ascontiguousarray(vec, dtype=np.float32).tobytes(),
            }
            for ref_id, vec in vectors.items()
            if ref_id in still_there
        ]
        if rows:
            session.execute(insert_embeddings_ignoring_duplicates(session), rows)
            session.commit()
    return len(rows)


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
