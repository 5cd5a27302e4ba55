"""Embedding and evaluation: k-NN, mean-distance and N-way K-shot metrics.

Evaluation mirrors how the service predicts: the *references* (the train split) are enrolled,
each *query* is classified from its distances to them. Two rules are measured:

- ``knn``: distance-weighted vote of the ``k`` nearest references (weight ``1/(d + eps)``);
- ``mean_distance``: the class whose references are nearest on average, where the mean distance
  is the root of the mean squared Euclidean distance (exact from the class mean, see
  ``docs/ARCHITECTURE.md``).

and ``n_way``: few-shot episodes as in the source work (one query, ``N`` candidate classes with
``K`` support images each, pick the class of the most similar support, the mean embedding for
``K > 1``).

Distances are computed here with numpy (``d = sqrt(max(0, 2 - 2 a.b))`` for unit vectors) so
training never depends on ``index/``. Metric functions are pure functions of arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from training.preprocess import Preprocessing, preprocess

log = logging.getLogger(__name__)

__all__ = [
    "classification_report",
    "embed_images",
    "embed_samples",
    "embed_tensors",
    "evaluate_embeddings",
    "knn_predict",
    "mean_distance_predict",
    "n_way_accuracy",
    "pairwise_distances",
]


# --------------------------------------------------------------------------------------------
# Embedding


@torch.no_grad()
def embed_tensors(
    encoder: nn.Module,
    tensors: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Embed preprocessed ``(1, S, S)`` tensors (or a ``(N, 1, S, S)`` batch) in eval mode.

    Restores the encoder's train/eval mode afterwards, so the training loop can call it.
    """
    was_training = encoder.training
    encoder.eval()
    device = torch.device(device)
    n = len(tensors)
    out: list[np.ndarray] = []
    try:
        for start in range(0, n, batch_size):
            chunk = tensors[start : start + batch_size]
            x = chunk if isinstance(chunk, torch.Tensor) else torch.stack(list(chunk))
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.bfloat16,
                enabled=autocast_dtype is not None,
            ):
                emb = encoder(x)
            out.append(emb.float().cpu().numpy())
    finally:
        encoder.train(was_training)
    if not out:
        dim = int(getattr(encoder, "embedding_dim", 0))
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_images(
    encoder: nn.Module,
    images: Sequence[np.ndarray],
    spec: Preprocessing,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Embed decoded images (``float32 (H, W)`` in ``[0, 1]``) through the shared preprocessing."""
    return embed_tensors(
        encoder, [preprocess(img, spec) for img in images], batch_size=batch_size, device=device
    )


def embed_samples(
    encoder: nn.Module,
    samples: Sequence[Any],
    spec: Preprocessing,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, list[str]]:
    """Decode, preprocess and embed ``Sample``s; returns ``(embeddings, labels)``.

    Unreadable images are skipped (named in one warning) rather than aborting an evaluation.
    Images are decoded chunk by chunk so memory stays bounded on large sources.
    """
    from training.imaging import decode_image

    embeddings: list[np.ndarray] = []
    labels: list[str] = []
    skipped: list[str] = []
    chunk = max(batch_size, 256)
    for start in range(0, len(samples), chunk):
        tensors: list[torch.Tensor] = []
        for sample in samples[start : start + chunk]:
            try:
                tensors.append(preprocess(decode_image(Path(sample.path)), spec))
            except (ValueError, OSError) as exc:
                skipped.append(f"{Path(sample.path).name} ({exc.__class__.__name__})")
                continue
            labels.append(sample.label)
        if tensors:
            embeddings.append(embed_tensors(encoder, tensors, batch_size=batch_size, device=device))
    if skipped:
        log.warning("skipped %d unreadable images: %s", len(skipped), ", ".join(skipped[:10]))
    if not embeddings:
        dim = int(getattr(encoder, "embedding_dim", 0))
        return np.zeros((0, dim), dtype=np.float32), labels
    return np.concatenate(embeddings), labels


# --------------------------------------------------------------------------------------------
# Distances and decision rules (pure numpy)


def pairwise_distances(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(nq, nr)`` between rows, exact for any vectors (not only unit)."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(refs, dtype=np.float64)
    sq = (q * q).sum(1)[:, None] - 2.0 * q @ r.T + (r * r).sum(1)[None, :]
    return np.sqrt(np.maximum(sq, 0.0))


def knn_predict(
    ref_emb: np.ndarray,
    ref_idx: np.ndarray,
    query_emb: np.ndarray,
    *,
    num_classes: int,
    k: int = 5,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance-weighted k-NN: ``(predicted class index (nq,), vote fractions (nq, C))``.

    Each of the ``k`` nearest references votes ``1 / (d + eps)`` for its class; ties go to the
    class with the smaller index. The vote fractions are the class scores used for the AUC
    (they are what the service reports as k-NN confidence).
    """
    nq = len(query_emb)
    scores = np.zeros((nq, num_classes), dtype=np.float64)
    if nq == 0 or len(ref_emb) == 0:
        return np.zeros(nq, dtype=np.int64), scores
    d = pairwise_distances(query_emb, ref_emb)
    k = min(k, d.shape[1])
    nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
    near_d = np.take_along_axis(d, nearest, axis=1)
    weights = 1.0 / (near_d + eps)
    np.add.at(scores, (np.repeat(np.arange(nq), k), ref_idx[nearest].ravel()), weights.ravel())
    scores /= scores.sum(1, keepdims=True)
    return scores.argmax(1), scores


def class_mean_distances(
    ref_emb: np.ndarray, ref_idx: np.ndarray, query_emb: np.ndarray, *, num_classes: int
) -> np.ndarray:
    """``(nq, C)`` root-mean-squared distance of each query to each class's references.

    ``mean_r |q - r|^2 = |q|^2 - 2 q.mean_r + mean_r |r|^2`` — exact, one dot product per
    class. Classes without references get ``inf``.
    """
    q = np.asarray(query_emb, dtype=np.float64)
    r = np.asarray(ref_emb, dtype=np.float64)
    out = np.full((len(q), num_classes), np.inf)
    q_sq = (q * q).sum(1)
    for c in range(num_classes):
        members = r[ref_idx == c]
        if len(members) == 0:
            continue
        mean = members.mean(0)
        mean_sq = (members * members).sum(1).mean()
        out[:, c] = np.sqrt(np.maximum(q_sq - 2.0 * q @ mean + mean_sq, 0.0))
    return out


def mean_distance_predict(
    ref_emb: np.ndarray, ref_idx: np.ndarray, query_emb: np.ndarray, *, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class of least mean distance: ``(predicted index, scores = -mean distance)``."""
    dist = class_mean_distances(ref_emb, ref_idx, query_emb, num_classes=num_classes)
    return dist.argmin(1) if len(dist) else np.zeros(0, dtype=np.int64), -dist


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
) -> dict[str, Any]:
    """The evaluate JSON of the product contract.

    ``{"knn": {...}, "mean_distance": {...}, "n_way": {...}}`` where each of ``knn`` and
    ``mean_distance`` has ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``per_class``,
    ``confusion_matrix`` and ``auc_ovr``. ``classes`` fixes the label order (default: sorted
    labels of references and queries); ``n_way`` defaults to the number of classes.
    """
    if classes is None:
        classes = sorted(set(ref_labels) | set(query_labels))
    classes = list(classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted((set(ref_labels) | set(query_labels)) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {classes}")
    ref_emb = np.asarray(ref_emb, dtype=np.float32)
    query_emb = np.asarray(query_emb, dtype=np.float32)
    if len(ref_emb) != len(ref_labels) or len(query_emb) != len(query_labels):
        raise ValueError("each embedding needs exactly one label")
    if len(ref_emb) == 0:
        raise ValueError("no reference embeddings to evaluate against")
    ref_idx = np.array([index[x] for x in ref_labels], dtype=np.int64)
    query_idx = np.array([index[x] for x in query_labels], dtype=np.int64)
    c = len(classes)

    knn_pred, knn_scores = knn_predict(ref_emb, ref_idx, query_emb, num_classes=c, k=k)
    md_pred, md_scores = mean_distance_predict(ref_emb, ref_idx, query_emb, num_classes=c)
    return {
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
