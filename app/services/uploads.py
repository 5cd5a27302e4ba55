"""Turning an uploaded file into pixels, within a memory budget: one path for every upload.

Prediction, enrollment and the bulk import all call :func:`decode_upload`, so they share the
same limits, in this order, each checked before the memory it guards is spent:

1. bytes: ``CXR_MAX_UPLOAD_MB`` (413);
2. shape, from the header: the shorter side at least ``CXR_MIN_IMAGE_SIDE`` and the aspect
   ratio at most ``CXR_MAX_ASPECT_RATIO`` (422: a 1x1 icon or a 10000x10 strip is no
   radiograph and gets no diagnosis);
3. a decode slot: at most ``effective_inference_workers`` decodes run at once in this process,
   whichever route they come from (enrollment had no limit: four parallel 49-megapixel
   uploads took +5 GB), so the process's peak is bounded by base + slots x budget;
4. the decode itself with ``CXR_MAX_PIXELS`` and ``CXR_MAX_DECODE_MB`` (413, from the header:
   bit depth and channels included, Deflated DICOM inflated with a bound).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from app.config import Settings
from training.imaging import (
    DegenerateImageError,
    ImageTooLargeError,
    decode_image,
    read_image_size,
)

logger = logging.getLogger(__name__)

__all__ = ["check_image_shape", "decode_slots", "decode_upload"]

_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def decode_slots(size: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore bounding concurrent decodes (one per configured size).

    Process-wide on purpose: memory is a per-process resource, and two apps in one process
    (tests) or a route plus a worker thread must share the same bound.
    """
    with _SLOTS_LOCK:
        slots = _SLOTS.get(size)
        if slots is None:
            slots = _SLOTS[size] = threading.BoundedSemaphore(size)
        return slots


def check_image_shape(width: int, height: int, *, settings: Settings) -> None:
    """Refuse (422) an image too small or too elongated to be a radiograph."""
    short, long = min(width, height), max(width, height)
    if short < settings.min_image_side:
        raise DegenerateImageError(
            f"The image is {width}x{height} pixels; a radiograph needs at least "
            f"{settings.min_image_side} pixels on its shorter side (CXR_MIN_IMAGE_SIDE). "
            "Upload the full-resolution image."
        )
    if long > settings.max_aspect_ratio * short:
        raise DegenerateImageError(
            f"The image is {width}x{height} pixels, an aspect ratio of {long / short:.1f}:1, "
            f"over the {settings.max_aspect_ratio:g}:1 a radiograph can have "
            "(CXR_MAX_ASPECT_RATIO). Upload the uncropped image."
        )


def decode_upload(data: bytes, *, settings: Settings) -> np.ndarray:
    """Decode one upload to a float32 ``(H, W)`` array in ``[0, 1]`` under every limit.

    Raises the ``training.imaging`` errors: ImageTooLargeError (413), UnsupportedImageError
    (415), CorruptImageError (400) and DegenerateImageError (422).
    """
    if len(data) > settings.max_upload_bytes:
        raise ImageTooLargeError(
            f"The file is {len(data)} bytes, over the limit of {settings.max_upload_bytes} "
            f"bytes (CXR_MAX_UPLOAD_MB={settings.max_upload_mb:g}); compress or downscale it."
        )
    width, height = read_image_size(data)
    check_image_shape(width, height, settings=settings)
    with decode_slots(settings.effective_inference_workers):
        return decode_image(
            data, max_pixels=settings.max_pixels, max_bytes=settings.max_decode_bytes
        )
