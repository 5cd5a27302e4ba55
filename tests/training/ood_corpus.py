"""A small corpus for the out-of-distribution check: synthetic frontal chest radiographs and
the usual wrong uploads (noise, photos, laterals, CT slices), all drawn here; never patient data.

The frontal "radiograph" is a crude phantom with the anatomy the check relies on and a real
radiograph has: a bright body with two darker, mirror-image lung fields, a bright spine and
mediastinum in the middle, ribs, soft edges, mild quantum noise, random pose and exposure. The
negatives: uniform / Gaussian / salt-and-pepper noise, real photographs (the two sample photos
scikit-learn ships, cropped and rotated) and synthetic scenes, a lateral chest phantom (one lung
shadow, the spine at the back) and an axial CT slice (a bright disc on black).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

KINDS_NEGATIVE = ("noise", "photo", "scene", "lateral", "ct")


def _finish(img: np.ndarray, rng: np.random.Generator, blur: float = 2.0) -> np.ndarray:
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8), mode="L")
    pil = pil.filter(ImageFilter.GaussianBlur(blur))
    out = np.asarray(pil, dtype=np.float32) / 255.0
    out = out + rng.normal(0, 0.01, out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def frontal(rng: np.random.Generator, size: tuple[int, int] = (256, 240)) -> np.ndarray:
    """A frontal chest phantom, ``float32 (H, W)`` in ``[0, 1]``."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w / 2 + rng.uniform(-0.03, 0.03) * w
    img = np.full((h, w), rng.uniform(0.05, 0.15), np.float32)
    body = ((xx - cx) / (0.46 * w)) ** 2 + ((yy - 0.55 * h) / (0.6 * h)) ** 2 < 1
    img[body] = rng.uniform(0.55, 0.7)
    lung_w, lung_h = rng.uniform(0.15, 0.19) * w, rng.uniform(0.27, 0.33) * h
    offset = rng.uniform(0.19, 0.23) * w
    lung_level = rng.uniform(0.3, 0.4)
    for side in (-1, 1):
        lung = ((xx - (cx + side * offset)) / lung_w) ** 2 + ((yy - 0.47 * h) / lung_h) ** 2 < 1
        img[lung] = lung_level + rng.uniform(-0.02, 0.02)
    period = rng.uniform(0.07, 0.09) * h
    ribs = (np.sin(2 * np.pi * (yy + 0.15 * np.abs(xx - cx)) / period) > 0.6) & (img < 0.5)
    img[ribs] += 0.08
    spine = np.abs(xx - cx) < rng.uniform(0.05, 0.07) * w
    img[spine & body] = rng.uniform(0.75, 0.85)
    heart = ((xx - cx - 0.05 * w) / (0.13 * w)) ** 2 + ((yy - 0.62 * h) / (0.13 * h)) ** 2 < 1
    img[heart] = np.maximum(img[heart], rng.uniform(0.65, 0.75))
    gain = rng.uniform(0.85, 1.1)
    return _finish(img * gain, rng, blur=rng.uniform(1.5, 3.0))


def lateral(rng: np.random.Generator, size: tuple[int, int] = (256, 240)) -> np.ndarray:
    """A lateral chest phantom: one lung shadow, spine at the back (right), sternum in front."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), rng.uniform(0.05, 0.15), np.float32)
    body = ((xx - 0.5 * w) / (0.42 * w)) ** 2 + ((yy - 0.55 * h) / (0.6 * h)) ** 2 < 1
    img[body] = rng.uniform(0.55, 0.7)
    lung = ((xx - 0.48 * w) / (0.26 * w)) ** 2 + ((yy - 0.45 * h) / (0.32 * h)) ** 2 < 1
    img[lung] = rng.uniform(0.3, 0.4)
    spine = (xx > 0.74 * w) & (xx < 0.84 * w) & body
    img[spine] = rng.uniform(0.75, 0.85)
    heart = ((xx - 0.38 * w) / (0.16 * w)) ** 2 + ((yy - 0.62 * h) / (0.14 * h)) ** 2 < 1
    img[heart] = rng.uniform(0.6, 0.7)
    return _finish(img, rng, blur=rng.uniform(1.5, 3.0))


def ct_slice(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """An axial CT slice phantom: a bright body disc with two dark lungs, on black."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    body = ((xx - size / 2) / (0.42 * size)) ** 2 + ((yy - size / 2) / (0.3 * size)) ** 2 < 1
    img[body] = rng.uniform(0.5, 0.6)
    for side in (-1, 1):
        lung = ((xx - size / 2 - side * 0.18 * size) / (0.13 * size)) ** 2 + (
            (yy - size / 2) / (0.2 * size)
        ) ** 2 < 1
        img[lung] = rng.uniform(0.02, 0.08)
    img[(np.hypot(xx - size / 2, yy - 0.72 * size) < 0.05 * size)] = 0.95
    return _finish(img, rng, blur=1.0)


def noise(rng: np.random.Generator, size: int = 192) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.uniform(0, 1, (size, size)).astype(np.float32)
    if kind == 1:
        return np.clip(rng.normal(0.5, 0.2, (size, size)), 0, 1).astype(np.float32)
    return (rng.uniform(0, 1, (size, size)) > 0.5).astype(np.float32)


def _sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images  # shipped with the package, no download

    photos = []
    for rgb in load_sample_images().images:
        gray = Image.fromarray(rgb).convert("L")
        photos.append(np.asarray(gray, dtype=np.float32) / 255.0)
    return photos


def photo(rng: np.random.Generator, _cache: list[np.ndarray] = []) -> np.ndarray:  # noqa: B006
    """A random crop (and flip / rotation) of one of the real sample photographs."""
    if not _cache:
        _cache.extend(_sample_photos())
    src = _cache[int(rng.integers(0, len(_cache)))]
    h, w = src.shape
    ch, cw = int(h * rng.uniform(0.4, 0.9)), int(w * rng.uniform(0.4, 0.9))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = src[y : y + ch, x : x + cw]
    return np.ascontiguousarray(np.rot90(crop, int(rng.integers(0, 4))))


def scene(rng: np.random.Generator, size: int = 200) -> np.ndarray:
    """A synthetic 'document or screenshot': rectangles and lines of text-like strokes."""
    img = np.full((size, size), rng.uniform(0.7, 1.0), np.float32)
    for _ in range(int(rng.integers(5, 15))):
        y0, x0 = rng.integers(0, size - 10, 2)
        hh, ww = rng.integers(3, size // 3, 2)
        img[y0 : y0 + hh, x0 : x0 + ww] = rng.uniform(0, 1)
    return _finish(img, rng, blur=0.5)


def negative(kind: str, rng: np.random.Generator) -> np.ndarray:
    return {"noise": noise, "photo": photo, "scene": scene, "lateral": lateral, "ct": ct_slice}[
        kind
    ](rng)


def corpus(seed: int = 0, per_kind: int = 12) -> tuple[list[np.ndarray], list[int], list[str]]:
    """``(images, labels, kinds)``: label 1 = not a chest radiograph, 0 = frontal phantom.
    As many frontal images as negatives of all kinds together."""
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    labels: list[int] = []
    kinds: list[str] = []
    for kind in KINDS_NEGATIVE:
        for _ in range(per_kind):
            images.append(negative(kind, rng))
            labels.append(1)
            kinds.append(kind)
    for _ in range(per_kind * len(KINDS_NEGATIVE)):
        images.append(frontal(rng))
        labels.append(0)
        kinds.append("frontal")
    return images, labels, kinds
