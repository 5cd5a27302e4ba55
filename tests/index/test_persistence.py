"""Save/load round trips and refusal of every file that is not an intact index."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.errors import IndexFileError
from index.persistence import MAGIC, read_index_file, write_index_file
from index.reference_index import ReferenceIndex
from index.synthetic import l2_normalize

DIM = 16
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 64


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ReferenceIndex, Path]:
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.standard_normal((120, DIM)))
    index = ReferenceIndex.build(
        x, [f"id{i}" for i in range(120)], [f"L{i % 3}" for i in range(120)], device="cpu", k=4
    )
    index.remove(["id0", "id5"])
    path = tmp_path / "refs.cxridx"
    index.save(path)
    return index, path


def test_round_trip_gives_identical_answers_and_state(saved) -> None:
    index, path = saved
    loaded = ReferenceIndex.load(path, device="cpu")
    assert loaded.ids == index.ids and loaded.classes() == index.classes()
    assert loaded.version == index.version and loaded.k == 4
    q = l2_normalize(np.random.default_rng(1).standard_normal((8, DIM)))
    for a, b in zip(index.search(q), loaded.search(q), strict=True):
        assert a == b
    for c in index.classes():
        s1, q1, n1 = index.class_sums(c)
        s2, q2, n2 = loaded.class_sums(c)
        np.testing.assert_array_equal(s1, s2)
        assert (q1, n1) == (q2, n2)
    # the loaded index keeps working: ids continue, removal and re-save round trip
    loaded.add(q[:2], ["new1", "new2"], ["L0", "L9"])
    loaded.remove(["id1"])
    loaded.save(path)
    again = ReferenceIndex.load(path, device="cpu")
    assert again.classes() == loaded.classes() and "new2" in again.ids


def test_save_is_atomic_and_leaves_no_temp_files(saved, monkeypatch) -> None:
    index, path = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # temp file cleaned up


@pytest.mark.parametrize("keep", [0, 5, 20, 60, -1])
def test_truncated_file_is_refused(saved, tmp_path: Path, keep: int) -> None:
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "truncated.cxridx"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(IndexFileError):
        ReferenceIndex.load(bad)


def test_flipped_byte_fails_the_checksum(saved, tmp_path: Path) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.cxridx"
    bad.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum"):
        ReferenceIndex.load(bad)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    png = tmp_path / "image.png"
    png.write_bytes(PNG_HEADER)
    with pytest.raises(IndexFileError, match="not a reference-index file"):
        ReferenceIndex.load(png)
    raw_faiss = tmp_path / "random.faiss"
    flat = faiss.IndexFlatIP(DIM)
    flat.add(l2_normalize(np.random.default_rng(2).standard_normal((10, DIM))))
    faiss.write_index(flat, str(raw_faiss))
    with pytest.raises(IndexFileError, match="not a reference-index file"):
        ReferenceIndex.load(raw_faiss)
    with pytest.raises(IndexFileError, match="does not exist"):
        ReferenceIndex.load(tmp_path / "missing.cxridx")
    empty = tmp_path / "empty.cxridx"
    empty.write_bytes(b"")
    with pytest.raises(IndexFileError):
        ReferenceIndex.load(empty)


def test_other_version_and_other_kind_are_refused(saved, tmp_path: Path) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    data[len(MAGIC)] = 99  # format version field
    future = tmp_path / "future.cxridx"
    future.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="version 99"):
        ReferenceIndex.load(future)
    other = tmp_path / "other.cxridx"
    write_index_file(other, {"kind": "something-else"}, {"a": np.zeros(3)})
    with pytest.raises(IndexFileError, match="another kind"):
        ReferenceIndex.load(other)
    meta, arrays = read_index_file(other)
    assert meta == {"kind": "something-else"} and arrays["a"].shape == (3,)
