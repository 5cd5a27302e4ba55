"""evaluate_embeddings against hand-made examples."""

from __future__ import annotations

import numpy as np
import pytest

from index.reference_index import ReferenceIndex
from training.evaluate import (
    classification_report,
    evaluate_embeddings,
    index_predictions,
    n_way_accuracy,
)

CLASSES = ["a", "b", "c"]


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clusters(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 8)
    x = np.concatenate([centres[i] + noise * rng.normal(size=(n, 8)) for i in range(3)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [c for c in CLASSES for _ in range(n)]


def test_report_has_the_spec_keys() -> None:
    ref, ref_y = _clusters(5, 0.05)
    q, q_y = _clusters(3, 0.05, seed=1)
    report = evaluate_embeddings(ref, ref_y, q, q_y, classes=CLASSES, episodes=50)
    for method in ("knn", "mean_distance"):
        r = report[method]
        assert set(r) >= {
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "per_class",
            "confusion_matrix",
            "auc_ovr",
        }
        assert set(r["per_class"]["a"]) == {"precision", "recall", "support"}
        assert r["confusion_matrix"]["labels"] == CLASSES
    assert set(report["n_way"]) == {"n", "k_shot", "episodes", "accuracy"}


def test_perfect_separation_scores_one() -> None:
    ref, ref_y = _clusters(6, 0.05)
    q, q_y = _clusters(4, 0.05, seed=2)
    report = evaluate_embeddings(ref, ref_y, q, q_y, classes=CLASSES, k=3, episodes=100)
    for method in ("knn", "mean_distance"):
        r = report[method]
        assert r["accuracy"] == r["balanced_accuracy"] == r["macro_f1"] == 1.0
        assert r["auc_ovr"] == 1.0
        assert r["confusion_matrix"]["matrix"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    assert report["n_way"] == {"n": 3, "k_shot": 1, "episodes": 100, "accuracy": 1.0}


def test_known_confusion() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2])
    scores = np.eye(3)[y_pred]
    r = classification_report(y_true, y_pred, scores, CLASSES)
    assert r["confusion_matrix"]["matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert r["per_class"]["a"] == {"precision": 0.75, "recall": 0.75, "support": 4}
    assert r["per_class"]["b"]["precision"] == pytest.approx(0.5)
    f1 = [0.75, 0.5, 1.0]
    assert r["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_classes_missing_from_queries_are_left_out_of_averages() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 2])
    scores = np.eye(3)[y_pred]
    r = classification_report(y_true, y_pred, scores, CLASSES)
    assert r["per_class"]["c"]["support"] == 0
    assert r["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert r["auc_ovr"] is not None  # computed over a and b only


@pytest.mark.parametrize("method", ["knn", "mean_distance"])
def test_evaluation_decides_exactly_like_the_service_index(method: str) -> None:
    # Overlapping clusters, so the rule matters: a 1/(d+eps) vote and the index's calibrated
    # kernel disagree on some of these queries.
    ref, ref_y = _clusters(12, 0.6, seed=4)
    q, _ = _clusters(10, 0.6, seed=5)
    pred, probs = index_predictions(ref, ref_y, q, classes=CLASSES, k=5, method=method)
    served = ReferenceIndex.build(ref, [f"id{i}" for i in range(len(ref))], ref_y, k=5).search(
        q, k=5, method=method
    )
    assert [CLASSES[i] for i in pred] == [r.label for r in served]
    for row, r in zip(probs, served, strict=True):
        np.testing.assert_allclose(row, [r.probabilities[c] for c in CLASSES], rtol=1e-6)


def test_per_source_report_separates_a_failing_source() -> None:
    ref, ref_y = _clusters(8, 0.05)
    q, q_y = _clusters(4, 0.05, seed=7)
    # Source "far": its queries carry the wrong labels, so only it scores badly.
    q_y_far = [CLASSES[(CLASSES.index(y) + 1) % 3] for y in q_y]
    report = evaluate_embeddings(
        ref, ref_y, np.concatenate([q, q]), q_y + q_y_far, classes=CLASSES, episodes=10,
        query_sources=["near"] * len(q) + ["far"] * len(q),
    )  # fmt: skip
    per = report["per_source"]
    assert per["near"]["knn"]["balanced_accuracy"] == 1.0
    assert per["far"]["knn"]["balanced_accuracy"] == 0.0
    assert per["near"]["n_queries"] == per["far"]["n_queries"] == len(q)
    assert report["source_balanced_accuracy"] == pytest.approx(0.5)
    assert report["knn"]["balanced_accuracy"] == pytest.approx(0.5)


def test_n_way_accuracy_is_seeded_and_chance_on_noise() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 16))
    ref_idx = np.repeat(np.arange(4), 10)
    q = rng.normal(size=(40, 16))
    q_idx = np.repeat(np.arange(4), 10)
    a = n_way_accuracy(ref, ref_idx, q, q_idx, n_way=2, k_shot=3, episodes=2000, seed=5)
    b = n_way_accuracy(ref, ref_idx, q, q_idx, n_way=2, k_shot=3, episodes=2000, seed=5)
    assert a == b
    assert a["n"] == 2 and a["k_shot"] == 3
    assert 0.4 < a["accuracy"] < 0.6  # 2-way chance on pure noise


def test_n_way_uses_mean_support_embedding() -> None:
    # Class a references straddle the query; no single a reference is nearer than b's,
    # but their mean is exactly on the query.
    ref = np.array([[1.0, 1.0], [1.0, -1.0], [1.2, 0.0]])
    ref_idx = np.array([0, 0, 1])
    q = np.array([[1.0, 0.0]])
    one = n_way_accuracy(ref[[0, 2]], np.array([0, 1]), q, np.array([0]), n_way=2, episodes=20)
    two = n_way_accuracy(ref, ref_idx, q, np.array([0]), n_way=2, k_shot=1, episodes=20)
    assert one["accuracy"] == 0.0
    assert two["n"] == 2
    ref2 = np.array([[1.0, 1.0], [1.0, -1.0], [1.3, 0.0], [1.3, 0.0]])
    both = n_way_accuracy(ref2, np.array([0, 0, 1, 1]), q, np.array([0]), n_way=2, k_shot=2,
                          episodes=20)  # fmt: skip
    assert both["accuracy"] == 1.0


def test_unknown_label_is_an_error() -> None:
    ref, ref_y = _clusters(2, 0.1)
    with pytest.raises(ValueError, match="not among the classes"):
        evaluate_embeddings(ref, ref_y, ref[:1], ["z"], classes=CLASSES)
