"""The one place that builds, changes, tunes and (de)serialises FAISS indexes.

Everything FAISS-specific lives here (faiss-contrib style), so :mod:`index.reference_index`
only speaks of "a sub-index per class". All indexes use the inner-product metric: embeddings are
L2-normalised, so the largest inner product is the smallest Euclidean distance
(``d = sqrt(max(0, 2 - 2 a.b))``).

Automatic choice (``factory="auto"``), per class sub-index of ``n`` references:

- ``n <= AUTO_SWITCH_SIZE``: ``IDMap2,Flat`` -- exact. Measured on one core of the 2-core shared
  CPU (dim 256, clustered data, ``runs/switch_probe.py`` in docs/BENCHMARKS.md): a flat search
  costs 0.04 ms at 2k, 0.24 ms at 10k, 0.8 ms at 20k, 2.7 ms at 50k and 12 ms at 100k (memory
  bound beyond the caches). Up to 20k exactness costs under 1 ms a query, so it is not traded.
- above it: ``IVF{nlist},Flat`` with ``nlist`` the power of two nearest ``4 sqrt(n)``, trained by
  spherical k-means on at most 64 points per list, and ``nprobe`` tuned at build time to the
  smallest power of two whose recall@10 on a leave-one-out sample of the references reaches
  ``target_recall``. IVF rather than HNSW because IVF supports ``remove_ids`` (references are
  deleted by clinicians; HNSW would need a full rebuild on every delete) and trains in seconds
  to minutes where HNSW construction of 1M vectors takes far longer on one core. The index is
  switched back to flat below ``AUTO_SWITCH_SIZE // 2`` (hysteresis) and retrained when its size
  leaves ``[trained / 4, trained * 4]``. If the tuned ``nprobe`` exceeds ``MAX_SCAN_FRACTION``
  of the lists (data without cluster structure, e.g. uniform random vectors), IVF would cost as
  much as an exact scan, so the class stays exact (retried when it has grown 4x).
"""

from __future__ import annotations

import logging
import math
import re
import threading

import faiss
import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "AUTO_SWITCH_SIZE",
    "EXACT_FACTORY",
    "add_to_index",
    "auto_factory",
    "build_index",
    "describe_index",
    "deserialize_index",
    "index_to_gpu",
    "is_exact",
    "min_train_size",
    "remove_from_index",
    "serialize_index",
    "tune_nprobe",
    "validate_factory",
]

AUTO_SWITCH_SIZE = 20_000
MAX_SCAN_FRACTION = 0.25  # auto mode: an IVF that must probe more lists than this stays exact
EXACT_FACTORY = "IDMap2,Flat"
_IVF_RE = re.compile(r"IVF(\d+)")
_gpu_lock = threading.Lock()
_gpu_resources: object | None = None


def ivf_nlist(n: int) -> int:
    """Number of inverted lists for ``n`` vectors: the power of two nearest ``4 sqrt(n)``."""
    return int(2 ** round(math.log2(max(16.0, 4.0 * math.sqrt(max(n, 1))))))


def auto_factory(n: int, current: str | None = None) -> str:
    """The factory string the automatic policy wants for a sub-index of ``n`` vectors.

    ``current`` (the sub-index's present factory) adds hysteresis so an index oscillating
    around the switch size is not rebuilt on every add/remove.
    """
    if current is not None and not is_exact(current) and n > AUTO_SWITCH_SIZE // 2:
        return current if _IVF_RE.search(current) else f"IVF{ivf_nlist(n)},Flat"
    if n <= AUTO_SWITCH_SIZE:
        return EXACT_FACTORY
    return f"IVF{ivf_nlist(n)},Flat"


def is_exact(factory: str) -> bool:
    """Whether a factory string denotes exhaustive (exact) search."""
    return factory.replace("IDMap2,", "").replace("IDMap,", "") == "Flat"


def min_train_size(factory: str) -> int:
    """The fewest vectors an index of this factory can be trained on (0: needs no training)."""
    match = _IVF_RE.search(factory)
    return int(match.group(1)) if match else 0


def validate_factory(factory: str, dim: int) -> None:
    """Raise ``ValueError`` with a usable message if FAISS cannot parse ``factory``."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(
            f"invalid FAISS factory string {factory!r}: {str(exc).strip()}. Use 'auto', "
            "'Flat' or e.g. 'IVF1024,Flat'"
        ) from exc


def build_index(
    factory: str,
    vectors: np.ndarray,
    keys: np.ndarray,
    *,
    target_recall: float = 0.98,
    seed: int = 0,
) -> faiss.Index:
    """Build (train if needed, fill, tune) an inner-product index of ``factory`` over ``vectors``.

    ``keys`` are the int64 ids FAISS returns. Indexes that cannot store ids themselves (flat,
    HNSW) are wrapped in ``IndexIDMap2``; IVF indexes store them in their lists.
    """
    validate_factory(factory, vectors.shape[1])
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _as_ivf(index)
    if ivf is None and not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        index = faiss.IndexIDMap2(index)
    if not index.is_trained:
        if ivf is not None:
            ivf.cp.max_points_per_centroid = 64  # k-means on <= 64 points/list: minutes, not hours
            ivf.cp.niter = 10
            ivf.cp.seed = seed
        train = vectors
        cap = 64 * (ivf.nlist if ivf is not None else 1024)
        if len(vectors) > cap:
            rows = np.random.default_rng(seed).choice(len(vectors), size=cap, replace=False)
            train = vectors[np.sort(rows)]
        index.train(np.ascontiguousarray(train))
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(keys, np.int64))
    if ivf is not None:
        ivf.nprobe = tune_nprobe(index, vectors, keys, target_recall=target_recall, seed=seed)
    return index


def _as_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def tune_nprobe(
    index: faiss.Index,
    vectors: np.ndarray,
    keys: np.ndarray,
    *,
    target_recall: float = 0.98,
    k: int = 10,
    n_queries: int = 200,
    seed: int = 0,
) -> int:
    """The smallest power-of-two ``nprobe`` whose leave-one-out recall@k reaches the target.

    Queries are a seeded sample of the indexed vectors themselves with each one's own hit
    removed (new images resemble existing references, they are not copies of them); the ground
    truth is an exact float32 scan. Returns ``nlist`` (exhaustive) if nothing smaller suffices.
    The chosen value is stored in the index (FAISS serialises ``nprobe``).
    """
    ivf = _as_ivf(index)
    if ivf is None:
        return 0
    n = len(vectors)
    if n <= k + 1:
        return int(ivf.nlist)
    rng = np.random.default_rng([seed, 7])
    rows = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    queries = np.ascontiguousarray(vectors[rows])
    truth = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), 32):  # chunks bound the score matrix to 32 x n floats
        part = slice(start, start + 32)
        scores = queries[part] @ vectors.T
        scores[np.arange(len(scores)), rows[part]] = -np.inf
        truth[part] = keys[np.argpartition(-scores, k, axis=1)[:, :k]]
    own = keys[rows]
    nprobe = 1
    recall = 0.0
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(queries, k + 1)
        hits = 0
        for i in range(len(rows)):
            got = [x for x in found[i].tolist() if x != own[i] and x >= 0][:k]
            hits += len(set(truth[i].tolist()).intersection(got))
        recall = hits / (k * len(rows))
        if recall >= target_recall or nprobe >= ivf.nlist:
            break
        nprobe = min(nprobe * 2, int(ivf.nlist))
    log.info(
        "IVF%d over %d vectors: nprobe=%d gives leave-one-out recall@%d=%.3f (target %.2f)",
        ivf.nlist,
        n,
        nprobe,
        k,
        recall,
        target_recall,
    )
    return nprobe


def add_to_index(index: faiss.Index, vectors: np.ndarray, keys: np.ndarray) -> faiss.Index:
    """A copy of ``index`` with ``vectors`` added (the original is left untouched for readers)."""
    clone = faiss.clone_index(index)
    clone.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(keys, np.int64))
    return clone


def remove_from_index(index: faiss.Index, keys: np.ndarray) -> faiss.Index | None:
    """A copy of ``index`` without ``keys``, or ``None`` if this index type cannot remove."""
    clone = faiss.clone_index(index)
    try:
        clone.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(keys, np.int64)))
    except RuntimeError:
        return None
    return clone


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set ``nprobe`` on an IVF index (no-op for others)."""
    ivf = _as_ivf(index)
    if ivf is not None and nprobe > 0:
        ivf.nprobe = int(nprobe)


def scan_fraction(index: faiss.Index) -> float:
    """``nprobe / nlist`` of an IVF index (the share of lists a search scans), 0 for others."""
    ivf = _as_ivf(index)
    return float(ivf.nprobe) / float(ivf.nlist) if ivf is not None else 0.0


def get_nprobe(index: faiss.Index) -> int:
    """The IVF ``nprobe`` of an index, 0 for non-IVF indexes."""
    ivf = _as_ivf(index)
    return int(ivf.nprobe) if ivf is not None else 0


def describe_index(index: faiss.Index, factory: str) -> str:
    """Human description, e.g. ``IDMap2,Flat`` or ``IVF2048,Flat(nprobe=8)``."""
    nprobe = get_nprobe(index)
    return f"{factory}(nprobe={nprobe})" if nprobe else factory


def serialize_index(index: faiss.Index) -> np.ndarray:
    """FAISS's own binary form of ``index`` as a uint8 array (stored inside our checked file)."""
    return faiss.serialize_index(index)


def deserialize_index(blob: np.ndarray) -> faiss.Index:
    """Inverse of :func:`serialize_index`."""
    return faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))


def index_nbytes(index: faiss.Index, n: int, dim: int) -> int:
    """Approximate resident bytes of an inner-product flat or IVF-flat index of ``n`` vectors."""
    ivf = _as_ivf(index)
    base = n * (dim * 4 + 8)  # vectors + int64 ids
    if ivf is not None:
        base += ivf.nlist * dim * 4
    return base


def index_to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` for searching (only when ``faiss.get_num_gpus() > 0``)."""
    global _gpu_resources
    with _gpu_lock:
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
    set_nprobe(gpu_index, get_nprobe(index))
    return gpu_index


def gpu_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search a GPU index; serialised because one StandardGpuResources is not thread-safe."""
    with _gpu_lock:
        return index.search(queries, k)
