"""A short version of the soak in bench/soak.py (4 clients, a few seconds) in the default run:
the mix of predict, enroll, delete and activate against the real service answers no 5xx and
leaves no reference row without its file or file without its row."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_soak():
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_smoke(tmp_path: Path, checkpoint_a: Path, checkpoint_b: Path) -> None:
    soak = load_soak()
    report = soak.run_soak(
        clients=4,
        seconds=8,
        checkpoints=[checkpoint_a, checkpoint_b],
        rss_bound_mb=400.0,
        work_dir=tmp_path,
    )
    assert report.requests > 0 and report.by_kind.get("predict", 0) > 0, report
    assert report.status_5xx == 0 and report.transport_errors == 0, report.statuses
    assert (report.rows_without_file, report.files_without_row) == (0, 0)
    assert report.ok, report.as_dict()
