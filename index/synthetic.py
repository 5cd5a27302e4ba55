"""Seeded synthetic embeddings for tests and benchmarks.

Learned embeddings are not uniform on the sphere: images of one kind cluster, and each cluster
varies along a few directions (a low intrinsic dimension) plus small isotropic noise. Benchmarks
and recall bounds measured on uniform random vectors would be pessimistic for IVF, benchmarks on
point-like clusters optimistic, so the generator exposes both knobs and the benchmark also reports
uniform data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clustered_embeddings", "l2_normalize", "uniform_embeddings"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm, float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def clustered_embeddings(
    n: int,
    dim: int,
    *,
    n_clusters: int = 64,
    n_classes: int = 4,
    spread: float = 0.35,
    rank: int = 16,
    noise: float = 0.03,
    seed: int = 0,
    centers_seed: int | None = None,
    chunk: int = 65_536,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded mixture of Gaussian clusters on the unit sphere.

    Each cluster has a random unit centre, a random ``rank``-dimensional subspace along which
    points vary with standard deviation ``spread`` per direction, and isotropic noise of standard
    deviation ``noise`` per coordinate; points are then L2-normalised. Cluster ``j`` belongs to
    class ``j % n_classes`` (a class is a union of clusters, as a diagnosis covers several
    appearances).

    ``centers_seed`` fixes the clusters independently of ``seed`` so that references and queries
    can be drawn from the *same* mixture with different samples.

    Returns ``(embeddings (n, dim) float32, cluster (n,) int64, class (n,) int64)``.
    """
    crng = np.random.default_rng(seed if centers_seed is None else centers_seed)
    centers = l2_normalize(crng.standard_normal((n_clusters, dim), dtype=np.float32))
    rank = max(1, min(rank, dim))
    bases = crng.standard_normal((n_clusters, rank, dim), dtype=np.float32) / np.float32(
        np.sqrt(dim)
    )
    rng = np.random.default_rng([seed, 1])
    cluster = rng.integers(0, n_clusters, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):  # chunks keep peak memory ~ one output copy at 1M x 256
        stop = min(n, start + chunk)
        c = cluster[start:stop]
        coef = rng.standard_normal((stop - start, rank), dtype=np.float32) * np.float32(spread)
        x = centers[c] + np.einsum("nr,nrd->nd", coef, bases[c])
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(noise)
        out[start:stop] = l2_normalize(x)
    return out, cluster.astype(np.int64), (cluster % n_classes).astype(np.int64)


def uniform_embeddings(n: int, dim: int, *, seed: int = 0, chunk: int = 65_536) -> np.ndarray:
    """``n`` points uniform on the unit sphere (normalised Gaussians), float32: the hard case."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        out[start:stop] = l2_normalize(rng.standard_normal((stop - start, dim), dtype=np.float32))
    return out
