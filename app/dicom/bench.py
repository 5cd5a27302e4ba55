"""`cxr bench dicom`: instances per minute from C-STORE in to SR stored in Orthanc, and the
latency DICOM adds over `/predict` for the same images.

What it does, so the numbers mean something:

1. A temp data dir with a fresh SQLite database, the model (the given checkpoint, or the small
   freshly initialised one `cxr bench predict` uses) and synthetic references, prepared by the
   same helpers as `cxr bench predict` (`app.bench`).
2. A private Orthanc (`app.dicom.orthanc`) that knows the listener as modality `cxr`, and the
   real `cxr dicom listen` in a subprocess whose results go back to that Orthanc by C-STORE.
3. `--instances` synthetic DX chest radiographs (`--image-size` pixels square, 16-bit) are
   stored in Orthanc first (not timed).
4. `sequential`: each instance alone, Orthanc `/modalities/cxr/store` then wait until its SR is
   in Orthanc: the end-to-end latency of one result (p50, p99).
5. `batch`: all instances in one Orthanc store job, until every SR is in Orthanc:
   `instances_per_min`.
6. `predict`: the same DICOM files posted to `/predict` (explain on, as the DICOM path does) on
   an in-process app over the same database, one after the other: `p50_ms`, and the `sequential`
   row's `added_p50_ms` and `ratio` against it.

Every part shares the machine: on a small machine the numbers include that contention.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer

from app.bench import _fresh_checkpoint, _percentile, _prepare_state, _synthetic_image
from app.dicom.orthanc import Orthanc, OrthancMissingError, free_port

logger = logging.getLogger(__name__)

__all__ = ["bench_dicom_command", "run_dicom_bench"]

RESULT_TIMEOUT_S = 600.0


def _dicom_instance(seed: int, size: int) -> tuple[bytes, str]:
    """A synthetic 16-bit DX chest radiograph (no patient data); (file, StudyInstanceUID)."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation as DX
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    kind = ("disc", "stripes", "grid")[seed % 3]
    png = _synthetic_image(kind, 50_000 + seed, size=(size, size))
    arr = (np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint16) * 16).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = f"BENCH^{seed}"
    ds.PatientID = f"BENCH-{seed}"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), str(ds.StudyInstanceUID)


def _sr_count(orthanc: Orthanc, study_uid: str | None = None) -> int:
    query: dict[str, str] = {"Modality": "SR"}
    if study_uid is not None:
        query["StudyInstanceUID"] = study_uid
    found = httpx.post(
        f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": query}, timeout=60
    ).json()
    return len(found)


def _wait(predicate: Any, what: str, timeout: float = RESULT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _echo(orthanc: Orthanc) -> bool:
    try:
        response = httpx.post(f"{orthanc.url}/modalities/cxr/echo", json={}, timeout=10)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def run_dicom_bench(
    *,
    checkpoint: Path | None = None,
    instances: int = 20,
    image_size: int = 512,
    references_per_class: int = 8,
    work_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Run the three phases; JSON-ready rows (see the module docstring)."""
    from fastapi.testclient import TestClient

    from app.config import get_settings
    from app.main import create_app

    tmp = tempfile.TemporaryDirectory(prefix="cxr-bench-dicom-") if work_dir is None else None
    root = Path(tmp.name) if tmp is not None else Path(work_dir or ".")
    listen_port = free_port()
    orthanc = Orthanc(root / "orthanc", modalities={"cxr": ("CXR", "127.0.0.1", listen_port)})
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(root / "var"),
        "CXR_DATABASE_URL": "",
        "CXR_SECRET_KEY": secrets.token_urlsafe(32),
        "CXR_DICOM_DESTINATION": orthanc.destination,
        "CXR_DICOM_DELIVERY_POLL_S": "0.05",
        "CXR_DICOM_DELIVERY_BACKOFF_S": "0.2",
        "CXR_LOG_LEVEL": "WARNING",
    }
    for name in ("CXR_DATA_DIR", "CXR_DATABASE_URL", "CXR_SECRET_KEY", "CXR_DICOM_DESTINATION"):
        os.environ[name] = env[name]
    settings = get_settings()
    ckpt = checkpoint or _fresh_checkpoint(root / "bench.pt", image_size=128)
    _prepare_state(settings, ckpt, references_per_class)
    listener = None
    rows: list[dict[str, Any]] = []
    try:
        orthanc.start()
        log_path = root / "listener.log"
        listener = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "dicom",
                "listen",
                "--host",
                "127.0.0.1",
                "--port",
                str(listen_port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_path.open("wb"),
        )
        try:
            _wait(lambda: _echo(orthanc), "the listener to answer C-ECHO", timeout=600)
        except RuntimeError as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}; the listener's log:\n{tail}") from exc
        files = [_dicom_instance(i, image_size) for i in range(instances)]
        stored = [orthanc.upload(data) for data, _study in files]
        warm = _dicom_instance(10_000, image_size)
        warm_id = orthanc.upload(warm[0])
        orthanc.send_to_modality("cxr", warm_id)  # warm-up: model load, ONNX session
        _wait(lambda: _sr_count(orthanc, warm[1]) == 1, "the warm-up SR")

        half = max(1, instances // 2)
        latencies = []
        for instance_id, (_data, study) in zip(stored[:half], files[:half], strict=True):
            started = time.perf_counter()
            orthanc.send_to_modality("cxr", instance_id)
            _wait(lambda s=study: _sr_count(orthanc, s) == 1, "an SR")  # type: ignore[misc]
            latencies.append((time.perf_counter() - started) * 1000)
        before = _sr_count(orthanc)
        batch = stored[half:]
        started = time.perf_counter()
        response = httpx.post(
            f"{orthanc.url}/modalities/cxr/store",
            json={"Resources": batch, "Synchronous": True},
            timeout=RESULT_TIMEOUT_S,
        )
        response.raise_for_status()
        _wait(lambda: _sr_count(orthanc) == before + len(batch), "every batch SR")
        batch_s = time.perf_counter() - started

        app = create_app(get_settings())
        predict_ms = []
        with TestClient(app) as client:
            reader = _prepare_key(app)
            for data, _study in [warm, *files[:half]]:
                started = time.perf_counter()
                answer = client.post(
                    "/predict",
                    headers={"X-API-Key": reader},
                    files={"file": ("x.dcm", data, "application/dicom")},
                )
                predict_ms.append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
        predict_ms = predict_ms[1:]  # the first one warmed this process up
        predict_p50 = statistics.median(predict_ms)
        dicom_p50 = statistics.median(latencies)
        common = {"image_size": image_size, "references": references_per_class * 3}
        rows = [
            {
                "mode": "sequential",
                "instances": half,
                **common,
                "p50_ms": round(dicom_p50, 1),
                "p99_ms": round(_percentile(latencies, 99), 1),
                "added_p50_ms": round(dicom_p50 - predict_p50, 1),
                "ratio": round(dicom_p50 / predict_p50, 2),
            },
            {
                "mode": "batch",
                "instances": len(batch),
                **common,
                "seconds": round(batch_s, 2),
                "instances_per_min": round(len(batch) / batch_s * 60, 1),
            },
            {
                "mode": "predict",
                "instances": len(predict_ms),
                **common,
                "p50_ms": round(predict_p50, 1),
                "p99_ms": round(_percentile(predict_ms, 99), 1),
            },
        ]
    finally:
        try:
            if listener is not None:
                listener.terminate()
                try:
                    listener.wait(120)
                except subprocess.TimeoutExpired:
                    listener.kill()
                    listener.wait(30)
        finally:
            orthanc.stop()
        if tmp is not None:
            tmp.cleanup()
    return rows


def _prepare_key(app: Any) -> str:
    from app.services.keys import create_api_key

    with app.state.sessionmaker() as session:
        _row, key = create_api_key(
            session=session, role="reader", name="bench dicom", settings=app.state.settings
        )
    return key


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["mode        instances  p50_ms   p99_ms   inst/min  added_p50_ms  ratio"]
    for r in rows:
        lines.append(
            f"{r['mode']:<11} {r['instances']:>9}  {r.get('p50_ms', ''):>7}  "
            f"{r.get('p99_ms', ''):>7}  {r.get('instances_per_min', ''):>8}  "
            f"{r.get('added_p50_ms', ''):>12}  {r.get('ratio', ''):>5}"
        )
    return "\n".join(lines)


def bench_dicom_main(
    *,
    out: Path | None,
    checkpoint: Path | None = None,
    instances: int = 20,
    image_size: int = 512,
) -> None:
    try:
        rows = run_dicom_bench(checkpoint=checkpoint, instances=instances, image_size=image_size)
    except OrthancMissingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(format_table(rows))
    if out is not None:
        out.write_text(json.dumps(rows, indent=2) + "\n")


def bench_dicom_command(
    out: Annotated[Path | None, typer.Option(help="Write the JSON rows here.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Encoder checkpoint (default: small untrained one).")
    ] = None,
    instances: Annotated[int, typer.Option(min=2, help="Synthetic instances to send.")] = 20,
    image_size: Annotated[int, typer.Option(min=32, help="Instance width and height.")] = 512,
) -> None:
    """Instances per minute from C-STORE in to SR stored in Orthanc, and the latency added
    over /predict for the same images (docs/BENCHMARKS.md)."""
    bench_dicom_main(out=out, checkpoint=checkpoint, instances=instances, image_size=image_size)
