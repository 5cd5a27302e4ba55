"""Grad-CAM of a siamese answer: the textbook map (pytorch_grad_cam's) from the feature map,
the same from ONNX Runtime's feature map as from torch's, the served model untouched, safe
alongside concurrent inference-mode predictions."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from torch import nn

from app.gradcam import EmbeddingSimilarityTarget, gradcam_heatmap, heatmap_from_features
from app.serving.onnx_runtime import load_onnx_encoder
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


def _reference_gradcam(encoder: nn.Module, x: torch.Tensor, mean: np.ndarray) -> np.ndarray:
    """pytorch_grad_cam's GradCAM on a trainable copy, hooked on the module whose output is the
    encoder's last feature map (the backbone's last block), full backward."""
    model = copy.deepcopy(encoder)
    for p in model.parameters():
        p.requires_grad_(True)
    last_block = model.backbone[-1]
    with torch.no_grad():
        torch.testing.assert_close(last_block_output(model, x), model.forward_features(x))
    with GradCAM(model=model, target_layers=[last_block]) as cam:
        return cam(input_tensor=x.clone(), targets=[EmbeddingSimilarityTarget(mean)])[0]


def last_block_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: list[torch.Tensor] = []
    handle = model.backbone[-1].register_forward_hook(lambda _m, _i, o: out.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    return out[0]


def test_heatmap_matches_pytorch_grad_cam(encoder: nn.Module) -> None:
    x, other = _inputs(2)
    with torch.inference_mode():
        mean = encoder(other)[0].numpy()  # another image's class: a non-empty map
    heat = gradcam_heatmap(encoder, x, mean)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0.5
    np.testing.assert_allclose(heat, _reference_gradcam(encoder, x, mean), atol=1e-4)


def test_map_from_onnx_runtime_features_equals_torch(encoder: nn.Module, tmp_path: Path) -> None:
    """The served path: the feature map comes out of the ORT call that gives the embedding."""
    ort = load_onnx_encoder(encoder, sha256="gc", image_size=64, models_dir=tmp_path, threads=1)
    assert ort is not None
    x, other = _inputs(2)
    embedding, features = ort.with_features(x.numpy())
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(embedding), encoder(x), atol=1e-5, rtol=0)
        mean = encoder(other)[0].numpy()
    served = heatmap_from_features(encoder, features, mean, size=64)
    assert served.max() > 0.5
    np.testing.assert_allclose(served, gradcam_heatmap(encoder, x, mean), atol=1e-4)
    np.testing.assert_allclose(served, _reference_gradcam(encoder, x, mean), atol=1e-4)


def test_explaining_never_touches_the_served_model(encoder: nn.Module) -> None:
    x = _inputs(1)[0]
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.inference_mode():
        before = encoder(x).clone()
    gradcam_heatmap(encoder, x, before[0].numpy())
    assert _hook_count(encoder) == 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), before)


def test_target_is_similarity_to_the_class_mean(encoder: nn.Module) -> None:
    """Explaining the class the image resembles most highlights where it differs from the
    opposite direction: the two maps for mean and -mean are not the same."""
    x, other = _inputs(2)
    with torch.inference_mode():
        emb = encoder(other)[0].numpy()
    target = EmbeddingSimilarityTarget(emb * 3.0)  # normalised internally
    assert float(target(torch.from_numpy(emb))) == pytest.approx(1.0, abs=1e-5)
    plus = gradcam_heatmap(encoder, x, emb)
    minus = gradcam_heatmap(encoder, x, -emb)
    assert not np.allclose(plus, minus)


def test_concurrent_explain_and_predict_are_safe(encoder: nn.Module) -> None:
    """Many threads explain with the ONE served encoder while others predict with it."""
    xs = _inputs(4)
    with torch.inference_mode():
        expected = [encoder(x).clone() for x in xs]
    means = [expected[(i + 1) % 4][0].numpy() for i in range(4)]
    serial = [gradcam_heatmap(encoder, x, m) for x, m in zip(xs, means, strict=True)]

    def predict(i: int) -> torch.Tensor:
        with torch.inference_mode():
            return encoder(xs[i % 4])

    def explain(i: int) -> np.ndarray:
        return gradcam_heatmap(encoder, xs[i % 4], means[i % 4])

    with ThreadPoolExecutor(max_workers=6) as pool:
        preds = [pool.submit(predict, i) for i in range(24)]
        maps = [pool.submit(explain, i) for i in range(12)]
        for i, fut in enumerate(preds):
            torch.testing.assert_close(fut.result(), expected[i % 4])
        for i, fut in enumerate(maps):
            np.testing.assert_allclose(fut.result(), serial[i % 4], atol=1e-5)
    assert _hook_count(encoder) == 0
