"""Micro-batching of concurrent forwards: batches really form, and every caller gets its own
rows, through the batcher alone and through concurrent `/predict` requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.serving.batcher import MicroBatcher
from tests.app.conftest import new_key
from tests.app.conftest_predict import enroll_classes, post_predict, register_in, synthetic_xray


def _slow_square_sums(calls: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(0.05)  # the forward is in progress while the other callers queue
        return (x.reshape(len(x), -1) ** 2).sum(axis=1, keepdims=True)

    return forward


def test_concurrent_calls_are_batched_and_each_gets_its_rows() -> None:
    calls: list[int] = []
    batcher = MicroBatcher(_slow_square_sums(calls), max_batch=8, idle_exit_s=0.2)
    inputs = [np.full((1, 2, 2), float(i)) for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        outs = list(pool.map(batcher, inputs))
    for i, out in enumerate(outs):
        assert out.shape == (1, 1) and out[0, 0] == pytest.approx(4.0 * i * i)
    stats = batcher.stats()
    assert stats.images == 12 and sum(calls) == 12
    assert stats.batches == len(calls) < 12
    assert stats.multi_request_batches >= 1 and 1 < stats.largest_batch <= 8
    assert max(calls) <= 8


def test_errors_reach_every_caller_and_the_thread_ends_when_idle() -> None:
    def broken(_x: np.ndarray) -> np.ndarray:
        raise RuntimeError("forward failed")

    batcher = MicroBatcher(broken, idle_exit_s=0.1)
    with pytest.raises(RuntimeError, match="forward failed"):
        batcher(np.zeros((1, 3)))
    deadline = time.monotonic() + 5
    while any(t.name == "cxr-batcher" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the batcher thread did not end when idle"
        time.sleep(0.05)
    # A new submission starts a new thread.
    ok = MicroBatcher(lambda x: x * 2, idle_exit_s=0.1)
    np.testing.assert_array_equal(ok(np.ones((2, 3))), np.full((2, 3), 2.0))


def test_concurrent_predictions_are_batched_and_answer_like_sequential_ones(
    make_settings: Callable[..., Settings], checkpoint_a: Path
) -> None:
    settings = make_settings(
        predict_batch_max=8, predict_batch_wait_ms=40.0, inference_workers=6, ood_check=False
    )
    app = create_app(settings)
    with TestClient(app) as client:
        register_in(app, checkpoint_a)
        enroll_classes(client, {"X-API-Key": new_key(app, "clinician")}, per_class=4)
        reader = {"X-API-Key": new_key(app, "reader")}
        queries = [synthetic_xray("disc", seed=700 + i) for i in range(6)]
        queries += [synthetic_xray("stripes", seed=800 + i) for i in range(6)]

        def ask(data: bytes) -> dict:
            response = post_predict(client, reader, data, explain=False)
            assert response.status_code == 200, response.text
            return response.json()

        sequential = [ask(q) for q in queries]
        batcher = app.state.service.bundle.model.batcher
        assert batcher is not None
        before = batcher.stats()
        with ThreadPoolExecutor(max_workers=6) as pool:
            concurrent = list(pool.map(ask, queries))
        after = batcher.stats()
    assert after.multi_request_batches > before.multi_request_batches
    assert after.images - before.images == len(queries)
    assert [a["label"] for a in sequential] == ["disc"] * 6 + ["stripes"] * 6
    for seq, con in zip(sequential, concurrent, strict=True):
        assert con["label"] == seq["label"]
        assert con["distances"] == pytest.approx(seq["distances"], abs=1e-5)
        assert [n["reference_id"] for n in con["neighbors"]] == [
            n["reference_id"] for n in seq["neighbors"]
        ]
