"""bench/gradcam_mass.py: the lung-share arithmetic by hand, and a smoke run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.overlay import heat_on_film
from bench.gradcam_mass import mass_shares, run
from tests.training.synthetic import make_folder
from training.checkpoint import save_checkpoint
from training.encoders import create_encoder
from training.preprocess import Preprocessing


def test_mass_shares_by_hand() -> None:
    heat = np.zeros((100, 100), np.float32)
    heat[50, 50] = 3.0  # centre: inside the lung box
    heat[2, 2] = 1.0  # corner: on the border band, outside the box
    lung, border = mass_shares(heat)
    assert lung == pytest.approx(0.75) and border == pytest.approx(0.25)
    assert mass_shares(np.zeros((4, 4))) == (0.0, 0.0)


def test_film_heat_leaves_the_cropped_border_cold() -> None:
    placed = heat_on_film(np.ones((8, 8), np.float32), (100, 50), crop=0.1)
    assert placed.shape == (100, 50)
    assert placed[:10].sum() == 0 and placed[:, :5].sum() == 0 and placed[50, 25] == 1.0
    assert mass_shares(placed)[1] < 0.05


def test_smoke_run_on_synthetic_images(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", {"train": 3, "test": 2}, size=40)
    ckpt = save_checkpoint(
        tmp_path / "enc.pt", encoder=create_encoder("sepconv", embedding_dim=8),
        encoder_name="sepconv", encoder_kwargs={},
        preprocessing=Preprocessing(image_size=32, crop=0.1, equalize=True),
        classes=["bars", "checker", "disc", "ring"], config={}, metrics={},
    )  # fmt: skip
    report = run(ckpt, [data], per_source=5, seed=0)
    part = report["per_source"]["data"]
    assert part["images"] == 5
    assert 0.0 <= part["lung_share"] <= 1.0 and 0.0 <= part["border_share"] <= 0.05
