"""PNG and JPEG through Pillow: header-first opening, memory cost, grayscale conversion."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from training.imaging.errors import CorruptImageError, ImageError, ImageTooLargeError
from training.imaging.formats import ImageFormat
from training.imaging.limits import check_budget, check_pixels, too_large_error
from training.imaging.pixels import bit_depth_to_unit, min_max

__all__ = ["decode_pil", "open_pil", "parse_header_size", "pil_cost"]

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


def open_pil(
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
        size = parse_header_size(data, fmt)
        if size is not None:
            raise too_large_error(size[0], size[1], limit) from exc
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
    check_pixels(width, height, max_pixels)
    if max_bytes is not None:
        try:
            check_budget(pil_cost(img, fmt), f"{width}x{height} {img.mode}", max_bytes)
        except ImageError:
            img.close()
            raise
    return img


#: Bytes per pixel Pillow stores for a mode (multi-band modes are padded to 4 bytes).
_PIL_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
#: Bytes per pixel :func:`_pil_to_array` allocates on top of Pillow's buffer, by mode.
_PIL_WORK = {"1": 6, "L": 5, "I;16": 10, "I;16L": 10, "I;16B": 10, "I;16N": 10, "I": 12, "F": 12}
_PIL_WORK_OTHER = 9  # colour: convert("RGB") (4) + convert("L") (1) + float32 (4)


def pil_cost(img: Image.Image, fmt: ImageFormat) -> int:
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


def parse_header_size(data: bytes, fmt: ImageFormat) -> tuple[int, int] | None:
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


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        return bit_depth_to_unit(arr, _png_significant_bits(img))
    if mode == "F":
        return min_max(np.asarray(img, dtype=np.float64))
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


def decode_pil(
    data: bytes, fmt: ImageFormat, max_pixels: int | None, max_bytes: int | None = None
) -> np.ndarray:
    img = open_pil(data, fmt, max_pixels, max_bytes)
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
