"""Which format a file is, from its magic bytes (never its name or the client's content type)."""

from __future__ import annotations

import enum
import os
from pathlib import Path

from training.imaging.dicom import DICOM_MAGIC, DICOM_MAGIC_OFFSET, looks_like_raw_dicom
from training.imaging.errors import CorruptImageError, UnsupportedImageError

__all__ = ["ImageFormat", "format_or_raise", "read_bytes", "sniff_format"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_ACCEPTED = "PNG, JPEG or DICOM"


class ImageFormat(enum.StrEnum):
    """Formats :func:`decode_image` accepts (values are lower-case names)."""

    PNG = "png"
    JPEG = "jpeg"
    DICOM = "dicom"


def sniff_format(data: bytes) -> ImageFormat | None:
    """Identify the format of ``data`` from its magic bytes (``None`` when unsupported).

    The file name or the client's content type are never trusted: a text file renamed to
    ``.png`` must be refused as unsupported, not half-decoded.
    """
    if data.startswith(_PNG_MAGIC):
        return ImageFormat.PNG
    if data.startswith(_JPEG_MAGIC):
        return ImageFormat.JPEG
    end = DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)
    if len(data) >= end and data[DICOM_MAGIC_OFFSET:end] == DICOM_MAGIC:
        return ImageFormat.DICOM
    if looks_like_raw_dicom(data):
        return ImageFormat.DICOM
    return None


# --------------------------------------------------------------------------------------------


def read_bytes(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    """Return the bytes of ``data`` (reading the file when given a path)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str | os.PathLike):
        return Path(data).read_bytes()
    raise TypeError(f"expected bytes or a path, got {type(data).__name__}")


def format_or_raise(data: bytes) -> ImageFormat:
    if not data:
        raise CorruptImageError(f"The file is empty; upload a {_ACCEPTED} image.")
    fmt = sniff_format(data)
    if fmt is None:
        hint = ""
        if data.startswith((b"GIF87a", b"GIF89a")):
            hint = " (this is a GIF)"
        elif data.startswith((b"II*\x00", b"MM\x00*")):
            hint = " (this is a TIFF)"
        elif data[:5].lower() in (b"<!doc", b"<html") or data.startswith(b"%PDF"):
            hint = " (this looks like a document, not an image)"
        raise UnsupportedImageError(
            f"Unsupported image format{hint}: the content is not {_ACCEPTED} "
            "(the file name and extension are not trusted). Convert the image to PNG, "
            "JPEG or DICOM and upload it again."
        )
    return fmt
