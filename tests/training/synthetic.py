"""Synthetic chest-X-ray-like images for fast tests: drawn shapes and textures per class.

Each class has a distinct pattern (disc, bar, ring, checker) drawn at a random position and size
on a noisy background, so a small encoder must actually learn shape to separate them: pixel
means alone do not give the class away (intensities are randomised per image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("disc", "bars", "ring", "checker")


def draw(label: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """One ``float32 (size, size)`` image in ``[0, 1]`` of class ``label``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    dist = np.hypot(yy - cy, xx - cx)
    if label == "disc":
        mask = dist < r
    elif label == "ring":
        mask = np.abs(dist - r) < 0.1 * size
    elif label == "bars":
        period = rng.uniform(5, 8)
        mask = (np.sin(2 * np.pi * xx / period + rng.uniform(0, 6)) > 0.3) & (dist < 1.4 * r)
    elif label == "checker":
        period = rng.uniform(5, 8)
        mask = ((xx // period + yy // period) % 2 == 0) & (dist < 1.4 * r)
    else:
        raise ValueError(label)
    bg, fg = rng.uniform(0.1, 0.35), rng.uniform(0.6, 0.9)
    img = np.where(mask, fg, bg) + rng.normal(0, 0.05, (size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def make_arrays(
    n_per_class: int, *, classes: tuple[str, ...] = CLASSES, size: int = 40, seed: int = 0
) -> tuple[list[np.ndarray], list[str]]:
    """``n_per_class`` images of each class and their labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in classes:
        for _ in range(n_per_class):
            images.append(draw(label, rng, size))
            labels.append(label)
    return images, labels


def make_folder(
    root: Path,
    counts: dict[str, int],
    *,
    classes: tuple[str, ...] = CLASSES,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """Write ``root/SPLIT/CLASS/*.png`` with ``counts[SPLIT]`` images per class; returns root."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (draw(label, rng, size) * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}_{i:03d}.png")
    return root
