"""Evaluation: k-NN, mean-distance and N-way K-shot metrics of embedded references and queries.

Evaluation *is* how the service predicts: the *references* (the train split) go into the
service's own :class:`index.ReferenceIndex` and each *query* is answered by its ``search``, so
the two rules measured are exactly those ``/predict`` serves:

- ``knn``: distance-weighted vote of the ``k`` nearest references (calibrated kernel, see
  ``index/calibration.py``);
- ``mean_distance``: the class whose references are nearest on average (root of the mean
  squared Euclidean distance, exact from the class sums).

and ``n_way``: few-shot episodes as in the source work (one query, ``N`` candidate classes with
``K`` support images each, pick the class of the most similar support, the mean embedding for
``K > 1``).

Images are embedded by :mod:`training.embedding`, the one path the service and the retrain
use too (its functions are re-exported here for existing callers). ``training/`` may import
``index/`` (never the reverse); metric functions are pure functions of arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from training.embedding import embed_images, embed_samples, embed_tensors

log = logging.getLogger(__name__)

__all__ = [
    "classification_report",
    "embed_images",
    "embed_samples",
    "embed_tensors",
    "evaluate_checkpoint",
    "evaluate_embeddings",
    "index_predictions",
    "n_way_accuracy",
]


# --------------------------------------------------------------------------------------------
# Decision rules: the service's own index decides


def index_predictions(
    ref_emb: np.ndarray,
    ref_labels: Sequence[str],
    query_emb: np.ndarray,
    *,
    classes: Sequence[str],
    k: int = 5,
    method: str = "knn",
    index: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices ``(nq,)`` and class probabilities ``(nq, C)`` of ``method``.

    Decided by :class:`index.ReferenceIndex`, the object ``/predict`` searches, so every
    figure that evaluation, the benchmarks and the retrain's promotion report is the rule the
    service answers with (calibrated kernel vote for ``knn``, least mean distance for
    ``mean_distance``). Pass an already built ``index`` to search it instead of building one.
    """
    from index.reference_index import ReferenceIndex

    col = {name: i for i, name in enumerate(classes)}
    nq = len(query_emb)
    probs = np.zeros((nq, len(classes)), dtype=np.float64)
    if nq == 0:
        return np.zeros(0, dtype=np.int64), probs
    if index is None:
        index = ReferenceIndex.build(
            np.asarray(ref_emb, dtype=np.float32),
            [f"r{i}" for i in range(len(ref_labels))],
            list(ref_labels),
            k=k,
            device="cpu",
        )
    results = index.search(np.asarray(query_emb, dtype=np.float32), k=k, method=method)
    pred = np.array([col[r.label] for r in results], dtype=np.int64)
    for i, r in enumerate(results):
        for name, p in r.probabilities.items():
            probs[i, col[name]] = p
    return pred, probs


# --------------------------------------------------------------------------------------------
# Metrics


def _auc_ovr(y_true: np.ndarray, scores: np.ndarray, num_classes: int) -> float | None:
    """Macro one-vs-rest ROC AUC over the classes that occur in the queries.

    Computed per class from that class's score column, so the scores need not be
    probabilities; classes absent from the queries (no positives) are left out, and ``None``
    is returned when no class has both positives and negatives.
    """
    aucs = []
    for c in range(num_classes):
        positives = y_true == c
        if positives.all() or not positives.any():
            continue
        column = np.nan_to_num(scores[:, c], neginf=-1e9, posinf=1e9)
        aucs.append(roc_auc_score(positives, column))
    return float(np.mean(aucs)) if aucs else None


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/support, confusion
    matrix (rows = true, columns = predicted) and one-vs-rest AUC.

    Balanced accuracy and macro F1 average over the classes present in the queries: a class
    with no query has no recall, and counting it as 0 would punish a split for its sampling.
    """
    c = len(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    matrix = np.zeros((c, c), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    support = matrix.sum(1)
    predicted = matrix.sum(0)
    tp = np.diag(matrix)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
    present = support > 0
    n = int(support.sum())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": {"labels": list(classes), "matrix": matrix.tolist()},
        "auc_ovr": _auc_ovr(y_true, scores, c),
    }


def n_way_accuracy(
    ref_emb: np.ndarray,
    ref_idx: np.ndarray,
    query_emb: np.ndarray,
    query_idx: np.ndarray,
    *,
    n_way: int,
    k_shot: int = 1,
    episodes: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """N-way K-shot episodes: ``{"n", "k_shot", "episodes", "accuracy"}``.

    Each episode draws a query, then ``N`` candidate classes (the query's own and ``N-1``
    others) among the classes with at least ``K`` references, and ``K`` support references of
    each; the prediction is the class whose support (mean embedding when ``K > 1``) is
    nearest. ``n`` is capped by the number of eligible classes. Seeded, so repeatable.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(ref_idx, minlength=int(max(ref_idx.max(initial=-1), 0)) + 1)
    eligible = np.flatnonzero(counts >= k_shot)
    n = int(min(n_way, len(eligible)))
    usable = np.flatnonzero(np.isin(query_idx, eligible))
    if n < 2 or len(usable) == 0 or episodes <= 0:
        return {"n": n, "k_shot": k_shot, "episodes": 0, "accuracy": None}
    by_class = {int(c): np.flatnonzero(ref_idx == c) for c in eligible}
    correct = 0
    for _ in range(episodes):
        qi = int(rng.choice(usable))
        true = int(query_idx[qi])
        others = rng.choice(eligible[eligible != true], size=n - 1, replace=False)
        candidates = np.concatenate([[true], others]).astype(int)
        protos = np.stack(
            [
                ref_emb[rng.choice(by_class[int(c)], size=k_shot, replace=False)].mean(0)
                for c in candidates
            ]
        )
        d = ((protos - query_emb[qi]) ** 2).sum(1)
        correct += int(candidates[int(d.argmin())] == true)
    return {"n": n, "k_shot": k_shot, "episodes": episodes, "accuracy": correct / episodes}


def evaluate_embeddings(
    ref_emb: np.ndarray,
    ref_labels: Sequence[str],
    query_emb: np.ndarray,
    query_labels: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    k: int = 5,
    n_way: int | None = None,
    k_shot: int = 1,
    episodes: int = 1000,
    seed: int = 0,
    query_sources: Sequence[str | None] | None = None,
    query_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The evaluate JSON of the product contract.

    ``{"knn": {...}, "mean_distance": {...}, "n_way": {...}}`` where each of ``knn`` and
    ``mean_distance`` has ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``per_class``,
    ``confusion_matrix`` and ``auc_ovr``. ``classes`` fixes the label order (default: sorted
    labels of references and queries); ``n_way`` defaults to the number of classes.

    With ``query_sources`` (one source name per query) the report adds ``per_source``: the
    same ``knn`` / ``mean_distance`` reports over each source's queries alone, all answered by
    the one index of every reference (as a deployment would), and ``source_balanced_accuracy``,
    the mean over sources of their k-NN balanced accuracy. Pooled figures alone would let a
    large source hide a failing one.

    With ``query_ids`` (one name per query, e.g. its path) the report adds ``predictions``:
    ``{"id", "label", "knn", "mean_distance"}`` per query, the labels each rule answered (what
    ``/predict`` answers for the same image against the same references).
    """
    if classes is None:
        classes = sorted(set(ref_labels) | set(query_labels))
    classes = list(classes)
    col = {name: i for i, name in enumerate(classes)}
    unknown = sorted((set(ref_labels) | set(query_labels)) - set(col))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {classes}")
    ref_emb = np.asarray(ref_emb, dtype=np.float32)
    query_emb = np.asarray(query_emb, dtype=np.float32)
    if len(ref_emb) != len(ref_labels) or len(query_emb) != len(query_labels):
        raise ValueError("each embedding needs exactly one label")
    if query_sources is not None and len(query_sources) != len(query_labels):
        raise ValueError("query_sources needs one source per query")
    if query_ids is not None and len(query_ids) != len(query_labels):
        raise ValueError("query_ids needs one id per query")
    if len(ref_emb) == 0:
        raise ValueError("no reference embeddings to evaluate against")
    ref_idx = np.array([col[x] for x in ref_labels], dtype=np.int64)
    query_idx = np.array([col[x] for x in query_labels], dtype=np.int64)
    c = len(classes)

    from index.reference_index import ReferenceIndex

    index = ReferenceIndex.build(
        ref_emb, [f"r{i}" for i in range(len(ref_emb))], list(ref_labels), k=k, device="cpu"
    )
    knn_pred, knn_scores = index_predictions(
        ref_emb, ref_labels, query_emb, classes=classes, k=k, method="knn", index=index
    )
    md_pred, md_scores = index_predictions(
        ref_emb, ref_labels, query_emb, classes=classes, k=k, method="mean_distance", index=index
    )
    report: dict[str, Any] = {
        "knn": {"k": k, **classification_report(query_idx, knn_pred, knn_scores, classes)},
        "mean_distance": classification_report(query_idx, md_pred, md_scores, classes),
        "n_way": n_way_accuracy(
            ref_emb,
            ref_idx,
            query_emb,
            query_idx,
            n_way=n_way if n_way is not None else c,
            k_shot=k_shot,
            episodes=episodes,
            seed=seed,
        ),
        "classes": classes,
        "n_references": len(ref_emb),
        "n_queries": len(query_emb),
    }
    if query_sources is not None:
        sources = np.array([s or "" for s in query_sources])
        per_source: dict[str, Any] = {}
        for name in sorted(set(sources.tolist())):
            rows = sources == name
            per_source[name] = {
                "n_queries": int(rows.sum()),
                "knn": classification_report(
                    query_idx[rows], knn_pred[rows], knn_scores[rows], classes
                ),
                "mean_distance": classification_report(
                    query_idx[rows], md_pred[rows], md_scores[rows], classes
                ),
            }
        report["per_source"] = per_source
        report["source_balanced_accuracy"] = float(
            np.mean([r["knn"]["balanced_accuracy"] for r in per_source.values()])
        )
    if query_ids is not None:
        report["predictions"] = [
            {
                "id": str(qid),
                "label": classes[query_idx[i]],
                "knn": classes[knn_pred[i]],
                "mean_distance": classes[md_pred[i]],
            }
            for i, qid in enumerate(query_ids)
        ]
    return report


def evaluate_checkpoint(
    loaded: Any,
    sources: Sequence[str | Path],
    *,
    split: str = "test",
    k: int = 5,
    n_way: int | None = None,
    k_shot: int = 1,
    episodes: int = 1000,
    device: str = "auto",
    batch_size: int = 64,
    predictions: bool = False,
) -> dict[str, Any]:
    """Evaluate a loaded checkpoint the way a deployment would answer.

    References: the train splits of every source, in one index (as ``cxr references import``
    of each would enroll them); queries: ``split`` of every source, reported pooled and per
    source. Splits are recomputed with the fractions and seed recorded in the checkpoint, so
    a source without given splits is split exactly as in training. ``predictions`` adds each
    query's answers, identified by its path (see :func:`evaluate_embeddings`).
    """
    from training.data import load_sources, split_samples
    from training.devices import resolve_device
    from training.train import TrainConfig

    defaults = TrainConfig()
    cfg = loaded.config
    splits = split_samples(
        load_sources(list(sources)),
        val_fraction=float(cfg.get("val_fraction", defaults.val_fraction)),
        test_fraction=float(cfg.get("test_fraction", defaults.test_fraction)),
        seed=int(cfg.get("seed", defaults.seed)),
    )
    if not splits[split]:
        raise ValueError(f"the {split} split of the given sources is empty; choose another --split")
    dev = resolve_device(device)
    encoder = loaded.encoder.to(dev)
    spec = loaded.preprocessing
    ref_emb, ref_labels, _ = embed_samples(
        encoder, splits["train"], spec, batch_size=batch_size, device=dev
    )
    q_emb, q_labels, q_kept = embed_samples(
        encoder, splits[split], spec, batch_size=batch_size, device=dev
    )
    classes = sorted(set(loaded.classes) | set(ref_labels) | set(q_labels))
    report = evaluate_embeddings(
        ref_emb, ref_labels, q_emb, q_labels, classes=classes, k=k, n_way=n_way,
        k_shot=k_shot, episodes=episodes, seed=int(cfg.get("seed", 0)),
        query_sources=[s.source for s in q_kept],
        query_ids=[str(s.path) for s in q_kept] if predictions else None,
    )  # fmt: skip
    return {"data": [str(s) for s in sources], "split": split, **report}
