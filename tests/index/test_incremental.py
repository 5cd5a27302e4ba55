"""Copy-on-write forks and background recalibration: what incremental enrollment relies on."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index.reference_index import ReferenceIndex
from index.synthetic import l2_normalize

DIM = 16


def clustered(n: int, seed: int, classes: int = 3) -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((classes, DIM)))
    labels = [f"c{i % classes}" for i in range(n)]
    x = l2_normalize(centres[[i % classes for i in range(n)]] + 0.4 * rng.standard_normal((n, DIM)))
    return x.astype(np.float32), [f"r{seed}-{i}" for i in range(n)], labels


def answers(index: ReferenceIndex, q: np.ndarray) -> list[tuple]:
    return [
        (
            r.label,
            round(r.confidence, 6),
            round(r.outlier_threshold, 6),
            tuple(n.reference_id for n in r.neighbors),
        )
        for r in index.search(q, k=5)
    ]


def test_fork_is_independent_and_shares_the_state() -> None:
    x, ids, labels = clustered(60, 0)
    index = ReferenceIndex.build(x, ids, labels, device="cpu")
    fork = index.fork()
    assert fork.ids == index.ids and fork.version == index.version
    extra, extra_ids, extra_labels = clustered(3, 1)
    fork.add(extra, extra_ids, extra_labels)
    fork.remove(ids[:2])
    assert len(index) == 60 and ids[0] in index.ids and extra_ids[0] not in index.ids
    assert len(fork) == 61 and ids[0] not in fork.ids


def test_background_recalibration_answers_at_once_and_converges_to_the_sync_fit() -> None:
    x, ids, labels = clustered(300, 2)
    q = clustered(20, 3)[0]
    background = ReferenceIndex.build(x, ids, labels, device="cpu", recalibration="background")
    background.wait_calibrated()
    before = background.calibration()
    extra, extra_ids, extra_labels = clustered(6, 4)
    background.add(extra, extra_ids, extra_labels)
    # answers with the carried calibration (no fit in the search) ...
    assert background.calibration() is before
    # ... and converges on exactly what a synchronous index fits for the same references
    assert background.wait_calibrated(timeout=60)
    fresh = ReferenceIndex.build(
        np.concatenate([x, extra]), ids + extra_ids, labels + extra_labels, device="cpu"
    )
    after = background.calibration()
    assert after is not before
    assert after.thresholds == pytest.approx(fresh.calibration().thresholds)
    assert (after.temperature_knn, after.power_knn, after.temperature_mean) == pytest.approx(
        (
            fresh.calibration().temperature_knn,
            fresh.calibration().power_knn,
            fresh.calibration().temperature_mean,
        )
    )
    assert answers(background, q) == answers(fresh, q)


def test_a_new_class_or_a_large_change_refits_before_answering() -> None:
    x, ids, labels = clustered(100, 5)
    index = ReferenceIndex.build(
        x, ids, labels, device="cpu", recalibration="background", max_stale_fraction=0.1
    )
    index.wait_calibrated()
    first = index.calibration()
    new_class = l2_normalize(np.random.default_rng(6).standard_normal((5, DIM))).astype(np.float32)
    index.add(new_class, [f"n{i}" for i in range(5)], ["new"] * 5)
    assert "new" in index.calibration().thresholds  # fitted now, not carried
    second = index.calibration()
    assert second is not first
    many, many_ids, many_labels = clustered(20, 7)  # 20 > 10 % of 105 references
    index.add(many, many_ids, many_labels)
    assert index._snapshot.carried is None
    assert index.calibration() is not second


def test_a_search_does_not_wait_for_the_background_refit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit runs while predictions go on: a search on the new state answers with the
    carried calibration even while the fit is still running (it used to wait for the whole fit
    on the snapshot's lock: 22 s at 100,000 references)."""
    x, ids, labels = clustered(200, 8)
    index = ReferenceIndex.build(x, ids, labels, device="cpu", recalibration="background")
    index.wait_calibrated()
    fitting, release = threading.Event(), threading.Event()
    fit = ReferenceIndex._fit

    def slow_fit(self: ReferenceIndex, snap: object) -> object:
        fitting.set()
        assert release.wait(timeout=60)
        return fit(self, snap)

    monkeypatch.setattr(ReferenceIndex, "_fit", slow_fit)
    fork = index.fork()
    extra, extra_ids, extra_labels = clustered(2, 9)
    fork.add(extra, extra_ids, extra_labels)
    assert not fork.wait_calibrated(timeout=0)  # schedules the refit, touches no cache
    assert fitting.wait(timeout=30)
    answered: list[object] = []
    searcher = threading.Thread(target=lambda: answered.append(fork.search(extra[:1], k=3)))
    searcher.start()
    searcher.join(timeout=20)
    waited = searcher.is_alive()
    release.set()  # let the fit finish whatever happened
    searcher.join(timeout=60)
    assert not waited, "the search waited for the background calibration fit"
    assert answered[0][0].neighbors[0].reference_id == extra_ids[0]
    assert fork.wait_calibrated(timeout=60)
