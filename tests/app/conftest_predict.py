"""Fixtures for the prediction side: tiny checkpoints, synthetic classes, an app with a model.

Images are PIL-drawn and clearly distinct per class ("disc": a bright disc on a dark field,
"stripes": dark horizontal stripes on a light field), with random jitter per seed so references
and queries differ. A freshly initialised small CNN already separates such different patterns,
so tests need no training. Never real patient data.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from app.services.models import register_model
from training.checkpoint import save_checkpoint
from training.encoders import create_encoder
from training.preprocess import Preprocessing

TEST_ENCODER = "resnet9_half"
TEST_IMAGE_SIZE = 64
TEST_EMBEDDING_DIM = 32
CLASS_KINDS = ("disc", "stripes")


def make_test_checkpoint(path: Path, *, seed: int = 0, image_size: int = TEST_IMAGE_SIZE) -> Path:
    """A small, freshly initialised, self-describing checkpoint (deterministic per seed)."""
    torch.manual_seed(seed)
    encoder = create_encoder(TEST_ENCODER, embedding_dim=TEST_EMBEDDING_DIM).eval()
    return save_checkpoint(
        path,
        encoder=encoder,
        encoder_name=TEST_ENCODER,
        encoder_kwargs={},
        preprocessing=Preprocessing(image_size=image_size),
        classes=list(CLASS_KINDS),
        config={"seed": seed, "note": "test checkpoint, untrained"},
        metrics={"knn": {"balanced_accuracy": 0.5}, "seed": seed},
    )


def synthetic_xray(
    kind: str, seed: int = 0, size: tuple[int, int] = (96, 96), fmt: str = "PNG"
) -> bytes:
    """A synthetic image of class `kind` ("disc", "stripes", or "noise" for unlike-anything)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if kind == "disc":
        img = Image.new("L", size, int(rng.integers(10, 40)))
        draw = ImageDraw.Draw(img)
        r = min(w, h) * rng.uniform(0.25, 0.32)
        cx = w / 2 + rng.uniform(-0.08, 0.08) * w
        cy = h / 2 + rng.uniform(-0.08, 0.08) * h
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(rng.integers(220, 256)))
    elif kind == "stripes":
        img = Image.new("L", size, int(rng.integers(200, 240)))
        draw = ImageDraw.Draw(img)
        period = max(4, int(h / rng.uniform(7.0, 9.0)))
        offset = int(rng.integers(0, period))
        for y in range(offset - period, h, period):
            draw.rectangle((0, y, w, y + period // 2), fill=int(rng.integers(0, 30)))
    elif kind == "noise":
        arr = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        arr[:, ::2] = 255 - arr[:, ::2]
        img = Image.fromarray(arr, mode="L")
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}")
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, size=(h, w))
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    out.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def checkpoint_a(checkpoint_dir: Path) -> Path:
    """Checkpoint of model A (seed 0)."""
    return make_test_checkpoint(checkpoint_dir / "a.pt", seed=0)


@pytest.fixture(scope="session")
def checkpoint_b(checkpoint_dir: Path) -> Path:
    """Checkpoint of model B (seed 1): another version, other embeddings."""
    return make_test_checkpoint(checkpoint_dir / "b.pt", seed=1)


@pytest.fixture
def make_xray() -> Callable[..., bytes]:
    return synthetic_xray


def register_in(app: FastAPI, checkpoint: Path, *, activate: bool = True) -> str:
    """Register (and activate) a checkpoint in the app's database; returns the version."""
    with app.state.sessionmaker() as session:
        row = register_model(
            session=session,
            checkpoint=checkpoint,
            settings=app.state.settings,
            activate=activate,
            source="test",
        )
        return row.version


def enroll(
    client: TestClient,
    headers: dict[str, str],
    label: str,
    images: list[bytes],
) -> list[dict]:
    """Enroll images under a label through the API; returns the enrolled items."""
    files = [("file", (f"{label}-{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = client.post("/references", headers=headers, data={"label": label}, files=files)
    assert response.status_code == 201, response.text
    return response.json()["references"]


def enroll_classes(
    client: TestClient, headers: dict[str, str], *, per_class: int = 6, seed0: int = 100
) -> dict[str, list[dict]]:
    """Enroll `per_class` references of every synthetic class."""
    return {
        kind: enroll(
            client,
            headers,
            kind,
            [synthetic_xray(kind, seed=seed0 + i) for i in range(per_class)],
        )
        for kind in CLASS_KINDS
    }


@pytest.fixture
def model_version(client: TestClient, app: FastAPI, checkpoint_a: Path) -> str:
    """Model A registered and active in the app under test."""
    return register_in(app, checkpoint_a)


@pytest.fixture
def enrolled(
    client: TestClient, headers: dict[str, dict[str, str]], model_version: str
) -> dict[str, list[dict]]:
    """Both synthetic classes enrolled (6 references each) with model A active."""
    return enroll_classes(client, headers["clinician"])


def post_predict(
    client: TestClient,
    headers: dict[str, str],
    data: bytes,
    *,
    filename: str = "query.png",
    content_type: str = "image/png",
    **params: object,
):
    """POST /predict with one file; query params as keywords (explain, k, method)."""
    query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}
    return client.post(
        "/predict",
        headers=headers,
        params=query,
        files={"file": (filename, data, content_type)},
    )
