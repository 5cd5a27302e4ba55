"""How a snapshot maps onto the index file: JSON metadata plus raw arrays per class part.

The byte format (magic, checksum, atomic write) is :mod:`index.persistence`; this module decides
what goes into it, and checks on the way back that every part is consistent before any of it is
used (a part whose ids, keys, vectors and FAISS sub-index disagree in size is refused).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from index import factory as fx
from index.snapshot import ClassPart, Snapshot

__all__ = ["KIND", "dump", "restore"]

KIND = "cxr-reference-index"


def dump(snap: Snapshot, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` of ``snap``; ``config`` is the index's constructor settings."""
    meta = {
        "kind": KIND,
        "dim": snap.dim,
        "version": snap.version,
        "next_key": snap.next_key,
        "config": config,
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
    return meta, arrays


def restore(meta: dict[str, Any], arrays: dict[str, np.ndarray], dim: int) -> Snapshot:
    """The snapshot :func:`dump` wrote. Raises ``KeyError``/``ValueError``/``TypeError`` on an
    inconsistent payload (the caller turns them into an ``IndexFileError`` naming the file)."""
    parts = []
    lookup: dict[str, tuple[str, int]] = {}
    for i, pm in enumerate(meta["parts"]):
        vectors = arrays[f"vectors/{i}"]
        keys = arrays[f"keys/{i}"]
        vectors.setflags(write=False)
        part = ClassPart(
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
        lookup.update({rid: (part.label, int(k)) for rid, k in zip(part.ids, keys, strict=True)})
    return Snapshot(
        version=int(meta["version"]),
        dim=dim,
        parts=tuple(parts),
        lookup=lookup,
        next_key=int(meta["next_key"]),
    )
