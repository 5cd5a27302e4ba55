"""Grad-CAM for a siamese (metric-learning) answer.

A siamese encoder has no class logits, so the score we explain is the *similarity of the query
to the predicted class*: the inner product of the query embedding with that class's mean
reference embedding (L2-normalised). Its gradient at the encoder's ``.target_layer`` (the last
conv block, exposed by every encoder of ``training.encoders``) weights the feature maps exactly
as in classic Grad-CAM (`pytorch_grad_cam.GradCAM` with a custom target callable).

Why a pool of model copies (:class:`Explainer`) instead of the served encoder:

- the served encoder runs under ``torch.inference_mode`` on several threads at once, while
  Grad-CAM needs autograd and registers hooks on the target layer; hooks on a shared module
  would fire for every concurrent prediction and corrupt both answers;
- each copy is used by one thread at a time, hooks are removed when the ``with GradCAM(...)``
  block ends, and the served encoder is never touched, so concurrent explain + predict is safe.

Only the gradient *at the target layer* is needed, so the copies' parameters are frozen and a
temporary forward hook turns the target layer's output into an autograd leaf: the backward pass
then runs through the small head only (pool + projection + normalise), not the whole backbone,
and no weight gradients are allocated. And the explained prediction needs only ONE forward pass:
the Grad-CAM target (:class:`SearchThenExplainTarget`) receives the embedding, searches the
index with it and only then picks the class to explain, so the answer and its explanation come
from the same pass.

`pytorch_grad_cam` is imported at module import (it pulls in torchvision, OpenCV, SciPy and
matplotlib: seconds on a busy machine), so the service pays it at startup, not in the first
explained request.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from torch import nn

from training.preprocess import crop_box

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_SIDE",
    "EmbeddingSimilarityTarget",
    "Explainer",
    "SearchThenExplainTarget",
    "gradcam_heatmap",
    "heat_on_film",
    "overlay_png",
    "overlay_size",
]

#: The long side of the returned overlay is capped here (the upload may be 3000 px wide).
DEFAULT_MAX_SIDE = 512
#: Weight of the heat map in the blend; the anatomy stays readable under it.
HEAT_ALPHA = 0.4


class EmbeddingSimilarityTarget:
    """Grad-CAM target: ``embedding . class_mean`` for one sample's embedding.

    `pytorch_grad_cam` calls the target with one row of the model output (the embedding of one
    image) and back-propagates the returned scalar.
    """

    def __init__(self, class_mean: np.ndarray | torch.Tensor) -> None:
        mean = torch.as_tensor(np.asarray(class_mean, dtype=np.float32)).flatten()
        norm = torch.linalg.vector_norm(mean)
        self.class_mean = mean / norm if float(norm) > 0 else mean

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        mean = self.class_mean.to(device=embedding.device, dtype=embedding.dtype)
        return (embedding.flatten() * mean).sum()


class SearchThenExplainTarget:
    """Grad-CAM target that decides *what* to explain from the embedding it is given.

    `pytorch_grad_cam` calls the target with the model output after the forward pass and before
    the backward pass. Searching the index there lets one forward pass serve both the answer
    (embedding -> search -> label) and its explanation (similarity to that label's class mean),
    instead of a prediction forward plus a second Grad-CAM forward.
    """

    def __init__(
        self,
        search: Callable[[np.ndarray], Any],
        class_mean_of: Callable[[Any], np.ndarray | None],
    ) -> None:
        self.search = search
        self.class_mean_of = class_mean_of
        self.result: Any = None
        self.embedding: np.ndarray | None = None

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        self.embedding = embedding.detach().float().cpu().numpy().reshape(1, -1)
        self.result = self.search(self.embedding)
        mean = self.class_mean_of(self.result)
        if mean is None:  # nothing to explain against: a zero score gives an empty map
            return (embedding.flatten() * 0.0).sum()
        return EmbeddingSimilarityTarget(mean)(embedding)


@contextmanager
def _target_output_as_leaf(layer: nn.Module) -> Iterator[None]:
    """While active, the target layer's output is detached into an autograd leaf.

    Prepended so it runs before Grad-CAM's own hooks: they then record the leaf and register
    their gradient hook on it. Removed on exit whatever happens.
    """

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # `* 1.0` makes a non-leaf so an in-place op that follows cannot hit a leaf.
        return output.detach().requires_grad_(True) * 1.0

    handle = layer.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def gradcam_heatmap(
    model: nn.Module,
    input_tensor: torch.Tensor,
    class_mean: np.ndarray | None = None,
    *,
    target: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Grad-CAM map ``(S, S)`` in ``[0, 1]`` of ``embedding . class_mean`` for one image.

    ``model`` must not be shared with other threads while this runs (hooks are attached for the
    duration of the call and removed afterwards); :class:`Explainer` hands out private copies.
    ``input_tensor`` is the preprocessed ``(1, 1, S, S)`` tensor (an inference tensor is
    cloned into a normal one). ``target`` replaces the fixed ``class_mean`` target (see
    :class:`SearchThenExplainTarget`).
    """
    if target is None:
        if class_mean is None:
            raise ValueError("give class_mean or target")
        target = EmbeddingSimilarityTarget(class_mean)
    target_layer: nn.Module = model.target_layer  # type: ignore[assignment]
    result: np.ndarray | None = None
    with torch.inference_mode(False), torch.enable_grad():
        # A clone made here is a normal tensor even if the caller's was an inference tensor.
        x = input_tensor.detach().clone()
        with (
            _target_output_as_leaf(target_layer),
            GradCAM(model=model, target_layers=[target_layer]) as cam,
        ):
            result = cam(input_tensor=x, targets=[target])
    model.zero_grad(set_to_none=True)
    if result is None:  # GradCAM.__exit__ swallows IndexError; do not hide it.
        raise RuntimeError("Grad-CAM failed to produce a map (see the log)")
    heat = np.asarray(result[0], dtype=np.float32)
    return np.nan_to_num(np.clip(heat, 0.0, 1.0))


def overlay_size(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """``(w, h)`` with the upload's aspect ratio and the long side capped at ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@cache
def _jet_palette() -> tuple[int, ...]:
    """The 'jet' colour table (blue = low, red = high) as a flat PIL palette, computed once."""
    from matplotlib import colormaps

    lut = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    return tuple(int(v) for v in lut.reshape(-1))


def heat_on_film(heat: np.ndarray, shape: tuple[int, int], crop: float = 0.0) -> np.ndarray:
    """The model-input map ``heat`` placed on a film of ``shape`` ``(h, w)``: resized onto the
    region the preprocessing's border ``crop`` kept, zero on the cut borders (float32)."""
    h, w = shape
    top, bottom, left, right = crop_box(h, w, crop)
    inner = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize(
        (right - left, bottom - top), Image.Resampling.BILINEAR
    )
    film = np.zeros((h, w), dtype=np.float32)
    film[top:bottom, left:right] = np.asarray(inner, dtype=np.float32)
    return film


def overlay_png(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    crop: float = 0.0,
) -> bytes:
    """Blend ``heat`` (any size, ``[0, 1]``) on the grayscale ``image`` ``(H, W)`` as a PNG.

    The output has the upload's aspect ratio (not the model's square input), so the heat map
    lies on the anatomy the clinician sees. ``crop`` is the preprocessing's border crop: the
    model saw only the central part, so the map is placed on that part and the cut borders
    stay cold. Resizing, colouring and blending are PIL operations (C loops), so the PNG
    encoding is the only noticeable cost.
    """
    h, w = image.shape[:2]
    out_w, out_h = overlay_size(w, h, max_side)
    gray = Image.fromarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    gray = gray.resize((out_w, out_h), Image.Resampling.BILINEAR).convert("RGB")
    film = heat_on_film(heat, (out_h, out_w), crop)
    colour = Image.fromarray((np.clip(film, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    colour = colour.convert("P")
    colour.putpalette(_jet_palette())
    blended = Image.blend(gray, colour.convert("RGB"), HEAT_ALPHA)
    buf = io.BytesIO()
    blended.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Explainer:
    """A bounded pool of private, gradient-ready copies of one encoder.

    Copies are made lazily (a service that never explains pays nothing) and reused; at most
    ``size`` exist, so at most ``size`` explanations run at once and others wait for a copy.
    The served encoder is only read (deep-copied), never hooked.
    """

    def __init__(self, encoder: nn.Module, *, size: int = 2) -> None:
        if size < 1:
            raise ValueError("Explainer size must be >= 1")
        self._source = encoder
        self._size = size
        self._created = 0
        self._lock = threading.Lock()
        self._free: queue.LifoQueue[nn.Module] = queue.LifoQueue()

    def _new_copy(self) -> nn.Module:
        with torch.inference_mode(False), torch.no_grad():
            model = copy.deepcopy(self._source)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        """Borrow a private copy for the duration of the block."""
        try:
            model = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                create = self._created < self._size
                if create:
                    self._created += 1
            if create:
                try:
                    model = self._new_copy()
                except BaseException:
                    with self._lock:
                        self._created -= 1
                    raise
            else:
                model = self._free.get()
        try:
            yield model
        finally:
            self._free.put(model)

    def heatmap(self, input_tensor: torch.Tensor, class_mean: np.ndarray) -> np.ndarray:
        """Grad-CAM map ``(S, S)`` of ``embedding . class_mean`` on a borrowed copy."""
        with self.model() as model:
            device = next(model.parameters()).device
            return gradcam_heatmap(model, input_tensor.to(device), class_mean)

    def search_and_explain(
        self,
        input_tensor: torch.Tensor,
        search: Callable[[np.ndarray], Any],
        class_mean_of: Callable[[Any], np.ndarray | None],
    ) -> tuple[np.ndarray, Any, np.ndarray]:
        """One forward pass for answer and explanation: returns (embedding, search result,
        Grad-CAM map of the similarity to the class that `class_mean_of(result)` names)."""
        target = SearchThenExplainTarget(search, class_mean_of)
        with self.model() as model:
            device = next(model.parameters()).device
            heat = gradcam_heatmap(model, input_tensor.to(device), target=target)
        if target.embedding is None:  # pragma: no cover - Grad-CAM always calls the target
            raise RuntimeError("Grad-CAM did not evaluate its target")
        return target.embedding, target.result, heat

    def explain_png(
        self,
        input_tensor: torch.Tensor,
        class_mean: np.ndarray,
        image: np.ndarray,
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        crop: float = 0.0,
    ) -> str:
        """Base64 PNG overlay of the Grad-CAM map on the original upload ``image``."""
        heat = self.heatmap(input_tensor, class_mean)
        png = overlay_png(image, heat, max_side=max_side, crop=crop)
        return base64.b64encode(png).decode("ascii")
