"""The index file format: atomic writes, a magic header, a version and a checksum.

Layout (little-endian)::

    magic       8 bytes   b"CXRINDEX"
    version     uint32    FORMAT_VERSION
    length      uint64    payload length in bytes
    sha256      32 bytes  digest of the payload
    payload     length bytes:
        header_len uint64, header (UTF-8 JSON: metadata + blob table), blobs (raw bytes)

Why this shape: a crash while writing must never leave a half-written index where the service
looks for one (so we write a temp file in the same directory, fsync it and ``os.replace`` it, an
atomic rename on POSIX and Windows); and a truncated, bit-flipped or foreign file must be refused
before any of it is interpreted (so the magic, the declared length and the SHA-256 of the whole
payload are checked first). Arrays are stored as raw bytes with dtype and shape in the JSON blob
table: no pickle, so loading a file can never execute code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from index.errors import IndexFileError

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "MAGIC", "read_index_file", "write_index_file"]

MAGIC = b"CXRINDEX"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256
_U64 = struct.Struct("<Q")


def _encode_payload(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    table: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype object; store strings in the metadata")
        raw = array.tobytes()
        table.append(
            {
                "name": name,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "length": len(raw),
            }
        )
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta, "arrays": table}, separators=(",", ":")).encode()
    return b"".join([_U64.pack(len(header)), header, *blobs])


def write_index_file(path: str | Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``meta`` (JSON-able) and ``arrays`` to ``path`` atomically.

    The file appears complete or not at all: readers of ``path`` see either the previous file or
    the new one. The parent directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _encode_payload(meta, arrays)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(prefix)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_index_file(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify a file written by :func:`write_index_file`.

    Raises :class:`IndexFileError` (never returns partial data) when the file is missing, not an
    index file, of an unsupported version, truncated, or fails its checksum.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IndexFileError(
            f"index file {path} does not exist; build the index and save() it first"
        ) from exc
    except OSError as exc:
        raise IndexFileError(f"cannot read index file {path}: {exc}") from exc
    if len(data) < _PREFIX.size or not data.startswith(MAGIC):
        raise IndexFileError(
            f"{path} is not a reference-index file (missing the {MAGIC!r} header); "
            "pass a file written by ReferenceIndex.save()"
        )
    _magic, version, length, digest = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise IndexFileError(
            f"{path} has index format version {version}; this build reads version "
            f"{FORMAT_VERSION}. Rebuild the index from the references with this version"
        )
    payload = memoryview(data)[_PREFIX.size :]
    if len(payload) != length:
        raise IndexFileError(
            f"{path} is truncated or has trailing bytes: header declares {length} payload bytes, "
            f"found {len(payload)}. Restore it from a backup or rebuild the index"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise IndexFileError(
            f"{path} failed its SHA-256 checksum (the file is corrupt); "
            "restore it from a backup or rebuild the index"
        )
    try:
        (header_len,) = _U64.unpack_from(payload)
        header = json.loads(bytes(payload[_U64.size : _U64.size + header_len]))
        blob_base = _U64.size + header_len
        arrays: dict[str, np.ndarray] = {}
        for entry in header["arrays"]:
            start = blob_base + int(entry["offset"])
            raw = payload[start : start + int(entry["length"])]
            if len(raw) != int(entry["length"]):
                raise ValueError(f"array {entry['name']!r} runs past the end of the payload")
            arrays[entry["name"]] = (
                np.frombuffer(raw, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"]).copy()
            )
        meta = header["meta"]
    except (ValueError, KeyError, TypeError) as exc:  # checksum passed but content is malformed
        raise IndexFileError(f"{path} has a malformed index payload: {exc}") from exc
    return meta, arrays
