"""Size and memory limits checked from the header, before any pixel is decoded.

A 100-byte PNG may claim 50000x50000 pixels: ``max_pixels`` (width x height) and ``max_bytes``
(what decoding may allocate, see :func:`training.imaging.decode.estimate_decode_bytes`) are
compared here, and a refusal is a 413 that says how to make the image fit.
"""

from __future__ import annotations

from training.imaging.errors import CorruptImageError, ImageTooLargeError

__all__ = ["MB", "check_budget", "check_pixels", "too_large_error"]

MB = 1024 * 1024


def too_large_error(width: int, height: int, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The image is {width}x{height} = {width * height} pixels, over the limit of "
        f"{max_pixels} pixels; downscale it (a chest X-ray needs no more than about "
        "4000x4000) and upload it again."
    )


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(
            f"The image header gives an invalid size {width}x{height}; the file is damaged. "
            "Export the image again."
        )
    if max_pixels is not None and width * height > max_pixels:
        raise too_large_error(width, height, max_pixels)


def check_budget(cost: int, what: str, max_bytes: int | None) -> None:
    """Refuse (413) before decoding when ``cost`` bytes would pass the decode budget."""
    if max_bytes is not None and cost > max_bytes:
        raise ImageTooLargeError(
            f"Decoding this image ({what}) needs about {cost / MB:.0f} MB of memory, over the "
            f"decode budget of {max_bytes / MB:.0f} MB (CXR_MAX_DECODE_MB); downscale it or "
            "save it with 8 bits per sample and one channel, and upload it again."
        )
