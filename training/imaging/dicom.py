"""DICOM through pydicom: bounded parsing (Deflated data sets never inflate past their header),
first-frame decoding, modality and VOI transforms, memory cost."""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from typing import Any

import numpy as np

from training.imaging.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    safe_message,
)
from training.imaging.limits import MB, check_budget, check_pixels
from training.imaging.pixels import bit_depth_to_unit, min_max, rgb_to_gray

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_INFLATED_BYTES",
    "DEFLATED_TS",
    "DICOM_HEADER_LIMIT",
    "DICOM_MAGIC",
    "DICOM_MAGIC_OFFSET",
    "bounded_dcmread",
    "decode_dicom",
    "dicom_cost",
    "dicom_size",
    "is_deflated",
    "looks_like_raw_dicom",
    "read_dicom",
    "transfer_syntax",
]

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"


def looks_like_raw_dicom(data: bytes) -> bool:
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
        ds = bounded_dcmread(data, stop_before_pixels=True, force=True)
    except Exception:  # force-parsing arbitrary bytes can fail in many ways
        return False
    markers = ("SOPClassUID", "Modality", "Rows", "PhotometricInterpretation")
    try:
        return any(keyword in ds for keyword in markers)
    except Exception:
        return False


DICOM_HEADER_LIMIT = 1 * MB
#: Inflated size allowed after the pixel data (trailing elements, padding).
_DICOM_TRAILER_SLACK = 64 * 1024
#: Ceiling on one inflated Deflated DICOM data set when the caller sets no budget (training).
DEFAULT_MAX_INFLATED_BYTES = 1024 * MB
DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_INFLATE_CHUNK = 256 * 1024


def bounded_dcmread(
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
        if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_TS:
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


def frame_bytes(ds: Any) -> int:
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
            allowed += frame_bytes(header) * max(1, frames)
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


def read_dicom(data: bytes, *, stop_before_pixels: bool, max_bytes: int | None = None) -> Any:
    """Parse a DICOM stream (with or without preamble); errors become CorruptImageError."""
    has_preamble = data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC
    try:
        ds = bounded_dcmread(
            data,
            stop_before_pixels=stop_before_pixels,
            force=not has_preamble,
            max_bytes=max_bytes,
        )
    except ImageError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged input
        raise CorruptImageError(
            f"The DICOM file cannot be parsed ({exc.__class__.__name__}: {safe_message(exc)}); "
            "it is damaged or truncated. Export it again from the PACS."
        ) from exc
    _ensure_transfer_syntax(ds)
    return ds


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


def dicom_size(ds: Any) -> tuple[int, int]:
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptImageError(
            "The DICOM file has no valid Rows/Columns; it is not an image (perhaps a report "
            "or structured document). Upload the image series instead."
        ) from exc
    return cols, rows


def transfer_syntax(ds: Any) -> Any:
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
    ts = transfer_syntax(ds)
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
            f"The DICOM {what}pixel data cannot be decoded ({safe_message(exc, 200)}); the file is "
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


def dicom_cost(ds: Any, *, compressed: bool, inflated: bool) -> int:
    """Peak bytes decoding the first frame costs, from the header (see estimate_decode_bytes)."""
    width, height = dicom_size(ds)
    pixels = width * height
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frame = frame_bytes(ds)
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


def decode_dicom(data: bytes, max_pixels: int | None, max_bytes: int | None = None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # Header first: the size and memory checks must not wait for the pixel data to be parsed.
    header = read_dicom(data, stop_before_pixels=True, max_bytes=max_bytes)
    width, height = dicom_size(header)
    check_pixels(width, height, max_pixels)
    ts = transfer_syntax(header)
    compressed = ts is not None and bool(getattr(ts, "is_compressed", False))
    inflated = str(ts) == DEFLATED_TS or is_deflated(data)
    bits = int(getattr(header, "BitsAllocated", 16) or 16)
    samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    check_budget(
        dicom_cost(header, compressed=compressed, inflated=inflated),
        f"{width}x{height}, {bits}-bit, {samples} sample(s) per pixel",
        max_bytes,
    )

    ds = read_dicom(data, stop_before_pixels=False, max_bytes=max_bytes)
    arr = _dicom_pixels(ds)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()

    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and samples >= 3:
        # pixel_array already converted YBR to RGB; LUTs do not apply to colour images.
        return min_max(rgb_to_gray(arr))
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
        unit = bit_depth_to_unit(arr, stored if 0 < stored < allocated else None)
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
        logger.warning("ignoring malformed DICOM LUT/window attributes: %s", safe_message(exc, 200))
        values = arr
    del arr
    unit = min_max(np.asarray(values))
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the minimum value is white; invert so that 0 is black everywhere.
        np.subtract(np.float32(1.0), unit, out=unit)
    return np.ascontiguousarray(unit, dtype=np.float32)


def is_deflated(data: bytes) -> bool:
    """Whether the file meta (within the first few KB) names the Deflated transfer syntax."""
    return DEFLATED_TS.encode("ascii") in data[:8192]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
