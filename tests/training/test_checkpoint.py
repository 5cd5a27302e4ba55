"""Checkpoints: self-describing, atomic, identical embeddings after a round trip, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from training.encoders import create_encoder
from training.preprocess import Preprocessing


def _save(path: Path, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = create_encoder("resnet9_half", embedding_dim=32, stem_stride=1).eval()
    kwargs = dict(
        encoder=encoder,
        encoder_name="resnet9_half",
        encoder_kwargs={"stem_stride": 1},
        preprocessing=Preprocessing(image_size=32, mean=0.4, std=0.3),
        classes=["COVID-19", "Normal"],
        config={"epochs": 3, "out": Path("/tmp/x")},
        metrics={"val": {"balanced_accuracy": 0.9}},
    )
    kwargs.update(overrides)
    save_checkpoint(path, **kwargs)
    return encoder


def test_round_trip_gives_identical_embeddings(tmp_path: Path) -> None:
    path = tmp_path / "run" / "encoder.pt"
    encoder = _save(path)
    loaded = load_checkpoint(path)
    assert not loaded.encoder.training
    assert loaded.encoder_name == "resnet9_half"
    assert loaded.encoder_kwargs == {"stem_stride": 1}
    assert loaded.embedding_dim == 32
    assert loaded.preprocessing == Preprocessing(image_size=32, mean=0.4, std=0.3)
    assert loaded.classes == ["COVID-19", "Normal"]
    assert loaded.config["out"] == "/tmp/x"  # paths stored as plain strings
    assert loaded.metrics["val"]["balanced_accuracy"] == 0.9
    assert loaded.format_version == FORMAT_VERSION
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encoder(x), encoder(x))
    # Atomic save leaves no temporary files behind.
    assert [p.name for p in path.parent.iterdir()] == ["encoder.pt"]


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_foreign_files_are_rejected(tmp_path: Path) -> None:
    bare = tmp_path / "state_dict.pt"
    torch.save(create_encoder("sepconv").state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a cxr checkpoint"):
        load_checkpoint(bare)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(text)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_newer_format_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    _save(path)
    payload = read_checkpoint(path)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)
