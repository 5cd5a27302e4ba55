"""Smoke test of `cxr bench predict`: the real service in a subprocess, ~1 s per phase."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

SPEC_FIELDS = {"clients", "explain", "p50_ms", "p99_ms", "rps", "errors", "bare_p50_ms"}
#: What explains the limits: the framework + HTTP + client floor and the CPU per request.
LIMIT_FIELDS = {
    "floor_p50_ms",
    "floor_rps",
    "server_cpu_ms_per_request",
    "floor_server_cpu_ms_per_request",
    "client_cpu_ms_per_request",
    "machine_cores_busy",
}


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
        assert set(row) >= SPEC_FIELDS | LIMIT_FIELDS
        assert row["errors"] == 0 and row["status_5xx"] == 0
        assert row["requests"] > 0 and row["rps"] > 0
        assert row["p50_ms"] > 0
        assert row["p99_ms"] >= row["p50_ms"]
        assert row["bare_p50_ms"] > 0
        # The floor does no service work: it is below the service, and it is measured.
        assert 0 < row["floor_p50_ms"] < row["p50_ms"]
        assert row["floor_rps"] > 0
        if sys.platform == "linux":  # read from /proc
            # The server decodes, embeds and searches every request: it cannot be free.
            assert row["server_cpu_ms_per_request"] > 0
        assert row["client_cpu_ms_per_request"] > 0
        if sys.platform == "linux":
            assert 0 < row["machine_cores_busy"] <= os.cpu_count()
    # Rows of one client count share one floor measurement.
    assert rows[0]["floor_p50_ms"] == rows[1]["floor_p50_ms"]
    assert "| clients | explain |" in result.stdout
    assert "floor_p50_ms" in result.stdout and "server_cpu_ms/req" in result.stdout
    assert "p50 - floor" in result.stdout and "cores busy: bench" in result.stdout


def test_floor_app_reads_the_upload_and_answers_a_constant() -> None:
    """The floor endpoint takes the same multipart request as /predict and does nothing else."""
    from fastapi.testclient import TestClient

    from app.bench import create_floor_app

    payload = b"\x89PNG" + bytes(range(256)) * 40
    with TestClient(create_floor_app()) as client:
        assert client.get("/ready").status_code == 200
        response = client.post(
            "/predict",
            params={"explain": "false"},
            files={"file": ("query.png", payload, "image/png")},
        )
        assert response.status_code == 200
        assert response.json() == {"label": "floor", "bytes": len(payload), "unknown": False}
        assert client.post("/predict").status_code == 422  # no file: not a floor measurement


def test_bench_predict_needs_a_real_checkpoint(tmp_path: Path) -> None:
    """The default is the shipped recipe's model, never a silent random one."""
    from app.cli import cli

    missing = tmp_path / "nope.pt"
    result = CliRunner().invoke(cli, ["bench", "predict", "--checkpoint", str(missing)])
    assert result.exit_code == 2
    assert "--fresh-model" in result.output and "runs/default" in result.output


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the process tree is read from /proc")
def test_bench_predict_with_two_api_processes(data_dir: Path, tmp_path: Path) -> None:
    """`--api-workers 2`: uvicorn's multi-process mode; the server's CPU is the sum over its
    worker processes (the supervisor itself does no request work, so a positive figure means
    the children were counted) and the RSS is one process's."""
    from app.cli import cli

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "predict",
            "--clients",
            "2",
            "--seconds",
            "1",
            "--explain",
            "false",
            "--references-per-class",
            "3",
            "--fresh-model",
            "--api-workers",
            "2",
            "--no-keepalive",
            "--query-size",
            "600x400",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["api_workers"] == 2 and row["clients"] == 2 and row["keepalive"] is False
    assert row["query_size"] == "600x400"
    assert row["errors"] == 0 and row["requests"] > 0
    assert row["server_cpu_ms_per_request"] > 0
    assert 0 < row["server_rss_mb"] < 4096
    assert "api_workers=2 onnx=auto clients=2" in result.stdout


@pytest.mark.parametrize("size", ["512", "axb", "8x8", "20000x512"])
def test_bench_predict_refuses_a_bad_query_size(size: str) -> None:
    from app.cli import cli

    result = CliRunner().invoke(cli, ["bench", "predict", "--fresh-model", "--query-size", size])
    assert result.exit_code == 2
    assert "--query-size" in result.output
