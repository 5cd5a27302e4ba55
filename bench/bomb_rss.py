"""Peak RSS of the API process over a corpus of decompression bombs and largest-allowed images.

Starts ``uvicorn app.main:create_app`` on a fresh embedded deployment (SQLite, a small untrained
checkpoint registered and active, a few synthetic references), records the process's resident
memory after warm-up (``base``), resets the kernel's peak counter (``/proc/PID/clear_refs``),
then sends every corpus file to ``POST /predict`` and ``POST /references``, and finally a burst
of parallel enrollments and predictions of the largest images the limits allow. It reports each
answer (status and reason) and the peak RSS (``VmHWM``) against the documented bound::

    peak <= base + slots x CXR_MAX_DECODE_MB x 2

(``slots`` = ``CXR_INFERENCE_WORKERS``: decodes that may run at once in one process; the factor
2 covers what the prediction keeps after decoding: the float32 image, the preprocessing copy and
the Grad-CAM overlay.)

The corpus (built here, nothing downloaded): a Deflated DICOM whose header says 16x16 but that
inflates to ``--inflate-mb`` (the adversarial pass: 408 KB -> 400 MB, +1.55 GB RSS); a Deflated
DICOM declaring 4000x4000 that inflates 10x further; a 49-megapixel 16-bit PNG (under the pixel
limit, over the memory budget); a 50000x50000 PNG header; a PNG with a zTXt bomb; and, allowed,
a 49-megapixel 8-bit PNG, a 5000x5000 16-bit PNG, a progressive 7000x7000 JPEG and an honest
Deflated 4000x4000 DICOM.

Usage (not part of the default test run; ``tests/app/test_bombs.py`` runs a small version)::

    uv run python bench/bomb_rss.py --out runs/bomb_rss.json            # full corpus
    uv run python bench/bomb_rss.py --small --out /tmp/bomb_rss.json     # seconds
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

# --------------------------------------------------------------------------------------------
# Corpus builders (streamed: building a 400 MB bomb never holds 400 MB)
# --------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_constant(width: int, height: int, *, bits: int = 8, value: int = 0) -> bytes:
    """A grayscale PNG of one value, built row by row (a 49-megapixel one is ~100 KB)."""
    sample = bits // 8
    row = b"\x00" + (value.to_bytes(sample, "big") * width)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def png_header_bomb(width: int = 50000, height: int = 50000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def png_ztxt_bomb(inflated_mb: int = 64) -> bytes:
    """A small, valid 64x64 PNG with a zTXt chunk that inflates to ``inflated_mb``."""
    comp = zlib.compressobj(9)
    chunk = b"A" * MB
    text = b"".join(comp.compress(chunk) for _ in range(inflated_mb)) + comp.flush()
    base = png_constant(64, 64, value=90)
    iend = base.rindex(b"IEND") - 4
    return base[:iend] + _png_chunk(b"zTXt", b"Comment\x00\x00" + text) + base[iend:]


def jpeg_progressive(width: int, height: int) -> bytes:
    from PIL import Image

    img = Image.new("L", (width, height), 100)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, progressive=True)
    return buf.getvalue()


def _dicom_header(rows: int, cols: int, *, bits: int = 16, frames: int | None = None) -> bytes:
    """An Explicit VR Little Endian data set without pixel data (bytes, no meta)."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ds.Modality = "DX"
    ds.PatientName = "BOMB^TEST"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _dicom_meta(transfer_syntax: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    meta.TransferSyntaxUID = transfer_syntax
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def deflated_dicom(rows: int, cols: int, *, pixel_bytes: int | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose pixel data is ``pixel_bytes`` zeros
    (default: exactly what ``rows x cols`` 16-bit needs; more makes it a bomb)."""
    size = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    size += size % 2
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(_dicom_header(rows, cols))]
    parts.append(comp.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size)))
    zeros = b"\x00" * MB
    left = size
    while left > 0:
        step = min(left, MB)
        parts.append(comp.compress(zeros[:step]))
        left -= step
    parts.append(comp.flush())
    return _dicom_meta("1.2.840.10008.1.2.1.99") + b"".join(parts)


@dataclass(frozen=True)
class Item:
    name: str
    data: bytes
    expect: str  # "refused" or "allowed"


def corpus(*, small: bool = False, inflate_mb: int = 400) -> list[Item]:
    """The bomb corpus (``small``: sizes scaled down for a smoke test)."""
    if small:
        return [
            Item(
                "deflated DICOM 16x16 -> 32 MB",
                deflated_dicom(16, 16, pixel_bytes=32 * MB),
                "refused",
            ),
            Item(
                "16-bit PNG 2600x2600 (budget 64 MB)", png_constant(2600, 2600, bits=16), "refused"
            ),
            Item("PNG header 50000x50000", png_header_bomb(), "refused"),
            Item("PNG zTXt -> 16 MB", png_ztxt_bomb(16), "refused"),
            Item("8-bit PNG 1500x1500", png_constant(1500, 1500, value=80), "allowed"),
        ]
    return [
        Item(
            f"deflated DICOM 16x16 -> {inflate_mb} MB",
            deflated_dicom(16, 16, pixel_bytes=inflate_mb * MB),
            "refused",
        ),
        Item(
            "deflated DICOM 4000x4000 -> 320 MB",
            deflated_dicom(4000, 4000, pixel_bytes=320 * MB),
            "refused",
        ),
        Item("16-bit PNG 7000x7000 (49 MP)", png_constant(7000, 7000, bits=16), "refused"),
        Item("PNG header 50000x50000", png_header_bomb(), "refused"),
        Item("PNG zTXt -> 64 MB", png_ztxt_bomb(64), "refused"),
        Item("8-bit PNG 7000x7000 (49 MP)", png_constant(7000, 7000, value=80), "allowed"),
        Item("16-bit PNG 5000x5000 (25 MP)", png_constant(5000, 5000, bits=16), "allowed"),
        # a progressive JPEG keeps every coefficient of every scan: 49 MP cost ~440 MB to
        # decode, over the default 320 MB budget; 25 MP fits
        Item("progressive JPEG 7000x7000", jpeg_progressive(7000, 7000), "refused"),
        Item("progressive JPEG 5000x5000", jpeg_progressive(5000, 5000), "allowed"),
        Item("deflated DICOM 4000x4000 (honest)", deflated_dicom(4000, 4000), "allowed"),
    ]


# --------------------------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------------------------


def _proc_kb(pid: int, field: str) -> int:
    """`app.bench.proc_status_kb`, failing loudly: a bomb bench without memory figures is void."""
    from app.bench import proc_status_kb

    value = proc_status_kb(pid, field)
    if value is None:
        raise RuntimeError(f"cannot read {field} of process {pid}: has the service exited?")
    return value


def _prepare(data_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """Schema, an active untrained checkpoint and one key per role; returns the keys."""
    import torch

    from app.config import Settings
    from app.db.migrate import prepare_database
    from app.services.keys import create_api_key
    from app.services.models import register_model
    from training.checkpoint import save_checkpoint
    from training.encoders import create_encoder
    from training.preprocess import Preprocessing

    settings = Settings(data_dir=data_dir, secret_key=env["CXR_SECRET_KEY"], device="cpu")
    torch.manual_seed(0)
    encoder = create_encoder("resnet9_half", embedding_dim=32).eval()
    ckpt = save_checkpoint(
        data_dir.parent / "bench.pt",
        encoder=encoder,
        encoder_name="resnet9_half",
        encoder_kwargs={},
        preprocessing=Preprocessing(image_size=64),
        classes=["a", "b"],
        config={"note": "bomb bench, untrained"},
        metrics={},
    )
    factory = prepare_database(settings)
    keys = {}
    with factory() as session:
        register_model(session=session, checkpoint=ckpt, settings=settings, activate=True)
        for role in ("reader", "clinician"):
            _row, keys[role] = create_api_key(
                session=session, role=role, name=role, settings=settings
            )
    factory.kw["bind"].dispose()
    return keys


def _synthetic_png(seed: int, size: int = 256) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.normal(120, 30, (size, size))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def run(
    *,
    small: bool = False,
    inflate_mb: int = 400,
    slots: int = 2,
    decode_mb: float = 320.0,
    parallel: int = 8,
) -> dict[str, Any]:
    """Measure; returns ``{"rows": [...], "summary": {...}}``."""
    import httpx

    from app.bench import running_service, service_env

    items = corpus(small=small, inflate_mb=inflate_mb)
    if small:
        decode_mb = 64.0
    with tempfile.TemporaryDirectory(prefix="cxr-bomb-") as tmp:
        data_dir = Path(tmp) / "var"
        env = service_env(
            data_dir,
            "bomb-bench-secret-" + "x" * 20,
            CXR_INFERENCE_WORKERS=str(slots),
            CXR_MAX_DECODE_MB=str(decode_mb),
            OMP_NUM_THREADS="1",
        )
        keys = _prepare(data_dir, env)
        with running_service(
            env, Path(tmp) / "server.log", ready_path="/health", stop_timeout_s=20.0
        ) as server:
            pid = server.proc.pid
            client = httpx.Client(base_url=server.url, timeout=600.0)
            reader = {"X-API-Key": keys["reader"]}
            clinician = {"X-API-Key": keys["clinician"]}
            for label, seed0 in (("a", 0), ("b", 100)):
                files = [
                    ("file", (f"{i}.png", _synthetic_png(seed0 + i), "image/png")) for i in range(3)
                ]
                client.post("/references", headers=clinician, data={"label": label}, files=files)
            for i in range(3):  # warm up: model, index, ONNX session
                client.post(
                    "/predict", headers=reader, files={"file": ("q.png", _synthetic_png(900 + i))}
                )
            base_kb = _proc_kb(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            rows: list[dict[str, Any]] = []
            for item in items:
                for path, headers, extra in (
                    ("/predict", reader, {}),
                    ("/references", clinician, {"label": "bomb"}),
                ):
                    started = time.perf_counter()
                    resp = client.post(
                        path, headers=headers, data=extra, files={"file": ("x", item.data)}
                    )
                    detail = resp.json().get("detail", "") if resp.status_code >= 400 else ""
                    rows.append(
                        {
                            "item": item.name,
                            "bytes": len(item.data),
                            "endpoint": path,
                            "status": resp.status_code,
                            "expect": item.expect,
                            "seconds": round(time.perf_counter() - started, 2),
                            "detail": str(detail)[:120],
                            "rss_peak_mb": round(_proc_kb(pid, "VmHWM") / 1024, 1),
                        }
                    )
            allowed = [i for i in items if i.expect == "allowed"]
            largest = max(allowed, key=lambda i: i.name.endswith("(49 MP)") or len(i.data))
            errors: list[int] = []

            def burst(n: int) -> None:
                with httpx.Client(base_url=server.url, timeout=600.0) as c:
                    if n % 2:
                        r = c.post("/predict", headers=reader, files={"file": ("x", largest.data)})
                    else:
                        r = c.post(
                            "/references",
                            headers=clinician,
                            data={"label": f"p{n}"},
                            files={"file": ("x", allowed[n % len(allowed)].data)},
                        )
                    if r.status_code >= 500:
                        errors.append(r.status_code)

            threads = [threading.Thread(target=burst, args=(n,)) for n in range(parallel)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            burst_s = time.perf_counter() - started
            peak_kb = _proc_kb(pid, "VmHWM")
    base_mb = base_kb / 1024
    peak_mb = peak_kb / 1024
    bound_mb = base_mb + slots * decode_mb * 2
    summary = {
        "slots": slots,
        "decode_budget_mb": decode_mb,
        "base_rss_mb": round(base_mb, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "growth_mb": round(peak_mb - base_mb, 1),
        "bound_mb": round(bound_mb, 1),
        "growth_over_allowed": round((peak_mb - base_mb) / (bound_mb - base_mb), 3),
        "within_bound": peak_mb <= bound_mb,
        "burst_requests": parallel,
        "burst_seconds": round(burst_s, 1),
        "burst_5xx": len(errors),
        "unexpected": [r for r in rows if (r["status"] < 400) != (r["expect"] == "allowed")],
    }
    return {"rows": rows, "summary": summary}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'item':40} {'endpoint':12} {'status':>6} {'s':>6} {'peak MB':>8}  reason"]
    for r in result["rows"]:
        lines.append(
            f"{r['item'][:40]:40} {r['endpoint']:12} {r['status']:>6} {r['seconds']:>6} "
            f"{r['rss_peak_mb']:>8}  {r['detail'][:60]}"
        )
    s = result["summary"]
    lines.append(
        f"base {s['base_rss_mb']} MB, peak {s['peak_rss_mb']} MB (growth {s['growth_mb']} MB); "
        f"bound base + {s['slots']} x 2 x {s['decode_budget_mb']:g} MB = {s['bound_mb']} MB; "
        f"growth / allowed = {s['growth_over_allowed']}; within bound: {s['within_bound']}; "
        f"burst of {s['burst_requests']}: {s['burst_seconds']} s, {s['burst_5xx']} 5xx"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="scaled-down corpus (smoke test)")
    parser.add_argument("--inflate-mb", type=int, default=400)
    parser.add_argument("--slots", type=int, default=2, help="CXR_INFERENCE_WORKERS")
    parser.add_argument("--decode-mb", type=float, default=320.0, help="CXR_MAX_DECODE_MB")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run(
        small=args.small,
        inflate_mb=args.inflate_mb,
        slots=args.slots,
        decode_mb=args.decode_mb,
        parallel=args.parallel,
    )
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    ok = result["summary"]["within_bound"] and not result["summary"]["unexpected"]
    return 0 if ok and not result["summary"]["burst_5xx"] else 1


if __name__ == "__main__":
    sys.exit(main())
