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


class _Observed(ReferenceIndex):
    """Every state the index publishes is seen by the reader before the writer goes on.

    The `_snapshot` assignment is where a state becomes visible; here it blocks until a search
    that *started after* it has finished, so a reader is guaranteed to observe every published
    state, however briefly it lives. A replace that publishes an intermediate state (remove,
    then add) is therefore caught deterministically, not by luck of thread scheduling.
    """

    watching = False
    published = 0
    observed = -1

    @property  # type: ignore[override]
    def _snapshot(self):
        return self.__dict__["_snap"]

    @_snapshot.setter
    def _snapshot(self, value) -> None:
        self.__dict__["_snap"] = value
        if not self.watching:
            return
        self.published += 1
        deadline = time.monotonic() + 10
        while self.observed < self.published and time.monotonic() < deadline:
            time.sleep(0.0005)


class _NonAtomicReplace(_Observed):
    """A deliberately broken replace: two publications (empty, then new)."""

    def replace(self, embeddings, ids, labels) -> None:
        self.remove(self.ids)
        self.add(embeddings, ids, labels)


def _states_seen_during_replace(index_cls: type[_Observed]) -> tuple[list[object], int]:
    """Answers a reader saw while `replace` ran (a set of id prefixes and classes, or the
    exception raised), and how many states were published."""
    rng = np.random.default_rng(1)
    old = l2_normalize(rng.standard_normal((50, DIM)))
    new = l2_normalize(rng.standard_normal((70, DIM)))
    index = index_cls.build(old, [f"o{i}" for i in range(50)], ["X"] * 50, device="cpu")
    q = l2_normalize(rng.standard_normal((1, DIM)))
    seen: list[object] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            started_after = index.published
            try:
                r = index.search(q, k=10)[0]
                seen.append(frozenset({n.reference_id[0] for n in r.neighbors} | set(r.distances)))
            except Exception as exc:  # an intermediate empty index raises
                seen.append(type(exc).__name__)
            index.observed = started_after

    index.watching = True
    t = threading.Thread(target=reader)
    t.start()
    try:
        index.replace(new, [f"n{i}" for i in range(70)], ["Y"] * 70)
    finally:
        stop.set()
        t.join(timeout=30)
    assert index.classes() == {"Y": 70}
    with pytest.raises(KeyError):
        index.label_of("o1")
    return seen, index.published


OLD_STATE = frozenset({"o", "X"})
NEW_STATE = frozenset({"n", "Y"})


def test_replace_swaps_everything_at_once() -> None:
    seen, published = _states_seen_during_replace(_Observed)
    assert published == 1
    assert NEW_STATE in seen  # the reader did observe the published state
    assert set(seen) <= {OLD_STATE, NEW_STATE}, set(seen)


def test_the_replace_check_catches_a_non_atomic_replace() -> None:
    """The check above can fail: against a replace that publishes twice it sees the gap."""
    seen, published = _states_seen_during_replace(_NonAtomicReplace)
    assert published == 2
    assert set(seen) - {OLD_STATE, NEW_STATE}, "the intermediate state went unobserved"
