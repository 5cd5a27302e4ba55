"""The Grad-CAM overlay a clinician sees: the heat map blended on the upload, as a PNG.

The overlay keeps the upload's aspect ratio (not the model's square input) with its long side
capped at `DEFAULT_MAX_SIDE`, and the map lies on the part of the film the preprocessing kept
(its border `crop`), so the colour sits on the anatomy the model actually saw.

Why the PNG is written here instead of by Pillow (measured on the 2-core CPU, one 512x512 RGB
overlay, docs/BENCHMARKS.md "Grad-CAM"): Pillow's PNG encoder tries every row filter on every row
whatever the compression level, 13-27 ms per overlay, more than the whole plain prediction.
`encode_png_rgb` applies the "Up" filter to all rows with one NumPy subtraction (the vertical
gradient of a chest film is what "Up" removes) and deflates with ISA-L (`isal`, level 1):
1.7-2.5 ms against 7-8 ms for zlib's fastest setting, and a smaller file. Without `isal`, zlib's
run-length strategy. The output is a standard 8-bit RGB PNG (IHDR, one IDAT, IEND) that every
decoder reads; tests decode it with Pillow pixel for pixel.
"""

from __future__ import annotations

import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image

try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; plain zlib is the fallback
    isal_zlib = None

from training.preprocess import crop_box

__all__ = [
    "DEFAULT_MAX_SIDE",
    "HEAT_ALPHA",
    "encode_png_rgb",
    "heat_on_film",
    "jet_palette",
    "overlay_png",
    "overlay_size",
]

#: The long side of the returned overlay is capped here (the upload may be 3000 px wide).
DEFAULT_MAX_SIDE = 512
#: Weight of the heat map in the blend; the anatomy stays readable under it.
HEAT_ALPHA = 0.4

#: matplotlib's "jet" as (position, value) control points per channel (its `_jet_data`): the
#: same table without importing matplotlib (17 MB and ~0.4 s) into every API process.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def overlay_size(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """``(w, h)`` with the upload's aspect ratio and the long side capped at ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@cache
def jet_palette() -> np.ndarray:
    """The 'jet' colour table (blue = low, red = high) as ``(256, 3)`` uint8, computed once."""
    x = np.linspace(0.0, 1.0, 256)
    channels = []
    for name in ("red", "green", "blue"):
        points = np.asarray(_JET[name], dtype=np.float64)
        channels.append(np.interp(x, points[:, 0], points[:, 1]))
    return (np.stack(channels, axis=1) * 255.0 + 0.5).astype(np.uint8)


def _on_film(
    heat: Image.Image, shape: tuple[int, int], crop: float, dtype: type[np.generic]
) -> np.ndarray:
    """`heat` resized onto the region of a film of ``shape`` ``(h, w)`` that the preprocessing's
    border ``crop`` kept, zero on the cut borders."""
    h, w = shape
    top, bottom, left, right = crop_box(h, w, crop)
    inner = heat.resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    film = np.zeros((h, w), dtype=dtype)
    film[top:bottom, left:right] = np.asarray(inner, dtype=dtype)
    return film


def heat_on_film(heat: np.ndarray, shape: tuple[int, int], crop: float = 0.0) -> np.ndarray:
    """The model-input map ``heat`` placed on a film of ``shape`` ``(h, w)``: resized onto the
    region the preprocessing's border ``crop`` kept, zero on the cut borders (float32)."""
    image = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
    return _on_film(image, shape, crop, np.float32)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats to 0-255 levels (rounded, clipped)."""
    return (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _heat_levels(heat: np.ndarray, shape: tuple[int, int], crop: float) -> np.ndarray:
    """`heat_on_film` in 0-255 levels, resized as 8-bit (the palette has 256 entries anyway;
    4x cheaper than resizing floats): the palette indices of the overlay's colour layer."""
    image = Image.fromarray(_to_uint8(np.asarray(heat, dtype=np.float32)), mode="L")
    return _on_film(image, shape, crop, np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png_rgb(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` ``(H, W, 3)`` uint8: every row "Up"-filtered, deflated by
    ISA-L at level 1 (zlib's run-length strategy without it; see the module docstring)."""
    pixels = np.ascontiguousarray(rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ValueError(f"expected a non-empty (H, W, 3) array, got shape {pixels.shape}")
    h, w, _ = pixels.shape
    rows = pixels.reshape(h, w * 3)
    filtered = np.empty((h, w * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up": each byte minus the byte above it (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    if isal_zlib is not None:
        data = isal_zlib.compress(filtered.data, 1)
    else:
        deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        data = deflate.compress(filtered.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def overlay_png(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    crop: float = 0.0,
) -> bytes:
    """Blend ``heat`` (any size, ``[0, 1]``) on the grayscale ``image`` ``(H, W)`` as a PNG.

    ``crop`` is the preprocessing's border crop: the model saw only the central part, so the
    map is placed on that part and the cut borders stay cold.
    """
    h, w = image.shape[:2]
    out_w, out_h = overlay_size(w, h, max_side)
    # Downscale first, in float, then quantise: a 2500x2048 film costs 28 ms the other way
    # round (NumPy over five million pixels); `reducing_gap` box-reduces before the bilinear
    # filter (PIL: "indistinguishable from fair resampling in most cases"; measured 2500x2048:
    # 20 ms -> ~9 ms for the whole overlay).
    small = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize(
        (out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    gray = Image.fromarray(_to_uint8(np.asarray(small)), mode="L").convert("RGB")
    colour = Image.fromarray(_heat_levels(heat, (out_h, out_w), crop), mode="P")
    colour.putpalette(jet_palette().tobytes())  # palette lookup in C, not NumPy indexing
    blended = Image.blend(gray, colour.convert("RGB"), HEAT_ALPHA)
    return encode_png_rgb(np.asarray(blended))
