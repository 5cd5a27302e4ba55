"""The training loop learns for real on synthetic shapes, writes its run directory, resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from tests.training.synthetic import make_folder
from training.checkpoint import load_checkpoint
from training.data import load_source
from training.evaluate import embed_images, evaluate_embeddings
from training.threads import ThreadPolicy, apply_thread_policy
from training.train import TrainConfig, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(
        tmp_path_factory.mktemp("shapes"), {"train": 32, "val": 8, "test": 12}, size=40
    )


def _config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    base = dict(
        data=str(data) if data else None, out=str(out), encoder="resnet9_half",
        encoder_kwargs={"stem_stride": 1}, loss="contrastive", epochs=4, image_size=32,
        batch_size=16, lr=3e-3, warmup_epochs=0.5, patience=None, threads=1,
        n_way_episodes=100, progress_bar=False,
    )  # fmt: skip
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[float]]:
    fractions: list[float] = []
    result = train(_config(shapes, tmp_path_factory.mktemp("run")), progress=fractions.append)
    return result, fractions


def test_learns_far_above_chance(trained: tuple) -> None:
    result, _ = trained
    test = result.metrics["test"]
    # Four classes: chance is 0.25.
    assert test["knn"]["balanced_accuracy"] > 0.8, test["knn"]
    assert result.metrics["evaluated_split"] == "test"


@pytest.mark.parametrize("loss", ["supcon", "hybrid"])
def test_other_losses_learn_too(loss: str, shapes: Path, tmp_path: Path) -> None:
    """The losses added after the first comparison learn the same shapes, not just run."""
    result = train(_config(shapes, tmp_path, loss=loss))
    assert result.metrics["test"]["knn"]["balanced_accuracy"] > 0.8, result.metrics["test"]
    if loss == "hybrid":  # the CE head is a trained parameter of the loss
        state = torch.load(tmp_path / "last.pt", weights_only=False)
        assert "classifier.head.weight" in state["loss"]


@pytest.mark.usefixtures("restore_thread_policy")
def test_train_runs_with_the_process_thread_count_and_leaves_it_alone(
    shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Threads are the process's (training/threads.py): a retrain inside the API must not
    change the request threads' counts, so train() records the count and never sets it."""
    apply_thread_policy(ThreadPolicy.training(1))
    with caplog.at_level(logging.WARNING, logger="training.train"):
        result = train(_config(shapes, tmp_path, epochs=1, threads=2))
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    assert json.loads((result.run_dir / "config.json").read_text())["resolved"]["threads"] == 1
    assert "config.threads is 2 but this process runs 1" in caplog.text


def test_run_directory_contents(trained: tuple) -> None:
    result, fractions = trained
    run = result.run_dir
    for name in ("encoder.pt", "last.pt", "metrics.json", "config.json", "loss_curve.png",
                 "confusion_matrix.png", "embedding_map.png"):  # fmt: skip
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["history"]) == 4
    assert all(h["images_per_second"] > 0 for h in metrics["history"])
    assert "val_balanced_accuracy" in metrics["history"][0]
    config = json.loads((run / "config.json").read_text())
    assert config["encoder"] == "resnet9_half" and config["resolved"]["device"] == "cpu"
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 < fractions[0] < 0.2


def test_checkpoint_reproduces_the_reported_metrics(trained: tuple, shapes: Path) -> None:
    """Rebuild from encoder.pt alone and re-embed the raw images: same test metrics."""
    result, _ = trained
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.classes == ["bars", "checker", "disc", "ring"]
    assert loaded.preprocessing.image_size == 32
    from training.imaging import decode_image

    samples = load_source(shapes)
    by_split = {s: [x for x in samples if x.split == s] for s in ("train", "test")}
    emb = {
        s: embed_images(loaded.encoder, [decode_image(x.path) for x in items], loaded.preprocessing)
        for s, items in by_split.items()
    }
    report = evaluate_embeddings(
        emb["train"], [x.label for x in by_split["train"]],
        emb["test"], [x.label for x in by_split["test"]],
        classes=loaded.classes, episodes=100,
    )  # fmt: skip
    reported = result.metrics["test"]["knn"]["balanced_accuracy"]
    assert report["knn"]["balanced_accuracy"] == pytest.approx(reported, abs=1e-6)


class _Interrupt(Exception):
    pass


def test_resume_continues_exactly(shapes: Path, tmp_path: Path) -> None:
    config = dict(epochs=2, augment=True, encoder="sepconv", encoder_kwargs={})
    train(_config(shapes, tmp_path / "full", **config))

    def stop_in_epoch_two(fraction: float) -> None:
        if fraction > 0.5:  # first step of the second epoch
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(_config(shapes, tmp_path / "cut", **config), progress=stop_in_epoch_two)
    assert (tmp_path / "cut" / "last.pt").is_file()
    resumed = train(_config(shapes, tmp_path / "cut", resume=True, **config))
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["encoder"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["encoder"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_resume_without_last_is_a_clear_error(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(_config(shapes, tmp_path / "none", resume=True))


def test_given_samples_and_classifier_loss(shapes: Path, tmp_path: Path) -> None:
    """The service path: samples instead of --data; a loss with parameters gets optimised."""
    samples = load_source(shapes)
    splits = {s: [x for x in samples if x.split == s] for s in ("train", "val")}
    result = train(
        _config(None, tmp_path, loss="classifier", epochs=2, encoder="sepconv", encoder_kwargs={}),
        samples=splits,  # type: ignore[arg-type]
    )
    assert result.metrics["evaluated_split"] == "val"
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert "head.weight" in state["loss"]
    assert np.isfinite(result.metrics["history"][-1]["train_loss"])


def test_bad_config_fails_before_loading_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        train(TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path), encoder="nope"))
    with pytest.raises(ValueError, match="unknown loss"):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path), loss="nope"))
