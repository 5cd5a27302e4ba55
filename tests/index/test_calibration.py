"""Calibrated confidence, unknown-class flagging and its recalibration on change."""

from __future__ import annotations

import numpy as np
import pytest

from index.calibration import MAX_DISTANCE, class_thresholds, expected_calibration_error
from index.reference_index import ReferenceIndex
from index.synthetic import clustered_embeddings, l2_normalize

DIM = 32


def overlapping(n: int, seed: int, separation: float = 0.3):
    """Four classes around close centres: accuracy well below 1, so calibration matters."""
    centres = l2_normalize(np.random.default_rng(100).standard_normal((4, DIM)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = l2_normalize(centres[y] * separation + rng.standard_normal((n, DIM)) / np.sqrt(DIM))
    return x, None, y


@pytest.mark.parametrize("method", ["knn", "mean_distance"])
def test_confidence_is_calibrated_on_overlapping_clusters(method: str) -> None:
    x, _, y = overlapping(3000, seed=1)
    q, _, yq = overlapping(2000, seed=2)
    index = ReferenceIndex.build(
        x, [f"r{i}" for i in range(len(x))], [f"c{v}" for v in y], device="cpu", k=10
    )
    results = index.search(q, method=method)
    conf = np.array([r.confidence for r in results])
    correct = np.array([r.label == f"c{t}" for r, t in zip(results, yq, strict=True)])
    accuracy = correct.mean()
    assert 0.4 < accuracy < 0.97, "the data must be ambiguous for this test to mean anything"
    ece = expected_calibration_error(conf, correct)
    assert ece < 0.04, (ece, accuracy, conf.mean())
    cal = index.calibration()
    assert cal.temperature_knn > 0 and cal.temperature_mean > 0 and cal.power_knn > 0
    if method == "knn":  # the raw vote share (power 1) is measurably worse calibrated
        raw = ReferenceIndex.build(
            x, [f"r{i}" for i in range(len(x))], [f"c{v}" for v in y], device="cpu", k=10
        )
        snap_cal = raw.calibration()
        object.__setattr__(snap_cal, "power_knn", 1.0)
        raw_conf = np.array([r.confidence for r in raw.search(q)])
        assert expected_calibration_error(raw_conf, correct) > ece + 0.02


def test_expected_calibration_error_basics() -> None:
    assert expected_calibration_error(np.full(100, 0.7), np.arange(100) < 70) == pytest.approx(0)
    assert expected_calibration_error(np.full(10, 1.0), np.zeros(10, bool)) == pytest.approx(1)
    assert expected_calibration_error(np.array([]), np.array([])) == 0.0


def test_unknown_flags_a_held_out_cluster_but_few_enrolled_queries() -> None:
    x, cluster, _ = clustered_embeddings(
        4000, DIM, n_clusters=6, n_classes=6, spread=0.25, seed=3, centers_seed=3
    )
    q, qcluster, _ = clustered_embeddings(
        3000, DIM, n_clusters=6, n_classes=6, spread=0.25, seed=4, centers_seed=3
    )
    enrolled = cluster != 5
    labels = [f"k{c}" for c in cluster[enrolled]]
    index = ReferenceIndex.build(
        x[enrolled], [f"r{i}" for i in range(int(enrolled.sum()))], labels, device="cpu"
    )
    assert "k5" not in index.classes()
    results = index.search(q)
    unknown = np.array([r.unknown for r in results])
    held_out = qcluster == 5
    assert unknown[held_out].mean() > 0.9
    # by construction ~5 % of in-distribution queries exceed the 0.95 quantile
    assert unknown[~held_out].mean() < 0.12
    r = results[int(np.flatnonzero(held_out)[0])]
    assert r.outlier_score == pytest.approx(r.distances[r.label])
    assert r.outlier_threshold == index.calibration().thresholds[r.label]


def test_threshold_moves_when_references_change_and_is_never_stale() -> None:
    x, _, y = clustered_embeddings(800, DIM, n_clusters=4, n_classes=2, spread=0.2, seed=5)
    ids = [f"r{i}" for i in range(len(x))]
    labels = [f"c{v}" for v in y]
    index = ReferenceIndex.build(x[:400], ids[:400], labels[:400], device="cpu")
    q = x[500:501]
    before = index.search(q)[0]
    cal_before = index.calibration()
    # add a wide, noisy batch to one class: its nearest-neighbour spread (and threshold) grows
    wide, _, _ = clustered_embeddings(300, DIM, n_clusters=4, n_classes=2, spread=1.5, seed=6)
    index.add(wide, [f"w{i}" for i in range(300)], ["c0"] * 300)
    cal_after = index.calibration()
    assert cal_after is not cal_before
    assert cal_after.thresholds["c0"] != pytest.approx(cal_before.thresholds["c0"])
    after = index.search(q)[0]
    assert after.outlier_threshold == cal_after.thresholds[after.label]
    # removing the batch restores the state, so the calibration returns to the same values
    index.remove([f"w{i}" for i in range(300)])
    assert index.calibration().thresholds == pytest.approx(cal_before.thresholds)
    assert index.search(q)[0].outlier_threshold == pytest.approx(before.outlier_threshold)


def test_quantile_is_configurable() -> None:
    x, _, y = clustered_embeddings(600, DIM, n_clusters=4, n_classes=2, spread=0.4, seed=7)
    ids = [f"r{i}" for i in range(len(x))]
    labels = [f"c{v}" for v in y]
    lo = ReferenceIndex.build(x, ids, labels, device="cpu", unknown_quantile=0.5)
    hi = ReferenceIndex.build(x, ids, labels, device="cpu", unknown_quantile=0.99)
    for c in lo.classes():
        assert lo.calibration().thresholds[c] < hi.calibration().thresholds[c]


def test_thresholds_fall_back_when_a_class_is_too_small() -> None:
    loo = {"big": np.linspace(0.1, 0.5, 100), "tiny": np.array([0.9]), "none": np.empty(0)}
    t = class_thresholds(loo, 0.95)
    pooled = np.quantile(np.concatenate([loo["big"], loo["tiny"]]), 0.95)
    assert t["big"] == pytest.approx(np.quantile(loo["big"], 0.95))
    assert t["tiny"] == pytest.approx(pooled) and t["none"] == pytest.approx(pooled)
    assert class_thresholds({"a": np.empty(0)}, 0.95) == {"a": MAX_DISTANCE}


def test_single_references_per_class_still_answer() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = ReferenceIndex.build(x, ["a", "b", "c"], ["A", "B", "C"], device="cpu")
    r = index.search(x[0])[0]
    assert r.label == "A" and r.outlier_threshold == MAX_DISTANCE and not r.unknown


def test_a_few_mislabeled_references_do_not_make_an_unknown_class_look_known() -> None:
    """Stray references of class B inside an unenrolled class's region (label noise, as in
    report-mined labels) put a B reference next to every query of that class. A score on the
    nearest reference would call those queries typical B; the mean distance to B does not."""
    rng = np.random.default_rng(12)
    dim = 8
    axes = np.eye(dim)

    def cloud(centre: np.ndarray, n: int) -> np.ndarray:
        return l2_normalize(centre + 0.2 / np.sqrt(dim) * rng.standard_normal((n, dim)))

    refs = np.concatenate([cloud(axes[0], 300), cloud(axes[1], 285), cloud(axes[2], 15)])
    labels = ["A"] * 300 + ["B"] * 300  # the last 15 "B" lie where the unknown class lives
    index = ReferenceIndex.build(refs, [f"r{i}" for i in range(600)], labels, device="cpu")
    known = index.search(np.concatenate([cloud(axes[0], 100), cloud(axes[1], 100)]))
    unknown = index.search(cloud(axes[2], 100))
    assert all(r.label == "B" for r in unknown)  # the strays decide the label ...
    assert np.mean([r.unknown for r in unknown]) > 0.9  # ... but not the familiarity
    assert np.mean([r.unknown for r in known]) < 0.1
    # the nearest-reference distance would not have flagged them: it is as small as a known one's
    near_unknown = np.median([r.nearest["B"] for r in unknown])
    near_known = np.quantile([r.nearest[r.label] for r in known], 0.95)
    assert near_unknown < near_known
