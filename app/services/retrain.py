"""Retraining as named stages, with a pure activation decision.

The job transport (claiming the job row, the heartbeat, progress writes, failure recording:
`app/jobs/tasks.py`) calls :func:`retrain`; the stages are:

1. :func:`prepare`: **snapshot** the enrolled references (rows and image files, hard-linked or
   copied into the job's scratch directory, so deletions during training cannot break it), build
   the training configuration (a fine-tune of the active model unless the request changes its
   architecture), and **split** for validation with `training.data.split_samples`: per source,
   stratified by label, grouped by image hash. No patient ids are stored for references, so the
   grouping can only keep identical images on one side; different images of one patient may land
   on both sides and make the validation metric optimistic. Every class keeps its first image in
   train; a class with one image is train-only.
2. **Train** with `training.train.train(config, samples=..., progress=...)`.
3. :func:`score`: the new model *and* the active one on the same validation split with
   `training.evaluate` (the train split in the service's `ReferenceIndex`, each validation image
   answered as `/predict` answers it): k-NN balanced accuracy per source and their mean. The
   active model's vectors come from the embeddings store (computed only where missing).
4. :func:`decide_activation` (pure): activate when there is no active model, or when the new
   model beats it on the mean *and* loses no source by more than `SOURCE_TOLERANCE`; if an admin
   switched the active model meanwhile, the comparison is void.
5. **Register** the new version (`register_model`, file written atomically, row inserted after
   the file is complete), then **store every reference's vector** for it in the embeddings
   store, so activation is instant for every API process; then **activate** if decided.

A worker killed mid-way leaves no model row and the active model untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Model, Reference
from app.files import resolve_data_path
from app.serving.embeddings import Embedder, compute_embeddings, ensure_embeddings
from training.devices import resolve_device

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger("app.jobs.tasks")

#: Fraction of each class held out to compare the new model with the active one.
VAL_FRACTION = 0.2
#: The promotion metric: mean over sources of their k-NN balanced accuracy on the validation
#: split (each source's validation images answered by the service's decision rule).
VALIDATION_METRIC = "knn_balanced_accuracy"
#: A source may lose at most this much balanced accuracy for the new model to be activated.
SOURCE_TOLERANCE = 0.02
#: What a fine-tune must keep from the active model (else the retrain trains from scratch).
_ARCHITECTURE_PARAMS = ("encoder", "image_size", "embedding_dim")
#: Job progress at the start and end of the training stage.
TRAIN_START, TRAIN_END = 0.02, 0.85


class RetrainError(RuntimeError):
    """A retrain cannot proceed; the message tells the administrator what to do."""


class Progress(Protocol):
    """What the stages need of the job's progress (`app.jobs.tasks.ProgressWriter`)."""

    def __call__(self, fraction: float, *, force: bool = False) -> None: ...

    def stage(self, start: float, end: float) -> Callable[[float], None]: ...

    def check(self) -> None: ...


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


@dataclass(frozen=True)
class Prepared:
    """What training starts from: the frozen references, the configuration and the split."""

    snapshot: list[RefSnapshot]
    split: Split
    config: Any  # training.train.TrainConfig
    active_version: str | None
    active_path: Path | None
    finetuned: bool


@dataclass(frozen=True)
class Scores:
    """Promotion metric (mean over sources) and its per-source parts, of one model."""

    mean: float
    per_source: dict[str, float]


@dataclass(frozen=True)
class Decision:
    """Whether to activate the new model, and why (recorded in the job's metrics)."""

    activate: bool
    reason: str


@dataclass(frozen=True)
class Outcome:
    """A finished retrain: the registered version, whether it is active, and its metrics."""

    version: str
    activated: bool
    metrics: dict[str, Any]


# -- the stages --------------------------------------------------------------------------------


def prepare(
    *, params: dict[str, Any], settings: Settings, factory: sessionmaker[Session], scratch: Path
) -> Prepared:
    """Snapshot the references, choose fine-tune or from-scratch, split for validation."""
    from training.train import TrainConfig, finetune_config

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
    return Prepared(
        snapshot=snapshot,
        split=split,
        config=config,
        active_version=active_version,
        active_path=active_path,
        finetuned=finetune_from is not None,
    )


def train_model(prepared: Prepared, *, progress: Progress) -> Any:
    """`training.train.train` on the split, with the threads of the process it runs in.

    train() never changes thread counts (training/threads.py). In a `cxr worker` pool process
    that is the worker's training policy (the idle cores at its start, shared by its
    concurrency). In the API's in-process runner (no broker) it is the API's serving policy,
    cores // `CXR_INFERENCE_WORKERS` (1 on 2 cores): the job thread is started after the
    lifespan applied it, and takes it like a request thread. That is on purpose: the API
    process's counts must not move for a job, and a retrain must leave the other inference
    workers their cores; a deployment that wants retrains on every idle core runs `cxr worker`.
    """
    from training.train import train

    return train(
        prepared.config,
        samples=to_samples(prepared.split),
        progress=progress.stage(TRAIN_START, TRAIN_END),
    )


def score(
    prepared: Prepared,
    new_model: Embedder,
    *,
    settings: Settings,
    factory: sessionmaker[Session],
    k: int,
) -> tuple[dict[str, np.ndarray], Scores, Scores | None]:
    """The new model's snapshot vectors and scores, and the active model's scores (None when
    there is none or it cannot be evaluated: a broken active model must not block its
    replacement)."""
    from training.checkpoint import load_checkpoint

    new_vectors = embed_snapshot(new_model, prepared.snapshot)
    new = Scores(*validation_scores(new_vectors, prepared.split, k=k))
    active: Scores | None = None
    if prepared.active_path is not None and prepared.active_version is not None:
        try:
            old_model = Embedder.from_checkpoint(
                load_checkpoint(prepared.active_path, map_location=new_model.device),
                version=prepared.active_version,
                device=new_model.device,
            )
            where = {r.id: r.path for r in prepared.snapshot}
            with factory() as session:
                old_vectors = ensure_embeddings(session, old_model, list(where), where.__getitem__)
            active = Scores(*validation_scores(old_vectors, prepared.split, k=k))
        except Exception:
            logger.warning("could not evaluate the active model", exc_info=True)
    return new_vectors, new, active


def decide_activation(
    *,
    new: Scores,
    active: Scores | None,
    active_version: str | None,
    current_version: str | None,
    version: str,
) -> Decision:
    """Activate or keep as a candidate. Pure: the scores and versions decide.

    `active_version` is the active model when the job started, `current_version` the active
    one now; if they differ an admin switched models during training and the comparison with
    the old one says nothing about the new active one.
    """
    promote = f"activate it with POST /admin/models/{version}/activate"
    if current_version != active_version:
        return Decision(
            False,
            f"the active model changed to {current_version} during training; kept as a "
            f"candidate ({promote})",
        )
    if active_version is None or active is None:
        why = "no active model" if active_version is None else "the active model cannot be scored"
        return Decision(True, why)
    losers = {
        src: (new.per_source[src], old)
        for src, old in active.per_source.items()
        if src in new.per_source and new.per_source[src] < old - SOURCE_TOLERANCE
    }
    if losers:
        worse = ", ".join(f"{s or 'unnamed'} {n:.3f} < {o:.3f}" for s, (n, o) in losers.items())
        return Decision(
            False,
            f"worse than {active_version} on a source ({worse}); kept as a candidate ({promote})",
        )
    if new.mean > active.mean:
        return Decision(True, f"beats {active_version}: {new.mean:.4f} > {active.mean}")
    return Decision(
        False,
        f"does not beat {active_version} ({new.mean:.4f} <= {active.mean:.4f}); kept as a "
        f"candidate ({promote})",
    )


def retrain(
    job_id: str,
    *,
    params: dict[str, Any],
    settings: Settings,
    factory: sessionmaker[Session],
    scratch: Path,
    progress: Progress,
    before_activation: Callable[[], None] = lambda: None,
) -> Outcome:
    """Run the stages (module docstring) for job `job_id`; `before_activation` raises to stop
    a job that no longer owns its row from publishing."""
    from app.services.models import activate_model, register_model
    from training.checkpoint import load_checkpoint

    progress(0.0, force=True)
    prepared = prepare(params=params, settings=settings, factory=factory, scratch=scratch)
    logger.info(
        "job %s: %d references, %d train / %d validation, classes %s",
        job_id,
        len(prepared.snapshot),
        len(prepared.split.train),
        len(prepared.split.val),
        sorted({r.label for r in prepared.snapshot}),
    )
    result = train_model(prepared, progress=progress)
    progress(TRAIN_END, force=True)

    device = resolve_device(settings.device)
    new_model = Embedder.from_checkpoint(
        load_checkpoint(Path(result.checkpoint), map_location=device),
        version=f"job-{job_id}",
        device=device,
    )
    k = int(getattr(settings, "default_k", 5) or 5)
    new_vectors, new, active = score(prepared, new_model, settings=settings, factory=factory, k=k)
    progress(0.9, force=True)

    # -- register (file complete before the row), store every vector, then activate ----------
    progress.check()
    with factory() as session:
        registered = register_model(
            session=session,
            checkpoint=Path(result.checkpoint),
            settings=settings,
            activate=False,
            source="retrain",
            metrics=model_metrics(result.metrics, new_score=new.mean, job_id=job_id),
        )
        version = registered if isinstance(registered, str) else registered.version
    logger.info(
        "job %s registered model %s (%s=%.4f)", job_id, version, VALIDATION_METRIC, new.mean
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
    with factory() as session:
        current = session.execute(select(Model.version).where(Model.active.is_(True))).scalar()
    decision = decide_activation(
        new=new,
        active=active,
        active_version=prepared.active_version,
        current_version=current,
        version=version,
    )
    metrics: dict[str, Any] = {
        "validation": {
            "metric": VALIDATION_METRIC,
            "k": k,
            "new": new.mean,
            "active": active.mean if active is not None else None,
            "active_version": prepared.active_version,
            "per_source": {
                "new": new.per_source,
                "active": (active.per_source or None) if active is not None else None,
            },
        },
        "mode": (
            f"fine-tuned from {prepared.active_version}" if prepared.finetuned else "from scratch"
        ),
        "training": _jsonable(result.metrics),
        "n_train": len(prepared.split.train),
        "n_val": len(prepared.split.val),
        "classes": _class_counts(prepared.snapshot),
        "params": {key: _jsonable(value) for key, value in params.items()},
        "activated": decision.activate,
        "decision": decision.reason,
    }
    before_activation()  # not `progress.check()`: a shutdown now should not waste the model
    if decision.activate:
        with factory() as session:
            activate_model(session=session, version=version)
        logger.info("job %s activated model %s (%s)", job_id, version, decision.reason)
    else:
        logger.info("job %s kept model %s as a candidate: %s", job_id, version, decision.reason)
    return Outcome(version=version, activated=decision.activate, metrics=metrics)


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
