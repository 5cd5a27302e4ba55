"""`app.files`: the one atomic-write helper of the service's data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import files
from app.files import atomic_copy, atomic_write_bytes


def test_atomic_write_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.png"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]  # no temp file left


def test_atomic_copy_copies_large_files(tmp_path: Path) -> None:
    source = tmp_path / "src.pt"
    source.write_bytes(bytes(range(256)) * 10_000)  # over one copy chunk
    target = tmp_path / "models" / "dst.pt"
    atomic_copy(source, target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.pt", tmp_path / "models" / "other.pt")
    assert sorted(p.name for p in target.parent.iterdir()) == ["dst.pt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def failing_replace(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
