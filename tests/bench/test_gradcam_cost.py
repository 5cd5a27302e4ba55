"""bench/gradcam_cost.py: a smoke run end to end on a small checkpoint (every row present, the
encoders it compares produce decodable PNGs of the same pixels)."""

from __future__ import annotations

from pathlib import Path

from bench.gradcam_cost import run
from tests.app.conftest_predict import make_test_checkpoint


def test_smoke_run_reports_every_part(tmp_path: Path) -> None:
    report = run(make_test_checkpoint(tmp_path / "m.pt"), iterations=2)
    assert set(report["forward"]) == {"ort_embedding_ms", "ort_embedding_and_features_ms"}
    assert set(report["cam"]) == {
        "pytorch_grad_cam_ms",
        "eager_features_head_backward_ms",
        "ort_features_head_backward_ms",
    }
    png = report["png"]
    assert png["shape"] == [512, 512, 3]
    for name in ("pillow", "encode_png_rgb_isal", "encode_png_rgb_zlib"):
        assert png[f"{name}_ms"] > 0 and png[f"{name}_bytes"] > 0
    values = [v for part in ("forward", "cam") for v in report[part].values()]
    assert all(v > 0 for v in values)
