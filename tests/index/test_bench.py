"""Smoke tests of `cxr bench index` and of the unknown-class report script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from index.bench import bench_index_command, format_table, run_index_bench
from index.synthetic import clustered_embeddings

ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = {
    "size",
    "index",
    "p50_ms",
    "p99_ms",
    "recall_at_10",
    "brute_p50_ms",
    "speedup",
    "batch",
    "build_s",
    "memory_mb",
}


def test_bench_command_writes_json_rows(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(bench_index_command)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "--sizes",
            "300,600",
            "--dim",
            "16",
            "--queries",
            "8",
            "--batch",
            "4",
            "--datasets",
            "clustered,uniform",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 2  # datasets x sizes x batch sizes
    for row in rows:
        assert set(row) >= ROW_FIELDS
        assert row["recall_at_10"] == pytest.approx(1.0)  # exact index at these sizes
        assert row["p50_ms"] > 0 and row["speedup"] > 0
    assert {r["batch"] for r in rows} == {1, 4}
    assert "recall_at_10" in result.output and "speedup" in result.output


def test_bench_rejects_bad_sizes() -> None:
    app = typer.Typer()
    app.command()(bench_index_command)
    result = CliRunner().invoke(app, ["--sizes", "ten"])
    assert result.exit_code != 0 and "comma-separated integers" in result.output


def test_run_index_bench_with_an_explicit_factory() -> None:
    rows = run_index_bench(
        [400], dim=8, n_queries=5, batch=5, datasets=["clustered"], factories=["Flat"], n_classes=2
    )
    assert all("Flat" in r["index"] for r in rows)
    assert "p50_ms" in format_table(rows)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "unknown_classes", ROOT / "bench" / "unknown_classes.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_unknown_class_report_on_synthetic_embeddings() -> None:
    script = _load_script()
    x, cluster, _ = clustered_embeddings(1200, 16, n_clusters=3, n_classes=3, spread=0.3, seed=1)
    q, qcluster, _ = clustered_embeddings(
        600, 16, n_clusters=3, n_classes=3, spread=0.3, seed=2, centers_seed=1
    )
    names = np.array(["A", "B", "C"])
    rows = script.unknown_class_report(x, names[cluster], q, names[qcluster], quantile=0.95)
    assert [r["held_out"] for r in rows] == ["A", "B", "C"]
    for r in rows:
        assert r["held_out"] not in r["enrolled"]
        assert r["auroc"] > 0.95 and r["flagged_unknown"] > 0.8 and r["flagged_known"] < 0.15
    assert "auroc" in script.format_rows(rows)


def test_auroc_matches_the_definition() -> None:
    script = _load_script()
    assert script.auroc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert script.auroc(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert script.auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert script.auroc(np.array([0.5]), np.array([1])) is None
