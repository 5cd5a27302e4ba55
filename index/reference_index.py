"""The reference index: labeled reference embeddings in, a diagnosis for a query out.

For a query embedding the index answers: the nearest references, the mean distance to each
class, the nearest reference of each class, a distance-weighted k-NN label (or the class of least
mean distance) with a calibrated confidence, and whether the image resembles no enrolled class.

Design, and why:

- **One sub-index per class** (FAISS, inner product; exact ``IDMap2,Flat`` up to
  :data:`~index.factory.AUTO_SWITCH_SIZE` references, IVF above; see :mod:`index.factory`).
  The overall k nearest are the merge of each class's k nearest, and each class's nearest
  reference comes out of the same pass, so the per-class nearest distance (the outlier score) is
  never missing and needs no second scan. For exact sub-indexes the total work equals one flat
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
- **Copy-on-write snapshots**: all state lives in an immutable :class:`_Snapshot`. ``search``
  reads the current snapshot reference once and uses only it; ``add``/``remove``/``replace``
  build a new snapshot (cloning only the sub-indexes of classes that change) under a lock and
  publish it with one reference assignment. A search concurrent with a change therefore sees
  the old or the new references, never a mix. Cost: a change copies the changed classes
  (O(n_c x dim) memory traffic); batch large enrolments into one ``add``.
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
- **Devices**: FAISS GPU when the installed FAISS sees GPUs, else an exact torch search on CUDA
  when available, else FAISS CPU (``device="auto"``). The torch path is always exact and can be
  forced on CPU (``device="torch-cpu"``) to check it against FAISS. Calibration always runs on
  FAISS CPU, so every device reports the same thresholds and temperatures.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from index import factory as fx
from index.calibration import (
    Calibration,
    class_thresholds,
    fit_knn_calibration,
    fit_temperature,
    knn_probabilities,
    mean_distance_probabilities,
)
from index.errors import EmptyIndexError, IndexFileError
from index.persistence import read_index_file, write_index_file

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
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "faiss-gpu", "torch-cuda", "torch-cpu")
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


@dataclass(frozen=True)
class _ClassPart:
    """The references of one class: vectors, stable int64 keys, ids, sums and its sub-index."""

    label: str
    vectors: np.ndarray  # (n_c, dim) float32, read-only
    keys: np.ndarray  # (n_c,) int64, ascending
    ids: tuple[str, ...]
    index: Any  # faiss.Index; never mutated once published
    factory: str
    trained_size: int
    vec_sum: np.ndarray  # (dim,) float64
    sq_sum: float
    ivf_rejected: bool = False  # auto mode found IVF no faster than exact at trained_size

    @property
    def size(self) -> int:
        return len(self.keys)

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.keys, keys)


@dataclass(frozen=True)
class _Snapshot:
    """An immutable state of the index (plus caches derived from it, filled lazily)."""

    version: int
    dim: int
    parts: tuple[_ClassPart, ...]  # sorted by label
    lookup: dict[str, tuple[str, int]]  # reference id -> (label, key)
    next_key: int
    #: a calibration of an earlier snapshot with the same classes, and how many references
    #: changed since it was fitted (answered with while a background refit runs)
    carried: tuple[Calibration, int] | None = None
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, compare=False, repr=False)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.parts]


@dataclass
class _Raw:
    """Per-query arrays computed once and turned into results (or into calibration data)."""

    nb_key: np.ndarray  # (m, k) int64, -1 padding
    nb_dist: np.ndarray  # (m, k) float64, inf padding
    nb_class: np.ndarray  # (m, k) int64, -1 padding
    nearest: np.ndarray  # (m, C) float64, inf where a class has no (other) reference
    mean: np.ndarray  # (m, C) float64, inf where a class has no (other) reference


def _distance(scores: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores.astype(np.float64)))


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
        unknown_quantile: quantile of leave-one-out nearest same-class distances used as each
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
        self._refitter = _Refitter()
        self.device = device
        self.backend = _resolve_backend(device)
        self._write_lock = threading.Lock()
        self._snapshot = _Snapshot(version=0, dim=self.dim, parts=(), lookup={}, next_key=0)

    # ----------------------------------------------------------------------------- building

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
                parts[label] = self._grow(
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
                shrunk = self._shrink(parts[label], np.asarray(sorted(keys), np.int64))
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
            self._snapshot = _Snapshot(
                version=old.version + 1,
                dim=self.dim,
                parts=new.parts,
                lookup=new.lookup,
                next_key=new.next_key,
            )

    def _publish(
        self,
        old: _Snapshot,
        parts: dict[str, _ClassPart],
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
        self._snapshot = _Snapshot(
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
        self._refitter.schedule(self, snap)
        return self._refitter.wait(snap, timeout)

    def _wanted_factory(self, n: int, current: str | None) -> str:
        if self.factory == "auto":
            return fx.auto_factory(n, current)
        if n < fx.min_train_size(self.factory):
            return fx.EXACT_FACTORY  # too few vectors to train it; exact search instead
        return self.factory

    def _needs_rebuild(self, part: _ClassPart, n: int, wanted: str) -> bool:
        if part.ivf_rejected and not fx.is_exact(wanted):
            return n > part.trained_size * 4  # retry IVF only once the class has grown 4x
        if wanted != part.factory:
            return True
        if fx.is_exact(wanted) or self.factory != "auto":
            return False
        return not (part.trained_size / 4 <= n <= part.trained_size * 4)

    def _new_part(
        self,
        label: str,
        vectors: np.ndarray,
        keys: np.ndarray,
        ids: Sequence[str],
        factory: str | None = None,
    ) -> _ClassPart:
        """A class part built from scratch (IVF training and nprobe tuning included)."""
        factory = factory or self._wanted_factory(len(vectors), None)
        index = fx.build_index(
            factory, vectors, keys, target_recall=self.target_recall, seed=self.seed
        )
        rejected = False
        if self.factory == "auto" and fx.scan_fraction(index) > fx.MAX_SCAN_FRACTION:
            # no cluster structure: reaching the target recall needs most lists, so an IVF
            # scan costs as much as an exact one (and batches lose BLAS): stay exact
            log.info(
                "class %r: IVF needs nprobe/nlist=%.2f for recall %.2f; using exact search",
                label,
                fx.scan_fraction(index),
                self.target_recall,
            )
            factory, rejected = fx.EXACT_FACTORY, True
            index = fx.build_index(factory, vectors, keys)
        vectors.setflags(write=False)
        v64 = vectors.astype(np.float64)
        return _ClassPart(
            label=label,
            vectors=vectors,
            keys=keys,
            ids=tuple(ids),
            index=index,
            factory=factory,
            trained_size=len(vectors),
            vec_sum=v64.sum(axis=0),
            sq_sum=float(np.einsum("ij,ij->", v64, v64)),
            ivf_rejected=rejected,
        )

    def _grow(
        self,
        part: _ClassPart | None,
        label: str,
        x: np.ndarray,
        keys: np.ndarray,
        ids: list[str],
    ) -> _ClassPart:
        if part is None:
            return self._new_part(label, np.ascontiguousarray(x), keys, ids)
        vectors = np.concatenate([part.vectors, x])
        all_keys = np.concatenate([part.keys, keys])
        wanted = self._wanted_factory(len(vectors), part.factory)
        if self._needs_rebuild(part, len(vectors), wanted):
            return self._new_part(label, vectors, all_keys, part.ids + tuple(ids), wanted)
        x64 = x.astype(np.float64)
        vectors.setflags(write=False)
        return _ClassPart(
            label=label,
            vectors=vectors,
            keys=all_keys,
            ids=part.ids + tuple(ids),
            index=fx.add_to_index(part.index, x, keys),
            factory=part.factory,
            trained_size=part.trained_size,
            vec_sum=part.vec_sum + x64.sum(axis=0),
            sq_sum=part.sq_sum + float(np.einsum("ij,ij->", x64, x64)),
            ivf_rejected=part.ivf_rejected,
        )

    def _shrink(self, part: _ClassPart, keys: np.ndarray) -> _ClassPart | None:
        rows = part.rows_of(keys)
        keep = np.ones(part.size, dtype=bool)
        keep[rows] = False
        if not keep.any():
            return None
        vectors = np.ascontiguousarray(part.vectors[keep])
        new_keys = part.keys[keep]
        ids = tuple(i for i, k in zip(part.ids, keep, strict=True) if k)
        wanted = self._wanted_factory(len(vectors), part.factory)
        index = None
        if not self._needs_rebuild(part, len(vectors), wanted):
            index = fx.remove_from_index(part.index, keys)
        if index is None:
            return self._new_part(part.label, vectors, new_keys, ids, wanted)
        gone = part.vectors[rows].astype(np.float64)
        vectors.setflags(write=False)
        return _ClassPart(
            label=part.label,
            vectors=vectors,
            keys=new_keys,
            ids=ids,
            index=index,
            factory=part.factory,
            trained_size=part.trained_size,
            vec_sum=part.vec_sum - gone.sum(axis=0),
            sq_sum=part.sq_sum - float(np.einsum("ij,ij->", gone, gone)),
            ivf_rejected=part.ivf_rejected,
        )

    # ----------------------------------------------------------------------------- queries

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
        raw = self._raw_search(snap, q, k, backend=self.backend)
        return self._results(snap, raw, calibration, method)

    def calibration(self) -> Calibration:
        """The calibration of the current references (computed now if not cached)."""
        snap = self._snapshot
        if not snap.parts:
            raise EmptyIndexError("the reference index is empty; nothing to calibrate")
        return self._calibration(snap)

    def _results(
        self, snap: _Snapshot, raw: _Raw, cal: Calibration, method: str
    ) -> list[IndexResult]:
        labels = snap.labels
        n_classes = len(labels)
        if method == "knn":
            cand_d, cand_c = _knn_candidates(raw, n_classes)
            prob = knn_probabilities(cand_d, cand_c, n_classes, cal.temperature_knn, cal.power_knn)
            pred = np.argmax(prob, axis=1)
        else:
            prob = mean_distance_probabilities(raw.mean, cal.temperature_mean)
            pred = np.argmin(raw.mean, axis=1)
        ref_ids = _reference_ids(snap, raw.nb_key, raw.nb_class)
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
            score = near_l[i][c]
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

    def _raw_search(
        self,
        snap: _Snapshot,
        q: np.ndarray,
        k: int,
        *,
        backend: str,
        exclude: np.ndarray | None = None,
    ) -> _Raw:
        """Neighbours, per-class nearest and mean distances for queries ``q``.

        ``exclude`` (one key per query, for leave-one-out) removes that reference from every
        answer, including from its class's sums.
        """
        m = len(q)
        extra = 0 if exclude is None else 1
        found = _search_parts(snap, q, [min(k + extra, p.size) for p in snap.parts], backend)
        cand_s, cand_k, cand_c = [], [], []
        nearest = np.full((m, len(snap.parts)), -np.inf)
        for c, (part, (scores, keys)) in enumerate(zip(snap.parts, found, strict=True)):
            scores = scores.astype(np.float64)
            invalid = keys < 0
            if exclude is not None:
                invalid |= keys == exclude[:, None]
            scores[invalid] = -np.inf
            keys = np.where(invalid, -1, keys)
            nearest[:, c] = scores.max(axis=1) if scores.shape[1] else -np.inf
            cand_s.append(scores)
            cand_k.append(keys)
            cand_c.append(np.where(invalid, -1, c))
            self._exact_fallback(part, q, nearest[:, c], exclude)
        s = np.concatenate(cand_s, axis=1)
        kk = np.concatenate(cand_k, axis=1)
        cc = np.concatenate(cand_c, axis=1)
        order = np.lexsort((kk, -s), axis=1)[:, :k]  # by score, ties by key: deterministic
        s = np.take_along_axis(s, order, axis=1)
        kk = np.take_along_axis(kk, order, axis=1)
        cc = np.take_along_axis(cc, order, axis=1)
        nb_dist = np.where(kk >= 0, _distance(np.where(np.isfinite(s), s, 0.0)), np.inf)
        finite = np.isfinite(nearest)
        near_d = np.where(finite, _distance(np.where(finite, nearest, 0.0)), np.inf)
        return _Raw(
            nb_key=kk,
            nb_dist=nb_dist,
            nb_class=cc.astype(np.int64),
            nearest=near_d,
            mean=_mean_distances(snap, q, exclude),
        )

    @staticmethod
    def _exact_fallback(
        part: _ClassPart, q: np.ndarray, nearest_col: np.ndarray, exclude: np.ndarray | None
    ) -> None:
        """Exact nearest score for queries an approximate sub-index returned nothing for."""
        missing = np.flatnonzero(~np.isfinite(nearest_col))
        if not len(missing):
            return
        scores = q[missing] @ part.vectors.T
        if exclude is not None:
            own = exclude[missing]
            rows = part.rows_of(own)
            hit = (rows < part.size) & (part.keys[np.minimum(rows, part.size - 1)] == own)
            scores[np.flatnonzero(hit), rows[hit]] = -np.inf
        if scores.shape[1]:
            nearest_col[missing] = scores.max(axis=1)

    # ------------------------------------------------------------------------- calibration

    def _calibration(self, snap: _Snapshot) -> Calibration:
        cached = snap.cache.get("calibration")
        if cached is not None:
            return cached
        if self.recalibration == "background" and snap.carried is not None:
            self._refitter.schedule(self, snap)
            return snap.carried[0]
        with snap.lock:
            cached = snap.cache.get("calibration")
            if cached is None:
                cached = self._fit_calibration(snap)
                snap.cache["calibration"] = cached
        return cached

    def _fit_calibration(self, snap: _Snapshot) -> Calibration:
        """Leave-one-out calibration on a stratified, seeded sample of the references."""
        rng = np.random.default_rng([self.seed, 11])
        per_class = max(1, -(-self.calibration_samples // len(snap.parts)))
        queries, keys, true = [], [], []
        for c, part in enumerate(snap.parts):
            rows = np.arange(part.size)
            if part.size > per_class:
                rows = np.sort(rng.choice(part.size, size=per_class, replace=False))
            queries.append(part.vectors[rows])
            keys.append(part.keys[rows])
            true.append(np.full(len(rows), c))
        q = np.concatenate(queries)
        ex = np.concatenate(keys)
        y = np.concatenate(true)
        raw = self._raw_search(snap, q, self.k, backend="cpu", exclude=ex)
        n_classes = len(snap.parts)
        # a reference alone in its class cannot be predicted correctly with itself left out
        ok = np.isfinite(raw.nearest[np.arange(len(y)), y])
        cand_d, cand_c = _knn_candidates(raw, n_classes)
        cand_d, cand_c, mean, yy = cand_d[ok], cand_c[ok], raw.mean[ok], y[ok]
        t_knn, power = fit_knn_calibration(cand_d, cand_c, n_classes, yy)
        t_mean = fit_temperature(lambda t: mean_distance_probabilities(mean, t), yy)
        loo = {part.label: raw.nearest[(y == c) & ok, c] for c, part in enumerate(snap.parts)}
        cal = Calibration(
            temperature_knn=t_knn,
            power_knn=power,
            temperature_mean=t_mean,
            thresholds=class_thresholds(loo, self.unknown_quantile),
            quantile=self.unknown_quantile,
            n_samples=int(ok.sum()),
            loo_distances=loo,
        )
        log.info(
            "calibrated index v%d on %d references: T_knn=%.4f a_knn=%.3f T_mean=%.4f "
            "thresholds=%s",
            snap.version,
            cal.n_samples,
            t_knn,
            power,
            t_mean,
            {k: round(v, 4) for k, v in cal.thresholds.items()},
        )
        return cal

    # --------------------------------------------------------------------------- inspection

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

    # --------------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """Write the current state atomically (temp file + ``os.replace``), with a checksum."""
        snap = self._snapshot
        meta = {
            "kind": "cxr-reference-index",
            "dim": snap.dim,
            "version": snap.version,
            "next_key": snap.next_key,
            "config": {
                "factory": self.factory,
                "unknown_quantile": self.unknown_quantile,
                "k": self.k,
                "calibration_samples": self.calibration_samples,
                "target_recall": self.target_recall,
                "seed": self.seed,
            },
            "parts": [
                {
                    "label": p.label,
                    "ids": list(p.ids),
                    "factory": p.factory,
                    "trained_size": p.trained_size,
                    "ivf_rejected": p.ivf_rejected,
                    "sq_sum": p.sq_sum,
                }
                for p in snap.parts
            ],
        }
        arrays: dict[str, np.ndarray] = {}
        for i, p in enumerate(snap.parts):
            arrays[f"vectors/{i}"] = p.vectors
            arrays[f"keys/{i}"] = p.keys
            arrays[f"vec_sum/{i}"] = p.vec_sum
            arrays[f"faiss/{i}"] = fx.serialize_index(p.index)
        write_index_file(path, meta, arrays)
        log.info("saved reference index v%d (%d references) to %s", snap.version, snap.size, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> ReferenceIndex:
        """Read an index written by :meth:`save`; raises :class:`IndexFileError` if unusable."""
        meta, arrays = read_index_file(path)
        if meta.get("kind") != "cxr-reference-index":
            raise IndexFileError(f"{path} is an index file of another kind: {meta.get('kind')!r}")
        try:
            config = meta["config"]
            index = cls(int(meta["dim"]), device=device, **config)
            parts = []
            lookup: dict[str, tuple[str, int]] = {}
            for i, pm in enumerate(meta["parts"]):
                vectors = arrays[f"vectors/{i}"]
                keys = arrays[f"keys/{i}"]
                vectors.setflags(write=False)
                part = _ClassPart(
                    label=pm["label"],
                    vectors=vectors,
                    keys=keys,
                    ids=tuple(pm["ids"]),
                    index=fx.deserialize_index(arrays[f"faiss/{i}"]),
                    factory=pm["factory"],
                    trained_size=int(pm["trained_size"]),
                    vec_sum=arrays[f"vec_sum/{i}"],
                    sq_sum=float(pm["sq_sum"]),
                    ivf_rejected=bool(pm.get("ivf_rejected", False)),
                )
                if not (len(part.ids) == len(keys) == len(vectors) == part.index.ntotal):
                    raise ValueError(f"class {part.label!r} has inconsistent sizes")
                parts.append(part)
                lookup.update(
                    {rid: (part.label, int(k)) for rid, k in zip(part.ids, keys, strict=True)}
                )
            index._snapshot = _Snapshot(
                version=int(meta["version"]),
                dim=index.dim,
                parts=tuple(parts),
                lookup=lookup,
                next_key=int(meta["next_key"]),
            )
        except IndexFileError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise IndexFileError(f"{path} has an inconsistent index payload: {exc}") from exc
        return index

    # ------------------------------------------------------------------------------ helpers

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


class _Refitter:
    """One background thread fitting the calibration of the newest snapshot it was asked for.

    Shared by an index and its forks. Requests that arrive while a fit runs replace each other,
    so a burst of enrollments costs one extra fit, not one per enrollment.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted: tuple[ReferenceIndex, _Snapshot] | None = None
        self._running = False

    def schedule(self, index: ReferenceIndex, snap: _Snapshot) -> None:
        with self._cond:
            self._wanted = (index, snap)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="index-recalibration", daemon=True).start()

    def wait(self, snap: _Snapshot, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: "calibration" in snap.cache, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._wanted is None:
                    self._running = False
                    self._cond.notify_all()
                    return
                index, snap = self._wanted
                self._wanted = None
            try:
                # Fit without holding the snapshot's lock: searches take it for their own lazy
                # caches (class sums, id arrays), and must not wait for a whole fit (measured:
                # 22 s for the first prediction after an enrollment at 100,000 references).
                if "calibration" not in snap.cache:
                    fitted = index._fit_calibration(snap)
                    with snap.lock:
                        snap.cache.setdefault("calibration", fitted)
            except Exception:  # keep answering with the carried calibration
                log.exception("background recalibration failed")
            with self._cond:
                self._cond.notify_all()


def _reference_ids(snap: _Snapshot, keys: np.ndarray, classes: np.ndarray) -> list[list[str]]:
    """Reference ids of neighbour keys (``""`` for padding), one vectorised lookup per class."""
    id_arrays = _cached(
        snap, "id-arrays", lambda: [np.asarray(p.ids, dtype=object) for p in snap.parts]
    )
    out = np.full(keys.shape, "", dtype=object)
    for c, part in enumerate(snap.parts):
        mask = classes == c
        if mask.any():
            out[mask] = id_arrays[c][np.searchsorted(part.keys, keys[mask])]
    return out.tolist()


def _knn_candidates(raw: _Raw, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The k neighbours plus, for each class absent from them, its nearest reference."""
    m = len(raw.nb_key)
    present = np.zeros((m, n_classes), dtype=bool)
    rows = np.broadcast_to(np.arange(m)[:, None], raw.nb_class.shape)
    valid = raw.nb_class >= 0
    present[rows[valid], raw.nb_class[valid]] = True
    extra_c = np.where(~present & np.isfinite(raw.nearest), np.arange(n_classes)[None, :], -1)
    extra_d = np.where(extra_c >= 0, raw.nearest, np.inf)
    return (
        np.concatenate([raw.nb_dist, extra_d], axis=1),
        np.concatenate([raw.nb_class, extra_c], axis=1),
    )


def _class_stats(snap: _Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per snapshot (cached): class sums (C, dim), squared-norm sums (C,), counts, means."""

    def make() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        sums = np.stack([p.vec_sum for p in snap.parts])
        sq = np.array([p.sq_sum for p in snap.parts])
        counts = np.array([p.size for p in snap.parts], dtype=np.float64)
        return sums, sq, counts, sums / counts[:, None]

    return _cached(snap, "class-stats", make)


def _mean_distances(snap: _Snapshot, q: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """Root mean squared distance to each class from the float64 running sums.

    ``|q|^2 - 2 q.mean_c + mean_c(|r|^2)``: O(classes x dim) per query, whatever the class sizes.
    """
    q64 = q.astype(np.float64)
    sums, sq, counts, means = _class_stats(snap)
    qn = np.einsum("ij,ij->i", q64, q64)[:, None]
    if exclude is None:
        return np.sqrt(np.maximum(qn - 2.0 * (q64 @ means.T) + sq / counts, 0.0))
    qs = q64 @ sums.T  # (m, C)
    sq_b = np.tile(sq, (len(q), 1))
    n_b = np.tile(counts, (len(q), 1))
    for c, part in enumerate(snap.parts):  # leave-one-out: take the query out of its class
        rows = part.rows_of(exclude)
        hit = (rows < part.size) & (part.keys[np.minimum(rows, part.size - 1)] == exclude)
        if hit.any():
            qs[hit, c] -= qn[hit, 0]
            sq_b[hit, c] -= qn[hit, 0]
            n_b[hit, c] -= 1
    with np.errstate(divide="ignore", invalid="ignore"):
        msq = qn - 2.0 * qs / n_b + sq_b / n_b
        out = np.sqrt(np.maximum(msq, 0.0))
    return np.where(n_b > 0, out, np.inf)


def _search_parts(
    snap: _Snapshot, q: np.ndarray, ks: list[int], backend: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each class sub-index's top ``ks[c]`` (inner products, keys) for queries ``q``."""
    if backend == "cpu":
        return [p.index.search(q, kc) for p, kc in zip(snap.parts, ks, strict=True)]
    if backend == "faiss-gpu":
        gpu = _cached(snap, "faiss-gpu", lambda: [fx.index_to_gpu(p.index) for p in snap.parts])
        return [fx.gpu_search(g, q, kc) for g, kc in zip(gpu, ks, strict=True)]
    return _torch_search(snap, q, ks, "cuda" if backend == "torch-cuda" else "cpu")


def _cached(snap: _Snapshot, name: str, make) -> Any:
    value = snap.cache.get(name)
    if value is None:
        with snap.lock:
            value = snap.cache.get(name)
            if value is None:
                value = make()
                snap.cache[name] = value
    return value


def _torch_search(
    snap: _Snapshot, q: np.ndarray, ks: list[int], device: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact search with one matrix product in torch (the CUDA path without FAISS GPU)."""
    import torch

    def make() -> tuple[Any, list[int]]:
        matrix = torch.from_numpy(np.concatenate([p.vectors for p in snap.parts])).to(device)
        offsets = np.cumsum([0] + [p.size for p in snap.parts]).tolist()
        return matrix, offsets

    matrix, offsets = _cached(snap, f"torch-{device}", make)
    with torch.inference_mode():
        scores = torch.from_numpy(q).to(device) @ matrix.T
        out = []
        for c, (part, kc) in enumerate(zip(snap.parts, ks, strict=True)):
            top = torch.topk(scores[:, offsets[c] : offsets[c + 1]], kc, dim=1)
            s = top.values.cpu().numpy()
            keys = part.keys[top.indices.cpu().numpy()]
            out.append((s, keys))
    return out


def _resolve_backend(device: str) -> str:
    """Map a device request to ``cpu`` | ``faiss-gpu`` | ``torch-cuda`` | ``torch-cpu``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device in ("cpu", "torch-cpu"):
        return device
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device in ("auto", "cuda", "faiss-gpu") and faiss_gpus > 0:
        return "faiss-gpu"
    if device == "faiss-gpu":
        raise ValueError(
            "device='faiss-gpu' but the installed FAISS sees no GPU; install faiss-gpu "
            "(the 'gpu' extra) or use device='auto'"
        )
    if device in ("auto", "cuda", "torch-cuda"):
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:  # pragma: no cover - torch is a dependency
            cuda = False
        if cuda:
            return "torch-cuda"
        if device != "auto":
            raise ValueError(f"device={device!r} but no CUDA GPU is available; use 'auto' or 'cpu'")
    return "cpu"
