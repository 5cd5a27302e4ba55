"""Grad-CAM for a siamese (metric-learning) answer.

A siamese encoder has no class logits, so the score we explain is the *similarity of the query
to the predicted class*: the inner product of the query embedding with that class's mean
reference embedding (L2-normalised). It is explained at the encoder's last feature map ``A``
(`Encoder.forward_features`): channel weights are the spatial mean of ``d score / d A``, the map
is ``ReLU(sum_c w_c A_c)``, min-max scaled and resized to the model input. That is classic
Grad-CAM, and exactly what `pytorch_grad_cam.GradCAM` computes with the layer that outputs ``A``
as its target layer (tests/app/test_gradcam.py checks the two agree).

Why it is computed from the feature map instead of through `pytorch_grad_cam`'s hooks
(measured on the 2-core CPU, docs/BENCHMARKS.md "Grad-CAM"):

- the feature map comes out of the same ONNX Runtime call as the embedding
  (`app.serving.onnx_runtime`), so an explained prediction runs the backbone once, in ORT
  (0.7 ms at 160 px), not a second time in eager torch (5 ms); only the head (pool, projection,
  normalise) runs under autograd, on a ``(1, C, h, w)`` tensor;
- nothing is hooked and nothing is copied: the gradient is taken with `torch.autograd.grad`
  with respect to the feature tensor alone, the encoder's parameters are frozen and never get a
  ``.grad``, so any number of threads explain with the served encoder at once;
- importing `pytorch_grad_cam` pulled torchvision, ``torch._dynamo``, SymPy, scikit-learn,
  OpenCV, SciPy and matplotlib into every API process: 325 MB of RSS and seconds of start-up.
  The library remains the tests' reference implementation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingSimilarityTarget", "gradcam_heatmap", "heatmap_from_features"]


class EmbeddingSimilarityTarget:
    """The explained score: ``embedding . class_mean`` (the mean normalised to unit length).

    Callable on one embedding (the signature `pytorch_grad_cam` targets use, so the reference
    implementation in the tests explains the very same score).
    """

    def __init__(self, class_mean: np.ndarray | torch.Tensor) -> None:
        mean = torch.as_tensor(np.asarray(class_mean, dtype=np.float32)).flatten()
        norm = torch.linalg.vector_norm(mean)
        self.class_mean = mean / norm if float(norm) > 0 else mean

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        mean = self.class_mean.to(device=embedding.device, dtype=embedding.dtype)
        return (embedding.flatten() * mean).sum()


def _min_max(cam: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] as `pytorch_grad_cam.utils.image.scale_cam_image` does."""
    cam = cam - np.min(cam)
    return cam / (1e-7 + np.max(cam))


def heatmap_from_features(
    encoder: nn.Module,
    features: np.ndarray | torch.Tensor,
    class_mean: np.ndarray,
    *,
    size: int,
) -> np.ndarray:
    """Grad-CAM map ``(size, size)`` in ``[0, 1]`` of ``embedding . class_mean`` from the
    encoder's last feature map ``features`` ``(1, C, h, w)`` of one image.

    Only ``encoder.embed_features`` (the head) runs, with autograd; safe to call from many
    threads with one shared, frozen encoder.
    """
    device = next(encoder.parameters()).device
    target = EmbeddingSimilarityTarget(class_mean)
    with torch.inference_mode(False), torch.enable_grad():
        feats = torch.as_tensor(features).detach().to(device=device, dtype=torch.float32)
        # A clone is a normal tensor even when the caller's was an inference tensor.
        feats = feats.clone().requires_grad_(True)
        score = target(encoder.embed_features(feats)[0])
        (grad,) = torch.autograd.grad(score, feats)
    activations = feats.detach()[0].float().cpu().numpy()
    weights = grad[0].float().cpu().numpy().mean(axis=(1, 2))
    cam = _min_max(np.maximum((weights[:, None, None] * activations).sum(axis=0), 0.0))
    # Bilinear, half-pixel centres: the interpolation cv2.resize uses in pytorch_grad_cam.
    resized = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None],
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    heat = _min_max(np.maximum(resized, 0.0)).astype(np.float32)
    return np.nan_to_num(np.clip(heat, 0.0, 1.0))


def gradcam_heatmap(
    encoder: nn.Module, input_tensor: torch.Tensor, class_mean: np.ndarray
) -> np.ndarray:
    """Grad-CAM map ``(S, S)`` for one preprocessed ``(1, 1, S, S)`` input with the torch
    encoder (the CUDA / ``CXR_ONNX=off`` path and the offline benches): feature map without
    autograd, then `heatmap_from_features`."""
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        feats = encoder.forward_features(input_tensor.to(device))
    return heatmap_from_features(encoder, feats, class_mean, size=int(input_tensor.shape[-1]))
