"""Image decoding: the only place in the project where pixels are decoded.

Training, evaluation and the HTTP service all go through :func:`decode_image`, so a chest
X-ray looks the same to the model whichever path it came in by. Supported formats are PNG,
JPEG and DICOM (8- or 16-bit, signed or unsigned, MONOCHROME1/2, RGB, multi-frame). Every
decoded image is a ``float32`` array ``(H, W)`` in ``[0, 1]``, one channel, 0 = black.

Untrusted uploads are the main threat model here: the pixel limit is checked from the
header *before* pixels are decoded (a 100-byte PNG may claim 50000x50000 pixels), and every
failure becomes one of the :class:`ImageError` subclasses with a message that tells the
user what to do, so the service can map them to 400 / 413 / 415 without guessing.

Memory is budgeted before it is spent: besides ``max_pixels`` (width x height from the
header), ``max_bytes`` bounds what decoding one image may allocate, estimated from the header
(size, bit depth, channels and the conversion path; see :func:`estimate_decode_bytes`), and a
Deflated DICOM is inflated with a bound derived from its own header (a 400 KB file that
inflates to 400 MB is refused after inflating about what its pixels need).

Uploads are cleaned before anything is stored by :func:`training.deidentify.clean_for_storage`
(DICOM rebuilt from an allow-list, PNG/JPEG reduced to their pixels); ``deidentify_dicom`` and
``find_dicom_identifiers`` here are kept for importers and delegate to it.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "BLANKED_DICOM_KEYWORDS",
    "REMOVED_DICOM_KEYWORDS",
    "CorruptImageError",
    "DegenerateImageError",
    "DeidentificationError",
    "ImageError",
    "ImageFormat",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "decode_image",
    "deidentify_dicom",
    "estimate_decode_bytes",
    "find_dicom_identifiers",
    "read_image_size",
    "sniff_format",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_ACCEPTED = "PNG, JPEG or DICOM"


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


class ImageFormat(enum.StrEnum):
    """Formats :func:`decode_image` accepts (values are lower-case names)."""

    PNG = "png"
    JPEG = "jpeg"
    DICOM = "dicom"


# --------------------------------------------------------------------------------------------
# Format sniffing
# --------------------------------------------------------------------------------------------


def _looks_like_raw_dicom(data: bytes) -> bool:
    """Whether ``data`` is a DICOM data set written without the 128-byte preamble.

    Some PACS exports omit the preamble and the ``DICM`` marker. Accepting them needs
    pydicom's ``force=True``, which will happily "parse" any bytes, so we are conservative:
    the stream must start with a group 0x0002 or 0x0008 element (little endian), and the
    parsed header must contain an element only a real image data set has.
    """
    if len(data) < 16:
        return False
    group = int.from_bytes(data[0:2], "little")
    if group not in (0x0002, 0x0008):
        return False
    try:
        ds = _dcmread(data, stop_before_pixels=True, force=True)
    except Exception:  # force-parsing arbitrary bytes can fail in many ways
        return False
    markers = ("SOPClassUID", "Modality", "Rows", "PhotometricInterpretation")
    try:
        return any(keyword in ds for keyword in markers)
    except Exception:
        return False


def sniff_format(data: bytes) -> ImageFormat | None:
    """Identify the format of ``data`` from its magic bytes (``None`` when unsupported).

    The file name or the client's content type are never trusted: a text file renamed to
    ``.png`` must be refused as unsupported, not half-decoded.
    """
    if data.startswith(_PNG_MAGIC):
        return ImageFormat.PNG
    if data.startswith(_JPEG_MAGIC):
        return ImageFormat.JPEG
    end = _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)
    if len(data) >= end and data[_DICOM_MAGIC_OFFSET:end] == _DICOM_MAGIC:
        return ImageFormat.DICOM
    if _looks_like_raw_dicom(data):
        return ImageFormat.DICOM
    return None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _read_bytes(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    """Return the bytes of ``data`` (reading the file when given a path)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str | os.PathLike):
        return Path(data).read_bytes()
    raise TypeError(f"expected bytes or a path, got {type(data).__name__}")


def _format_or_raise(data: bytes) -> ImageFormat:
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


def _too_large(width: int, height: int, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The image is {width}x{height} = {width * height} pixels, over the limit of "
        f"{max_pixels} pixels; downscale it (a chest X-ray needs no more than about "
        "4000x4000) and upload it again."
    )


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(
            f"The image header gives an invalid size {width}x{height}; the file is damaged. "
            "Export the image again."
        )
    if max_pixels is not None and width * height > max_pixels:
        raise _too_large(width, height, max_pixels)


_MB = 1024 * 1024


def _check_budget(cost: int, what: str, max_bytes: int | None) -> None:
    """Refuse (413) before decoding when ``cost`` bytes would pass the decode budget."""
    if max_bytes is not None and cost > max_bytes:
        raise ImageTooLargeError(
            f"Decoding this image ({what}) needs about {cost / _MB:.0f} MB of memory, over the "
            f"decode budget of {max_bytes / _MB:.0f} MB (CXR_MAX_DECODE_MB); downscale it or "
            "save it with 8 bits per sample and one channel, and upload it again."
        )


def _min_max(arr: np.ndarray) -> np.ndarray:
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


def _rgb_to_gray(arr: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the same weights Pillow uses for ``convert("L")`` (float32)."""
    gray = arr[..., 0].astype(np.float32)
    gray *= np.float32(0.299)
    gray += arr[..., 1].astype(np.float32) * np.float32(0.587)
    gray += arr[..., 2].astype(np.float32) * np.float32(0.114)
    return gray


# --------------------------------------------------------------------------------------------
# PNG / JPEG through Pillow
# --------------------------------------------------------------------------------------------

_PIL_FORMATS = {ImageFormat.PNG: ["PNG"], ImageFormat.JPEG: ["JPEG", "MPO"]}


def _pil_formats(fmt: ImageFormat) -> list[str]:
    """The Pillow plugin names for ``fmt`` that this Pillow build has registered.

    Pillow raises ``KeyError`` from ``Image.open(..., formats=[...])`` for a name it has no
    opener for (recent versions open MPO through the JPEG plugin and register no "MPO"
    opener), which would surface as a 500 for any JPEG the JPEG plugin refuses.
    """
    Image.init()
    names = [name for name in _PIL_FORMATS[fmt] if name in Image.OPEN]
    return names or _PIL_FORMATS[fmt][:1]


# Errors Pillow (and zlib underneath) raise on damaged files.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
)


def _open_pil(
    data: bytes, fmt: ImageFormat, max_pixels: int | None, max_bytes: int | None = None
) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before any decoding.

    Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) raises
    ``DecompressionBombError`` inside ``open`` for absurd sizes; we map it to
    :class:`ImageTooLargeError` instead of changing the process-wide setting, which other
    code in the same process may rely on. The effective limit is therefore the smaller of
    ``max_pixels`` and twice Pillow's limit (about 179 megapixels).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_pil_formats(fmt))
    except Image.DecompressionBombError as exc:
        limit = max_pixels if max_pixels is not None else 2 * int(Image.MAX_IMAGE_PIXELS or 0)
        size = _parse_header_size(data, fmt)
        if size is not None:
            raise _too_large(size[0], size[1], limit) from exc
        raise ImageTooLargeError(
            f"The image header claims more pixels than allowed ({exc}); the limit is "
            f"{limit} pixels. Downscale the image and upload it again."
        ) from exc
    except UnidentifiedImageError as exc:
        raise CorruptImageError(
            f"The file starts like a {fmt.name} but its header cannot be read; it is damaged "
            "or truncated. Export the image again."
        ) from exc
    except Exception as exc:  # _PIL_ERRORS, and anything else a damaged header provokes
        raise CorruptImageError(
            f"The {fmt.name} header cannot be read ({exc.__class__.__name__}: {exc}); the "
            "file is damaged. Export the image again."
        ) from exc
    width, height = img.size
    _check_pixels(width, height, max_pixels)
    if max_bytes is not None:
        try:
            _check_budget(_pil_cost(img, fmt), f"{width}x{height} {img.mode}", max_bytes)
        except ImageError:
            img.close()
            raise
    return img


#: Bytes per pixel Pillow stores for a mode (multi-band modes are padded to 4 bytes).
_PIL_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
#: Bytes per pixel :func:`_pil_to_array` allocates on top of Pillow's buffer, by mode.
_PIL_WORK = {"1": 6, "L": 5, "I;16": 10, "I;16L": 10, "I;16B": 10, "I;16N": 10, "I": 12, "F": 12}
_PIL_WORK_OTHER = 9  # colour: convert("RGB") (4) + convert("L") (1) + float32 (4)


def _pil_cost(img: Image.Image, fmt: ImageFormat) -> int:
    """Peak bytes decoding ``img`` costs, from its header: Pillow's buffer, our conversion
    and, for JPEG, libjpeg's whole-image coefficient buffers (progressive) and the copy
    ``exif_transpose`` may make."""
    width, height = img.size
    pixels = width * height
    storage = _PIL_STORAGE.get(img.mode, 4)
    per_pixel = storage + _PIL_WORK.get(img.mode, _PIL_WORK_OTHER)
    if fmt is ImageFormat.JPEG:
        bands = len(img.getbands())
        per_pixel += storage  # exif_transpose copy
        if img.info.get("progressive") or img.info.get("progression"):
            per_pixel += 2 * bands  # one int16 coefficient per sample, kept for all scans
    return pixels * per_pixel


_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _parse_header_size(data: bytes, fmt: ImageFormat) -> tuple[int, int] | None:
    """``(width, height)`` straight from the PNG IHDR or JPEG SOF segment, or None.

    Used when Pillow refuses to open an image whose header claims an absurd size, so the
    caller still learns how big it claims to be.
    """
    if fmt is ImageFormat.PNG:
        if len(data) >= 24 and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return int(width), int(height)
        return None
    if fmt is ImageFormat.JPEG:
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0x01, *range(0xD0, 0xDA)):  # standalone markers
                pos += 2
                continue
            (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            if marker in _JPEG_SOF_MARKERS:
                if pos + 9 > len(data):
                    return None
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return int(width), int(height)
            pos += 2 + length
    return None


def _png_significant_bits(img: Image.Image) -> int | None:
    """Bits actually used by a 16-bit grayscale PNG, from its ``sBIT`` chunk if present."""
    png = getattr(img, "png", None)
    chunk = None
    if png is not None:
        # Pillow keeps unknown ancillary chunks only in some versions; be tolerant.
        chunk = getattr(png, "im_sbit", None)
    if chunk is None:
        return None
    try:
        bits = int(chunk[0])
    except (TypeError, ValueError, IndexError):
        return None
    return bits if 1 <= bits <= 16 else None


def _high_bit_depth_to_unit(arr: np.ndarray, significant_bits: int | None) -> np.ndarray:
    """Scale 16-bit (or 32-bit integer) grayscale to ``[0, 1]`` by its real value range.

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


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        return _high_bit_depth_to_unit(arr, _png_significant_bits(img))
    if mode == "F":
        return _min_max(np.asarray(img, dtype=np.float64))
    if mode == "1":
        gray = img.convert("L")
    elif mode == "L":
        gray = img
    elif mode in ("LA", "La"):
        gray = img.getchannel(0)
    else:
        # RGB, RGBA, P, PA, CMYK, YCbCr, ...: go through RGB (drops alpha) then luma.
        rgb = img.convert("RGB")
        gray = rgb.convert("L")
        rgb.close()
    out = np.asarray(gray, dtype=np.float32)
    if not out.flags.writeable:
        out = out.copy()
    out /= np.float32(255.0)
    return out


def _decode_pil(
    data: bytes, fmt: ImageFormat, max_pixels: int | None, max_bytes: int | None = None
) -> np.ndarray:
    img = _open_pil(data, fmt, max_pixels, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            if fmt is ImageFormat.JPEG:
                # Phone photos of films carry an EXIF orientation; honour it.
                img = ImageOps.exif_transpose(img)
            arr = _pil_to_array(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{exc}. Downscale the image and upload it again.") from exc
    except (*_PIL_ERRORS, MemoryError) as exc:
        raise CorruptImageError(
            f"The {fmt.name} image cannot be decoded ({exc}); the file is truncated or "
            "damaged. Export the image again."
        ) from exc
    except Exception as exc:  # any other decoder failure on untrusted bytes is damage too
        raise CorruptImageError(
            f"The {fmt.name} image cannot be decoded ({exc.__class__.__name__}: {exc}); the "
            "file is truncated or damaged. Export the image again."
        ) from exc
    finally:
        img.close()
    if arr.ndim != 2:
        raise CorruptImageError(f"Decoded {fmt.name} has unexpected shape {arr.shape}.")
    return np.ascontiguousarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# DICOM through pydicom
# --------------------------------------------------------------------------------------------


#: Inflated size allowed for a Deflated DICOM's header (everything before the pixel data).
DICOM_HEADER_LIMIT = 1 * _MB
#: Inflated size allowed after the pixel data (trailing elements, padding).
_DICOM_TRAILER_SLACK = 64 * 1024
#: Ceiling on one inflated Deflated DICOM data set when the caller sets no budget (training).
DEFAULT_MAX_INFLATED_BYTES = 1024 * _MB
_DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_INFLATE_CHUNK = 256 * 1024


def _dcmread(
    data: bytes,
    *,
    stop_before_pixels: bool = False,
    force: bool = False,
    max_bytes: int | None = None,
) -> Any:
    """``pydicom.dcmread`` that never inflates a Deflated data set without a bound.

    pydicom inflates the whole Deflated Explicit VR Little Endian stream with one
    ``zlib.decompress``: a 400 KB file can claim 16x16 pixels and inflate to gigabytes.
    Here the file meta is read first; a deflated body goes through :func:`_inflate_bounded`
    and the inflated data set is parsed as Explicit VR Little Endian.
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import ExplicitVRLittleEndian

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp = io.BytesIO(data)
        preamble = read_preamble(fp, force=True)
        meta = _read_file_meta_info(fp)
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED_TS:
            return pydicom.dcmread(
                io.BytesIO(data), stop_before_pixels=stop_before_pixels, force=force
            )
        body = _inflate_bounded(
            memoryview(data)[fp.tell() :], max_bytes=max_bytes, header_only=stop_before_pixels
        )
        ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=stop_before_pixels, force=True)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.preamble = preamble
        return ds


def _frame_bytes(ds: Any) -> int:
    """Bytes of one native frame as the header declares it (0 when it declares no image)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        bits = int(getattr(ds, "BitsAllocated", 16) or 16)
    except (AttributeError, KeyError, TypeError, ValueError):
        return 0
    return max(0, rows) * max(0, cols) * max(1, samples) * max(1, (bits + 7) // 8)


def _inflate_bounded(
    compressed: memoryview, *, max_bytes: int | None, header_only: bool = False
) -> bytes:
    """Inflate a Deflated DICOM body, never past what its own header says it needs.

    First at most :data:`DICOM_HEADER_LIMIT` bytes are inflated, enough to parse the header
    up to the pixel data; the allowance is then header + the declared frames' native size +
    a small slack, capped by ``max_bytes``. A stream that inflates further is a bomb: 413.
    ``header_only`` stops after the first step (for a header parse that stops before pixels).
    """
    import pydicom

    limit_total = max_bytes if max_bytes is not None else DEFAULT_MAX_INFLATED_BYTES
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = bytes(compressed)

    def pump(limit: int) -> None:
        nonlocal pending
        while len(out) < limit and not inflater.eof:
            chunk = inflater.decompress(pending, min(_INFLATE_CHUNK, limit - len(out)))
            pending = inflater.unconsumed_tail
            out.extend(chunk)
            if not chunk and not pending:
                break

    try:
        pump(min(DICOM_HEADER_LIMIT, limit_total))
        if header_only:
            return bytes(out)
        header: Any = None
        if len(out) >= 8:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = pydicom.dcmread(
                    io.BytesIO(bytes(out)), stop_before_pixels=True, force=True
                )
        frames = int(getattr(header, "NumberOfFrames", 1) or 1) if header is not None else 1
        allowed = DICOM_HEADER_LIMIT + _DICOM_TRAILER_SLACK
        if header is not None:
            allowed += _frame_bytes(header) * max(1, frames)
        allowed = min(allowed, limit_total)
        pump(allowed + 1)
    except zlib.error as exc:
        raise CorruptImageError(
            f"The Deflated DICOM data cannot be inflated ({exc}); the file is damaged. "
            "Export it again."
        ) from exc
    if len(out) > allowed:
        raise ImageTooLargeError(
            f"The Deflated DICOM data inflates to more than {allowed} bytes, more than its "
            f"header declares for its pixels (or over the decode budget of {limit_total} "
            "bytes): refused as a decompression bomb. Re-export it uncompressed (Explicit VR "
            "Little Endian)."
        )
    return bytes(out)


def _read_dicom(data: bytes, *, stop_before_pixels: bool, max_bytes: int | None = None) -> Any:
    """Parse a DICOM stream (with or without preamble); errors become CorruptImageError."""
    has_preamble = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC
    try:
        ds = _dcmread(
            data,
            stop_before_pixels=stop_before_pixels,
            force=not has_preamble,
            max_bytes=max_bytes,
        )
    except ImageError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged input
        raise CorruptImageError(
            f"The DICOM file cannot be parsed ({exc.__class__.__name__}: {_safe(exc)}); it is "
            "damaged or truncated. Export it again from the PACS."
        ) from exc
    _ensure_transfer_syntax(ds)
    return ds


_ADDRESS = re.compile(r"\s*(at )?0x[0-9a-fA-F]{6,}")


def _safe(exc: BaseException, limit: int = 300) -> str:
    """An exception message fit for a client: no memory addresses, bounded length."""
    text = _ADDRESS.sub("", str(exc)).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ensure_transfer_syntax(ds: Any) -> None:
    """Raw data sets (no preamble/meta) lack a transfer syntax; infer it from the encoding."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if not little:
        meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _dicom_size(ds: Any) -> tuple[int, int]:
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptImageError(
            "The DICOM file has no valid Rows/Columns; it is not an image (perhaps a report "
            "or structured document). Upload the image series instead."
        ) from exc
    return cols, rows


def _transfer_syntax(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None) if meta is not None else None


class _DropDecoderTracebacks(logging.Filter):
    """pydicom logs every failed decoder attempt with ``LOGGER.exception`` (an ERROR line and
    a traceback per corrupt upload). The failure reaches the caller as a clear 400; the log
    keeps one WARNING from us instead of a traceback that looks like a server fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        failed = record.exc_info or record.levelno >= logging.ERROR
        return not (failed and record.pathname.endswith(("decoders/base.py",)))


# On the module's own logger too: a parent logger's filter never sees a child's records.
for _name in ("pydicom", "pydicom.pixels.decoders.base"):
    logging.getLogger(_name).addFilter(_DropDecoderTracebacks())


def _decoder_available(ts: Any) -> bool:
    """Whether some installed pydicom plugin can decode transfer syntax ``ts``."""
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return bool(get_decoder(ts).is_available)
    except Exception:  # no decoder registered for this UID at all
        return False


def _dicom_pixels(ds: Any) -> np.ndarray:
    """Decode the first frame only, so a 500-frame cine loop costs one frame of memory."""
    from pydicom.pixels import pixel_array

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise CorruptImageError(
            "The DICOM file contains no pixel data; it is not an image (perhaps a report or "
            "structured document). Upload the image instead."
        )
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    ts = _transfer_syntax(ds)
    compressed = ts is not None and bool(getattr(ts, "is_compressed", False))
    name = getattr(ts, "name", str(ts))
    if compressed and not _decoder_available(ts):
        raise UnsupportedImageError(
            f"The DICOM pixel data is compressed as '{name}', which this server cannot "
            "decode. Re-export it uncompressed (Explicit VR Little Endian) or as PNG, and "
            "upload it again."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as exc:
        # A decoder exists (checked above), so a failure means the data is damaged: 400.
        logger.warning(
            "DICOM pixel data failed to decode",
            extra={"transfer_syntax": str(ts), "error": exc.__class__.__name__},
        )
        what = f"'{name}' " if compressed else ""
        raise CorruptImageError(
            f"The DICOM {what}pixel data cannot be decoded ({_safe(exc, 200)}); the file is "
            "damaged or truncated. Export it again."
        ) from exc
    return np.asarray(arr)


def _dicom_lean_luts(ds: Any) -> bool:
    """Whether the modality and VOI transforms are linear (rescale, linear window), which we
    apply in float32 in place; LUT sequences and non-linear functions go through pydicom."""
    if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        return False
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    return function == "LINEAR"


def _dicom_cost(ds: Any, *, compressed: bool, inflated: bool) -> int:
    """Peak bytes decoding the first frame costs, from the header (see estimate_decode_bytes)."""
    width, height = _dicom_size(ds)
    pixels = width * height
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frame = _frame_bytes(ds)
    cost = 2 * frame + pixels * 4 * (3 if samples >= 3 else 1) + pixels * 4
    if not _dicom_lean_luts(ds):
        cost += pixels * 8 * 3  # pydicom's float64 LUT outputs and temporaries
    if compressed:
        cost += 2 * frame  # the decoder's own output buffer, then our copy
    if inflated:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        cost += 2 * frame * max(1, frames)  # the inflated data set, parsed once more
    return cost


def _no_display_transform(ds: Any) -> bool:
    """Whether the data set asks for no rescale, modality LUT, window or VOI LUT."""
    if any(k in ds for k in ("ModalityLUTSequence", "VOILUTSequence", "WindowCenter")):
        return False
    try:
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return False
    return slope == 1.0 and intercept == 0.0


def _first_value(value: Any) -> float:
    if not isinstance(value, str | bytes) and hasattr(value, "__getitem__"):
        value = value[0]
    return float(value)


def _apply_luts_lean(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Rescale then linear window (DICOM PS3.3 C.11.2.1.2.1), in one float32 buffer."""
    values = arr.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = _first_value(ds.WindowCenter)
        width = max(_first_value(ds.WindowWidth), 1.0)
        # y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1]
        values -= np.float32(center - 0.5)
        values /= np.float32(max(width - 1.0, 1e-6))
        values += np.float32(0.5)
        np.clip(values, 0.0, 1.0, out=values)
    return values


def _decode_dicom(data: bytes, max_pixels: int | None, max_bytes: int | None = None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # Header first: the size and memory checks must not wait for the pixel data to be parsed.
    header = _read_dicom(data, stop_before_pixels=True, max_bytes=max_bytes)
    width, height = _dicom_size(header)
    _check_pixels(width, height, max_pixels)
    ts = _transfer_syntax(header)
    compressed = ts is not None and bool(getattr(ts, "is_compressed", False))
    inflated = str(ts) == _DEFLATED_TS or _is_deflated(data)
    bits = int(getattr(header, "BitsAllocated", 16) or 16)
    samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    _check_budget(
        _dicom_cost(header, compressed=compressed, inflated=inflated),
        f"{width}x{height}, {bits}-bit, {samples} sample(s) per pixel",
        max_bytes,
    )

    ds = _read_dicom(data, stop_before_pixels=False, max_bytes=max_bytes)
    arr = _dicom_pixels(ds)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()

    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and samples >= 3:
        # pixel_array already converted YBR to RGB; LUTs do not apply to colour images.
        return _min_max(_rgb_to_gray(arr))
    if arr.ndim != 2:
        raise CorruptImageError(
            f"The DICOM pixel data has an unexpected shape {arr.shape}; export a single "
            "2-D grayscale image."
        )
    if _no_display_transform(ds) and arr.dtype.kind == "u":
        # No rescale and no window: scale by the stored bit depth exactly as a PNG of the same
        # pixels is scaled (8-bit: /255), not by this image's own min and max, so the same
        # low-contrast pixels give the same model input in either container.
        stored = int(getattr(ds, "BitsStored", 0) or 0)
        allocated = int(getattr(ds, "BitsAllocated", 0) or 0)
        unit = _high_bit_depth_to_unit(arr, stored if 0 < stored < allocated else None)
        if photometric == "MONOCHROME1":
            np.subtract(np.float32(1.0), unit, out=unit)
        return np.ascontiguousarray(unit, dtype=np.float32)
    values: np.ndarray
    try:
        if _dicom_lean_luts(ds):
            values = _apply_luts_lean(arr, ds)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Modality LUT (RescaleSlope/Intercept or a LUT) gives physical units; then
                # the VOI LUT or window the modality chose for display, as a radiologist sees.
                values = apply_modality_lut(arr, ds)
                if "VOILUTSequence" in ds or "WindowCenter" in ds:
                    values = apply_voi_lut(values, ds, index=0)
    except Exception as exc:  # malformed LUT or window attributes
        logger.warning("ignoring malformed DICOM LUT/window attributes: %s", _safe(exc, 200))
        values = arr
    del arr
    unit = _min_max(np.asarray(values))
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the minimum value is white; invert so that 0 is black everywhere.
        np.subtract(np.float32(1.0), unit, out=unit)
    return np.ascontiguousarray(unit, dtype=np.float32)


def _is_deflated(data: bytes) -> bool:
    """Whether the file meta (within the first few KB) names the Deflated transfer syntax."""
    return _DEFLATED_TS.encode("ascii") in data[:8192]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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
    their precision (scaled by their real bit depth, see :func:`_high_bit_depth_to_unit`);
    DICOM gets the modality LUT (rescale), then the VOI LUT or window, then a min-max
    stretch; MONOCHROME1 is inverted; multi-frame DICOM yields its first frame.

    Raises:
        UnsupportedImageError: not PNG, JPEG or DICOM, or a DICOM compression that cannot
            be decoded here.
        CorruptImageError: empty, truncated or damaged file.
        ImageTooLargeError: more than ``max_pixels`` pixels or ``max_bytes`` of memory.
    """
    raw = _read_bytes(data)
    fmt = _format_or_raise(raw)
    try:
        if fmt is ImageFormat.DICOM:
            return _decode_dicom(raw, max_pixels, max_bytes)
        return _decode_pil(raw, fmt, max_pixels, max_bytes)
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: any other decoder failure is damage
        raise _unexpected(fmt, exc) from exc


def _unexpected(fmt: ImageFormat, exc: Exception) -> CorruptImageError:
    return CorruptImageError(
        f"The {fmt.name} image cannot be read ({exc.__class__.__name__}: {_safe(exc)}); the "
        "file is truncated or damaged. Export the image again."
    )


def estimate_decode_bytes(data: bytes | Path | str) -> int:
    """Peak bytes :func:`decode_image` allocates for ``data``, estimated from the header alone.

    The figure the ``max_bytes`` budget is compared with: the decoder's sample buffer (bit
    depth and channels included), our float32 conversion and, per format, the extra copies
    on its path (JPEG coefficient buffers, DICOM LUTs, an inflated Deflated data set). The
    upload bytes themselves are not counted (they are bounded by the upload limit).
    """
    raw = _read_bytes(data)
    fmt = _format_or_raise(raw)
    try:
        if fmt is ImageFormat.DICOM:
            header = _read_dicom(raw, stop_before_pixels=True)
            ts = _transfer_syntax(header)
            return _dicom_cost(
                header,
                compressed=ts is not None and bool(getattr(ts, "is_compressed", False)),
                inflated=str(ts) == _DEFLATED_TS or _is_deflated(raw),
            )
        img = _open_pil(raw, fmt, None)
        try:
            return _pil_cost(img, fmt)
        finally:
            img.close()
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: any other parser failure is damage
        raise _unexpected(fmt, exc) from exc


def read_image_size(data: bytes | Path | str) -> tuple[int, int]:
    """Return ``(width, height)`` from the header alone, without decoding pixels."""
    raw = _read_bytes(data)
    fmt = _format_or_raise(raw)
    try:
        return _read_size(raw, fmt)
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: any other parser failure is damage
        raise _unexpected(fmt, exc) from exc


def _read_size(raw: bytes, fmt: ImageFormat) -> tuple[int, int]:
    if fmt is ImageFormat.DICOM:
        width, height = _dicom_size(_read_dicom(raw, stop_before_pixels=True))
        return width, height
    try:
        img = _open_pil(raw, fmt, None)
    except ImageTooLargeError:
        size = _parse_header_size(raw, fmt)
        if size is None:
            raise
        return size
    try:
        return img.size
    finally:
        img.close()


# --------------------------------------------------------------------------------------------
# DICOM de-identification
# --------------------------------------------------------------------------------------------

#: Type 2 identifying attributes that must stay present but empty (PS3.15 action "Z").
BLANKED_DICOM_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ContentDate",
    "ContentTime",
)

#: Identifying attributes removed outright (PS3.15 action "X"), a working subset of the
#: basic application level confidentiality profile.
REMOVED_DICOM_KEYWORDS: tuple[str, ...] = (
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientMotherBirthName",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "PatientInsurancePlanCodeSequence",
    "PatientReligiousPreference",
    "PatientComments",
    "PatientState",
    "PregnancyStatus",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "MedicalAlerts",
    "Allergies",
    "SmokingStatus",
    "CountryOfResidence",
    "RegionOfResidence",
    "IssuerOfPatientID",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "OperatorsName",
    "OperatorIdentificationSequence",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "PlateID",
    "DetectorID",
    "CassetteID",
    "GantryID",
    "StudyDescription",
    "SeriesDescription",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepID",
    "AdmissionID",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDate",
    "AdmittingTime",
    "DischargeDiagnosisDescription",
    "CurrentPatientLocation",
    "PatientInstitutionResidence",
    "VisitComments",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "ImageComments",
    "FrameComments",
    "DerivationDescription",
    "TextComments",
    "TextString",
    "AcquisitionComments",
    "ProtocolName",
    "IdentifyingComments",
    "DigitalSignaturesSequence",
    "OriginalAttributesSequence",
    "ModifiedAttributesSequence",
    "ReferencedPatientSequence",
    "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence",
    "SourceImageSequence",
    "ReferencedImageSequence",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "OverlayDate",
    "OverlayTime",
    "CurveDate",
    "CurveTime",
    "PersonName",
    "ContentCreatorName",
    "VerifyingObserverName",
    "VerifyingObserverSequence",
    "AuthorObserverSequence",
    "ParticipantSequence",
    "TimezoneOffsetFromUTC",
)

#: UIDs replaced by a one-way hash, so one original image always gets the same new UID
#: (duplicate uploads stay recognisable) but the original cannot be read back.
_REPLACED_UID_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "ReferencedSOPInstanceUID",
    "IrradiationEventUID",
    "ConcatenationUID",
    "InstanceCreatorUID",
    "StorageMediaFileSetUID",
    "SynchronizationFrameOfReferenceUID",
)

_UID_SALT = "cxr-deidentify-v1"


def _new_uid(value: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_SALT, str(value)]))


def _visit(ds: Any, fn: Callable[[Any], None]) -> None:
    """Apply ``fn`` to ``ds`` and every nested sequence item."""
    fn(ds)
    for elem in list(ds):
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                _visit(item, fn)


def deidentify_dicom(data: bytes) -> bytes:
    """Return the DICOM ``data`` rebuilt from the allow-list of
    :func:`training.deidentify.clean_for_storage` (kept for importers of this module).

    Raises :class:`CorruptImageError` or :class:`UnsupportedImageError` when ``data`` is not
    a readable DICOM file, :class:`DeidentificationError` when it cannot be made safe.
    """
    from training.deidentify import clean_for_storage

    raw = _read_bytes(data)
    fmt = _format_or_raise(raw)
    if fmt is not ImageFormat.DICOM:
        raise UnsupportedImageError(
            f"deidentify_dicom expects a DICOM file, got {fmt.name}; use clean_for_storage "
            "for PNG and JPEG."
        )
    return clean_for_storage(raw)


def find_dicom_identifiers(data: bytes) -> list[str]:
    """What a DICOM file holds beyond the storage allow-list (empty list when clean): any
    attribute outside it, private tags, file-meta extras and a non-zero preamble."""
    from training.deidentify import find_identifying_content

    return find_identifying_content(_read_bytes(data))
