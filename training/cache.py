"""Decode once: a memory-mapped cache of preprocessed ``uint8`` images, fed to the device.

Decoding PNG/JPEG/DICOM and resizing a 2,000-pixel film costs milliseconds per image on a CPU
core; a GPU trains a small encoder on thousands of images per second. :func:`open_cache` decodes
every image once through the shared :func:`~training.preprocess.preprocess` and stores the
result, mapped back to ``[0, 1]`` and quantised to ``uint8`` (the precision of 8-bit sources), as
one raw ``(N, S, S)`` file. Later epochs, later runs and every DDP rank and DataLoader worker
read the same pages: ``S*S`` bytes per image (50 KB at 224 px, 5 GB for 100,000 images, which
need not fit in RAM).

The cache is keyed by the preprocessing (``Preprocessing.to_dict()``, the decode pixel limit,
this format's version) and by the **content** (a BLAKE2 digest of each file's bytes, in order),
so an edited image or a changed image size can never be served from a stale cache; a changed
label costs nothing (labels are not cached). Files are written to temporary names and renamed,
metadata last, so a crash or a concurrent run never leaves a half-written cache in use.

:class:`DeviceBatches` turns a batch sampler into ready training batches: gather rows from the
map (a background thread, so the next batch is read while the device computes), pin, copy to
the device, then augment the whole batch there (:class:`~training.gpu_augment.BatchAugmentation`)
and normalise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data import Sample, group_ids
from training.imaging import decode_image
from training.preprocess import Preprocessing, preprocess

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "CachedDataset",
    "DeviceBatches",
    "TensorCache",
    "cache_key",
    "file_digest",
    "open_cache",
]

CACHE_FORMAT = 1


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of the file's bytes (about 1 GB/s: cheap next to decoding the image)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_key(digests: Sequence[str], spec: Preprocessing, max_pixels: int | None) -> str:
    """The cache's name: preprocessing, decode limit, format version and content, in order."""
    head = json.dumps(
        {"format": CACHE_FORMAT, "spec": spec.to_dict(), "max_pixels": max_pixels},
        sort_keys=True,
    )
    h = hashlib.sha256(head.encode())
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()[:32]


def to_unit_u8(tensor: torch.Tensor, spec: Preprocessing) -> np.ndarray:
    """A preprocessed ``(1, S, S)`` tensor back to ``[0, 1]`` pixels, as ``uint8 (S, S)``."""
    unit = (tensor[0] * spec.std + spec.mean).clamp_(0.0, 1.0)
    return (unit * 255.0).round_().to(torch.uint8).numpy()


@dataclass
class TensorCache:
    """An opened cache: ``images[i]`` is sample ``samples[i]`` (unreadable files left out)."""

    key: str
    path: Path
    images: np.ndarray  # read-only memmap, uint8 (N, S, S)
    samples: list[Sample]
    skipped: list[Path]
    spec: Preprocessing
    built: bool  # True when this call decoded the images (a miss), False on a hit

    def __len__(self) -> int:
        return len(self.samples)


def _build(
    samples: Sequence[Sample],
    spec: Preprocessing,
    raw: Path,
    max_pixels: int | None,
) -> tuple[list[int], list[tuple[Path, str]]]:
    """Decode + preprocess every sample into ``raw`` (atomically); kept indices, skipped."""
    kept: list[int] = []
    skipped: list[tuple[Path, str]] = []
    fd, tmp = tempfile.mkstemp(prefix=f".{raw.name}.", suffix=".tmp", dir=raw.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for i, sample in enumerate(samples):
                try:
                    tensor = preprocess(decode_image(sample.path, max_pixels=max_pixels), spec)
                except (ValueError, OSError) as exc:  # ImageError is a ValueError
                    skipped.append((sample.path, exc.__class__.__name__))
                    continue
                fh.write(to_unit_u8(tensor, spec).tobytes())
                kept.append(i)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, raw)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return kept, skipped


def open_cache(
    samples: Sequence[Sample],
    spec: Preprocessing,
    cache_dir: Path | str,
    *,
    max_pixels: int | None = None,
    build: bool = True,
    barrier: Callable[[], None] | None = None,
) -> TensorCache:
    """Open the cache of ``samples`` under ``spec`` in ``cache_dir``, decoding them on a miss.

    ``build=False`` waits for another process to build it instead (DDP: local rank 0 builds,
    the others pass ``build=False``); ``barrier`` is then called by everyone after the build.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    samples = list(samples)
    digests = [file_digest(s.path) if s.path.is_file() else "missing" for s in samples]
    key = cache_key(digests, spec, max_pixels)
    raw, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    size = spec.image_size
    built = False
    if build and not meta_path.is_file():
        log.info("tensor cache %s: decoding %d images once (%d px)", key, len(samples), size)
        kept, skipped = _build(samples, spec, raw, max_pixels)
        meta = {
            "format": CACHE_FORMAT, "key": key, "spec": spec.to_dict(), "image_size": size,
            "max_pixels": max_pixels, "count": len(kept), "rows": kept,
            "skipped": [[str(p), why] for p, why in skipped],
        }  # fmt: skip
        fd, tmp = tempfile.mkstemp(prefix=f".{meta_path.name}.", dir=cache_dir)
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh)
        os.replace(tmp, meta_path)
        built = True
    if barrier is not None:
        barrier()
    meta = json.loads(meta_path.read_text())
    rows: list[int] = meta["rows"]
    expected = len(rows) * size * size
    if raw.stat().st_size != expected:
        raise ValueError(
            f"tensor cache {raw} has {raw.stat().st_size} bytes, expected {expected}; delete "
            f"{raw} and {meta_path} to rebuild it"
        )
    skipped_paths = [Path(p) for p, _ in meta["skipped"]]
    if meta["skipped"]:
        log.warning(
            "skipped %d of %d images that cannot be read: %s",
            len(skipped_paths), len(samples),
            ", ".join(f"{Path(p).name} ({why})" for p, why in meta["skipped"][:10]),
        )  # fmt: skip
    if samples and not rows:
        raise ValueError(
            f"none of the {len(samples)} images could be read (first: {skipped_paths[0]}); "
            "check the data source"
        )
    images = (
        np.memmap(raw, dtype=np.uint8, mode="r", shape=(len(rows), size, size))
        if rows
        else np.zeros((0, size, size), dtype=np.uint8)
    )
    if not built:
        log.info("tensor cache %s: %d images from %s (no decoding)", key, len(rows), raw)
    return TensorCache(
        key=key, path=raw, images=images, samples=[samples[i] for i in rows],
        skipped=skipped_paths, spec=spec, built=built,
    )  # fmt: skip


class CachedDataset(Dataset[tuple[torch.Tensor, int]]):
    """The cached images as ``(normalised float (1, S, S), class index)``, like ``XrayDataset``.

    Used un-augmented (validation references and queries); training batches go through
    :meth:`batch_u8` and :class:`DeviceBatches` instead.
    """

    def __init__(self, cache: TensorCache, classes: Sequence[str]) -> None:
        self.cache = cache
        self.spec = cache.spec
        self.classes = list(classes)
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({s.label for s in cache.samples} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {self.classes}")
        self.samples = cache.samples
        self.skipped = cache.skipped
        self.labels = np.array([index[s.label] for s in self.samples], dtype=np.int64)
        self.groups = group_ids(self.samples)  # label x source, for the balanced sampler

    def __len__(self) -> int:
        return len(self.samples)

    def normalise(self, u8: torch.Tensor) -> torch.Tensor:
        """``uint8`` pixels (any shape) to the model's input scale, as ``preprocess`` does."""
        return (u8.float() / 255.0 - self.spec.mean) / self.spec.std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        u8 = torch.from_numpy(np.array(self.cache.images[index]))
        return self.normalise(u8)[None], int(self.labels[index])

    def batch_u8(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``uint8 (B, 1, S, S)`` pixels and ``int64 (B,)`` labels of ``indices`` (one gather)."""
        idx = np.asarray(indices, dtype=np.int64)
        pixels = torch.from_numpy(np.ascontiguousarray(self.cache.images[idx]))[:, None]
        return pixels, torch.from_numpy(self.labels[idx])


class DeviceBatches:
    """Training batches from a :class:`CachedDataset`: gather, copy, augment on the device.

    Iterating yields ``(x, y)`` already on ``device``: ``x`` normalised float ``(B, 1, S, S)``
    (channels_last if asked), augmented per image by ``augment`` (pixels in ``[0, 1]``). The
    gather of batch ``n+1`` (and its pinning, on CUDA) runs in a background thread while the
    caller trains on batch ``n``.
    """

    def __init__(
        self,
        dataset: CachedDataset,
        batch_sampler: Iterable[Sequence[int]],
        *,
        device: torch.device,
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
        channels_last: bool = False,
        prefetch: int = 2,
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.device = device
        self.augment = augment
        self.channels_last = channels_last
        self.prefetch = max(1, prefetch)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        for indices in self.batch_sampler:
            x, y = self.dataset.batch_u8(indices)
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)

    def _prefetched(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self._host_batches():
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as exc:  # re-raised in the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, name="cxr-batch-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._prefetched():
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            unit = x.float().div_(255.0)
            if self.augment is not None:
                unit = self.augment(unit)
            out = (unit - self.dataset.spec.mean) / self.dataset.spec.std
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, y


def cached_splits(
    splits: dict[str, list[Sample]],
    classes: Sequence[str],
    spec: Preprocessing,
    cache_dir: Path | str,
    *,
    build: bool = True,
    barrier: Callable[[], None] | None = None,
) -> dict[str, CachedDataset]:
    """One :class:`CachedDataset` per non-empty split (a cache file each).

    Under DDP only one process per node decodes (``build=True``); ``barrier`` makes the
    others wait for it.
    """
    return {
        name: CachedDataset(
            open_cache(items, spec, cache_dir, build=build, barrier=barrier), classes
        )
        for name, items in splits.items()
        if items
    }
