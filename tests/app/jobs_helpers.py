"""Helpers for the job tests: synthetic class images, a baseline checkpoint, job polling and a
real `cxr worker` subprocess. Synthetic images only (drawn patterns plus noise)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

LABELS = ("Bacterial", "Normal", "Viral")
#: The retrain parameters of a tiny run (seconds on a shared CPU).
TINY = {"encoder": "sepconv", "epochs": 1, "image_size": 32}
ROOT = Path(__file__).resolve().parents[2]


def class_png(label: str, seed: int, size: int = 48) -> bytes:
    """A grey PNG whose pattern depends on `label` (stripes one way or the other, or a disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if label == LABELS[0]:
        base = 0.5 + 0.4 * np.sin(xx / 2.0 + phase)
    elif label == LABELS[1]:
        base = 0.5 + 0.4 * np.sin(yy / 2.0 + phase)
    else:
        cx, cy = rng.uniform(size * 0.35, size * 0.65, size=2)
        base = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < (size / 4) ** 2, 0.9, 0.1)
    image = np.clip(base + rng.normal(0, 0.05, size=(size, size)), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def enroll(
    client: TestClient,
    headers: dict[str, str],
    *,
    per_class: int = 6,
    seed0: int = 0,
    source: str | None = None,
) -> int:
    """Enroll `per_class` synthetic images of each label over HTTP; returns how many."""
    total = 0
    for i, label in enumerate(LABELS):
        files = [
            ("file", (f"{label}-{j}.png", class_png(label, seed0 + 1000 * i + j), "image/png"))
            for j in range(per_class)
        ]
        data = {"label": label, **({"source": source} if source else {})}
        response = client.post("/references", headers=headers, data=data, files=files)
        assert response.status_code == 201, response.text
        total += len(response.json()["references"])
    return total


def make_checkpoint(
    path: Path, *, constant: bool = False, bias: float = 1.0, image_size: int = 32
) -> Path:
    """A small, untrained `sepconv` checkpoint. `constant=True` embeds every image to the same
    vector (zero head weights; `bias` changes the file, not the vector), a baseline any trained
    model beats on k-NN balanced accuracy (it scores exactly 1 / number of classes)."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.encoders import create_encoder
    from training.preprocess import Preprocessing

    torch.manual_seed(0)
    encoder = create_encoder("sepconv", embedding_dim=32)
    with torch.no_grad():
        if constant:
            encoder.head.weight.zero_()
            encoder.head.bias.fill_(bias)
        else:
            # Untrained features are tiny next to the head's bias; without the bias the
            # embedding keeps the features' direction, so untrained k-NN is far above chance.
            encoder.head.bias.zero_()
    save_checkpoint(
        path,
        encoder=encoder.eval(),
        encoder_name="sepconv",
        encoder_kwargs={},
        preprocessing=Preprocessing(image_size=image_size, mean=0.5, std=0.25),
        classes=list(LABELS),
        config={"note": "test baseline"},
        metrics={},
    )
    return path


def wait_for_job(
    client: TestClient,
    headers: dict[str, str],
    job_id: str,
    *,
    until: tuple[str, ...] = ("succeeded", "failed"),
    timeout: float = 120.0,
    min_progress: float | None = None,
) -> dict[str, Any]:
    """Poll GET /jobs/{id} until its status is in `until` (and progress >= min_progress)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in until and (min_progress is None or body["progress"] >= min_progress):
            return body
        if body["status"] == "failed" and "failed" not in until:
            raise AssertionError(f"job failed: {body['error']}")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {until} in {timeout} s: {body}")


def predict_version(client: TestClient, headers: dict[str, str]) -> str:
    """The model version a prediction is answered with."""
    response = client.post(
        "/predict",
        headers=headers,
        params={"explain": "false"},
        files={"file": ("q.png", class_png(LABELS[2], 999_999), "image/png")},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


@dataclass
class WorkerProcess:
    """A `cxr worker` subprocess in its own process group (so kill -9 takes its children)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=15)


def unique_queue() -> str:
    return f"cxr-test-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def run_worker(env: dict[str, str], log_path: Path) -> Iterator[WorkerProcess]:
    """Start `python -m app.jobs.worker` (what `cxr worker` runs) and always kill it after."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.jobs.worker", "--concurrency", "1", "--loglevel", "INFO"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(process=process, log_path=log_path)
    try:
        yield worker
    finally:
        if process.poll() is None:
            worker.kill(signal.SIGKILL)
