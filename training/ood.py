"""Is this a frontal chest radiograph at all? A cheap image-level out-of-distribution check.

The reference index flags a query far from every enrolled class as ``unknown``, but an encoder
maps anything to *some* point, and random noise or a holiday photo can land near a class (the
adversarial pass saw noise answered "COVID-19" at 0.73-0.90 confidence). This check looks at
the image itself, before any model, with properties every frontal chest radiograph shares
and the usual wrong uploads lack:

* ``roughness``: neighbouring pixels of a radiograph are strongly correlated (X-ray images are
  smooth at 128 px); noise is not.
* ``asymmetry``: a frontal (PA/AP) chest is roughly mirror-symmetric left-right; a lateral view,
  a photo or a document is not.
* ``spine_contrast``: in a frontal chest the central column (spine, mediastinum) is brighter
  than the lung fields either side of it.
* ``black_fraction``: a CT slice (or any tomographic image) is a bright disc on a black field;
  more than a third of the image at the very bottom of the range is unusual for a radiograph.
* the frontal layout, two weak signs that only count together (photos and documents passed
  the four checks above two times in three): ``side_contrast``, the centre column brighter than
  the *brighter* of the two lung fields (not their mean: one bright side is no spine), and
  ``profile_symmetry``, the correlation of the column-mean profile with its mirror image. A
  real film may miss one (rotated, a large effusion); a photograph usually misses both.
* ``colourfulness`` (from the uploaded bytes, when given): a radiograph has no hue, even when
  saved as RGB; a colour photo or a screenshot has (the Hasler-Suesstrunk metric, 0-255 scale,
  measured on a thumbnail: JPEGs are decoded at reduced scale, so this costs little).

Each property becomes a violation in ``[0, inf)`` (0 = typical of a chest radiograph); the
score is the largest, and ``score > 1`` means "not a chest radiograph". The thresholds were set
on real radiographs (the ``cxr4`` and ``adult`` sets, see docs/BENCHMARKS.md) so that almost none
is flagged; the tests measure the AUROC on a synthetic corpus they build.

Only numpy and Pillow; ``training/`` never imports ``app/``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "OOD_THRESHOLD",
    "OodFeatures",
    "colourfulness",
    "image_features",
    "is_out_of_distribution",
    "ood_score",
]

#: Scores above this are "not a chest radiograph".
OOD_THRESHOLD = 1.0
_SIDE = 128

# Violation scales: the feature value at which the violation reaches 1 (the threshold).
_ROUGHNESS_OK, _ROUGHNESS_BAD = 0.35, 0.80
_ASYMMETRY_OK, _ASYMMETRY_BAD = 1.0, 1.3
_SPINE_OK, _SPINE_BAD = -0.02, -0.09
_BLACK_OK, _BLACK_BAD = 0.3, 0.45
# The two layout signs add up; each alone reaches 1 only well beyond what real films show.
_SIDE_OK, _SIDE_BAD = 0.0, -0.08
_PROFILE_OK, _PROFILE_BAD = -0.2, -0.8
# Grey films saved as RGB JPEG measure 0-3 (chroma noise); "slightly colourful" starts near 15.
_COLOUR_OK, _COLOUR_BAD = 6.0, 15.0
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "YCbCr", "CMYK", "LAB", "HSV"})


@dataclass(frozen=True)
class OodFeatures:
    roughness: float
    asymmetry: float
    spine_contrast: float
    black_fraction: float
    side_contrast: float
    profile_symmetry: float


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """A ``_SIDE`` x ``_SIDE`` float32 copy (area-averaged, so noise stays noise)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    pil = Image.fromarray(arr, mode="F").resize((_SIDE, _SIDE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


def image_features(image: np.ndarray) -> OodFeatures:
    """The properties of a decoded ``(H, W)`` image in ``[0, 1]`` (see the module doc)."""
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
    left = columns[int(_SIDE * 0.2) : int(_SIDE * 0.35)].mean()
    right = columns[int(_SIDE * 0.65) : int(_SIDE * 0.8)].mean()
    side_contrast = float((centre - max(left, right)) / spread / 4.0)
    profile = columns - columns.mean()
    flipped = profile[::-1]
    norm = float(np.sqrt((profile * profile).sum() * (flipped * flipped).sum())) + 1e-9
    profile_symmetry = float((profile * flipped).sum() / norm)

    lo = float(thumb.min())
    black_fraction = float((thumb <= lo + 0.04).mean())
    return OodFeatures(
        roughness, asymmetry, spine_contrast, black_fraction, side_contrast, profile_symmetry
    )


def _violation(value: float, ok: float, bad: float) -> float:
    """0 at or on the good side of ``ok``, 1 at ``bad``, linear beyond."""
    return max(0.0, (value - ok) / (bad - ok))


def colourfulness(data: bytes) -> float:
    """How colourful an uploaded PNG/JPEG is (0 for grey or anything Pillow does not open).

    Called after the upload was decoded within its memory budget, so opening it again cannot
    exceed it: JPEGs are drafted at reduced scale, other colour images take 3 bytes a pixel.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if img.mode not in _COLOUR_MODES:
            return 0.0
        img.draft("RGB", (_SIDE, _SIDE))
        img = img.convert("RGB")
        img.thumbnail((_SIDE, _SIDE))
    except Exception:  # not an image Pillow reads (DICOM): the pixel checks decide alone
        return 0.0
    rgb = np.asarray(img, dtype=np.float32)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def ood_score(image: np.ndarray, *, data: bytes | None = None) -> float:
    """How unlike a frontal chest radiograph ``image`` is; above :data:`OOD_THRESHOLD`: not one.

    ``data``, the uploaded bytes ``image`` was decoded from, adds the colour check.
    """
    f = image_features(image)
    colour = _violation(colourfulness(data), _COLOUR_OK, _COLOUR_BAD) if data else 0.0
    return max(
        colour,
        _violation(f.roughness, _ROUGHNESS_OK, _ROUGHNESS_BAD),
        _violation(f.asymmetry, _ASYMMETRY_OK, _ASYMMETRY_BAD),
        _violation(f.spine_contrast, _SPINE_OK, _SPINE_BAD),
        _violation(f.black_fraction, _BLACK_OK, _BLACK_BAD),
        _violation(f.side_contrast, _SIDE_OK, _SIDE_BAD)
        + _violation(f.profile_symmetry, _PROFILE_OK, _PROFILE_BAD),
    )


def is_out_of_distribution(
    image: np.ndarray, *, data: bytes | None = None, threshold: float = OOD_THRESHOLD
) -> bool:
    """Whether ``image`` (decoded from ``data``) should be ``unknown`` whatever the index says."""
    return ood_score(image, data=data) > threshold
