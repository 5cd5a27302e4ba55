"""`cxr bench index`: latency and recall of the reference index against NumPy brute force.

What is measured, per data set, size, factory and batch size (1 and 64 queries per call):

- ``p50_ms`` / ``p99_ms``: wall time of one :meth:`ReferenceIndex.search` call (the whole answer
  the service uses: k-NN, per-class nearest and mean distances, vote, calibrated confidence,
  unknown flag), after a warm-up call that also fits the calibration.
- ``recall_at_10``: overlap of the returned 10 neighbours with the exact top 10.
- ``brute_p50_ms``: the baseline, in the same process on the same data: one float32 NumPy matrix
  product against all references plus ``argpartition`` and a sort of the top k. ``speedup`` is
  ``brute_p50_ms / p50_ms``.
- ``build_s``: enrolment of all references (IVF training and ``nprobe`` tuning included) plus the
  leave-one-out calibration; ``memory_mb``: reference vectors plus FAISS structures.

Everything runs on **one CPU core**: FAISS via ``faiss.omp_set_num_threads(1)``, and every BLAS
and OpenMP pool loaded in the process (NumPy's OpenBLAS, the OpenBLAS and libgomp bundled with
faiss-cpu) via ``threadpoolctl.threadpool_limits(1)``, which works after import (the environment
variables ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` would only work if set before the first
import, which the ``cxr`` entry point cannot guarantee). The limits in force are logged.

Data: a seeded mixture of Gaussian clusters on the sphere (``clustered``: one cluster per 1000
references, each with a 16-dimensional spread plus isotropic noise, classes = clusters modulo
``--classes``), queries drawn from the same mixture; and ``uniform`` random unit vectors, the
worst case for IVF (no structure to exploit), reported as measured.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import typer

from index.reference_index import ReferenceIndex
from index.synthetic import clustered_embeddings, uniform_embeddings

log = logging.getLogger(__name__)

__all__ = ["bench_index_command", "run_index_bench"]

DATASETS = ("clustered", "uniform")
_COLUMNS = (
    ("dataset", "{}"),
    ("size", "{:,}"),
    ("batch", "{}"),
    ("index", "{}"),
    ("p50_ms", "{:.3f}"),
    ("p99_ms", "{:.3f}"),
    ("recall_at_10", "{:.3f}"),
    ("brute_p50_ms", "{:.2f}"),
    ("speedup", "{:.1f}x"),
    ("build_s", "{:.1f}"),
    ("memory_mb", "{:.0f}"),
)


@contextmanager
def single_thread() -> Iterator[None]:
    """Limit FAISS, BLAS and OpenMP to one thread for the duration (restored afterwards)."""
    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            pools = {
                f"{p['internal_api']}:{Path(p['filepath']).name}": p["num_threads"]
                for p in threadpool_info()
            }
            log.info("thread pools during the benchmark: %s", pools)
            yield
    finally:
        faiss.omp_set_num_threads(before)


def _make_data(
    dataset: str, n: int, n_queries: int, dim: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if dataset == "clustered":
        n_clusters = max(16, n // 1000)
        refs, _, labels = clustered_embeddings(
            n, dim, n_clusters=n_clusters, n_classes=n_classes, seed=seed, centers_seed=seed
        )
        queries, _, _ = clustered_embeddings(
            n_queries,
            dim,
            n_clusters=n_clusters,
            n_classes=n_classes,
            seed=seed + 1,
            centers_seed=seed,
        )
        return refs, labels, queries
    if dataset == "uniform":
        refs = uniform_embeddings(n, dim, seed=seed)
        labels = np.random.default_rng([seed, 3]).integers(0, n_classes, n)
        return refs, labels, uniform_embeddings(n_queries, dim, seed=seed + 1)
    raise typer.BadParameter(f"unknown data set {dataset!r}; use {', '.join(DATASETS)}")


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[np.ndarray, list[Any]]:
    times, outs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs.append(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(times), outs


def _brute_topk(refs: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The baseline: float32 matrix product, argpartition, sort of the k best (rows of refs)."""
    scores = q @ refs.T if q.ndim == 2 else (refs @ q)[None, :]
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def run_index_bench(
    sizes: Sequence[int],
    *,
    dim: int = 256,
    n_queries: int = 200,
    batch: int = 64,
    datasets: Sequence[str] = DATASETS,
    factories: Sequence[str] = ("auto",),
    n_classes: int = 4,
    k: int = 10,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the benchmark and return its rows (see the module docstring for each field)."""
    rows: list[dict[str, Any]] = []
    with single_thread():
        for dataset in datasets:
            for n in sizes:
                if n <= k:
                    raise typer.BadParameter(f"size {n} must exceed k={k}")
                for row in _bench_size(
                    dataset, n, dim, n_queries, batch, factories, n_classes, k, seed
                ):
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def _bench_size(
    dataset: str,
    n: int,
    dim: int,
    n_queries: int,
    batch: int,
    factories: Sequence[str],
    n_classes: int,
    k: int,
    seed: int,
) -> Iterator[dict[str, Any]]:
    t0 = time.perf_counter()
    refs, labels, queries = _make_data(dataset, n, n_queries, dim, n_classes, seed)
    log.info("%s n=%d: data in %.1fs", dataset, n, time.perf_counter() - t0)
    q_batch = queries[: min(batch, n_queries)]
    batch_reps = max(3, n_queries // max(batch, 1))
    brute_single, truth = _timed_iter(lambda q: _brute_topk(refs, q, k), queries)
    truth_rows = np.concatenate(truth)
    brute_batch, _ = _timed(lambda: _brute_topk(refs, q_batch, k), batch_reps)
    log.info("%s n=%d: brute force p50 %.2f ms", dataset, n, np.percentile(brute_single, 50))
    ids = [str(i) for i in range(n)]
    label_names = [f"class{c}" for c in labels]
    for factory in factories:
        t0 = time.perf_counter()
        index = ReferenceIndex(dim, factory=factory, device="cpu", k=k, seed=seed)
        index.add(refs, ids, label_names)
        index.calibration()
        build_s = time.perf_counter() - t0
        log.info("%s n=%d %s: built in %.1fs: %s", dataset, n, factory, build_s, index.describe())
        index.search(queries[:1])  # warm-up
        single, results = _timed_iter(lambda q, ix=index: ix.search(q, k=k)[0], queries)
        batched, _ = _timed(lambda ix=index: ix.search(q_batch, k=k), batch_reps)
        hits = [
            len({int(nb.reference_id) for nb in r.neighbors} & set(truth_rows[i].tolist()))
            for i, r in enumerate(results)
        ]
        recall = float(np.mean(hits)) / k
        kinds = sorted(set(index.describe().values()))
        desc = " | ".join(kinds) + f" x{len(index.classes())} classes"
        for b, times, brute in ((1, single, brute_single), (len(q_batch), batched, brute_batch)):
            p50 = float(np.percentile(times, 50))
            brute_p50 = float(np.percentile(brute, 50))
            yield {
                "dataset": dataset,
                "size": n,
                "dim": dim,
                "batch": b,
                "factory": factory,
                "index": desc,
                "p50_ms": p50,
                "p99_ms": float(np.percentile(times, 99)),
                "recall_at_10": recall,
                "brute_p50_ms": brute_p50,
                "speedup": brute_p50 / max(p50, 1e-9),
                "build_s": build_s,
                "memory_mb": index.memory_bytes() / 2**20,
                "classes": len(index.classes()),
                "queries": len(times) * b,
                "threads": 1,
            }


def _timed_iter(
    fn: Callable[[np.ndarray], Any], queries: np.ndarray
) -> tuple[np.ndarray, list[Any]]:
    times, outs = [], []
    for q in queries:
        t0 = time.perf_counter()
        outs.append(fn(q))
        times.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(times), outs


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of the main columns."""
    header = [name for name, _ in _COLUMNS]
    body = [[fmt.format(row[name]) for name, fmt in _COLUMNS] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) <= 0:
        raise typer.BadParameter("sizes must be positive integers, e.g. 10000,100000")
    return values


def bench_index_command(
    sizes: str = typer.Option(
        "10000,100000,1000000", "--sizes", help="Comma-separated reference counts."
    ),
    dim: int = typer.Option(256, "--dim", help="Embedding size."),
    queries: int = typer.Option(200, "--queries", help="Single queries timed per size."),
    batch: int = typer.Option(64, "--batch", help="Queries per call in the batched rows."),
    datasets: str = typer.Option(
        "clustered,uniform", "--datasets", help="Comma-separated: clustered, uniform."
    ),
    factory: list[str] = typer.Option(
        ["auto"], "--factory", help="Index factory (repeatable), e.g. auto, Flat, IVF1024,Flat."
    ),
    classes: int = typer.Option(4, "--classes", help="Number of classes the references form."),
    k: int = typer.Option(10, "--k", help="Neighbours per query (recall is recall@k)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data."),
    out: Path | None = typer.Option(None, "--out", help="Write the JSON rows to this file."),
) -> None:
    """Benchmark the reference index on one CPU core against NumPy brute force."""
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    for name in names:
        if name not in DATASETS:
            raise typer.BadParameter(f"unknown data set {name!r}; use {', '.join(DATASETS)}")
    rows = run_index_bench(
        _int_list(sizes),
        dim=dim,
        n_queries=queries,
        batch=batch,
        datasets=names,
        factories=factory,
        n_classes=classes,
        k=k,
        seed=seed,
        on_row=lambda row: log.info("row: %s", json.dumps(row)),
    )
    typer.echo(format_table(rows))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        typer.echo(f"wrote {len(rows)} rows to {out}")


def main() -> None:  # pragma: no cover - `python -m index.bench` without the `cxr` entry point
    """Run the benchmark as ``python -m index.bench`` (same options as ``cxr bench index``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = typer.Typer(add_completion=False)
    app.command()(bench_index_command)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
