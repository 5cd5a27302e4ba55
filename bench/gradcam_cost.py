"""What an explained prediction costs beyond the plain one, part by part, old way against new.

Measured in one process on one thread (the service runs each request's CPU work on one core),
each figure the median of ``--iterations`` calls on the same preprocessed image:

- ``forward``: the ONNX Runtime call with the embedding only, and with the feature map as a
  second output (what an explained prediction asks for);
- ``cam``: Grad-CAM through `pytorch_grad_cam.GradCAM` (hooks on the last block, full eager
  forward + backward on a model copy: how the service explained before), against
  `app.gradcam.gradcam_heatmap` (eager feature map, head-only backward) and
  `app.gradcam.heatmap_from_features` on ORT's feature map (what `/predict` does now);
- ``png``: the 512x512 RGB overlay encoded by Pillow (``compress_level=1``, what the service did
  before), by `app.overlay.encode_png_rgb` with ISA-L, and with its zlib fallback; with sizes.

The image is the bench's synthetic film (``app.bench._synthetic_image``, noisy, so PNG sizes are
an upper bound for a real radiograph). `pytorch_grad_cam` is a dev dependency: without it the
first ``cam`` row is left out.

Usage::

    uv run python bench/gradcam_cost.py --checkpoint CKPT [--iterations 40] [--out cost.json]
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/gradcam_cost.py` from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.gradcam_cost")


def _median_ms(fn: Callable[[], Any], iterations: int) -> float:
    fn()  # warm-up: lazy allocations and first-call dispatch are not what is measured
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 3)


def run(checkpoint: Path, *, iterations: int = 40) -> dict[str, Any]:
    import torch
    from PIL import Image

    from app import overlay
    from app.bench import _synthetic_image
    from app.gradcam import EmbeddingSimilarityTarget, gradcam_heatmap, heatmap_from_features
    from app.serving.onnx_runtime import load_onnx_encoder
    from training.checkpoint import load_checkpoint
    from training.imaging import decode_image
    from training.preprocess import preprocess

    torch.set_num_threads(1)
    loaded = load_checkpoint(checkpoint)
    encoder = loaded.encoder.eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    spec = loaded.preprocessing
    image = decode_image(_synthetic_image("disc", seed=424242), max_pixels=None)
    x = preprocess(image, spec).unsqueeze(0)
    other = preprocess(decode_image(_synthetic_image("stripes", seed=7), max_pixels=None), spec)
    with torch.inference_mode():
        mean = encoder(other.unsqueeze(0))[0].numpy()

    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "image_size": spec.image_size,
        "iterations": iterations,
    }
    with tempfile.TemporaryDirectory(prefix="cxr-cam-") as tmp:
        ort = load_onnx_encoder(
            encoder, sha256="bench", image_size=spec.image_size, models_dir=Path(tmp), threads=1
        )
        if ort is None:
            raise RuntimeError("ONNX Runtime could not serve this checkpoint (see the log)")
        batch = x.numpy()
        report["forward"] = {
            "ort_embedding_ms": _median_ms(lambda: ort(batch), iterations),
            "ort_embedding_and_features_ms": _median_ms(
                lambda: ort.with_features(batch), iterations
            ),
        }
        _embedding, features = ort.with_features(batch)

    cam: dict[str, float] = {}
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        log.warning("pytorch_grad_cam is not installed: the library row is left out")
    else:
        model = copy.deepcopy(encoder)  # trainable: the library back-propagates to the input
        for param in model.parameters():
            param.requires_grad_(True)
        target = EmbeddingSimilarityTarget(mean)

        def library() -> None:
            with torch.enable_grad(), GradCAM(model=model, target_layers=[model.backbone[-1]]) as g:
                g(input_tensor=x.clone(), targets=[target])

        cam["pytorch_grad_cam_ms"] = _median_ms(library, iterations)
    cam["eager_features_head_backward_ms"] = _median_ms(
        lambda: gradcam_heatmap(encoder, x, mean), iterations
    )
    cam["ort_features_head_backward_ms"] = _median_ms(
        lambda: heatmap_from_features(encoder, features, mean, size=spec.image_size), iterations
    )
    report["cam"] = cam

    heat = heatmap_from_features(encoder, features, mean, size=spec.image_size)
    rgb = np.asarray(
        Image.open(io.BytesIO(overlay.overlay_png(image, heat, crop=spec.crop))).convert("RGB")
    )

    def pillow() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def zlib_fallback() -> bytes:
        isal, overlay.isal_zlib = overlay.isal_zlib, None
        try:
            return overlay.encode_png_rgb(rgb)
        finally:
            overlay.isal_zlib = isal

    png: dict[str, Any] = {"shape": list(rgb.shape)}
    for name, fn in (
        ("pillow", pillow),
        ("encode_png_rgb_isal", lambda: overlay.encode_png_rgb(rgb)),
        ("encode_png_rgb_zlib", zlib_fallback),
    ):
        png[f"{name}_ms"] = _median_ms(fn, iterations)
        png[f"{name}_bytes"] = len(fn())
    png["whole_overlay_ms"] = _median_ms(
        lambda: overlay.overlay_png(image, heat, crop=spec.crop), iterations
    )
    report["png"] = png
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from bench.report import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = run(args.checkpoint, iterations=args.iterations)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
