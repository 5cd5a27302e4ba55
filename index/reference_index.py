"""The reference index: labeled reference embeddings in, a diagnosis for a query out.

For a query embedding the index answers: the nearest references, the mean distance to each
class, the nearest reference of each class, a distance-weighted k-NN label (or the class of least
mean distance) with a calibrated confidence, and whether the image resembles no enrolled class.

Design, and why:

- **One sub-index per class** (FAISS, inner product; exact ``IDMap2,Flat`` up to
  :data:`~index.factory.AUTO_SWITCH_SIZE` references, IVF above; see :mod:`index.factory`).
  The overall k nearest are the merge of each class's k nearest, and each class's nearest
  reference comes out of the same pass, so the per-class nearest distance is never missing and
  needs no second scan. For exact sub-indexes the total work equals one flat
  scan of all references; for IVF it is one coarse search per class. The trade-off against a
  single global index plus a fallback search for classes absent from the top k: the global index
  is cheaper when there are many classes (cost grows with the number of classes here), but its
  fallback must scan whole classes for the absent ones, which is exactly the common case (a
  confident query has all k neighbours in one class). With the few classes of a diagnosis
  service, per-class sub-indexes win. If an approximate sub-index returns nothing for a class
  (IVF lists probed without members), that class is scanned exactly for the affected queries.
- **Per-class mean distance in O(classes x dim)**: each class keeps float64 running sums (sum of
  vectors, sum of squared norms, count), so the root mean squared distance
  ``sqrt(|q|^2 - 2 q.mean_c + mean_c(|r|^2))`` is exact without touching the references, and
  add/remove update the sums exactly (float64 keeps cancellation error ~1e-12).
- **The outlier score is the mean distance to the predicted class**, not the distance to its
  nearest reference. Nearest-neighbour distance measures local density, and density is highest
  where classes overlap: with a class held out of the references, its films (normal films
  especially, which lie among the diseased ones) land close to *some* reference of another class
  and look familiar (leave-one-class-out AUROC 0.20 for held-out Normal on the shipped recipe).
  The RMS distance to the whole class asks whether the film is typical of the class it was given,
  which held-out films are not (0.90 for the same case; docs/BENCHMARKS.md). It is also the
  class-level distance the answer already reports in ``distances``.
- **Copy-on-write snapshots**: all state lives in an immutable
  :class:`~index.snapshot.Snapshot`. ``search`` reads the current snapshot reference once and
  uses only it; ``add``/``remove``/``replace`` build a new snapshot (cloning only the
  sub-indexes of classes that change) under a lock and publish it with one reference
  assignment. A search concurrent with a change therefore sees the old or the new references,
  never a mix. Cost: a change copies the changed classes (O(n_c x dim) memory traffic); batch
  large enrolments into one ``add``.
- **Calibration** (:mod:`index.calibration`) is a property of a snapshot, computed lazily on the
  first search of that snapshot and cached in it; since any change makes a new snapshot, the
  thresholds and temperatures are never stale (``recalibration="sync"``, the default). A
  leave-one-out fit costs about a second on a 2-core CPU (most of it the parameter grid), which
  an enrollment should not add to the next prediction; with ``recalibration="background"`` a
  snapshot that differs from a calibrated one by a few references (at most
  ``max_stale_fraction`` of them, same classes) answers with that calibration at once while one
  background thread refits the newest snapshot, so a burst of enrollments costs one refit, and
  every process converges on the calibration of the same reference set. A new or vanished class
  always refits before answering (its threshold would be missing).

Layout: this module is the facade (the public API and the copy-on-write publishing); the parts
live next to it, one concept each: :mod:`index.snapshot` (the immutable state),
:mod:`index.parts` (exact vs IVF sub-index policy, grow/shrink), :mod:`index.search` (search
backends and the raw per-class arrays), :mod:`index.recalibration` (the leave-one-out fit and its
background thread), :mod:`index.calibration` (the pure calibration functions) and
:mod:`index.layout` / :mod:`index.persistence` (what goes into the file / the file format).
- **Devices**: FAISS GPU when the installed FAISS sees GPUs, else an exact torch search on CUDA
  when available, else FAISS CPU (``device="auto"``). The torch path is always exact and can be
  forced on CPU (``device="torch-cpu"``) to check it against FAISS. Calibration always runs on
  FAISS CPU, so every device reports the same thresholds and temperatures.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from index import factory as fx
from index import layout
from index.calibration import Calibration, knn_probabilities, mean_distance_probabilities
from index.errors import EmptyIndexError, IndexFileError
from index.parts import PartPolicy
from index.persistence import read_index_file, write_index_file
from index.recalibration import Refitter, fit_calibration
from index.search import (
    DEVICES,
    Raw,
    knn_candidates,
    raw_search,
    reference_ids,
    resolve_backend,
)
from index.snapshot import ClassPart, Snapshot

log = logging.getLogger(__name__)

__all__ = [
    "DEVICES",
    "METHODS",
    "EmptyIndexError",
    "IndexFileError",
    "IndexResult",
    "Neighbor",
    "ReferenceIndex",
]

Method = Literal["knn", "mean_distance"]
METHODS: tuple[str, ...] = ("knn", "mean_distance")
RECALIBRATION: tuple[str, ...] = ("sync", "background")
_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Neighbor:
    """One reference near the query."""

    reference_id: str
    label: str
    distance: float


@dataclass(frozen=True)
class IndexResult:
    """The index's answer for one query (the fields of the service's ``/predict`` answer).

    ``distances`` are mean distances to each class (RMS over the class's references),
    ``nearest`` the distance to each class's nearest reference, ``probabilities`` the calibrated
    class probabilities of ``method`` (``confidence`` is that of ``label``). ``unknown`` is
    ``outlier_score > outlier_threshold``, both for the predicted class.
    """

    label: str
    confidence: float
    distances: dict[str, float]
    nearest: dict[str, float]
    neighbors: list[Neighbor]
    outlier_score: float
    outlier_threshold: float
    unknown: bool
    probabilities: dict[str, float]
    method: str


class ReferenceIndex:
    """Labeled reference embeddings, searchable by k-NN, mean class distance and outlier score.

    Args:
        dim: embedding size.
        factory: ``"auto"`` (exact flat search up to ``AUTO_SWITCH_SIZE`` references per class,
            IVF above), or a FAISS factory string used for every class sub-index (e.g.
            ``"Flat"``, ``"IVF1024,Flat"``; classes too small to train it use exact search).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``faiss-gpu`` | ``torch-cuda`` | ``torch-cpu``.
            ``auto``: FAISS GPU if ``faiss.get_num_gpus() > 0``, else exact torch on CUDA if
            available, else FAISS CPU. ``cuda``: the first two of those, or an error.
        unknown_quantile: quantile of leave-one-out mean same-class distances used as each
            class's unknown threshold (see :mod:`index.calibration`).
        k: default number of neighbours.
        calibration_samples: references sampled (stratified by class) for leave-one-out
            calibration; bounds its cost on large indexes.
        target_recall: recall@10 that IVF ``nprobe`` tuning aims for.
        seed: seeds IVF training and calibration sampling (answers are reproducible).
    """

    def __init__(
        self,
        dim: int,
        *,
        factory: str = "auto",
        device: str = "auto",
        unknown_quantile: float = 0.95,
        k: int = 5,
        calibration_samples: int = 2000,
        target_recall: float = 0.98,
        seed: int = 0,
        recalibration: str = "sync",
        max_stale_fraction: float = 0.1,
    ) -> None:
        if recalibration not in RECALIBRATION:
            raise ValueError(
                f"recalibration must be one of {', '.join(RECALIBRATION)}; got {recalibration!r}"
            )
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if not 0.0 < unknown_quantile <= 1.0:
            raise ValueError(f"unknown_quantile must be in (0, 1], got {unknown_quantile}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if factory != "auto":
            fx.validate_factory(factory, dim)
        self.dim = int(dim)
        self.factory = factory
        self.unknown_quantile = float(unknown_quantile)
        self.k = int(k)
        self.calibration_samples = int(calibration_samples)
        self.target_recall = float(target_recall)
        self.seed = int(seed)
        self.recalibration = recalibration
        self.max_stale_fraction = float(max_stale_fraction)
        self._refitter = Refitter()
        self.device = device
        self.backend = resolve_backend(device)
        self._policy = PartPolicy(factory=factory, target_recall=self.target_recall, seed=self.seed)
        self._write_lock = threading.Lock()
        self._snapshot = Snapshot(version=0, dim=self.dim, parts=(), lookup={}, next_key=0)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str],
        labels: Sequence[str],
        **kwargs: Any,
    ) -> ReferenceIndex:
        """A new index holding ``embeddings`` (``dim`` is taken from them)."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (n, dim), got shape {embeddings.shape}")
        index = cls(embeddings.shape[1], **kwargs)
        index.add(embeddings, ids, labels)
        return index

    def add(self, embeddings: np.ndarray, ids: Sequence[str], labels: Sequence[str]) -> None:
        """Enroll references: L2-normalised ``embeddings`` (n, dim) with unique string ``ids``.

        Raises ``ValueError`` (changing nothing) if a shape, norm, id or label is invalid or an
        id is already enrolled. Visible to every search that starts after this returns.
        """
        x = self._check_vectors(embeddings, "embeddings")
        ids = [str(i) for i in ids]
        labels = [str(lab) for lab in labels]
        if not (len(ids) == len(labels) == len(x)):
            raise ValueError(
                f"got {len(x)} embeddings, {len(ids)} ids and {len(labels)} labels; "
                "pass one id and one label per embedding"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique within one add() call")
        if any(not lab for lab in labels):
            raise ValueError("labels must be non-empty strings")
        if not len(x):
            return
        with self._write_lock:
            snap = self._snapshot
            dup = [i for i in ids if i in snap.lookup]
            if dup:
                raise ValueError(
                    f"{len(dup)} id(s) already enrolled (e.g. {dup[0]!r}); remove them first"
                )
            keys = np.arange(snap.next_key, snap.next_key + len(x), dtype=np.int64)
            lookup = dict(snap.lookup)
            parts = {p.label: p for p in snap.parts}
            label_arr = np.asarray(labels, dtype=object)
            for label in sorted(set(labels)):
                rows = np.flatnonzero(label_arr == label)
                parts[label] = self._policy.grow(
                    parts.get(label), label, x[rows], keys[rows], [ids[r] for r in rows]
                )
                for r in rows:
                    lookup[ids[r]] = (label, int(keys[r]))
            self._publish(snap, parts, lookup, snap.next_key + len(x), changed=len(x))

    def remove(self, ids: Iterable[str], *, missing_ok: bool = False) -> int:
        """Remove references by id; returns how many were removed.

        Unknown ids raise ``KeyError`` (changing nothing) unless ``missing_ok``. A class whose
        last reference is removed disappears from the answers.
        """
        ids = list(dict.fromkeys(str(i) for i in ids))
        with self._write_lock:
            snap = self._snapshot
            missing = [i for i in ids if i not in snap.lookup]
            if missing and not missing_ok:
                raise KeyError(
                    f"{len(missing)} id(s) are not in the index (e.g. {missing[0]!r}); "
                    "list enrolled ids with .ids"
                )
            present = [i for i in ids if i in snap.lookup]
            if not present:
                return 0
            lookup = dict(snap.lookup)
            by_label: dict[str, list[int]] = {}
            for i in present:
                label, key = lookup.pop(i)
                by_label.setdefault(label, []).append(key)
            parts = {p.label: p for p in snap.parts}
            for label, keys in by_label.items():
                shrunk = self._policy.shrink(parts[label], np.asarray(sorted(keys), np.int64))
                if shrunk is None:
                    del parts[label]
                else:
                    parts[label] = shrunk
            self._publish(snap, parts, lookup, snap.next_key, changed=len(present))
            return len(present)

    def replace(self, embeddings: np.ndarray, ids: Sequence[str], labels: Sequence[str]) -> None:
        """Swap in a complete new reference set atomically (searches see old or new, no mix)."""
        fresh = ReferenceIndex(
            self.dim,
            factory=self.factory,
            device="cpu",
            unknown_quantile=self.unknown_quantile,
            k=self.k,
            calibration_samples=self.calibration_samples,
            target_recall=self.target_recall,
            seed=self.seed,
        )
        fresh.add(embeddings, ids, labels)
        with self._write_lock:
            old = self._snapshot
            new = fresh._snapshot
            self._snapshot = Snapshot(
                version=old.version + 1,
                dim=self.dim,
                parts=new.parts,
                lookup=new.lookup,
                next_key=new.next_key,
            )

    def _publish(
        self,
        old: Snapshot,
        parts: dict[str, ClassPart],
        lookup: dict[str, tuple[str, int]],
        next_key: int,
        *,
        changed: int,
    ) -> None:
        ordered = tuple(parts[label] for label in sorted(parts))
        carried: tuple[Calibration, int] | None = None
        if [p.label for p in ordered] == old.labels:
            fitted = old.cache.get("calibration")
            if fitted is not None:
                carried = (fitted, changed)
            elif old.carried is not None:
                carried = (old.carried[0], old.carried[1] + changed)
            size = sum(p.size for p in ordered)
            if carried is not None and carried[1] > max(1.0, self.max_stale_fraction * size):
                carried = None
        self._snapshot = Snapshot(
            version=old.version + 1,
            dim=self.dim,
            parts=ordered,
            lookup=lookup,
            next_key=next_key,
            carried=carried,
        )

    def fork(self) -> ReferenceIndex:
        """An independent index holding the current state, in O(1).

        Snapshots are immutable, so the fork shares them (and their calibration); changes to
        either index afterwards are invisible to the other. The service builds the next state
        of a bundle on a fork while predictions keep reading the bundle's own index.
        """
        twin = ReferenceIndex.__new__(ReferenceIndex)
        twin.__dict__.update(self.__dict__)
        twin._write_lock = threading.Lock()
        with self._write_lock:
            twin._snapshot = self._snapshot
        return twin

    def wait_calibrated(self, timeout: float | None = None) -> bool:
        """Block until the current state has its own calibration (a background refit done);
        returns False on timeout. Immediate with ``recalibration="sync"``."""
        snap = self._snapshot
        if not snap.parts or "calibration" in snap.cache:
            return True
        if self.recalibration == "sync" or snap.carried is None:
            self._calibration(snap)
            return True
        self._refitter.schedule(self._fit, snap)
        return self._refitter.wait(snap, timeout)

    def search(
        self, queries: np.ndarray, *, k: int | None = None, method: str = "knn"
    ) -> list[IndexResult]:
        """Answer each L2-normalised query row (a single 1-D vector is accepted too).

        ``method="knn"``: label = distance-weighted vote of the ``k`` nearest references;
        ``method="mean_distance"``: label = the class of least mean distance. Raises
        :class:`EmptyIndexError` when no reference is enrolled, ``ValueError`` for a bad
        method, ``k`` or query.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        k = self.k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        snap = self._snapshot  # the one state this search uses, whatever happens meanwhile
        if not snap.parts:
            raise EmptyIndexError(
                "the reference index is empty; enroll labeled references (add(), or "
                "POST /references) before searching"
            )
        q = self._check_vectors(queries, "queries")
        calibration = self._calibration(snap)
        raw = raw_search(snap, q, k, backend=self.backend)
        return self._results(snap, raw, calibration, method)

    def calibration(self) -> Calibration:
        """The calibration of the current references (computed now if not cached)."""
        snap = self._snapshot
        if not snap.parts:
            raise EmptyIndexError("the reference index is empty; nothing to calibrate")
        return self._calibration(snap)

    def _results(
        self, snap: Snapshot, raw: Raw, cal: Calibration, method: str
    ) -> list[IndexResult]:
        labels = snap.labels
        n_classes = len(labels)
        if method == "knn":
            cand_d, cand_c = knn_candidates(raw, n_classes)
            prob = knn_probabilities(cand_d, cand_c, n_classes, cal.temperature_knn, cal.power_knn)
            pred = np.argmax(prob, axis=1)
        else:
            prob = mean_distance_probabilities(raw.mean, cal.temperature_mean)
            pred = np.argmin(raw.mean, axis=1)
        ref_ids = reference_ids(snap, raw.nb_key, raw.nb_class)
        pred_l = pred.tolist()
        prob_l, mean_l, near_l = prob.tolist(), raw.mean.tolist(), raw.nearest.tolist()
        dist_l, class_l = raw.nb_dist.tolist(), raw.nb_class.tolist()
        out: list[IndexResult] = []
        for i, c in enumerate(pred_l):
            label = labels[c]
            neighbors = [
                Neighbor(rid, labels[cc], d)
                for rid, d, cc in zip(ref_ids[i], dist_l[i], class_l[i], strict=True)
                if cc >= 0
            ]
            score = mean_l[i][c]  # the class as a whole, not its nearest member (see above)
            threshold = cal.thresholds[label]
            out.append(
                IndexResult(
                    label=label,
                    confidence=prob_l[i][c],
                    distances=dict(zip(labels, mean_l[i], strict=True)),
                    nearest=dict(zip(labels, near_l[i], strict=True)),
                    neighbors=neighbors,
                    outlier_score=score,
                    outlier_threshold=threshold,
                    unknown=bool(score > threshold),
                    probabilities=dict(zip(labels, prob_l[i], strict=True)),
                    method=method,
                )
            )
        return out

    def _calibration(self, snap: Snapshot) -> Calibration:
        cached = snap.cache.get("calibration")
        if cached is not None:
            return cached
        if self.recalibration == "background" and snap.carried is not None:
            self._refitter.schedule(self._fit, snap)
            return snap.carried[0]
        with snap.lock:
            cached = snap.cache.get("calibration")
            if cached is None:
                cached = self._fit(snap)
                snap.cache["calibration"] = cached
        return cached

    def _fit(self, snap: Snapshot) -> Calibration:
        return fit_calibration(
            snap,
            k=self.k,
            seed=self.seed,
            calibration_samples=self.calibration_samples,
            unknown_quantile=self.unknown_quantile,
        )

    def __len__(self) -> int:
        return self._snapshot.size

    @property
    def ids(self) -> list[str]:
        """Enrolled reference ids (grouped by class, in enrolment order within a class)."""
        return [i for p in self._snapshot.parts for i in p.ids]

    @property
    def version(self) -> int:
        """Bumped by every change; a search reports the state of exactly one version."""
        return self._snapshot.version

    def classes(self) -> dict[str, int]:
        """Enrolled classes and their reference counts."""
        return {p.label: p.size for p in self._snapshot.parts}

    def label_of(self, reference_id: str) -> str:
        """The class of an enrolled reference (``KeyError`` if not enrolled)."""
        return self._snapshot.lookup[reference_id][0]

    def describe(self) -> dict[str, str]:
        """Per class, the sub-index in use, e.g. ``{"COVID-19": "IDMap2,Flat"}``."""
        return {p.label: fx.describe_index(p.index, p.factory) for p in self._snapshot.parts}

    def memory_bytes(self) -> int:
        """Approximate resident bytes: reference vectors plus FAISS sub-indexes."""
        snap = self._snapshot
        total = 0
        for p in snap.parts:
            total += p.vectors.nbytes + p.keys.nbytes
            total += fx.index_nbytes(p.index, p.size, snap.dim)
        return total

    def class_sums(self, label: str) -> tuple[np.ndarray, float, int]:
        """The running float64 (sum of vectors, sum of squared norms, count) of a class."""
        for p in self._snapshot.parts:
            if p.label == label:
                return p.vec_sum.copy(), p.sq_sum, p.size
        raise KeyError(f"class {label!r} is not enrolled; enrolled: {sorted(self.classes())}")

    def save(self, path: str | Path) -> None:
        """Write the current state atomically (temp file + ``os.replace``), with a checksum."""
        snap = self._snapshot
        config = {
            "factory": self.factory,
            "unknown_quantile": self.unknown_quantile,
            "k": self.k,
            "calibration_samples": self.calibration_samples,
            "target_recall": self.target_recall,
            "seed": self.seed,
        }
        write_index_file(path, *layout.dump(snap, config))
        log.info("saved reference index v%d (%d references) to %s", snap.version, snap.size, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> ReferenceIndex:
        """Read an index written by :meth:`save`; raises :class:`IndexFileError` if unusable."""
        meta, arrays = read_index_file(path)
        if meta.get("kind") != layout.KIND:
            raise IndexFileError(f"{path} is an index file of another kind: {meta.get('kind')!r}")
        try:
            index = cls(int(meta["dim"]), device=device, **meta["config"])
            index._snapshot = layout.restore(meta, arrays, index.dim)
        except IndexFileError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise IndexFileError(f"{path} has an inconsistent index payload: {exc}") from exc
        return index

    def _check_vectors(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}); got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        if len(x):
            norms = np.linalg.norm(x, axis=1)
            if np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
                raise ValueError(
                    f"{what} must be L2-normalised (norms in [{norms.min():.4f}, "
                    f"{norms.max():.4f}]); divide each row by its norm"
                )
        return np.ascontiguousarray(x)
