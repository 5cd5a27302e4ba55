"""`cxr bench throughput` on synthetic images: the rows the contract names, with real numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.training.synthetic import make_folder

runner = CliRunner()


def test_bench_throughput_rows(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", {"train": 8}, size=48)
    out = tmp_path / "rows.json"
    result = runner.invoke(
        cli,
        ["bench", "throughput", "--data", str(data), "--models", "resnet9_half:32",
         "--batch-size", "8", "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1",
         "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert (row["encoder"], row["image_size"], row["batch"], row["device"]) == (
        "resnet9_half", 32, 8, "cpu"
    )  # fmt: skip
    rates = ("images_per_s", "synthetic_images_per_s", "uncached_images_per_s",
             "pipeline_images_per_s", "ram_pipeline_images_per_s", "ram_images_per_s",
             "peak_memory_mb")  # fmt: skip
    for key in rates:
        assert row[key] > 0, key
    assert row["efficiency"] == pytest.approx(
        row["images_per_s"] / row["synthetic_images_per_s"], abs=0.01
    )
    assert row["images"] == 32 and row["cache_build_s"] > 0
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1  # the cache it built


def test_bench_throughput_rejects_a_bad_model(tmp_path: Path) -> None:
    result = runner.invoke(
        cli, ["bench", "throughput", "--data", str(tmp_path), "--models", "resnet18"]
    )
    assert result.exit_code == 2 and "ENCODER:IMAGE_SIZE" in result.output
