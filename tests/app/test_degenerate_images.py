"""Issue 11 item 7: degenerate images get no diagnosis.

A 1x1 icon or a 10000x10 strip is refused (422) with a message naming the limit to respect;
random noise, a photograph, a lateral view and a CT slice are answered ``unknown: true``
whatever the reference index says (the image-level check of ``training/ood.py``), while a
frontal chest phantom near its enrolled class is not. The check's separation is measured as an
AUROC on a corpus built here (synthetic phantoms, noise, documents, and the two real photographs
scikit-learn ships), against a floor the check before this change did not reach on photos.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from tests.app.conftest_predict import enroll, post_predict, register_in
from tests.training import ood_corpus
from training.imaging import decode_image
from training.ood import OOD_THRESHOLD, colourfulness, ood_score

H = dict[str, dict[str, str]]


def png(image: np.ndarray) -> bytes:
    """PNG of a float ``(H, W)`` image in ``[0, 1]`` or an ``(H, W, 3)`` uint8 RGB one."""
    if image.dtype == np.uint8:
        pil = Image.fromarray(image, mode="RGB" if image.ndim == 3 else "L")
    else:
        pil = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_photo(seed: int, size: tuple[int, int] = (240, 180)) -> np.ndarray:
    """A colour 'holiday snapshot': a sky-to-ground gradient, a sun, a house, a tree."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy = np.linspace(0, 1, h)[:, None, None]
    sky = np.array(rng.uniform([60, 120, 200], [120, 180, 255]))
    ground = np.array(rng.uniform([30, 90, 20], [90, 160, 60]))
    base = (1 - yy) * sky + yy * ground
    img = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    sx, sy = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.25) * h
    draw.ellipse((sx, sy, sx + 0.12 * w, sy + 0.12 * w), fill=(255, 230, 80))
    hx = rng.uniform(0.45, 0.65) * w
    draw.rectangle((hx, 0.45 * h, hx + 0.25 * w, 0.8 * h), fill=(180, 60, 50))
    draw.polygon(
        [(hx - 10, 0.45 * h), (hx + 0.125 * w, 0.25 * h), (hx + 0.25 * w + 10, 0.45 * h)],
        fill=(90, 40, 30),
    )
    tx = rng.uniform(0.05, 0.3) * w
    draw.rectangle((tx, 0.5 * h, tx + 8, 0.85 * h), fill=(90, 60, 30))
    draw.ellipse((tx - 25, 0.3 * h, tx + 33, 0.6 * h), fill=(30, 110, 40))
    return np.asarray(img, dtype=np.uint8)


@pytest.fixture
def frontal_index(client: TestClient, app: FastAPI, headers: H, checkpoint_a) -> None:
    """Model A with two classes of frontal chest phantoms enrolled (other seeds than queries)."""
    register_in(app, checkpoint_a)
    rng = np.random.default_rng(1000)
    for label in ("Normal", "Pneumonia"):
        enroll(
            client, headers["clinician"], label, [png(ood_corpus.frontal(rng)) for _ in range(6)]
        )


# -- shape: 422 before any model -------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "hint"),
    [
        ((1, 1), "CXR_MIN_IMAGE_SIDE"),
        ((16, 16), "CXR_MIN_IMAGE_SIDE"),
        ((31, 400), "CXR_MIN_IMAGE_SIDE"),
        ((10000, 10), "CXR_MIN_IMAGE_SIDE"),
        ((2000, 40), "CXR_MAX_ASPECT_RATIO"),
        ((64, 1024), "CXR_MAX_ASPECT_RATIO"),
    ],
)
def test_tiny_and_strip_images_are_422_with_the_limit(
    client: TestClient, headers: H, frontal_index: None, size: tuple[int, int], hint: str
) -> None:
    w, h = size
    data = png(np.random.default_rng(0).uniform(0.2, 0.8, (h, w)).astype(np.float32))
    for response in (
        post_predict(client, headers["reader"], data),
        client.post(
            "/references",
            headers=headers["clinician"],
            data={"label": "Normal"},
            files={"file": ("x.png", data, "image/png")},
        ),
    ):
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert f"{w}x{h}" in detail and hint in detail and "Upload" in detail
    counts = {
        c["label"]: c["count"] for c in client.get("/classes", headers=headers["reader"]).json()
    }
    assert counts == {"Normal": 6, "Pneumonia": 6}  # nothing degenerate was enrolled


def test_smallest_allowed_shape_is_still_answered(
    client: TestClient, headers: H, frontal_index: None
) -> None:
    side = client.app.state.settings.min_image_side
    ratio = client.app.state.settings.max_aspect_ratio
    rng = np.random.default_rng(5)
    for w, h in ((side, side), (int(side * ratio), side)):
        response = post_predict(client, headers["reader"], png(ood_corpus.frontal(rng, (h, w))))
        assert response.status_code == 200, (w, h, response.text)


# -- not a chest radiograph: unknown ---------------------------------------------------------

NOT_A_CHEST = {
    "uniform noise": lambda rng: rng.uniform(0, 1, (200, 200)).astype(np.float32),
    "gaussian noise": lambda rng: np.clip(rng.normal(0.5, 0.2, (256, 192)), 0, 1).astype(
        np.float32
    ),
    "colour photo": lambda rng: synthetic_photo(int(rng.integers(1 << 30))),
    "lateral chest": ood_corpus.lateral,
    "CT slice": ood_corpus.ct_slice,
}


@pytest.fixture
def junk_class(client: TestClient, headers: H, frontal_index: None) -> None:
    """The adversarial case: images of every wrong kind enrolled as a class, so the index finds
    the queries below near a class and does not flag them itself; only the image check can."""
    images = [
        png(make(np.random.default_rng(100 + i))) for make in NOT_A_CHEST.values() for i in range(3)
    ]
    enroll(client, headers["clinician"], "Junk", images)


@pytest.mark.parametrize("kind", list(NOT_A_CHEST))
def test_what_is_not_a_frontal_chest_is_answered_unknown(
    client: TestClient, headers: H, junk_class: None, kind: str
) -> None:
    answers = []
    for seed in range(3):
        image = NOT_A_CHEST[kind](np.random.default_rng(seed))
        response = post_predict(client, headers["reader"], png(image), explain=False)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert [a["unknown"] for a in answers] == [True] * 3, [
        (a["label"], a["confidence"], a["outlier_score"], a["outlier_threshold"]) for a in answers
    ]
    # the index alone would have answered at least one of them with a class
    assert any(a["outlier_score"] <= a["outlier_threshold"] for a in answers), answers


def test_frontal_chest_phantom_is_not_flagged(
    client: TestClient, headers: H, frontal_index: None
) -> None:
    """The control: the image check adds no flag to a frontal film."""
    rng = np.random.default_rng(77)
    answers = [
        post_predict(client, headers["reader"], png(ood_corpus.frontal(rng)), explain=False).json()
        for _ in range(4)
    ]
    # unknown only where the index itself says so (an untrained encoder, six references)
    assert [a["unknown"] for a in answers] == [
        a["outlier_score"] > a["outlier_threshold"] for a in answers
    ], answers
    assert sum(a["unknown"] for a in answers) <= 1, answers
    assert all(a["label"] in {"Normal", "Pneumonia"} for a in answers)


def test_the_check_can_be_switched_off(make_settings, checkpoint_a) -> None:
    """`CXR_OOD_CHECK=false` leaves only the index's flag: noise near a class is then answered."""
    from app.main import create_app
    from tests.app.conftest import new_key

    answers = {}
    for ood in (True, False):
        app = create_app(make_settings(ood_check=ood))
        with TestClient(app) as client:
            register_in(app, checkpoint_a)
            clinician = {"X-API-Key": new_key(app, "clinician")}
            # the noise itself enrolled as a class: the index then sees nothing unusual
            rng = np.random.default_rng(3)
            noise = [png(rng.uniform(0, 1, (128, 128)).astype(np.float32)) for _ in range(7)]
            enroll(client, clinician, "Noise", noise[:6])
            answers[ood] = post_predict(client, clinician, noise[6], explain=False).json()
    assert answers[True]["unknown"] is True
    assert answers[False]["unknown"] is False and answers[False]["label"] == "Noise"


# -- the measurement -------------------------------------------------------------------------


def _scores(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores as the service computes them: the decoded pixels plus the uploaded bytes."""
    images, labels, kinds = ood_corpus.corpus(seed=seed, per_kind=12)
    rng = np.random.default_rng(seed + 1)
    uploads = [png(im) for im in images]
    uploads += [png(synthetic_photo(int(rng.integers(1 << 30)))) for _ in range(12)]
    labels = labels + [1] * 12
    kinds = kinds + ["colour photo"] * 12
    scores = np.array([ood_score(decode_image(data), data=data) for data in uploads])
    return scores, np.array(labels), np.array(kinds)


def test_ood_auroc_on_the_built_corpus() -> None:
    """AUROC of the score, and the flag rate per kind at the serving threshold.

    Measured: AUROC 0.986, every noise / lateral / CT / colour photo flagged, 42 % of the grey
    real-photo crops, no frontal phantom. The check before the layout and colour signs gave
    AUROC 0.92 here and flagged 8 % of the grey photos and 17 % of the colour ones.
    """
    scores, labels, kinds = _scores(seed=3)
    auroc = roc_auc_score(labels, scores)
    assert auroc >= 0.96, auroc
    flagged = {k: float((scores[kinds == k] > OOD_THRESHOLD).mean()) for k in set(kinds)}
    assert flagged["frontal"] == 0.0, flagged
    for kind in ("noise", "lateral", "ct", "colour photo"):
        assert flagged[kind] == 1.0, flagged
    assert flagged["photo"] >= 0.3, flagged  # real photographs, grey, cropped and rotated


def test_a_grey_film_saved_as_rgb_jpeg_is_not_colourful() -> None:
    """Many films arrive as RGB JPEGs with R = G = B: chroma noise must not flag them."""
    rng = np.random.default_rng(9)
    for _ in range(4):
        grey = (ood_corpus.frontal(rng) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(grey, mode="L").convert("RGB").save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        assert colourfulness(data) < 3.0
        assert ood_score(decode_image(data), data=data) <= OOD_THRESHOLD
    assert colourfulness(png(synthetic_photo(0))) > 20.0
