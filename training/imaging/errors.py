"""The image errors: one class per HTTP answer, so the service maps them without guessing.

Every failure of decoding or cleaning an upload becomes one of these, with a message that tells
the user what to do: 400 (:class:`CorruptImageError`), 413 (:class:`ImageTooLargeError`), 415
(:class:`UnsupportedImageError`), 422 (:class:`DeidentificationError`,
:class:`DegenerateImageError`).
"""

from __future__ import annotations

import re

__all__ = [
    "CorruptImageError",
    "DegenerateImageError",
    "DeidentificationError",
    "ImageError",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "safe_message",
]


class ImageError(ValueError):
    """Base class of every image problem; a ``ValueError`` so callers may catch either."""


class CorruptImageError(ImageError):
    """The file claims a supported format but cannot be read (truncated, damaged, empty)."""


class UnsupportedImageError(ImageError):
    """The file is not PNG, JPEG or DICOM, or uses a variant this build cannot decode."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed, or decoding it would need more memory than the
    budget (bit depth and channels included); raised from the header, before decoding."""


class DeidentificationError(ImageError):
    """The file cannot be made safe to store (e.g. text burned into the pixels); HTTP 422."""


class DegenerateImageError(ImageError):
    """Readable, but no radiograph: too small or too elongated to diagnose; HTTP 422."""


_ADDRESS = re.compile(r"\s*(at )?0x[0-9a-fA-F]{6,}")


def safe_message(exc: BaseException, limit: int = 300) -> str:
    """An exception message fit for a client: no memory addresses, bounded length."""
    text = _ADDRESS.sub("", str(exc)).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
