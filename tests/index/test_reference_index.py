"""ReferenceIndex against exact float64 NumPy brute force, plus its mutation semantics."""

from __future__ import annotations

import numpy as np
import pytest

from index import factory as fx
from index.errors import EmptyIndexError
from index.reference_index import ReferenceIndex
from index.synthetic import clustered_embeddings, l2_normalize

DIM = 32


def random_refs(n: int, n_classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = l2_normalize(rng.standard_normal((n, DIM)))
    labels = [f"class{int(c)}" for c in rng.integers(0, n_classes, n)]
    ids = [f"ref-{seed}-{i}" for i in range(n)]
    return x, ids, labels


def brute(x: np.ndarray, labels: list[str], q: np.ndarray, k: int):
    """Exact float64 answers: neighbour rows, their distances, per-class mean and nearest."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    d = np.sqrt(np.maximum(0.0, ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    lab = np.asarray(labels)
    classes = sorted(set(labels))
    mean = {c: np.sqrt((d[:, lab == c] ** 2).mean(axis=1)) for c in classes}
    nearest = {c: d[:, lab == c].min(axis=1) for c in classes}
    return order, np.take_along_axis(d, order, axis=1), mean, nearest


def test_exact_index_matches_float64_brute_force() -> None:
    x, ids, labels = random_refs(600)
    q = l2_normalize(np.random.default_rng(1).standard_normal((25, DIM)))
    index = ReferenceIndex.build(x, ids, labels, device="cpu")
    order, dist, mean, nearest = brute(x, labels, q, 7)
    results = index.search(q, k=7)
    for i, r in enumerate(results):
        assert [n.reference_id for n in r.neighbors] == [ids[j] for j in order[i]]
        assert [n.label for n in r.neighbors] == [labels[j] for j in order[i]]
        np.testing.assert_allclose([n.distance for n in r.neighbors], dist[i], atol=1e-5)
        for c in mean:
            assert r.distances[c] == pytest.approx(mean[c][i], abs=1e-5)
            assert r.nearest[c] == pytest.approx(nearest[c][i], abs=1e-5)
    assert index.describe() == dict.fromkeys(sorted(set(labels)), fx.EXACT_FACTORY)


def test_torch_path_gives_the_same_answers_as_faiss_cpu() -> None:
    pytest.importorskip("torch")
    x, ids, labels = random_refs(500, seed=3)
    q = l2_normalize(np.random.default_rng(4).standard_normal((20, DIM)))
    cpu = ReferenceIndex.build(x, ids, labels, device="cpu")
    tch = ReferenceIndex.build(x, ids, labels, device="torch-cpu")
    assert tch.backend == "torch-cpu"
    for method in ("knn", "mean_distance"):
        for a, b in zip(cpu.search(q, method=method), tch.search(q, method=method), strict=True):
            assert [n.reference_id for n in a.neighbors] == [n.reference_id for n in b.neighbors]
            np.testing.assert_allclose(
                [n.distance for n in a.neighbors], [n.distance for n in b.neighbors], atol=1e-5
            )
            assert a.label == b.label and a.unknown == b.unknown
            assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
            for c in a.nearest:
                assert a.nearest[c] == pytest.approx(b.nearest[c], abs=1e-5)


def _gpu_devices() -> list[str]:
    import faiss

    devices = []
    if faiss.get_num_gpus() > 0:
        devices.append("faiss-gpu")
    try:
        import torch

        if torch.cuda.is_available():
            devices.append("torch-cuda")
    except ImportError:  # pragma: no cover
        pass
    return devices


@pytest.mark.parametrize("device", ["faiss-gpu", "torch-cuda"])
def test_gpu_paths_give_the_same_answers_as_faiss_cpu(device: str) -> None:
    if device not in _gpu_devices():
        pytest.skip(f"{device} needs a CUDA GPU (and faiss-gpu for faiss-gpu); none here")
    x, ids, labels = random_refs(800, seed=5)
    q = l2_normalize(np.random.default_rng(6).standard_normal((30, DIM)))
    cpu = ReferenceIndex.build(x, ids, labels, device="cpu")
    gpu = ReferenceIndex.build(x, ids, labels, device=device)
    for a, b in zip(cpu.search(q), gpu.search(q), strict=True):
        assert [n.reference_id for n in a.neighbors] == [n.reference_id for n in b.neighbors]
        assert a.label == b.label
        np.testing.assert_allclose(
            [n.distance for n in a.neighbors], [n.distance for n in b.neighbors], atol=1e-4
        )


def test_add_remove_keep_answers_exact_and_class_sums_exact() -> None:
    x, ids, labels = random_refs(400, seed=7)
    index = ReferenceIndex(DIM, device="cpu")
    index.add(x[:150], ids[:150], labels[:150])
    index.add(x[150:], ids[150:], labels[150:])
    removed = ids[::3]
    assert index.remove(removed) == len(removed)
    keep = [i for i in range(400) if ids[i] not in set(removed)]
    xk, lk = x[keep], [labels[i] for i in keep]
    assert len(index) == len(keep) and sorted(index.ids) == sorted(ids[i] for i in keep)
    assert index.classes() == {c: lk.count(c) for c in sorted(set(lk))}
    for c in index.classes():
        vec_sum, sq_sum, count = index.class_sums(c)
        rows = np.array([j for j, lab in enumerate(lk) if lab == c])
        exact = xk[rows].astype(np.float64)
        np.testing.assert_allclose(vec_sum, exact.sum(axis=0), atol=1e-9)
        assert sq_sum == pytest.approx(float((exact**2).sum()), abs=1e-9)
        assert count == len(rows)
    q = l2_normalize(np.random.default_rng(8).standard_normal((10, DIM)))
    order, _, mean, _ = brute(xk, lk, q, 5)
    for i, r in enumerate(index.search(q)):
        assert [n.reference_id for n in r.neighbors] == [ids[keep[j]] for j in order[i]]
        for c in mean:
            assert r.distances[c] == pytest.approx(mean[c][i], abs=1e-5)


def test_removing_a_whole_class_drops_it_and_unknown_ids_raise() -> None:
    x, ids, labels = random_refs(60, n_classes=3, seed=9)
    index = ReferenceIndex.build(x, ids, labels, device="cpu")
    gone = [i for i, lab in zip(ids, labels, strict=True) if lab == "class1"]
    index.remove(gone)
    assert "class1" not in index.classes()
    assert "class1" not in index.search(x[0]).pop().distances
    with pytest.raises(KeyError, match="not in the index"):
        index.remove(["nope"])
    assert index.remove(["nope"], missing_ok=True) == 0
    with pytest.raises(ValueError, match="already enrolled"):
        index.add(x[:1], [ids[0]], ["class0"])


def test_empty_index_search_is_a_clear_error() -> None:
    index = ReferenceIndex(DIM, device="cpu")
    with pytest.raises(EmptyIndexError, match="enroll"):
        index.search(np.eye(DIM, dtype=np.float32)[:1])
    x, ids, labels = random_refs(5)
    index.add(x, ids, labels)
    index.remove(ids)
    with pytest.raises(EmptyIndexError):
        index.search(x[:1])


def test_bad_inputs_are_rejected_with_instructions() -> None:
    index = ReferenceIndex(DIM, device="cpu")
    with pytest.raises(ValueError, match="L2-normalised"):
        index.add(np.ones((2, DIM), np.float32), ["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        index.add(np.ones((2, 3), np.float32), ["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match="one id and one label"):
        index.add(l2_normalize(np.ones((2, DIM))), ["a"], ["x", "x"])
    x, ids, labels = random_refs(10)
    index.add(x, ids, labels)
    with pytest.raises(ValueError, match="method must be one of"):
        index.search(x[:1], method="cosine")
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        ReferenceIndex(DIM, factory="NotAnIndex")
    with pytest.raises(ValueError, match="device must be one of"):
        ReferenceIndex(DIM, device="tpu")


def test_knn_and_mean_distance_methods_can_disagree_as_designed() -> None:
    rng = np.random.default_rng(10)
    q = l2_normalize(rng.standard_normal((1, DIM)))[0]
    # class "near": one reference right next to the query, the rest on the far side
    near = l2_normalize(
        np.vstack([q + 0.05 * rng.standard_normal(DIM), -q + 0.3 * rng.standard_normal((9, DIM))])
    )
    # class "mid": ten references all moderately close
    mid = l2_normalize(q + 0.9 * rng.standard_normal((10, DIM)))
    x = np.vstack([near, mid])
    labels = ["near"] * 10 + ["mid"] * 10
    index = ReferenceIndex.build(x, [f"r{i}" for i in range(20)], labels, device="cpu", k=1)
    knn = index.search(q)[0]
    mean = index.search(q, method="mean_distance")[0]
    assert knn.label == "near" and knn.method == "knn"
    assert mean.label == "mid" and mean.method == "mean_distance"
    assert mean.distances["mid"] < mean.distances["near"]
    assert knn.nearest["near"] < knn.nearest["mid"]
    for r in (knn, mean):
        assert sum(r.probabilities.values()) == pytest.approx(1.0)
        assert r.confidence == pytest.approx(r.probabilities[r.label])


def test_weighted_vote_prefers_closer_neighbours_over_count() -> None:
    q = np.zeros(DIM, np.float32)
    q[0] = 1.0
    close = l2_normalize(np.tile(q, (2, 1)) + 0.02 * np.eye(DIM, dtype=np.float32)[1:3])
    far = l2_normalize(np.tile(q, (3, 1)) + 1.2 * np.eye(DIM, dtype=np.float32)[3:6])
    x = np.vstack([close, far])
    index = ReferenceIndex.build(
        x, ["c1", "c2", "f1", "f2", "f3"], ["A", "A", "B", "B", "B"], device="cpu", k=5
    )
    result = index.search(q)[0]
    assert result.label == "A"  # 2 close neighbours outvote 3 distant ones


def test_approximate_index_recall_on_clustered_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fx, "AUTO_SWITCH_SIZE", 1000)
    x, _, y = clustered_embeddings(8_000, DIM, n_clusters=40, seed=11, centers_seed=11)
    q, _, _ = clustered_embeddings(100, DIM, n_clusters=40, seed=12, centers_seed=11)
    ids = [f"r{i}" for i in range(len(x))]
    labels = [f"c{v}" for v in y]
    index = ReferenceIndex.build(x, ids, labels, device="cpu", target_recall=0.97)
    assert all(d.startswith("IVF") for d in index.describe().values()), index.describe()
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    results = index.search(q, k=10)
    recall = np.mean(
        [
            len({n.reference_id for n in r.neighbors} & {ids[j] for j in truth[i]}) / 10
            for i, r in enumerate(results)
        ]
    )
    assert recall >= 0.95
    # per-class nearest is still reported for every class, exact or close to it
    exact_near = {c: (q @ x[np.asarray(labels) == c].T).max(axis=1) for c in index.classes()}
    for i, r in enumerate(results):
        for c, score in exact_near.items():
            assert r.nearest[c] >= np.sqrt(max(0.0, 2 - 2 * score[i])) - 1e-5
    # incremental add/remove keep the trained IVF and its tuned nprobe, and stay consistent
    tuned = index.describe()
    index.remove(ids[:50])
    index.add(x[:50], [f"again{i}" for i in range(50)], labels[:50])
    assert len(index) == len(x) and index.describe() == tuned
    assert index.search(x[0], k=1)[0].neighbors[0].reference_id == "again0"


def test_auto_switch_hysteresis() -> None:
    assert fx.auto_factory(100) == fx.EXACT_FACTORY
    assert fx.auto_factory(fx.AUTO_SWITCH_SIZE) == fx.EXACT_FACTORY
    assert fx.auto_factory(fx.AUTO_SWITCH_SIZE + 1).startswith("IVF")
    ivf = fx.auto_factory(fx.AUTO_SWITCH_SIZE + 1)
    assert fx.auto_factory(fx.AUTO_SWITCH_SIZE - 1, ivf) == ivf  # stays IVF just below
    assert fx.auto_factory(fx.AUTO_SWITCH_SIZE // 2 - 1, ivf) == fx.EXACT_FACTORY


def test_explicit_factory_falls_back_to_exact_for_small_classes() -> None:
    x, ids, labels = random_refs(300, n_classes=2, seed=13)
    index = ReferenceIndex.build(x, ids, labels, device="cpu", factory="IVF256,Flat")
    assert set(index.describe().values()) == {fx.EXACT_FACTORY}
    big = ReferenceIndex.build(x, ids, labels, device="cpu", factory="IVF4,Flat")
    assert all(v.startswith("IVF4,Flat") for v in big.describe().values())


def test_auto_stays_exact_on_unstructured_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fx, "AUTO_SWITCH_SIZE", 500)
    rng = np.random.default_rng(14)
    x = l2_normalize(rng.standard_normal((3000, DIM)))  # uniform: IVF cannot prune anything
    index = ReferenceIndex.build(x, [f"u{i}" for i in range(3000)], ["U"] * 3000, device="cpu")
    assert index.describe() == {"U": fx.EXACT_FACTORY}
    index.add(x[:10] * -1.0, [f"n{i}" for i in range(10)], ["U"] * 10)  # no retraining churn
    assert index.describe() == {"U": fx.EXACT_FACTORY}
    order, _, _, _ = brute(np.vstack([x, -x[:10]]), ["U"] * 3010, x[5:6], 5)
    ids = [f"u{i}" for i in range(3000)] + [f"n{i}" for i in range(10)]
    assert [n.reference_id for n in index.search(x[5], k=5)[0].neighbors] == [
        ids[j] for j in order[0]
    ]
