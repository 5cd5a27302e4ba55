"""Site adaptation learns a new hospital from a handful of its images (real learning, not a
lookup): a site whose images carry a style the vendor data never had is recognised far better
after fine-tuning on five images per class of it than before."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import cli
from tests.training.synthetic import CLASSES, draw
from training.bench_adapt import site_metrics
from training.checkpoint import load_checkpoint
from training.data import load_source, split_samples
from training.evaluate import embed_samples, index_predictions
from training.train import TrainConfig, finetune_config, train


def _site_style(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another hospital: inverted film polarity and a strong exposure gradient."""
    ramp = np.linspace(0.0, 0.5, image.shape[1], dtype=np.float32)[None, :]
    return np.clip(1.0 - image * 0.7 + ramp + rng.normal(0, 0.03, image.shape), 0, 1)


def _write(root: Path, counts: dict[str, int], *, styled: bool, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = draw(label, rng, 40)
                if styled:
                    img = _site_style(img, rng)
                Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("adapt")
    vendor = _write(base / "vendor", {"train": 32, "val": 8, "test": 8}, styled=False, seed=0)
    site = _write(base / "site", {"train": 10, "test": 16}, styled=True, seed=1)
    config = TrainConfig(
        data=[str(vendor)], out=str(base / "model"), encoder="resnet9_half",
        encoder_kwargs={"stem_stride": 1}, loss="contrastive", epochs=4, image_size=32,
        batch_size=16, lr=3e-3, warmup_epochs=0.5, threads=1, n_way_episodes=50,
        progress_bar=False, equalize=False,
    )  # fmt: skip
    return {"vendor": vendor, "site": site, "model": train(config).checkpoint}


def _site_accuracy(checkpoint: Path, vendor: Path, site: Path, picks: list) -> float:
    loaded = load_checkpoint(checkpoint)
    enc, spec = loaded.encoder, loaded.preprocessing
    refs = split_samples(load_source(vendor))["train"] + picks
    queries = split_samples(load_source(site))["test"]
    r_emb, r_lab, _ = embed_samples(enc, refs, spec)
    q_emb, q_lab, _ = embed_samples(enc, queries, spec)
    classes = sorted(set(r_lab))
    pred, _ = index_predictions(r_emb, r_lab, q_emb, classes=classes)
    return site_metrics(q_lab, [classes[i] for i in pred], classes)["balanced_accuracy"]


def test_fine_tuning_on_five_site_images_per_class_learns_the_site(
    world: dict[str, Path], tmp_path: Path
) -> None:
    site_train = split_samples(load_source(world["site"]))["train"]
    picks = [s for label in CLASSES for s in [x for x in site_train if x.label == label][:5]]
    picks = [dataclasses.replace(s, source="site") for s in picks]
    before = _site_accuracy(world["model"], world["vendor"], world["site"], picks)

    vendor_train = split_samples(load_source(world["vendor"]))["train"]
    config = finetune_config(world["model"], out=str(tmp_path / "ft"), threads=1,
                             epoch_images=256, batch_size=32, progress_bar=False)  # fmt: skip
    result = train(config, samples={"train": vendor_train + picks, "val": []})
    tuned = load_checkpoint(result.checkpoint)
    base = load_checkpoint(world["model"])
    assert tuned.preprocessing == base.preprocessing and tuned.encoder_name == base.encoder_name
    after = _site_accuracy(result.checkpoint, world["vendor"], world["site"], picks)
    assert after >= before + 0.2 and after > 0.7, (before, after)


def test_bench_adapt_rows(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "adapt.json"
    result = CliRunner().invoke(
        cli,
        ["bench", "adapt", "--data", str(world["vendor"]), "--site", str(world["site"]),
         "--checkpoint", str(world["model"]), "--k", "2", "--repeats", "2",
         "--adapt-repeats", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["k"], r["stage"]) for r in rows] == [
        (0, "zero_shot"),
        (2, "enrolled"),
        (2, "adapted"),
    ]
    for row in rows:
        assert row["site"] == "site"
        assert set(row) >= {
            "site",
            "k",
            "stage",
            "balanced_accuracy",
            "recall",
            "covid_false_positive_rate",
            "minutes",
            "vendor_balanced_accuracy",
        }
        assert set(row["recall"]) == set(CLASSES)
        assert 0.0 <= row["balanced_accuracy"] <= 1.0
    assert rows[2]["minutes"] > 0


def test_site_metrics_by_hand() -> None:
    m = site_metrics(
        ["Normal", "Normal", "Pneumonia", "Pneumonia"],
        ["Normal", "COVID-19", "Pneumonia", "COVID-19"],
        ["Normal", "Pneumonia"],
    )
    assert m["balanced_accuracy"] == 0.5
    assert m["recall"] == {"Normal": 0.5, "Pneumonia": 0.5}
    assert m["covid_false_positive_rate"] == 0.5
