"""Reference thumbnails for the web page: `GET /references/{id}/image?size=N`.

Pixels only: the stored (already de-identified) image is decoded by `training.imaging` and
re-encoded as a bare 8-bit grayscale PNG, so no DICOM attribute, PNG text chunk or EXIF block of
the original can leave through this route. Thumbnails are cached per process by content hash
and size (a reference's bytes never change, so an entry is never stale) in a byte-bounded LRU.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Reference
from app.services.references import ReferenceNotFoundError
from training.imaging import decode_image

logger = logging.getLogger(__name__)

MIN_SIZE = 16
MAX_SIZE = 512
DEFAULT_SIZE = 128
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024


class ReferenceImageMissingError(LookupError):
    """The reference exists but its image file is gone from the data directory."""


@dataclass(frozen=True)
class Thumbnail:
    png: bytes
    etag: str
    width: int
    height: int


class ThumbnailCache:
    """A thread-safe LRU of encoded thumbnails bounded by their total size in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], Thumbnail] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int]) -> Thumbnail | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[str, int], item: Thumbnail) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old.png)
            self._items[key] = item
            self._bytes += len(item.png)
            while self._bytes > self.max_bytes and self._items:
                _key, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted.png)

    @property
    def size_bytes(self) -> int:
        return self._bytes


def render_thumbnail(pixels: np.ndarray, *, size: int) -> tuple[bytes, int, int]:
    """A PNG whose longer side is at most `size` (aspect kept, never enlarged), pixels only."""
    image = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)  # Pillow writes no text chunks by default
    return buffer.getvalue(), image.width, image.height


def reference_thumbnail(
    *,
    session: Session,
    reference_id: str,
    size: int = DEFAULT_SIZE,
    settings: Settings,
    cache: ThumbnailCache | None = None,
) -> Thumbnail:
    """The thumbnail of one reference. Raises ReferenceNotFoundError (unknown id),
    ReferenceImageMissingError (file gone) or the `training.imaging` errors."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
    row = session.get(Reference, reference_id)
    if row is None:
        raise ReferenceNotFoundError(f"no reference with id {reference_id!r}")
    key = (row.sha256, size)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    path = settings.data_dir / row.image_path
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        logger.warning("reference image file missing", extra={"reference_id": reference_id})
        raise ReferenceImageMissingError(
            f"the image file of reference {reference_id!r} is missing from the data directory; "
            "delete the reference and enroll the image again"
        ) from exc
    png, width, height = render_thumbnail(
        decode_image(data, max_pixels=settings.max_pixels), size=size
    )
    thumb = Thumbnail(png=png, etag=f'"{row.sha256[:24]}-{size}"', width=width, height=height)
    if cache is not None:
        cache.put(key, thumb)
    return thumb
