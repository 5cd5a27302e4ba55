"""Fitting a snapshot's calibration: leave-one-out on its own references, now or in the
background (one thread per index family, newest request wins)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from index.calibration import (
    Calibration,
    class_thresholds,
    fit_knn_calibration,
    fit_temperature,
    mean_distance_probabilities,
)
from index.search import knn_candidates, raw_search
from index.snapshot import Snapshot

log = logging.getLogger("index.reference_index")

__all__ = ["Refitter", "fit_calibration"]


def fit_calibration(
    snap: Snapshot, *, k: int, seed: int, calibration_samples: int, unknown_quantile: float
) -> Calibration:
    """Leave-one-out calibration on a stratified, seeded sample of the references."""
    rng = np.random.default_rng([seed, 11])
    per_class = max(1, -(-calibration_samples // len(snap.parts)))
    queries, keys, true = [], [], []
    for c, part in enumerate(snap.parts):
        rows = np.arange(part.size)
        if part.size > per_class:
            rows = np.sort(rng.choice(part.size, size=per_class, replace=False))
        queries.append(part.vectors[rows])
        keys.append(part.keys[rows])
        true.append(np.full(len(rows), c))
    q = np.concatenate(queries)
    ex = np.concatenate(keys)
    y = np.concatenate(true)
    raw = raw_search(snap, q, k, backend="cpu", exclude=ex)
    n_classes = len(snap.parts)
    # a reference alone in its class cannot be predicted correctly with itself left out
    ok = np.isfinite(raw.nearest[np.arange(len(y)), y])
    cand_d, cand_c = knn_candidates(raw, n_classes)
    cand_d, cand_c, mean, yy = cand_d[ok], cand_c[ok], raw.mean[ok], y[ok]
    t_knn, power = fit_knn_calibration(cand_d, cand_c, n_classes, yy)
    t_mean = fit_temperature(lambda t: mean_distance_probabilities(mean, t), yy)
    loo = {part.label: raw.mean[(y == c) & ok, c] for c, part in enumerate(snap.parts)}
    cal = Calibration(
        temperature_knn=t_knn,
        power_knn=power,
        temperature_mean=t_mean,
        thresholds=class_thresholds(loo, unknown_quantile),
        quantile=unknown_quantile,
        n_samples=int(ok.sum()),
        loo_distances=loo,
    )
    log.info(
        "calibrated index v%d on %d references: T_knn=%.4f a_knn=%.3f T_mean=%.4f thresholds=%s",
        snap.version,
        cal.n_samples,
        t_knn,
        power,
        t_mean,
        {k: round(v, 4) for k, v in cal.thresholds.items()},
    )
    return cal


class Refitter:
    """One background thread fitting the calibration of the newest snapshot it was asked for.

    Shared by an index and its forks. Requests that arrive while a fit runs replace each other,
    so a burst of enrollments costs one extra fit, not one per enrollment.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted: tuple[Callable[[Snapshot], Calibration], Snapshot] | None = None
        self._running = False

    def schedule(self, fit: Callable[[Snapshot], Calibration], snap: Snapshot) -> None:
        """Fit ``snap`` with ``fit`` in the background (replacing any request not yet started)."""
        with self._cond:
            self._wanted = (fit, snap)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="index-recalibration", daemon=True).start()

    def wait(self, snap: Snapshot, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: "calibration" in snap.cache, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._wanted is None:
                    self._running = False
                    self._cond.notify_all()
                    return
                fit, snap = self._wanted
                self._wanted = None
            try:
                # Fit without holding the snapshot's lock: searches take it for their own lazy
                # caches (class sums, id arrays), and must not wait for a whole fit (measured:
                # 22 s for the first prediction after an enrollment at 100,000 references).
                if "calibration" not in snap.cache:
                    fitted = fit(snap)
                    with snap.lock:
                        snap.cache.setdefault("calibration", fitted)
            except Exception:  # keep answering with the carried calibration
                log.exception("background recalibration failed")
            with self._cond:
                self._cond.notify_all()
