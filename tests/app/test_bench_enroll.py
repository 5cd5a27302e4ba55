"""Smoke test of `cxr bench enroll` (the measured runs are in docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

from app.bench import _fresh_checkpoint
from app.bench_enroll import run_enroll_bench


def test_bench_enroll_smoke(data_dir: Path, tmp_path: Path) -> None:
    checkpoint = _fresh_checkpoint(tmp_path / "fresh.pt")
    rows = run_enroll_bench(
        checkpoint=checkpoint, references=[12], rounds=2, predicts=2, work_dir=tmp_path
    )
    assert len(rows) == 1
    row = rows[0]
    assert row.references == 12 and row.rounds == 2 and row.errors == 0
    assert row.enroll_p50_ms > 0 and row.predict_p50_ms > 0
    assert row.first_predict_after_enroll_p50_ms > 0 and row.start_s > 0
