"""Image files: the only place in the project where pixels are decoded, and where uploads are
made safe to store.

Training, evaluation and the HTTP service all go through :func:`decode_image`, so a chest
X-ray looks the same to the model whichever path it came in by. Supported formats are PNG,
JPEG and DICOM (8- or 16-bit, signed or unsigned, MONOCHROME1/2, RGB, multi-frame). Every
decoded image is a ``float32`` array ``(H, W)`` in ``[0, 1]``, one channel, 0 = black.

Untrusted uploads are the main threat model here: the pixel limit is checked from the
header *before* pixels are decoded (a 100-byte PNG may claim 50000x50000 pixels), and every
failure becomes one of the :class:`ImageError` subclasses with a message that tells the
user what to do, so the service can map them to 400 / 413 / 415 / 422 without guessing.

Memory is budgeted before it is spent: besides ``max_pixels`` (width x height from the
header), ``max_bytes`` bounds what decoding one image may allocate, estimated from the header
(size, bit depth, channels and the conversion path; see :func:`estimate_decode_bytes`), and a
Deflated DICOM is inflated with a bound derived from its own header (a 400 KB file that
inflates to 400 MB is refused after inflating about what its pixels need).

One concept per module, imports flowing down the list:

* :mod:`~training.imaging.errors`: the error classes (one per HTTP answer).
* :mod:`~training.imaging.limits`: pixel and memory limits checked from the header.
* :mod:`~training.imaging.pixels`: value conversions shared by both decoders.
* :mod:`~training.imaging.dicom`: DICOM parsing (bounded inflation), pixels, LUTs, cost.
* :mod:`~training.imaging.formats`: :class:`ImageFormat` and sniffing from magic bytes.
* :mod:`~training.imaging.raster`: PNG and JPEG through Pillow.
* :mod:`~training.imaging.decode`: the public entry points.
* :mod:`~training.imaging.deidentify`: :func:`clean_for_storage` (what every stored upload
  goes through) and its independent checker :func:`find_identifying_content`.

This package re-exports the public names, so ``from training.imaging import decode_image``
keeps working; code that needs one concept may import its module directly.
"""

from training.imaging.decode import decode_image, estimate_decode_bytes, read_image_size
from training.imaging.deidentify import clean_for_storage, find_identifying_content
from training.imaging.errors import (
    CorruptImageError,
    DegenerateImageError,
    DeidentificationError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from training.imaging.formats import ImageFormat, sniff_format

__all__ = [
    "CorruptImageError",
    "DegenerateImageError",
    "DeidentificationError",
    "ImageError",
    "ImageFormat",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "clean_for_storage",
    "decode_image",
    "estimate_decode_bytes",
    "find_identifying_content",
    "read_image_size",
    "sniff_format",
]
