"""The ONNX Runtime path of the CPU encoder: same embeddings as torch, same answers as the
torch-served service, one export per checkpoint content."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.files import file_sha256
from app.main import create_app
from app.serving.onnx_runtime import load_onnx_encoder, onnx_cache_path
from tests.app.conftest import new_key
from tests.app.conftest_predict import enroll_classes, post_predict, register_in, synthetic_xray
from training.checkpoint import load_checkpoint


def test_ort_embeddings_equal_torch_and_export_is_cached(
    checkpoint_a: Path, tmp_path: Path
) -> None:
    loaded = load_checkpoint(checkpoint_a, map_location="cpu")
    encoder = loaded.encoder.eval()
    size = loaded.preprocessing.image_size
    digest = file_sha256(checkpoint_a)
    ort_encoder = load_onnx_encoder(encoder, sha256=digest, image_size=size, models_dir=tmp_path)
    assert ort_encoder is not None
    assert ort_encoder.path == onnx_cache_path(tmp_path, digest) and ort_encoder.path.is_file()

    batch = torch.rand(5, 1, size, size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = encoder(batch).numpy()
    got = ort_encoder(batch.numpy())
    assert got.shape == expected.shape == (5, loaded.embedding_dim)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Batch dimension dynamic: one image alone gives its row of the batch.
    np.testing.assert_allclose(ort_encoder(batch[2:3].numpy())[0], expected[2], atol=1e-4)

    # A second load reuses the export (same file, not rewritten).
    stamp = ort_encoder.path.stat().st_mtime_ns
    again = load_onnx_encoder(encoder, sha256=digest, image_size=size, models_dir=tmp_path)
    assert again is not None and again.path.stat().st_mtime_ns == stamp


def test_mismatching_export_falls_back_to_torch(checkpoint_a: Path, tmp_path: Path) -> None:
    """A cached export that no longer computes this encoder's embeddings is refused."""
    loaded = load_checkpoint(checkpoint_a, map_location="cpu")
    size = loaded.preprocessing.image_size
    digest = file_sha256(checkpoint_a)
    first = load_onnx_encoder(loaded.encoder, sha256=digest, image_size=size, models_dir=tmp_path)
    assert first is not None
    with torch.no_grad():
        for param in loaded.encoder.parameters():
            param.add_(0.5)
    assert (
        load_onnx_encoder(loaded.encoder, sha256=digest, image_size=size, models_dir=tmp_path)
        is None
    )


def _answers(settings: Settings, checkpoint: Path) -> tuple[list[dict], bool]:
    app = create_app(settings)
    with TestClient(app) as client:
        register_in(app, checkpoint)
        clinician = {"X-API-Key": new_key(app, "clinician")}
        reader = {"X-API-Key": new_key(app, "reader")}
        enroll_classes(client, clinician, per_class=4)
        answers = []
        for kind in ("disc", "stripes"):
            for seed in (900, 901):
                response = post_predict(
                    client, reader, synthetic_xray(kind, seed=seed), explain=False
                )
                assert response.status_code == 200, response.text
                answers.append(response.json())
        bundle = app.state.service.bundle
        return answers, bundle is not None and bundle.model.onnx is not None


def test_service_answers_identically_with_onnx_on_and_off(
    make_settings: Callable[..., Settings], checkpoint_a: Path, tmp_path: Path
) -> None:
    on, used_onnx = _answers(
        make_settings(onnx="auto", device="cpu", data_dir=tmp_path / "on"), checkpoint_a
    )
    off, used_torch_only = _answers(
        make_settings(onnx="off", device="cpu", data_dir=tmp_path / "off"), checkpoint_a
    )
    assert used_onnx and not used_torch_only
    assert [a["label"] for a in on] == [a["label"] for a in off] == ["disc"] * 2 + ["stripes"] * 2
    for a, b in zip(on, off, strict=True):
        assert a["distances"] == pytest.approx(b["distances"], abs=1e-4)
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)
        assert a["unknown"] == b["unknown"]
        assert [n["label"] for n in a["neighbors"]] == [n["label"] for n in b["neighbors"]]
        assert [n["distance"] for n in a["neighbors"]] == pytest.approx(
            [n["distance"] for n in b["neighbors"]], abs=1e-4
        )
