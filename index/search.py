"""Searching a snapshot: per-class top-k on FAISS CPU, FAISS GPU or torch, and the raw arrays
(neighbours, per-class nearest and mean distances) that answers and calibration are made of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from index import factory as fx
from index.snapshot import ClassPart, Snapshot, cached

__all__ = [
    "DEVICES",
    "Raw",
    "class_stats",
    "distance",
    "knn_candidates",
    "mean_distances",
    "raw_search",
    "reference_ids",
    "resolve_backend",
]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "faiss-gpu", "torch-cuda", "torch-cpu")


@dataclass
class Raw:
    """Per-query arrays computed once and turned into results (or into calibration data)."""

    nb_key: np.ndarray  # (m, k) int64, -1 padding
    nb_dist: np.ndarray  # (m, k) float64, inf padding
    nb_class: np.ndarray  # (m, k) int64, -1 padding
    nearest: np.ndarray  # (m, C) float64, inf where a class has no (other) reference
    mean: np.ndarray  # (m, C) float64, inf where a class has no (other) reference


def distance(scores: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores.astype(np.float64)))


def raw_search(
    snap: Snapshot,
    q: np.ndarray,
    k: int,
    *,
    backend: str,
    exclude: np.ndarray | None = None,
) -> Raw:
    """Neighbours, per-class nearest and mean distances for queries ``q``.

    ``exclude`` (one key per query, for leave-one-out) removes that reference from every
    answer, including from its class's sums.
    """
    m = len(q)
    extra = 0 if exclude is None else 1
    found = search_parts(snap, q, [min(k + extra, p.size) for p in snap.parts], backend)
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
        exact_fallback(part, q, nearest[:, c], exclude)
    s = np.concatenate(cand_s, axis=1)
    kk = np.concatenate(cand_k, axis=1)
    cc = np.concatenate(cand_c, axis=1)
    order = np.lexsort((kk, -s), axis=1)[:, :k]  # by score, ties by key: deterministic
    s = np.take_along_axis(s, order, axis=1)
    kk = np.take_along_axis(kk, order, axis=1)
    cc = np.take_along_axis(cc, order, axis=1)
    nb_dist = np.where(kk >= 0, distance(np.where(np.isfinite(s), s, 0.0)), np.inf)
    finite = np.isfinite(nearest)
    near_d = np.where(finite, distance(np.where(finite, nearest, 0.0)), np.inf)
    return Raw(
        nb_key=kk,
        nb_dist=nb_dist,
        nb_class=cc.astype(np.int64),
        nearest=near_d,
        mean=mean_distances(snap, q, exclude),
    )


def exact_fallback(
    part: ClassPart, q: np.ndarray, nearest_col: np.ndarray, exclude: np.ndarray | None
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


def reference_ids(snap: Snapshot, keys: np.ndarray, classes: np.ndarray) -> list[list[str]]:
    """Reference ids of neighbour keys (``""`` for padding), one vectorised lookup per class."""
    id_arrays = cached(
        snap, "id-arrays", lambda: [np.asarray(p.ids, dtype=object) for p in snap.parts]
    )
    out = np.full(keys.shape, "", dtype=object)
    for c, part in enumerate(snap.parts):
        mask = classes == c
        if mask.any():
            out[mask] = id_arrays[c][np.searchsorted(part.keys, keys[mask])]
    return out.tolist()


def knn_candidates(raw: Raw, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
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


def class_stats(snap: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per snapshot (cached): class sums (C, dim), squared-norm sums (C,), counts, means."""

    def make() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        sums = np.stack([p.vec_sum for p in snap.parts])
        sq = np.array([p.sq_sum for p in snap.parts])
        counts = np.array([p.size for p in snap.parts], dtype=np.float64)
        return sums, sq, counts, sums / counts[:, None]

    return cached(snap, "class-stats", make)


def mean_distances(snap: Snapshot, q: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """Root mean squared distance to each class from the float64 running sums.

    ``|q|^2 - 2 q.mean_c + mean_c(|r|^2)``: O(classes x dim) per query, whatever the class sizes.
    """
    q64 = q.astype(np.float64)
    sums, sq, counts, means = class_stats(snap)
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


def search_parts(
    snap: Snapshot, q: np.ndarray, ks: list[int], backend: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each class sub-index's top ``ks[c]`` (inner products, keys) for queries ``q``."""
    if backend == "cpu":
        return [p.index.search(q, kc) for p, kc in zip(snap.parts, ks, strict=True)]
    if backend == "faiss-gpu":
        gpu = cached(snap, "faiss-gpu", lambda: [fx.index_to_gpu(p.index) for p in snap.parts])
        return [fx.gpu_search(g, q, kc) for g, kc in zip(gpu, ks, strict=True)]
    return torch_search(snap, q, ks, "cuda" if backend == "torch-cuda" else "cpu")


def torch_search(
    snap: Snapshot, q: np.ndarray, ks: list[int], device: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact search with one matrix product in torch (the CUDA path without FAISS GPU)."""
    import torch

    def make() -> tuple[Any, list[int]]:
        matrix = torch.from_numpy(np.concatenate([p.vectors for p in snap.parts])).to(device)
        offsets = np.cumsum([0] + [p.size for p in snap.parts]).tolist()
        return matrix, offsets

    matrix, offsets = cached(snap, f"torch-{device}", make)
    with torch.inference_mode():
        scores = torch.from_numpy(q).to(device) @ matrix.T
        out = []
        for c, (part, kc) in enumerate(zip(snap.parts, ks, strict=True)):
            top = torch.topk(scores[:, offsets[c] : offsets[c + 1]], kc, dim=1)
            s = top.values.cpu().numpy()
            keys = part.keys[top.indices.cpu().numpy()]
            out.append((s, keys))
    return out


def resolve_backend(device: str) -> str:
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
