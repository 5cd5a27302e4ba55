"""DistributedDataParallel training: the sharded sampler, and 2 real gloo processes on CPU.

The two-process runs go through `cxr train --nproc 2`, which starts torch's own launcher
(torch.distributed.run); they are compared with a one-process run of the same global batch.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import cli
from tests.training.synthetic import make_folder
from training.checkpoint import load_checkpoint
from training.data import balanced_sampler, load_source
from training.distributed import ShardedBatchSampler
from training.evaluate import embed_images, evaluate_embeddings
from training.imaging import decode_image
from training.train import TrainConfig, train

runner = CliRunner()


# ---- the sampler ----------------------------------------------------------------------------


def _labels(n_per_class: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_a_balanced_share_of_the_same_global_batch(world: int) -> None:
    labels = _labels((40, 7, 25, 60))  # one rare class, as COVID-19 in cxr4
    m, per_rank = 2, 8
    np.random.seed(3)
    shards = []
    for rank in range(world):
        np.random.seed(3)  # every rank seeds the global sampler identically
        sampler = balanced_sampler(
            labels, m_per_class=m * world, length=len(labels), batch_size=per_rank * world
        )
        shards.append(
            list(
                ShardedBatchSampler(
                    sampler, groups=labels, global_batch=per_rank * world, rank=rank,
                    world_size=world,
                )
            )
        )  # fmt: skip
    np.random.seed(3)
    one = balanced_sampler(
        labels, m_per_class=m * world, length=len(labels), batch_size=per_rank * world
    )
    global_batches = list(ShardedBatchSampler(one, groups=labels, global_batch=per_rank * world))
    assert len(global_batches) == len(labels) // (per_rank * world)
    for step, batch in enumerate(global_batches):
        parts = [shards[r][step] for r in range(world)]
        # The ranks partition the global batch: same images, none twice.
        assert Counter(i for p in parts for i in p) == Counter(batch)
        for part in parts:
            assert len(part) == per_rank
            counts = Counter(labels[part].tolist())
            # Every class of the global batch, m images each, kept together (positive pairs).
            assert set(counts) == set(labels[batch].tolist()) and set(counts.values()) == {m}
            runs = [k for k, i in enumerate(part) if k == 0 or labels[part[k - 1]] != labels[i]]
            assert len(runs) == len(counts)


def test_uneven_groups_give_sizes_within_one() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2])
    batch = list(range(9))
    shards = [ShardedBatchSampler([], groups=labels, global_batch=9, rank=r, world_size=2)
              for r in range(2)]  # fmt: skip
    sizes = [len(s.shard(batch)) for s in shards]
    assert sorted(sizes) == [4, 5]
    with pytest.raises(ValueError, match="raise --batch-size"):
        ShardedBatchSampler([], groups=labels, global_batch=1, rank=0, world_size=2)


# ---- two gloo processes ---------------------------------------------------------------------

EPOCHS, PER_RANK = 2, 16  # 2 epochs, then resumed for a third
# Two launches of 3 processes each (torch imports dominate): minutes on a loaded 2-core box.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(
        tmp_path_factory.mktemp("shapes"), {"train": 24, "val": 4, "test": 6}, size=32, seed=1
    )


def _args(data: Path, out: Path, **options: object) -> list[str]:
    base = {"--data": data, "--out": out, "--encoder": "resnet9_half", "--loss": "hybrid",
            "--image-size": 32, "--threads": 1, "--seed": 0, **options}  # fmt: skip
    return ["train", *[str(x) for kv in base.items() for x in kv], "--no-progress"]


@pytest.fixture(scope="module")
def runs(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    two = root / "two"
    for epochs, extra in ((EPOCHS, []), (EPOCHS + 1, ["--resume"])):
        result = runner.invoke(
            cli,
            _args(shapes, two, **{"--epochs": epochs, "--batch-size": PER_RANK, "--nproc": 2})
            + extra,
        )
        assert result.exit_code == 0, result.output
        if not extra:
            first = json.loads((two / "metrics.json").read_text())
            (root / "two_before_resume.json").write_text(json.dumps(first))
    train(
        TrainConfig(
            data=str(shapes), out=str(root / "one"), encoder="resnet9_half", loss="hybrid",
            image_size=32, threads=1, seed=0, epochs=EPOCHS, batch_size=2 * PER_RANK,
            progress_bar=False,
        )
    )  # fmt: skip
    return {"two": two, "one": root / "one", "before": root / "two_before_resume.json"}


def test_two_ranks_write_one_run_directory(runs: dict[str, Path]) -> None:
    names = sorted(p.name for p in runs["two"].iterdir())
    expected = ["config.json", "encoder.pt", "last.pt", "metrics.json", "loss_curve.png",
                "confusion_matrix.png", "embedding_map.png"]  # fmt: skip
    assert names == sorted(expected)
    config = json.loads((runs["two"] / "config.json").read_text())["resolved"]
    assert config["world_size"] == 2 and config["global_batch_size"] == 2 * PER_RANK
    assert config["batch_size"] == PER_RANK
    assert json.loads((runs["two"] / "metrics.json").read_text())["world_size"] == 2


def test_resume_under_ddp_continues_the_run(runs: dict[str, Path]) -> None:
    before = json.loads(runs["before"].read_text())["history"]
    after = json.loads((runs["two"] / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in after] == list(range(1, EPOCHS + 2))
    assert after[:EPOCHS] == before  # the resumed run kept the first epochs
    state = torch.load(runs["two"] / "last.pt", weights_only=False)
    assert state["epoch"] == EPOCHS + 1 and len(state["rng_ranks"]) == 2


def test_checkpoint_is_the_same_format_and_reproduces_its_metrics(
    runs: dict[str, Path], shapes: Path
) -> None:
    two = load_checkpoint(runs["two"] / "encoder.pt")
    one = load_checkpoint(runs["one"] / "encoder.pt")
    assert (two.encoder_name, two.embedding_dim, two.classes, two.preprocessing) == (
        one.encoder_name, one.embedding_dim, one.classes, one.preprocessing
    )  # fmt: skip
    a, b = two.encoder.state_dict(), one.encoder.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    # Loaded alone and fed the raw images, it scores what the run reported.
    samples = load_source(shapes)
    split = {s: [x for x in samples if x.split == s] for s in ("train", "test")}
    emb = {
        s: embed_images(two.encoder, [decode_image(x.path) for x in xs], two.preprocessing)
        for s, xs in split.items()
    }
    report = evaluate_embeddings(
        emb["train"], [x.label for x in split["train"]], emb["test"],
        [x.label for x in split["test"]], classes=two.classes, episodes=100,
    )  # fmt: skip
    reported = json.loads((runs["two"] / "metrics.json").read_text())["test"]["knn"]
    assert report["knn"]["balanced_accuracy"] == pytest.approx(reported["balanced_accuracy"])
    assert reported["balanced_accuracy"] > 0.5  # it learned (chance: 0.25)


def test_loss_of_two_ranks_tracks_one_rank_of_twice_the_batch(runs: dict[str, Path]) -> None:
    """Same global batches step for step; only pairs across ranks and BatchNorm statistics
    (per rank of 16 instead of over 32) differ, so the curves stay close."""
    two = [h["train_loss"] for h in json.loads(runs["before"].read_text())["history"]]
    one_metrics = json.loads((runs["one"] / "metrics.json").read_text())
    one = [h["train_loss"] for h in one_metrics["history"]]
    rel = np.abs(np.array(two) - np.array(one)) / np.array(one)
    assert rel.max() < 0.2, (two, one)
    assert two[-1] < two[0] and one[-1] < one[0]
