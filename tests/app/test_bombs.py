"""Issue 11 item 1: decompression bombs. Every decode path has a memory budget enforced before
the memory is spent, and the refusal (413) says why.

The corpus builders are the bench's (`bench/bomb_rss.py`), so the smoke test at the end and
the figure in docs/BENCHMARKS.md measure the same files.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import app.services.uploads as uploads
from app.main import create_app
from tests.app.conftest import new_key
from tests.app.conftest_predict import post_predict
from training.imaging import ImageTooLargeError, decode_image, estimate_decode_bytes

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


def _bench():
    name = "bench_bomb_rss"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "bomb_rss.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _traced_peak(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        try:
            result: object = fn()
        except Exception as exc:  # the caller inspects it
            result = exc
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_deflated_dicom_bomb_is_refused_without_inflating_it() -> None:
    bomb = _bench().deflated_dicom(16, 16, pixel_bytes=96 * MB)
    assert len(bomb) < 200_000  # ~100 KB on the wire
    peak, result = _traced_peak(lambda: decode_image(bomb, max_bytes=320 * MB))
    assert isinstance(result, ImageTooLargeError)
    assert "decompression bomb" in str(result)
    # pydicom's own reader inflated all 96 MB (then +1.55 GB in the service for 400 MB)
    assert peak < 8 * MB, f"{peak / MB:.1f} MB traced while refusing the bomb"


def test_deflated_dicom_declaring_big_pixels_is_bounded_by_its_header() -> None:
    # The header declares 1000x1000 16-bit (2 MB) but the stream inflates to 40 MB.
    bomb = _bench().deflated_dicom(1000, 1000, pixel_bytes=40 * MB)
    peak, result = _traced_peak(lambda: decode_image(bomb, max_bytes=320 * MB))
    assert isinstance(result, ImageTooLargeError)
    assert peak < 12 * MB


def test_honest_deflated_dicom_still_decodes() -> None:
    data = _bench().deflated_dicom(64, 48)
    out = decode_image(data, max_bytes=320 * MB)
    assert out.shape == (64, 48) and out.dtype == np.float32


def test_budget_accounts_for_bit_depth() -> None:
    bench = _bench()
    eight = estimate_decode_bytes(bench.png_constant(1200, 1000, value=7))
    sixteen = estimate_decode_bytes(bench.png_constant(1200, 1000, bits=16, value=7))
    assert sixteen >= 1.8 * eight
    # The estimate bounds what decoding really allocates (numpy buffers, traced).
    data = bench.png_constant(1200, 1000, bits=16, value=700)
    peak, out = _traced_peak(lambda: decode_image(data))
    assert isinstance(out, np.ndarray) and out.shape == (1000, 1200)
    assert peak <= sixteen


def test_49_megapixel_16bit_png_is_refused_under_the_pixel_limit(client, headers) -> None:
    bench = _bench()
    settings = client.app.state.settings
    bomb = bench.png_constant(7000, 7000, bits=16)
    assert settings.max_pixels > 7000 * 7000 and len(bomb) < 200_000
    started = time.perf_counter()
    response = client.post(
        "/references",
        headers=headers["clinician"],
        data={"label": "x"},
        files={"file": ("bomb.png", bomb, "image/png")},
    )
    assert response.status_code == 413, response.text
    assert "CXR_MAX_DECODE_MB" in response.json()["detail"]
    assert "I;16" in response.json()["detail"]
    assert time.perf_counter() - started < 5  # refused from the header, nothing decoded


def test_deflated_bomb_is_413_on_both_upload_routes(client, headers, enrolled) -> None:
    bomb = _bench().deflated_dicom(64, 64, pixel_bytes=64 * MB)
    response = client.post(
        "/references",
        headers=headers["clinician"],
        data={"label": "x"},
        files={"file": ("b.dcm", bomb, "application/dicom")},
    )
    assert response.status_code == 413 and "bomb" in response.json()["detail"]
    response = post_predict(client, headers["reader"], bomb, filename="b.dcm")
    assert response.status_code == 413 and "bomb" in response.json()["detail"]


def test_enrollment_decodes_are_limited_like_predictions(
    make_settings, monkeypatch: pytest.MonkeyPatch, make_xray
) -> None:
    """Four parallel enrollments took +5 GB: decodes now queue for a bounded number of slots
    (shared with predictions), so at most `inference_workers` images are decoded at once."""
    running = 0
    peak = 0
    lock = threading.Lock()
    real = uploads.decode_image

    def slow_decode(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.3)
            return real(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(uploads, "decode_image", slow_decode)
    app = create_app(make_settings(inference_workers=2))
    with TestClient(app) as client:
        key = {"X-API-Key": new_key(app, "clinician")}
        statuses: list[int] = []

        def enroll(seed: int) -> None:
            r = client.post(
                "/references",
                headers=key,
                data={"label": "disc"},
                files={"file": ("x.png", make_xray("disc", seed=seed), "image/png")},
            )
            statuses.append(r.status_code)

        threads = [threading.Thread(target=enroll, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [201] * 6
    assert peak == 2, f"{peak} decodes ran at once with 2 slots"


@pytest.mark.slow
def test_bomb_bench_smoke(tmp_path: Path) -> None:
    """The bench on its small corpus: a real server process, its peak RSS within the bound."""
    result = _bench().run(small=True, parallel=4)
    summary = result["summary"]
    assert summary["unexpected"] == [], summary["unexpected"]
    assert summary["burst_5xx"] == 0
    assert summary["within_bound"], summary
    refused = [r for r in result["rows"] if r["status"] == 413]
    assert refused and all(r["detail"] for r in refused)
