"""Searches racing with add/remove/replace see one whole state, never a mix."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from index.reference_index import ReferenceIndex
from index.synthetic import l2_normalize

DIM = 24


def test_concurrent_search_sees_before_or_after_never_a_mix() -> None:
    rng = np.random.default_rng(0)
    q = l2_normalize(rng.standard_normal((1, DIM)))
    base = l2_normalize(rng.standard_normal((300, DIM)))
    base_ids = [f"a{i}" for i in range(300)]
    base_labels = ["A" if i % 2 else "B" for i in range(300)]
    # each batch adds references ever closer to the query, so every state has its own answer
    batches = []
    for j in range(8):
        near = l2_normalize(q + (1.0 - 0.07 * j) * rng.standard_normal((8, DIM)))
        batches.append((near, [f"b{j}-{i}" for i in range(8)], ["C"] * 8))

    # expected answers of every state, computed on a private index
    expected = []
    probe = ReferenceIndex.build(base, base_ids, base_labels, device="cpu", calibration_samples=100)
    states = [probe.search(q)[0]]
    for emb, ids, labels in batches:
        probe.add(emb, ids, labels)
        states.append(probe.search(q)[0])
    for _, ids, _ in batches:
        probe.remove(ids)
        states.append(probe.search(q)[0])
    for s in states:
        expected.append(
            (tuple(n.reference_id for n in s.neighbors), tuple(sorted(s.distances.items())))
        )

    index = ReferenceIndex.build(base, base_ids, base_labels, device="cpu", calibration_samples=100)
    seen: list[tuple] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                r = index.search(q)[0]
                seen.append(
                    (tuple(n.reference_id for n in r.neighbors), tuple(sorted(r.distances.items())))
                )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()

    def wait_for_readers() -> None:  # let the readers observe every state at least twice
        target = len(seen) + 2
        deadline = time.monotonic() + 10
        while len(seen) < target and time.monotonic() < deadline and not errors:
            time.sleep(0.001)

    try:
        for emb, ids, labels in batches:
            index.add(emb, ids, labels)
            wait_for_readers()
        for _, ids, _ in batches:
            index.remove(ids)
            wait_for_readers()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    assert len(seen) >= 2 * 2 * len(batches)
    allowed = set(expected)
    mixed = [s for s in seen if s not in allowed]
    assert not mixed, f"{len(mixed)} of {len(seen)} answers match no single state: {mixed[0]}"


def test_replace_swaps_everything_at_once() -> None:
    rng = np.random.default_rng(1)
    old = l2_normalize(rng.standard_normal((50, DIM)))
    new = l2_normalize(rng.standard_normal((70, DIM)))
    index = ReferenceIndex.build(old, [f"o{i}" for i in range(50)], ["X"] * 50, device="cpu")
    q = l2_normalize(rng.standard_normal((1, DIM)))
    v0 = index.version
    results: list[set[str]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            r = index.search(q, k=10)[0]
            results.append({n.reference_id[0] for n in r.neighbors} | set(r.distances))

    t = threading.Thread(target=reader)
    t.start()
    try:
        index.replace(new, [f"n{i}" for i in range(70)], ["Y"] * 70)
    finally:
        stop.set()
        t.join(timeout=30)
    assert index.version == v0 + 1 and index.classes() == {"Y": 70}
    assert all(r in ({"o", "X"}, {"n", "Y"}) for r in results), results[:3]
    with pytest.raises(KeyError):
        index.label_of("o1")
