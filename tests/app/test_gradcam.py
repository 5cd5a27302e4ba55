"""Grad-CAM of a siamese answer: correct target, hooks removed, served model untouched,
safe alongside concurrent inference-mode predictions."""

from __future__ import annotations

import base64
import copy
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from torch import nn

from app.gradcam import (
    EmbeddingSimilarityTarget,
    Explainer,
    gradcam_heatmap,
    overlay_png,
    overlay_size,
)
from training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    from tests.app.conftest_predict import make_test_checkpoint

    path = make_test_checkpoint(Path(tmp_path_factory.mktemp("gc")) / "m.pt", seed=3)
    model = load_checkpoint(path).encoder.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _inputs(n: int = 4, size: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 1, size, size, generator=gen)


def test_heatmap_matches_plain_gradcam_and_leaves_no_hooks(encoder: nn.Module) -> None:
    x = _inputs(1)[0]
    with torch.inference_mode():
        before = encoder(x).clone()
    mean = np.random.default_rng(0).normal(size=before.shape[1]).astype(np.float32)
    work = copy.deepcopy(encoder)
    heat = gradcam_heatmap(work, x, mean)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert _hook_count(work) == 0, "Grad-CAM hooks must be removed after the call"
    assert all(p.grad is None for p in work.parameters())

    # Reference: textbook Grad-CAM with full backward through trainable parameters.
    reference_model = copy.deepcopy(encoder)
    for p in reference_model.parameters():
        p.requires_grad_(True)
    with GradCAM(model=reference_model, target_layers=[reference_model.target_layer]) as cam:
        reference = cam(input_tensor=x.clone(), targets=[EmbeddingSimilarityTarget(mean)])[0]
    np.testing.assert_allclose(heat, reference, atol=1e-5)

    with torch.inference_mode():
        after = work(x)
    torch.testing.assert_close(after, before)


def test_explainer_never_touches_the_served_model(encoder: nn.Module) -> None:
    x = _inputs(1)[0]
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.inference_mode():
        before = encoder(x).clone()
    explainer = Explainer(encoder, size=1)
    mean = before[0].numpy()
    png = explainer.explain_png(x, mean, np.random.default_rng(1).random((90, 60), np.float32))
    image = Image.open(io.BytesIO(base64.b64decode(png)))
    assert image.format == "PNG" and image.size == (60, 90)
    assert _hook_count(encoder) == 0
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), before)


def test_target_is_similarity_to_the_class_mean(encoder: nn.Module) -> None:
    """Explaining the class the image resembles most highlights where it differs from the
    opposite direction: the two maps for mean and -mean are not the same."""
    x = _inputs(1)[0]
    with torch.inference_mode():
        emb = encoder(x)[0].numpy()
    target = EmbeddingSimilarityTarget(emb * 3.0)  # normalised internally
    assert float(target(torch.from_numpy(emb))) == pytest.approx(1.0, abs=1e-5)
    explainer = Explainer(encoder, size=1)
    plus = explainer.heatmap(x, emb)
    minus = explainer.heatmap(x, -emb)
    assert not np.allclose(plus, minus)


def test_concurrent_explain_and_predict_are_safe(encoder: nn.Module) -> None:
    xs = _inputs(4)
    with torch.inference_mode():
        expected = [encoder(x).clone() for x in xs]
    explainer = Explainer(encoder, size=2)
    means = [e[0].numpy() for e in expected]
    serial = [explainer.heatmap(x, m) for x, m in zip(xs, means, strict=True)]

    def predict(i: int) -> torch.Tensor:
        with torch.inference_mode():
            return encoder(xs[i % 4])

    def explain(i: int) -> np.ndarray:
        return explainer.heatmap(xs[i % 4], means[i % 4])

    with ThreadPoolExecutor(max_workers=6) as pool:
        preds = [pool.submit(predict, i) for i in range(24)]
        maps = [pool.submit(explain, i) for i in range(12)]
        for i, fut in enumerate(preds):
            torch.testing.assert_close(fut.result(), expected[i % 4])
        for i, fut in enumerate(maps):
            np.testing.assert_allclose(fut.result(), serial[i % 4], atol=1e-5)
    assert _hook_count(encoder) == 0


@pytest.mark.parametrize(
    ("size", "expected"),
    [((100, 50), (100, 50)), ((2048, 1024), (512, 256)), ((300, 3000), (51, 512))],
)
def test_overlay_size_keeps_aspect(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert overlay_size(*size) == expected
    image = np.zeros((size[1], size[0]), np.float32)
    png = overlay_png(image, np.ones((8, 8), np.float32))
    assert Image.open(io.BytesIO(png)).size == expected


def test_overlay_places_the_map_of_a_cropped_input_on_its_region() -> None:
    """With a border crop the model saw the centre only: the map lands there, borders stay cold."""
    image = np.full((100, 80), 0.5, np.float32)
    hot = np.ones((16, 16), np.float32)
    full = np.asarray(Image.open(io.BytesIO(overlay_png(image, hot))).convert("RGB"))
    cropped = np.asarray(Image.open(io.BytesIO(overlay_png(image, hot, crop=0.25))).convert("RGB"))
    cold = np.asarray(
        Image.open(io.BytesIO(overlay_png(image, np.zeros((16, 16), np.float32)))).convert("RGB")
    )
    assert cropped.shape == full.shape == (100, 80, 3)
    np.testing.assert_array_equal(cropped[50, 40], full[50, 40])  # centre: hot as without crop
    np.testing.assert_array_equal(cropped[5, 5], cold[5, 5])  # cut border: cold
    np.testing.assert_array_equal(cropped[95, 75], cold[95, 75])
    assert not np.array_equal(full[5, 5], cold[5, 5])
