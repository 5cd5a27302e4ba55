"""What one API process serves: the active model and the reference index, swapped as a whole.

`ModelBundle` is immutable: an encoder (eval mode, on the chosen device), its `Preprocessing`,
a `ReferenceIndex` over every enrolled reference embedded by *that* encoder, and the
`model_version` / `index_version` it was built from. `ServiceState` holds the current bundle in
one attribute. A reference change made by this process moves the bundle forward by exactly that
change (a copy-on-write `ReferenceIndex.fork()` + add/remove, no database read, no image read);
a change made elsewhere forks the previous index and applies the difference with the database.
Either way a refresh builds a complete new bundle first (load the checkpoint if the active
version changed, fetch or compute the embeddings, build the index) and only then assigns it, so
a prediction never sees a half-built index or a half-loaded model: it took its reference to a
bundle at the start and uses that one throughout.

How processes agree without talking to each other: every reference change and model activation
bumps `service_state.index_version` in the database (see `app.db.bump_index_version`). Each
request runs one small query (`index_version` and the active model's version, as two scalar
subqueries) and compares them with the loaded bundle; when they differ this process rebuilds.
So a reference enrolled through any process, the CLI or a worker is used by every process's
next prediction. Embeddings are stored per model version in the `embeddings` table; the process
that first needs a missing one (a reference enrolled before the model existed, or by a process
serving another version) computes it with the one preprocessing function and stores it.

Only one rebuild runs at a time. While it runs, other requests keep serving the previous bundle
(they do not queue behind a potentially long rebuild); requests that have no bundle at all wait
for it. A failed rebuild is logged, reported by `readiness()`, keeps the old bundle and is not
retried for the same database state for `retry_after_s` seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import (
    Embedding,
    Model,
    Reference,
    ServiceStateRow,
    insert_embeddings_ignoring_duplicates,
)
from app.gradcam import Explainer
from app.serving.batcher import MicroBatcher
from app.serving.onnx_runtime import OnnxEncoder, load_onnx_encoder
from index.reference_index import ReferenceIndex
from training.checkpoint import load_checkpoint
from training.imaging import ImageError, decode_image
from training.preprocess import Preprocessing, preprocess

logger = logging.getLogger(__name__)

__all__ = [
    "DatabaseTarget",
    "LoadedModel",
    "ModelBundle",
    "ModelFileError",
    "ReferencesChange",
    "ServiceState",
    "embed_tensors",
    "file_sha256",
    "resolve_data_path",
    "resolve_device",
]

SERVICE_STATE_ID = 1
#: References embedded per forward pass when computing missing embeddings.
EMBED_BATCH = 32
#: Ids per `IN (...)` query when fetching stored embeddings.
FETCH_CHUNK = 500

NO_MODEL_REASON = (
    "no active model: register and activate one with `cxr models add CKPT --activate`, "
    "or POST /admin/models/{version}/activate"
)
NO_REFERENCES_REASON = (
    "no references enrolled: enroll labelled images with POST /references (clinician) "
    "or `cxr references import SRC`"
)


class ModelFileError(RuntimeError):
    """The active model's checkpoint file is missing, altered or unreadable."""


# --------------------------------------------------------------------------------------------
# Small helpers shared with app/services (one implementation of each).


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else is passed to `torch.device`."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_data_path(path: str | Path, settings: Settings) -> Path:
    """Stored paths are relative to `data_dir` (so the directory can move); absolute ones
    are kept as they are."""
    p = Path(path)
    return p if p.is_absolute() else settings.data_dir / p


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def embed_tensors(
    encoder: torch.nn.Module, batch: torch.Tensor, device: torch.device
) -> np.ndarray:
    """Embeddings ``(B, dim)`` float32 of a preprocessed batch ``(B, 1, S, S)``.

    Runs under `torch.inference_mode` (no autograd bookkeeping): the served encoder is shared
    by all request threads and never needs gradients (Grad-CAM uses its own copies).
    """
    with torch.inference_mode():
        out = encoder(batch.to(device, non_blocking=True))
    return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The immutable objects.


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A checkpoint loaded for serving; reused across index rebuilds of the same version."""

    version: str
    sha256: str
    encoder: torch.nn.Module
    preprocessing: Preprocessing
    device: torch.device
    embedding_dim: int
    encoder_name: str
    trained_classes: tuple[str, ...]
    explainer: Explainer
    #: The plain forward in ONNX Runtime (CPU, `CXR_ONNX=auto`); None: the torch encoder.
    onnx: OnnxEncoder | None = None
    #: Concurrent forwards batched into one (`CXR_PREDICT_BATCH_MAX` > 1); None: direct calls.
    batcher: MicroBatcher | None = None

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Embeddings ``(B, dim)`` of a preprocessed batch: ONNX Runtime when loaded, else torch
        (through the micro-batcher when one is configured)."""
        if self.batcher is not None:
            return self.batcher(batch.numpy())
        return self.forward(batch.numpy())

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """One forward of a preprocessed ``(B, 1, S, S)`` batch, without batching."""
        if self.onnx is not None:
            return self.onnx(batch)
        return embed_tensors(self.encoder, torch.from_numpy(batch), self.device)


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """Everything a prediction needs, consistent with itself. Never mutated after creation.

    `index` is None when no reference is enrolled (the model is loaded, predictions answer
    503 until references exist). The next bundle of the same model is built on `index.fork()`
    (copy-on-write: only the classes that change are copied), so this bundle's index never
    changes under a prediction that holds it.
    """

    model: LoadedModel
    index: ReferenceIndex | None
    index_version: int
    built_at: float = field(default_factory=time.time)

    @property
    def encoder(self) -> torch.nn.Module:
        return self.model.encoder

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def size(self) -> int:
        return len(self.index) if self.index is not None else 0

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(self.index.classes())) if self.index is not None else ()

    @cached_property
    def class_means(self) -> Mapping[str, np.ndarray]:
        """L2-normalised mean reference embedding per class (the Grad-CAM target), from the
        index's running sums: O(classes x dim), computed once per bundle."""
        if self.index is None:
            return MappingProxyType({})
        means = {}
        for label in self.index.classes():
            total, _sq, count = self.index.class_sums(label)
            mean = total / max(count, 1)
            norm = float(np.linalg.norm(mean))
            means[label] = (mean / norm if norm > 0 else mean).astype(np.float32)
        return MappingProxyType(means)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Embeddings of a preprocessed batch with this bundle's encoder."""
        return self.model.embed(batch)


@dataclass(frozen=True)
class ReferencesChange:
    """A committed change of the reference set, told to this process's `ServiceState` so it
    can move its bundle forward without re-reading every reference.

    `index_version` is the value the change's transaction bumped `service_state` to.
    `added` are (reference id, label, embedding by `model_version`); `removed` are ids.
    """

    index_version: int
    model_version: str | None = None
    added: tuple[tuple[str, str, np.ndarray], ...] = ()
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatabaseTarget:
    """What the database says should be served: the bundle is fresh when it matches."""

    index_version: int
    model_version: str | None


# --------------------------------------------------------------------------------------------


class ServiceState:
    """The process's prediction state: the current `ModelBundle` and how to refresh it.

    Thread-safe: `current()` may be called from any number of request threads. The bundle is
    replaced by a single attribute assignment after it is fully built.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessionmaker: sessionmaker[Session] | Callable[[], Session],
        inference_workers: int | None = None,
        refresh_interval_s: float = 0.0,
        retry_after_s: float = 5.0,
        on_swap: Callable[[ModelBundle | None], None] | None = None,
        metrics: Any | None = None,
        configure_threads: bool = True,
    ) -> None:
        """`inference_workers`: how many predictions may run their CPU work at once (the
        route's thread limiter and the Grad-CAM copy pool); default
        `settings.effective_inference_workers` (`CXR_INFERENCE_WORKERS`, else min(4, CPUs)).
        `refresh_interval_s`: 0 checks the database on every request (measured at well under
        a millisecond on SQLite); a positive value caches the check for that long.
        `on_swap` is told about every new bundle; `metrics` (the app's `app.metrics.Metrics`,
        also attachable later as `.metrics`) gets its index and model gauges updated."""
        self.settings = settings
        self.sessionmaker = sessionmaker
        cpus = os.cpu_count() or 1
        self.inference_workers = max(
            1, int(inference_workers or settings.effective_inference_workers)
        )
        if configure_threads:
            # One intra-op thread pool per concurrent inference would oversubscribe the cores:
            # give each of the `inference_workers` concurrent forwards (and searches) its share.
            # FAISS gets the same cap: measured on the 2-core machine, when torch is imported
            # before faiss (as in every `cxr` process) a one-query search with 2 OpenMP threads
            # took 24 ms instead of 0.3 ms (two OpenMP runtimes spinning against each other).
            share = max(1, cpus // self.inference_workers)
            torch.set_num_threads(share)
            import faiss

            faiss.omp_set_num_threads(share)
        self.device = resolve_device(settings.device)
        self.refresh_interval_s = refresh_interval_s
        self.retry_after_s = retry_after_s
        self.on_swap = on_swap
        self.metrics = metrics
        self._bundle: ModelBundle | None = None
        self._rebuild_lock = threading.Lock()
        self._last_target: DatabaseTarget | None = None
        self._last_checked = 0.0
        self._last_error: str | None = None
        self._failed: tuple[DatabaseTarget, float] | None = None
        self._limiter: Any = None

    # -- public API ----------------------------------------------------------------------------

    @property
    def bundle(self) -> ModelBundle | None:
        """The bundle loaded now, without checking the database."""
        return self._bundle

    @property
    def model_version(self) -> str | None:
        bundle = self._bundle
        return bundle.model_version if bundle else None

    @property
    def limiter(self) -> Any:
        """The `anyio.CapacityLimiter` bounding concurrent inference threads (created lazily)."""
        if self._limiter is None:
            import anyio

            self._limiter = anyio.CapacityLimiter(self.inference_workers)
        return self._limiter

    def current(self, session: Session) -> ModelBundle | None:
        """The bundle to answer with, refreshed first if the database moved on.

        Cheap when nothing changed: one query (or none within `refresh_interval_s`). Returns
        None when there is no active model or it could not be loaded (see `readiness()`).
        """
        now = time.monotonic()
        bundle = self._bundle
        if (
            self.refresh_interval_s > 0
            and bundle is not None
            and now - self._last_checked < self.refresh_interval_s
        ):
            return bundle
        target = self.read_target(session)
        self._last_checked = now
        return self._ensure(target, wait=bundle is None)

    def refresh(self, *, wait: bool = True) -> ModelBundle | None:
        """Check the database with a session of our own and rebuild if needed."""
        with self.sessionmaker() as session:
            target = self.read_target(session)
        return self._ensure(target, wait=wait)

    def on_references_changed(
        self, session: Session | None = None, *, change: ReferencesChange | None = None
    ) -> None:
        """Called after a committed reference change, so this process's next prediction does
        not pay for it. With `change` (made by this process) the bundle moves forward by
        exactly that change when it was at the version just before it: no database read, no
        re-embedding, a copy-on-write add/remove on the index. Otherwise (another process
        changed something in between) it refreshes from the database. Waits for a running
        rebuild."""
        del session  # our own session sees the committed change; the caller's may be closed
        if change is not None and self._apply(change):
            return
        self.refresh(wait=True)

    def enrollment_model(self) -> LoadedModel | None:
        """The model new references should be embedded with now (None when none is loaded)."""
        bundle = self._bundle
        return bundle.model if bundle is not None else None

    def _apply(self, change: ReferencesChange) -> bool:
        """Move the bundle forward by `change`; False when it cannot be applied exactly."""
        with self._rebuild_lock:
            bundle = self._bundle
            if bundle is None or bundle.index_version != change.index_version - 1:
                return False
            if change.added and change.model_version != bundle.model_version:
                return False
            index = (
                bundle.index.fork()
                if bundle.index is not None
                else self._new_index(bundle.model.embedding_dim)
            )
            try:
                if change.removed:
                    index.remove(change.removed, missing_ok=True)
                if change.added:
                    index.add(
                        np.stack([vec for _id, _label, vec in change.added]),
                        [ref_id for ref_id, _label, _vec in change.added],
                        [label for _id, label, _vec in change.added],
                    )
            except ValueError:  # already there (read by a rebuild after its commit)
                return False
            self._swap(
                ModelBundle(
                    model=bundle.model,
                    index=index if len(index) else None,
                    index_version=change.index_version,
                )
            )
            return True

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons). Refreshes first, so a fresh process becomes ready without traffic."""
        try:
            self.refresh(wait=True)
        except SQLAlchemyError as exc:
            return False, [f"database unreachable ({exc.__class__.__name__})"]
        reasons = self.reasons()
        if not reasons and self._last_error:
            # Ready, but serving an older state because the newest one failed to load.
            return True, [f"serving an older state: {self._last_error}"]
        return not reasons, reasons

    def reasons(self) -> list[str]:
        """Why predictions cannot be answered now (empty when they can); no database access."""
        bundle = self._bundle
        if bundle is None:
            return [self._last_error or NO_MODEL_REASON]
        if bundle.index is None:
            return [NO_REFERENCES_REASON]
        return []

    @staticmethod
    def read_target(session: Session) -> DatabaseTarget:
        """`index_version` and the active model version, in one round trip."""
        index_q = (
            select(ServiceStateRow.index_version)
            .where(ServiceStateRow.id == SERVICE_STATE_ID)
            .scalar_subquery()
        )
        model_q = select(Model.version).where(Model.active.is_(True)).limit(1).scalar_subquery()
        row = session.execute(select(index_q, model_q)).one()
        return DatabaseTarget(index_version=int(row[0] or 0), model_version=row[1])

    # -- refresh machinery ---------------------------------------------------------------------

    @staticmethod
    def _fresh(bundle: ModelBundle | None, target: DatabaseTarget) -> bool:
        if target.model_version is None:
            return bundle is None
        return (
            bundle is not None
            and bundle.model_version == target.model_version
            and bundle.index_version >= target.index_version
        )

    def _ensure(self, target: DatabaseTarget, *, wait: bool) -> ModelBundle | None:
        bundle = self._bundle
        if self._fresh(bundle, target):
            return bundle
        failed = self._failed
        if (
            failed is not None
            and failed[0] == target
            and time.monotonic() - failed[1] < self.retry_after_s
        ):
            return bundle
        if not self._rebuild_lock.acquire(blocking=wait):
            return bundle  # someone else is rebuilding: keep serving the previous bundle
        try:
            bundle = self._bundle
            if self._fresh(bundle, target):
                return bundle
            try:
                new = self._build(previous=bundle)
            except (ModelFileError, ImportError, ValueError, RuntimeError, OSError) as exc:
                self._last_error = str(exc)
                self._failed = (target, time.monotonic())
                logger.error(
                    "could not load the service state; keeping the previous one",
                    extra={"error": str(exc)[:500], "model_version": target.model_version},
                )
                return bundle
            self._failed = None
            self._last_error = None
            self._swap(new)
            return new
        finally:
            self._rebuild_lock.release()

    def _swap(self, new: ModelBundle | None) -> None:
        old = self._bundle
        self._bundle = new  # the one assignment that publishes a complete bundle
        if new is not None and (old is None or old.model_version != new.model_version):
            logger.info("serving model", extra={"model_version": new.model_version})
        if new is not None:
            logger.info(
                "reference index loaded",
                extra={
                    "model_version": new.model_version,
                    "index_version": new.index_version,
                    "references": new.size,
                    "classes": len(new.classes),
                },
            )
        self.update_gauges()
        if self.on_swap is not None:
            try:
                self.on_swap(new)
            except Exception:  # a callback must never break serving
                logger.exception("on_swap callback failed")

    def update_gauges(self) -> None:
        """Publish the loaded index size / version and model to `self.metrics` (if any)."""
        metrics, bundle = self.metrics, self._bundle
        if metrics is None:
            return
        try:
            metrics.set_index(
                size=bundle.size if bundle else 0,
                version=bundle.index_version if bundle else None,
            )
            metrics.set_active_model(bundle.model_version if bundle else None)
        except Exception:  # metrics must never break serving
            logger.exception("could not update the service gauges")

    def _build(self, *, previous: ModelBundle | None) -> ModelBundle | None:
        """A complete new bundle from the database (or None when no model is active).

        For the model already loaded, the new index is the previous one's fork plus the
        difference with the database (references added or removed since), so a rebuild costs
        one id/label query plus the new references, not a re-embedding of everything.
        """
        started = time.perf_counter()
        with self.sessionmaker() as session:
            # Read the version *first*: a reference added after this read makes the bundle
            # contain more than its version says (harmless: the next check rebuilds), never less.
            target = self.read_target(session)
            if target.model_version is None:
                return None
            row = session.get(Model, target.model_version)
            if row is None:  # deactivated between the two reads: the next check retries
                raise RuntimeError(f"model {target.model_version!r} vanished while loading")
            if previous is not None and previous.model.version == row.version:
                model = previous.model
            else:
                model = self._load_model(row)
            refs = session.execute(
                select(Reference.id, Reference.label, Reference.image_path).order_by(
                    Reference.created_at, Reference.id
                )
            ).all()
            same_model = previous is not None and previous.model.version == model.version
            base = previous.index if same_model and previous is not None else None
            index, added, removed = self._sync_index(session, model, refs, base)
        if index is not None and base is None:
            index.wait_calibrated()  # a fresh index calibrates here, not in a prediction
        bundle = ModelBundle(model=model, index=index, index_version=target.index_version)
        logger.info(
            "service state built",
            extra={
                "seconds": round(time.perf_counter() - started, 3),
                "references": bundle.size,
                "added": added,
                "removed": removed,
                "model_version": model.version,
                "index_version": target.index_version,
            },
        )
        return bundle

    def _new_index(self, dim: int) -> ReferenceIndex:
        return ReferenceIndex(
            dim,
            factory=self.settings.index_factory,
            device=self.settings.device,
            unknown_quantile=self.settings.unknown_quantile,
            k=self.settings.default_k,
            recalibration="background",
        )

    def _sync_index(
        self,
        session: Session,
        model: LoadedModel,
        refs: Sequence[Any],
        base: ReferenceIndex | None,
    ) -> tuple[ReferenceIndex | None, int, int]:
        """`base` forked and brought in line with `refs` (or a new index); returns it (None
        when empty) and how many references were added and removed."""
        index = base.fork() if base is not None else self._new_index(model.embedding_dim)
        wanted = {r.id: r.label for r in refs}
        stale = []
        if base is not None:
            for ref_id in index.ids:
                label = wanted.get(ref_id)
                if label is None or label != index.label_of(ref_id):
                    stale.append(ref_id)
            index.remove(stale)
        present = set(index.ids)
        new_refs = [r for r in refs if r.id not in present]
        vectors = self._collect_embeddings(session, model, new_refs, {})
        kept = [r for r in new_refs if r.id in vectors]
        if kept:
            index.add(
                np.stack([vectors[r.id] for r in kept]).astype(np.float32, copy=False),
                [r.id for r in kept],
                [r.label for r in kept],
            )
        return (index if len(index) else None), len(kept), len(stale)

    def _load_model(self, row: Model) -> LoadedModel:
        path = resolve_data_path(row.file_path, self.settings)
        if not path.is_file():
            raise ModelFileError(
                f"model {row.version}: checkpoint file {path} is missing; restore it or "
                "register the checkpoint again with `cxr models add CKPT --activate`"
            )
        digest = file_sha256(path)
        if digest != row.sha256:
            raise ModelFileError(
                f"model {row.version}: checkpoint file {path} does not match its registered "
                f"sha256 (file changed on disk); restore the original or register it again"
            )
        loaded = load_checkpoint(path, map_location=str(self.device))
        encoder = loaded.encoder.to(self.device).eval()
        for param in encoder.parameters():
            param.requires_grad_(False)
        model = LoadedModel(
            version=row.version,
            sha256=digest,
            encoder=encoder,
            preprocessing=loaded.preprocessing,
            device=self.device,
            embedding_dim=int(loaded.embedding_dim),
            encoder_name=str(loaded.encoder_name),
            trained_classes=tuple(loaded.classes or ()),
            explainer=Explainer(encoder, size=self.inference_workers),
            onnx=load_onnx_encoder(
                encoder,
                sha256=digest,
                image_size=loaded.preprocessing.image_size,
                models_dir=self.settings.models_dir,
            )
            if self.settings.onnx == "auto" and self.device.type == "cpu"
            else None,
        )
        if self.settings.predict_batch_max <= 1:
            return model
        batcher = MicroBatcher(
            model.forward,
            max_batch=self.settings.predict_batch_max,
            max_wait_s=self.settings.predict_batch_wait_ms / 1000.0,
        )
        return dataclasses.replace(model, batcher=batcher)

    def _collect_embeddings(
        self,
        session: Session,
        model: LoadedModel,
        refs: Sequence[Any],
        known: Mapping[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Vectors for every reference: reused, fetched from the database, or computed."""
        vectors: dict[str, np.ndarray] = {r.id: known[r.id] for r in refs if r.id in known}
        wanted = [r.id for r in refs if r.id not in vectors]
        for start in range(0, len(wanted), FETCH_CHUNK):
            chunk = wanted[start : start + FETCH_CHUNK]
            rows = session.execute(
                select(Embedding.reference_id, Embedding.vector).where(
                    Embedding.model_version == model.version,
                    Embedding.reference_id.in_(chunk),
                )
            ).all()
            for ref_id, blob in rows:
                vec = np.frombuffer(blob, dtype=np.float32)
                if vec.shape == (model.embedding_dim,):
                    vectors[ref_id] = vec
        missing = [r for r in refs if r.id not in vectors]
        if missing:
            computed = self._compute_embeddings(model, missing)
            vectors.update(computed)
            self.store_embeddings(session, model.version, computed)
        return vectors

    def _compute_embeddings(self, model: LoadedModel, refs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Embed references from their stored files (decode_image → preprocess → encoder)."""
        out: dict[str, np.ndarray] = {}
        unreadable = 0
        for start in range(0, len(refs), EMBED_BATCH):
            batch_refs = []
            tensors = []
            for ref in refs[start : start + EMBED_BATCH]:
                try:
                    image = decode_image(resolve_data_path(ref.image_path, self.settings))
                except (ImageError, OSError):
                    unreadable += 1
                    continue
                tensors.append(preprocess(image, model.preprocessing))
                batch_refs.append(ref)
            if not tensors:
                continue
            emb = model.embed(torch.stack(tensors))
            for ref, vec in zip(batch_refs, emb, strict=True):
                out[ref.id] = vec
        if unreadable:
            logger.warning(
                "some reference images are missing or unreadable and were left out of the index",
                extra={"count": unreadable, "data_dir": str(self.settings.data_dir)},
            )
        logger.info(
            "computed reference embeddings",
            extra={"count": len(out), "model_version": model.version},
        )
        return out

    def store_embeddings(
        self, session: Session, model_version: str, vectors: Mapping[str, np.ndarray]
    ) -> None:
        """Persist computed vectors; concurrent writers (other processes) are tolerated."""
        if not vectors:
            return
        rows = [
            {
                "reference_id": ref_id,
                "model_version": model_version,
                "vector": np.ascontiguousarray(vec, dtype=np.float32).tobytes(),
            }
            for ref_id, vec in vectors.items()
        ]
        try:
            session.execute(insert_embeddings_ignoring_duplicates(session), rows)
            session.commit()
        except IntegrityError:
            # A reference deleted meanwhile (foreign key): store what still exists, one by one.
            session.rollback()
            for row in rows:
                try:
                    session.execute(insert_embeddings_ignoring_duplicates(session), [row])
                    session.commit()
                except IntegrityError:
                    session.rollback()
        except SQLAlchemyError:
            session.rollback()
            logger.exception("could not store computed embeddings; they will be recomputed")
