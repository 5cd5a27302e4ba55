"""How a class's sub-index is built, grown and shrunk: the choice between exact and IVF search.

A class part is rebuilt from scratch only when the wanted FAISS factory changes (e.g. a class
grows past :data:`~index.factory.AUTO_SWITCH_SIZE`) or an IVF part drifts 4x from the size it
was trained at; otherwise vectors are added to / removed from a *copy* of its sub-index, and the
float64 running sums are updated exactly, so a change costs the changed classes only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index import factory as fx
from index.snapshot import ClassPart

log = logging.getLogger("index.reference_index")

__all__ = ["PartPolicy"]


@dataclass(frozen=True)
class PartPolicy:
    """The sub-index policy of one index: its FAISS factory (or ``auto``), IVF recall and seed."""

    factory: str
    target_recall: float
    seed: int

    def wanted_factory(self, n: int, current: str | None) -> str:
        if self.factory == "auto":
            return fx.auto_factory(n, current)
        if n < fx.min_train_size(self.factory):
            return fx.EXACT_FACTORY  # too few vectors to train it; exact search instead
        return self.factory

    def needs_rebuild(self, part: ClassPart, n: int, wanted: str) -> bool:
        if part.ivf_rejected and not fx.is_exact(wanted):
            return n > part.trained_size * 4  # retry IVF only once the class has grown 4x
        if wanted != part.factory:
            return True
        if fx.is_exact(wanted) or self.factory != "auto":
            return False
        return not (part.trained_size / 4 <= n <= part.trained_size * 4)

    def new_part(
        self,
        label: str,
        vectors: np.ndarray,
        keys: np.ndarray,
        ids: Sequence[str],
        factory: str | None = None,
    ) -> ClassPart:
        """A class part built from scratch (IVF training and nprobe tuning included)."""
        factory = factory or self.wanted_factory(len(vectors), None)
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
        return ClassPart(
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

    def grow(
        self,
        part: ClassPart | None,
        label: str,
        x: np.ndarray,
        keys: np.ndarray,
        ids: list[str],
    ) -> ClassPart:
        if part is None:
            return self.new_part(label, np.ascontiguousarray(x), keys, ids)
        vectors = np.concatenate([part.vectors, x])
        all_keys = np.concatenate([part.keys, keys])
        wanted = self.wanted_factory(len(vectors), part.factory)
        if self.needs_rebuild(part, len(vectors), wanted):
            return self.new_part(label, vectors, all_keys, part.ids + tuple(ids), wanted)
        x64 = x.astype(np.float64)
        vectors.setflags(write=False)
        return ClassPart(
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

    def shrink(self, part: ClassPart, keys: np.ndarray) -> ClassPart | None:
        rows = part.rows_of(keys)
        keep = np.ones(part.size, dtype=bool)
        keep[rows] = False
        if not keep.any():
            return None
        vectors = np.ascontiguousarray(part.vectors[keep])
        new_keys = part.keys[keep]
        ids = tuple(i for i, k in zip(part.ids, keep, strict=True) if k)
        wanted = self.wanted_factory(len(vectors), part.factory)
        index = None
        if not self.needs_rebuild(part, len(vectors), wanted):
            index = fx.remove_from_index(part.index, keys)
        if index is None:
            return self.new_part(part.label, vectors, new_keys, ids, wanted)
        gone = part.vectors[rows].astype(np.float64)
        vectors.setflags(write=False)
        return ClassPart(
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
