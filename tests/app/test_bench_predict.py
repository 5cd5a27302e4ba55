"""Smoke test of `cxr bench predict`: the real service in a subprocess, ~1 s per phase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

SPEC_FIELDS = {"clients", "explain", "p50_ms", "p99_ms", "rps", "errors", "bare_p50_ms"}


@pytest.mark.slow
def test_bench_predict_smoke(data_dir: Path, tmp_path: Path) -> None:
    from app.cli import cli

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "predict",
            "--clients",
            "1,2",
            "--seconds",
            "1",
            "--references-per-class",
            "3",
            "--fresh-model",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["clients"], r["explain"]) for r in rows] == [
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    ]
    for row in rows:
        assert set(row) >= SPEC_FIELDS
        assert row["errors"] == 0 and row["status_5xx"] == 0
        assert row["requests"] > 0 and row["rps"] > 0
        assert row["p50_ms"] > 0
        assert row["p99_ms"] >= row["p50_ms"]
        assert row["bare_p50_ms"] > 0
    assert "| clients | explain |" in result.stdout


def test_bench_predict_needs_a_real_checkpoint(tmp_path: Path) -> None:
    """The default is the shipped recipe's model, never a silent random one."""
    from app.cli import cli

    missing = tmp_path / "nope.pt"
    result = CliRunner().invoke(cli, ["bench", "predict", "--checkpoint", str(missing)])
    assert result.exit_code == 2
    assert "--fresh-model" in result.output and "runs/default" in result.output
