"""Files of the service's data directory (reference images, stored prediction images, model
checkpoints): where a stored path points, what a file holds, and atomic writes.

A file appears complete under its real name or not at all: the content goes to a temp file in
the target's directory, is flushed and fsynced, then `os.replace`d over the target. A crash or
an error leaves no partial file under the real name (the temp file is removed on error).

`index/persistence.py` and `training/checkpoint.py` keep their own copies on purpose: `index/`
and `training/` never import `app/`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from app.config import Settings

__all__ = ["atomic_copy", "atomic_write_bytes", "file_sha256", "resolve_data_path"]

_COPY_CHUNK = 1024 * 1024


@contextmanager
def _atomic_target(target: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes `target` (fsynced, renamed) when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (parent directories are created)."""
    with _atomic_target(Path(path)) as handle:
        handle.write(data)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy the file `src` to `dst` atomically (parent directories are created)."""
    with _atomic_target(Path(dst)) as out, open(src, "rb") as source:
        shutil.copyfileobj(source, out, length=_COPY_CHUNK)


def resolve_data_path(path: str | Path, settings: Settings) -> Path:
    """Stored paths are relative to `data_dir` (so the directory can move); absolute ones
    are kept as they are."""
    p = Path(path)
    return p if p.is_absolute() else settings.data_dir / p


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
