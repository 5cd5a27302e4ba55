"""The immutable state of a reference index: one part per class, and the snapshot of all parts.

A search reads one :class:`Snapshot` and uses only it; every change builds a new snapshot and
publishes it with one reference assignment (see :mod:`index.reference_index`). Derived data (the
calibration, GPU copies, id arrays) is cached *in* the snapshot, so it can never be stale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.calibration import Calibration

__all__ = ["ClassPart", "Snapshot", "cached"]


@dataclass(frozen=True)
class ClassPart:
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
class Snapshot:
    """An immutable state of the index (plus caches derived from it, filled lazily)."""

    version: int
    dim: int
    parts: tuple[ClassPart, ...]  # sorted by label
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


def cached(snap: Snapshot, name: str, make: Callable[[], Any]) -> Any:
    """``snap``'s cached value ``name``, made once (under the snapshot's lock) if missing."""
    value = snap.cache.get(name)
    if value is None:
        with snap.lock:
            value = snap.cache.get(name)
            if value is None:
                value = make()
                snap.cache[name] = value
    return value
