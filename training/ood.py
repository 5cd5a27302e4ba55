"""Is this a frontal chest radiograph at all? A cheap image-level out-of-distribution check.

The reference index flags a query far from every enrolled class as ``unknown``, but an encoder
maps anything to *some* point, and random noise or a holiday photo can land near a class (the
adversarial pass saw noise answered "COVID-19" at 0.73-0.90 confidence). This check looks at
the image itself, before any model, with four properties every frontal chest radiograph shares
and the usual wrong uploads lack:

* ``roughness``: neighbouring pixels of a radiograph are strongly correlated (X-ray images are
  smooth at 128 px); noise is not.
* ``asymmetry``: a frontal (PA/AP) chest is roughly mirror-symmetric left-right; a lateral view,
  a photo or a document is not.
* ``spine_contrast``: in a frontal chest the central column (spine, mediastinum) is brighter
  than the lung fields either side of it.
* ``black_fraction``: a CT slice (or any tomographic image) is a bright disc on a black field;
  more than a third of the image at the very bottom of the range is unusual for a radiograph.

Each property becomes a violation in ``[0, inf)`` (0 = typical of a chest radiograph); the
score is the largest, and ``score > 1`` means "not a chest radiograph". The thresholds were set
on real radiographs (the ``cxr4`` and ``adult`` sets, see docs/BENCHMARKS.md) so that almost none
is flagged; the tests measure the AUROC on a synthetic corpus they build.

Only numpy and Pillow; ``training/`` never imports ``app/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["OOD_THRESHOLD", "OodFeatures", "image_features", "is_out_of_distribution", "ood_score"]

#: Scores above this are "not a chest radiograph".
OOD_THRESHOLD = 1.0
_SIDE = 128

# Violation scales: the feature value at which the violation reaches 1 (the threshold).
_ROUGHNESS_OK, _ROUGHNESS_BAD = 0.35, 0.80
_ASYMMETRY_OK, _ASYMMETRY_BAD = 1.0, 1.3
_SPINE_OK, _SPINE_BAD = -0.02, -0.09
_BLACK_OK, _BLACK_BAD = 0.3, 0.45


@dataclass(frozen=True)
class OodFeatures:
    roughness: float
    asymmetry: float
    spine_contrast: float
    black_fraction: float


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """A ``_SIDE`` x ``_SIDE`` float32 copy (area-averaged, so noise stays noise)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    pil = Image.fromarray(arr, mode="F").resize((_SIDE, _SIDE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


def image_features(image: np.ndarray) -> OodFeatures:
    """The four properties of a decoded ``(H, W)`` image in ``[0, 1]`` (see the module doc)."""
    thumb = _thumbnail(image)
    spread = float(thumb.std()) + 1e-3
    dx = np.abs(np.diff(thumb, axis=1)).mean()
    dy = np.abs(np.diff(thumb, axis=0)).mean()
    roughness = float((dx + dy) / 2.0 / spread)

    body = thumb[int(_SIDE * 0.1) : int(_SIDE * 0.9), int(_SIDE * 0.05) : int(_SIDE * 0.95)]
    mirrored = body[:, ::-1]
    a = body - body.mean()
    b = mirrored - mirrored.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum())) + 1e-9
    asymmetry = float(1.0 - (a * b).sum() / denom)  # 0: perfectly symmetric, up to 2

    rows = thumb[int(_SIDE * 0.25) : int(_SIDE * 0.75)]
    columns = rows.mean(axis=0)
    centre = columns[int(_SIDE * 0.44) : int(_SIDE * 0.56)].mean()
    lungs = np.concatenate(
        [
            columns[int(_SIDE * 0.2) : int(_SIDE * 0.35)],
            columns[int(_SIDE * 0.65) : int(_SIDE * 0.8)],
        ]
    ).mean()
    spine_contrast = float((centre - lungs) / spread / 4.0)

    lo = float(thumb.min())
    black_fraction = float((thumb <= lo + 0.04).mean())
    return OodFeatures(roughness, asymmetry, spine_contrast, black_fraction)


def _violation(value: float, ok: float, bad: float) -> float:
    """0 at or on the good side of ``ok``, 1 at ``bad``, linear beyond."""
    return max(0.0, (value - ok) / (bad - ok))


def ood_score(image: np.ndarray) -> float:
    """How unlike a frontal chest radiograph ``image`` is; above :data:`OOD_THRESHOLD`: not one."""
    f = image_features(image)
    return max(
        _violation(f.roughness, _ROUGHNESS_OK, _ROUGHNESS_BAD),
        _violation(f.asymmetry, _ASYMMETRY_OK, _ASYMMETRY_BAD),
        _violation(f.spine_contrast, _SPINE_OK, _SPINE_BAD),
        _violation(f.black_fraction, _BLACK_OK, _BLACK_BAD),
    )


def is_out_of_distribution(image: np.ndarray, *, threshold: float = OOD_THRESHOLD) -> bool:
    """Whether ``image`` should be answered ``unknown`` whatever the index says."""
    return ood_score(image) > threshold
