"""Pixel value conversions shared by the Pillow and DICOM decoders."""

from __future__ import annotations

import numpy as np

from training.imaging.errors import CorruptImageError

__all__ = ["min_max", "rgb_to_gray"]


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
