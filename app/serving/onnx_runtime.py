"""The served encoder's forward in ONNX Runtime (CPU), exported once from the checkpoint.

Why: on this project's CPU encoders ONNX Runtime runs the same network several times faster
than eager torch at one intra-op thread (docs/BENCHMARKS.md, "ONNX Runtime against eager torch":
covidnet 160 px, 1.3 ms against 14 ms per image). Every `/predict` forward and the reference
embeddings use it; CUDA keeps torch.

The graph has two outputs: the embedding and the encoder's last feature map
(`Encoder.forward_features`). An explained prediction takes both from the same ORT call and
back-propagates through the small torch head only (`app.gradcam.heatmap_from_features`), so
Grad-CAM no longer needs a second, eager forward of the whole backbone.

How: at model load the encoder is exported with the legacy TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`, opset 17, batch dimension dynamic so micro-batches of any
size run in one call) into ``{models_dir}/onnx/{checkpoint sha256}-opset17-features.onnx``. The
file is keyed by the checkpoint's content, written atomically, and reused by every later load and
every process (nothing is ever downloaded). Before it is used, ORT's embeddings and feature maps of
a probe batch are compared with torch's; a difference over `MAX_ABS_DIFF` (an operator exported
differently), a failed export or a missing `onnxruntime` falls back to torch with a warning, so a
model that cannot be exported is still served. `CXR_ONNX=off` turns the whole path off.

The session is built with the process's thread policy (`training.threads`: cores // inference
workers in an API process), so ORT, torch and FAISS share the cores the same way.
`InferenceSession.run` is thread-safe and releases the GIL: request threads call it concurrently.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.files import atomic_write_bytes
from training.threads import current_thread_policy

logger = logging.getLogger(__name__)

__all__ = ["MAX_ABS_DIFF", "OPSET", "OnnxEncoder", "load_onnx_encoder", "onnx_cache_path"]

OPSET = 17
#: Largest |ORT - torch| accepted on the probe batch (unit-norm embeddings; float32 differs ~1e-6;
#: the feature maps are compared relative to their largest value).
MAX_ABS_DIFF = 1e-4
INPUT_NAME = "x"
OUTPUT_NAME = "embedding"
FEATURES_NAME = "features"
#: Names the graph's outputs in the cache file name: a change of outputs is a new file.
LAYOUT = "features"


@dataclass(frozen=True, eq=False)
class OnnxEncoder:
    """An ONNX Runtime session computing a checkpoint's embeddings (batch dimension dynamic)."""

    session: Any  # onnxruntime.InferenceSession
    path: Path
    threads: int

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings ``(B, dim)`` float32 of a preprocessed ``(B, 1, S, S)`` batch."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings ``(B, dim)`` and last feature maps ``(B, C, h, w)`` from one run (the
        feature map is computed for the embedding anyway: asking for it costs a copy)."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        emb, feats = self.session.run([OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: x})
        return np.ascontiguousarray(emb, dtype=np.float32), np.asarray(feats, dtype=np.float32)


def onnx_cache_path(models_dir: Path, sha256: str) -> Path:
    """Where the export of the checkpoint with content `sha256` lives (shared by processes)."""
    return models_dir / "onnx" / f"{sha256}-opset{OPSET}-{LAYOUT}.onnx"


class _EmbeddingAndFeatures(torch.nn.Module):
    """The encoder with its last feature map as a second output (what Grad-CAM explains)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder.forward_features(x)
        return self.encoder.embed_features(feats), feats


def _export(encoder: torch.nn.Module, image_size: int, path: Path) -> None:
    """Export the eval-mode encoder (CPU copy, batch dimension dynamic) atomically to `path`."""
    import copy
    import warnings

    model = _EmbeddingAndFeatures(copy.deepcopy(encoder).to("cpu").eval())
    example = torch.zeros(2, 1, image_size, image_size)
    buffer = io.BytesIO()
    # The legacy exporter on purpose: the dynamo one needs onnxscript and traces far slower.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, FEATURES_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch"},
                OUTPUT_NAME: {0: "batch"},
                FEATURES_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    atomic_write_bytes(path, buffer.getvalue())


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle worker threads must not spin on a shared, small machine (they would steal the cores
    # other requests' decode and search need).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx_encoder(
    encoder: torch.nn.Module,
    *,
    sha256: str,
    image_size: int,
    models_dir: Path,
    threads: int | None = None,
) -> OnnxEncoder | None:
    """The ORT encoder of this checkpoint (exported now if no cached export exists), or None
    when ONNX Runtime is unavailable or its embeddings do not match torch's (logged)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        logger.warning("onnxruntime is not installed; serving the encoder with eager torch")
        return None
    threads = max(1, int(threads or current_thread_policy().threads))
    path = onnx_cache_path(models_dir, sha256)
    try:
        if not path.is_file():
            _export(encoder, image_size, path)
            logger.info("exported the encoder to ONNX", extra={"path": str(path)})
        session = _session(path, threads)
        onnx_encoder = OnnxEncoder(session=session, path=path, threads=threads)
        seeded = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 1, image_size, image_size, generator=seeded)
        with torch.inference_mode():
            feats = encoder.forward_features(probe)
            expected = encoder.embed_features(feats).float().numpy()
            expected_feats = feats.float().numpy()
        emb, got_feats = onnx_encoder.with_features(probe.numpy())
        # Feature maps are not unit-norm: compare them relative to their scale.
        scale = max(1.0, float(np.abs(expected_feats).max()))
        diff = max(
            float(np.abs(emb - expected).max()),
            float(np.abs(got_feats - expected_feats).max()) / scale,
        )
    except Exception as exc:  # an exporter or runtime failure must never stop serving
        logger.warning(
            "could not build the ONNX Runtime encoder; serving with eager torch",
            extra={"error": str(exc)[:500], "path": str(path)},
        )
        return None
    if not diff <= MAX_ABS_DIFF:
        logger.warning(
            "ONNX Runtime embeddings differ from torch's; serving with eager torch",
            extra={"max_abs_diff": diff, "path": str(path)},
        )
        return None
    logger.info(
        "serving the encoder with ONNX Runtime",
        extra={"path": str(path), "threads": threads, "max_abs_diff": diff},
    )
    return onnx_encoder
