"""The immutable objects a prediction holds: the loaded model and the bundle built on it.

`ModelBundle` is an encoder (eval mode, on the chosen device), its `Preprocessing`, a
`ReferenceIndex` over every enrolled reference embedded by *that* encoder, and the
`model_version` / `index_version` it was built from. It is never mutated: the next bundle of the
same model is built on `index.fork()` (copy-on-write), so a prediction that took a bundle at its
start uses one consistent model and index throughout (see `app.serving.state`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

import numpy as np
import torch

from app.serving.batcher import MicroBatcher
from app.serving.onnx_runtime import OnnxEncoder
from index.reference_index import ReferenceIndex
from training.embedding import embed_tensors
from training.preprocess import Preprocessing

__all__ = ["LoadedModel", "ModelBundle"]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A checkpoint loaded for serving; reused across index rebuilds of the same version."""

    version: str
    sha256: str
    encoder: torch.nn.Module
    preprocessing: Preprocessing
    device: torch.device
    embedding_dim: int
    encoder_name: str
    trained_classes: tuple[str, ...]
    #: The plain forward in ONNX Runtime (CPU, `CXR_ONNX=auto`); None: the torch encoder.
    onnx: OnnxEncoder | None = None
    #: Concurrent forwards batched into one (`CXR_PREDICT_BATCH_MAX` > 1); None: direct calls.
    batcher: MicroBatcher | None = None

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Embeddings ``(B, dim)`` of a preprocessed batch: ONNX Runtime when loaded, else torch
        (through the micro-batcher when one is configured)."""
        if self.batcher is not None:
            return self.batcher(batch.numpy())
        return self.forward(batch.numpy())

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """One forward of a preprocessed ``(B, 1, S, S)`` batch, without batching."""
        if self.onnx is not None:
            return self.onnx(batch)
        return embed_tensors(self.encoder, torch.from_numpy(batch), device=self.device)

    def forward_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Embeddings ``(B, dim)`` and the last feature maps ``(B, C, h, w)`` (what Grad-CAM
        explains) from one forward: ONNX Runtime when loaded, else the torch encoder (never
        batched with other requests: the feature map is this request's own)."""
        if self.onnx is not None:
            embeddings, features = self.onnx.with_features(batch)
            return embeddings, torch.from_numpy(features)
        with torch.inference_mode():
            feats = self.encoder.forward_features(torch.from_numpy(batch).to(self.device))
            embeddings = self.encoder.embed_features(feats).float().cpu().numpy()
        return np.ascontiguousarray(embeddings, dtype=np.float32), feats


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """Everything a prediction needs, consistent with itself. Never mutated after creation.

    `index` is None when no reference is enrolled (the model is loaded, predictions answer
    503 until references exist). The next bundle of the same model is built on `index.fork()`
    (copy-on-write: only the classes that change are copied), so this bundle's index never
    changes under a prediction that holds it.
    """

    model: LoadedModel
    index: ReferenceIndex | None
    index_version: int
    built_at: float = field(default_factory=time.time)

    @property
    def encoder(self) -> torch.nn.Module:
        return self.model.encoder

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def size(self) -> int:
        return len(self.index) if self.index is not None else 0

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(self.index.classes())) if self.index is not None else ()

    @cached_property
    def class_means(self) -> Mapping[str, np.ndarray]:
        """L2-normalised mean reference embedding per class (the Grad-CAM target), from the
        index's running sums: O(classes x dim), computed once per bundle."""
        if self.index is None:
            return MappingProxyType({})
        means = {}
        for label in self.index.classes():
            total, _sq, count = self.index.class_sums(label)
            mean = total / max(count, 1)
            norm = float(np.linalg.norm(mean))
            means[label] = (mean / norm if norm > 0 else mean).astype(np.float32)
        return MappingProxyType(means)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Embeddings of a preprocessed batch with this bundle's encoder."""
        return self.model.embed(batch)
