"""Pixel value conversions shared by the Pillow and DICOM decoders."""

from __future__ import annotations

import numpy as np

from training.imaging.errors import CorruptImageError

__all__ = ["bit_depth_to_unit", "min_max", "rgb_to_gray"]


def min_max(arr: np.ndarray) -> np.ndarray:
    """Scale to ``[0, 1]`` in ``float32``, in place when ``arr`` is already a float32 copy we
    own (one pixel-sized buffer instead of three); a constant image becomes all zeros."""
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    lo = float(np.min(arr))
    hi = float(np.max(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise CorruptImageError(
            "The image contains non-finite pixel values; the file is damaged. Export it again."
        )
    if hi <= lo:
        arr.fill(0.0)
        return arr
    arr -= np.float32(lo)
    arr /= np.float32(hi - lo)
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def rgb_to_gray(arr: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the same weights Pillow uses for ``convert("L")`` (float32)."""
    gray = arr[..., 0].astype(np.float32)
    gray *= np.float32(0.299)
    gray += arr[..., 1].astype(np.float32) * np.float32(0.587)
    gray += arr[..., 2].astype(np.float32) * np.float32(0.114)
    return gray


# --------------------------------------------------------------------------------------------
# PNG / JPEG through Pillow


def bit_depth_to_unit(arr: np.ndarray, significant_bits: int | None) -> np.ndarray:
    """Scale integer grayscale to ``[0, 1]`` by its bit depth (PNG, and DICOM without a window).

    Medical 16-bit PNGs often hold 10-, 12- or 14-bit data: dividing by 65535 would give an
    almost black image. We divide by ``2**bits - 1`` where ``bits`` is the declared ``sBIT``
    depth, or else the smallest depth (at least 8) that holds the image's maximum value. This
    keeps one fixed scale per bit depth (unlike a per-image min-max stretch) while never
    clipping to 8 bits.
    """
    # float32 holds every 16-bit value exactly; work in place on one copy (memory budget).
    arr = arr.astype(np.float32)
    lo = float(arr.min()) if arr.size else 0.0
    if lo < 0:  # signed 32-bit data: shift so that the minimum is black
        arr -= np.float32(lo)
    peak = float(arr.max()) if arr.size else 0.0
    if significant_bits is not None and peak <= 2**significant_bits - 1:
        bits = significant_bits
    else:
        bits = max(8, int(np.ceil(np.log2(peak + 1.0))) if peak > 0 else 8)
    arr /= np.float32(2**bits - 1)
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr
