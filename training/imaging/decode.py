"""The public decoding entry points: :func:`decode_image`, :func:`read_image_size` and
:func:`estimate_decode_bytes`. Each sniffs the format, hands over to the Pillow or DICOM
decoder, and turns any unexpected decoder failure on untrusted bytes into a 400."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.imaging.dicom import (
    DEFLATED_TS,
    decode_dicom,
    dicom_cost,
    dicom_size,
    is_deflated,
    read_dicom,
    transfer_syntax,
)
from training.imaging.errors import CorruptImageError, ImageError, ImageTooLargeError, safe_message
from training.imaging.formats import ImageFormat, format_or_raise, read_bytes
from training.imaging.raster import decode_pil, open_pil, parse_header_size, pil_cost

__all__ = ["decode_image", "estimate_decode_bytes", "read_image_size"]


def decode_image(
    data: bytes | Path | str, *, max_pixels: int | None = None, max_bytes: int | None = None
) -> np.ndarray:
    """Decode a PNG, JPEG or DICOM image into a ``float32`` ``(H, W)`` array in ``[0, 1]``.

    ``data`` is the file content or a path to it. ``max_pixels`` (``width * height``) and
    ``max_bytes`` (the memory decoding may take, bit depth and channels included: see
    :func:`estimate_decode_bytes`) are checked from the header before decoding, so a
    decompression bomb is refused without allocating its pixels; a Deflated DICOM is never
    inflated past what its header declares.

    Conversions: colour and palette images become luma; alpha is dropped; 16-bit PNGs keep
    their precision (scaled by their real bit depth, see
    :func:`training.imaging.pixels.bit_depth_to_unit`);
    DICOM gets the modality LUT (rescale), then the VOI LUT or window, then a min-max
    stretch; MONOCHROME1 is inverted; multi-frame DICOM yields its first frame.

    Raises:
        UnsupportedImageError: not PNG, JPEG or DICOM, or a DICOM compression that cannot
            be decoded here.
        CorruptImageError: empty, truncated or damaged file.
        ImageTooLargeError: more than ``max_pixels`` pixels or ``max_bytes`` of memory.
    """
    raw = read_bytes(data)
    fmt = format_or_raise(raw)
    try:
        if fmt is ImageFormat.DICOM:
            return decode_dicom(raw, max_pixels, max_bytes)
        return decode_pil(raw, fmt, max_pixels, max_bytes)
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: any other decoder failure is damage
        raise _unexpected(fmt, exc) from exc


def _unexpected(fmt: ImageFormat, exc: Exception) -> CorruptImageError:
    return CorruptImageError(
        f"The {fmt.name} image cannot be read ({exc.__class__.__name__}: {safe_message(exc)}); the "
        "file is truncated or damaged. Export the image again."
    )


def estimate_decode_bytes(data: bytes | Path | str) -> int:
    """Peak bytes :func:`decode_image` allocates for ``data``, estimated from the header alone.

    The figure the ``max_bytes`` budget is compared with: the decoder's sample buffer (bit
    depth and channels included), our float32 conversion and, per format, the extra copies
    on its path (JPEG coefficient buffers, DICOM LUTs, an inflated Deflated data set). The
    upload bytes themselves are not counted (they are bounded by the upload limit).
    """
    raw = read_bytes(data)
    fmt = format_or_raise(raw)
    try:
        if fmt is ImageFormat.DICOM:
            header = read_dicom(raw, stop_before_pixels=True)
            ts = transfer_syntax(header)
            return dicom_cost(
                header,
                compressed=ts is not None and bool(getattr(ts, "is_compressed", False)),
                inflated=str(ts) == DEFLATED_TS or is_deflated(raw),
            )
        img = open_pil(raw, fmt, None)
        try:
            return pil_cost(img, fmt)
        finally:
            img.close()
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: any other parser failure is damage
        raise _unexpected(fmt, exc) from exc


def read_image_size(data: bytes | Path | str) -> tuple[int, int]:
    """Return ``(width, height)`` from the header alone, without decoding pixels."""
    raw = read_bytes(data)
    fmt = format_or_raise(raw)
    try:
        return _read_size(raw, fmt)
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: any other parser failure is damage
        raise _unexpected(fmt, exc) from exc


def _read_size(raw: bytes, fmt: ImageFormat) -> tuple[int, int]:
    if fmt is ImageFormat.DICOM:
        width, height = dicom_size(read_dicom(raw, stop_before_pixels=True))
        return width, height
    try:
        img = open_pil(raw, fmt, None)
    except ImageTooLargeError:
        size = parse_header_size(raw, fmt)
        if size is None:
            raise
        return size
    try:
        return img.size
    finally:
        img.close()
