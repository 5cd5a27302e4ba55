"""`POST /predict`: answers on clearly distinct synthetic classes, Grad-CAM, audit, metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from collections.abc import Callable

import faiss
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from app.config import Settings
from app.db import ApiKey, Prediction
from app.main import create_app
from app.serving.state import ServiceState
from tests.app.conftest_predict import CLASS_KINDS, enroll, post_predict, synthetic_xray
from training.threads import ThreadPolicy, apply_thread_policy, current_thread_policy

ANSWER_FIELDS = {
    "id",
    "label",
    "unknown",
    "confidence",
    "distances",
    "neighbors",
    "outlier_score",
    "outlier_threshold",
    "gradcam",
    "model_version",
    "index_version",
}


def check_consistent(answer: dict, *, k: int, n_references: int) -> None:
    """Invariants of every answer, whatever the method."""
    assert set(answer) == ANSWER_FIELDS
    assert set(answer["distances"]) == set(CLASS_KINDS)
    assert all(0.0 <= d <= 2.0 for d in answer["distances"].values())
    neighbors = answer["neighbors"]
    assert len(neighbors) == min(k, n_references)
    distances = [n["distance"] for n in neighbors]
    assert distances == sorted(distances), "neighbours must come nearest first"
    assert all(0.0 <= d <= 2.0 for d in distances)
    assert all(n["label"] in CLASS_KINDS for n in neighbors)
    assert 0.0 <= answer["confidence"] <= 1.0
    assert answer["outlier_score"] >= 0.0 and answer["outlier_threshold"] >= 0.0
    assert answer["unknown"] == (answer["outlier_score"] > answer["outlier_threshold"])


@pytest.mark.parametrize("method", ["knn", "mean_distance"])
def test_each_class_is_recognised(
    client: TestClient,
    headers: dict[str, dict[str, str]],
    enrolled: dict[str, list[dict]],
    model_version: str,
    method: str,
) -> None:
    n_refs = sum(len(v) for v in enrolled.values())
    ref_ids = {item["id"] for items in enrolled.values() for item in items}
    for kind in CLASS_KINDS:
        for seed in (7001, 7002):
            response = post_predict(
                client,
                headers["reader"],
                synthetic_xray(kind, seed=seed),
                explain=False,
                method=method,
                k=3,
            )
            assert response.status_code == 200, response.text
            answer = response.json()
            check_consistent(answer, k=3, n_references=n_refs)
            assert answer["label"] == kind, answer
            assert answer["model_version"] == model_version
            assert answer["gradcam"] is None
            assert {n["reference_id"] for n in answer["neighbors"]} <= ref_ids
            if method == "mean_distance":
                distances = answer["distances"]
                assert distances[answer["label"]] == min(distances.values())
            else:
                assert answer["neighbors"][0]["label"] == kind


def test_image_unlike_every_class_is_flagged_unknown(
    client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict
) -> None:
    for seed in (1, 2):
        response = post_predict(
            client, headers["reader"], synthetic_xray("noise", seed=seed), explain=False
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["unknown"] is True, answer
        assert answer["label"] in CLASS_KINDS  # the nearest class; the caller decides


def test_gradcam_overlay_keeps_the_upload_aspect_ratio(
    client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict
) -> None:
    upload = synthetic_xray("disc", seed=31, size=(150, 100))
    response = post_predict(client, headers["reader"], upload)  # explain defaults to true
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["gradcam"]["label"] == answer["label"]
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["gradcam"]["overlay_png"])))
    assert overlay.format == "PNG"
    assert overlay.size == (150, 100)
    # The one-pass explained answer is the same answer as without explanation.
    plain = post_predict(client, headers["reader"], upload, explain=False).json()
    assert plain["label"] == answer["label"] and plain["gradcam"] is None
    assert plain["distances"] == pytest.approx(answer["distances"], abs=1e-5)
    assert [n["reference_id"] for n in plain["neighbors"]] == [
        n["reference_id"] for n in answer["neighbors"]
    ]

    big = synthetic_xray("stripes", seed=32, size=(1200, 600), fmt="JPEG")
    response = post_predict(
        client, headers["reader"], big, filename="q.jpg", content_type="image/jpeg"
    )
    assert response.status_code == 200, response.text
    overlay = Image.open(io.BytesIO(base64.b64decode(response.json()["gradcam"]["overlay_png"])))
    assert overlay.size == (512, 256)  # long side capped, aspect kept


def test_audit_row_and_metrics(
    client: TestClient,
    app: FastAPI,
    headers: dict[str, dict[str, str]],
    enrolled: dict,
    data_dir,
) -> None:
    response = post_predict(
        client, headers["reader"], synthetic_xray("disc", seed=41), method="mean_distance"
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    with app.state.sessionmaker() as session:
        row = session.get(Prediction, answer["id"])
        assert row is not None
        reader = session.execute(select(ApiKey).where(ApiKey.role == "reader")).scalar_one()
        assert row.api_key_id == reader.id
        assert row.model_version == answer["model_version"]
        assert row.index_version == answer["index_version"]
        assert row.method == "mean_distance"
        assert row.label == answer["label"] and row.unknown == answer["unknown"]
        assert row.image_path is None
        assert row.answer["distances"] == answer["distances"]
        assert row.answer["gradcam"] == {"label": answer["label"], "overlay_png": None}
    assert not (data_dir / "predictions").exists(), "no image is stored unless configured"

    metrics = client.get("/metrics").text
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith("cxr_predictions_total{")
        and f'label="{answer["label"]}"' in ln
        and f'unknown="{str(answer["unknown"]).lower()}"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) == 1.0
    assert "cxr_index_size 12.0" in metrics
    assert f'cxr_active_model_info{{version="{answer["model_version"]}"}} 1.0' in metrics


def test_stored_prediction_images_are_deidentified(make_settings, checkpoint_a, make_dicom) -> None:
    from app.main import create_app
    from tests.app.conftest import new_key
    from tests.app.conftest_predict import register_in
    from training.imaging.deidentify import find_identifying_content

    settings = make_settings(store_prediction_images=True)
    app = create_app(settings)
    with TestClient(app) as client:
        register_in(app, checkpoint_a)
        clinician = {"X-API-Key": new_key(app, "clinician")}
        enroll(client, clinician, "disc", [synthetic_xray("disc", seed=s) for s in range(3)])
        enroll(client, clinician, "stripes", [synthetic_xray("stripes", seed=s) for s in range(3)])
        response = post_predict(
            client,
            {"X-API-Key": new_key(app, "reader")},
            make_dicom(seed=5, size=(48, 40)),
            filename="DOE_JANE.dcm",
            content_type="application/dicom",
            explain=True,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        overlay = Image.open(io.BytesIO(base64.b64decode(answer["gradcam"]["overlay_png"])))
        assert overlay.size == (48, 40)
        with app.state.sessionmaker() as session:
            row = session.get(Prediction, answer["id"])
            assert row is not None and row.image_path is not None
        stored = (settings.data_dir / row.image_path).read_bytes()
        assert find_identifying_content(stored) == []
        assert b"DOE^JANE" not in stored and b"PID-4711-0815" not in stored


def test_roles_and_auth(
    client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict
) -> None:
    image = synthetic_xray("disc", seed=3)
    assert post_predict(client, {}, image).status_code == 401
    assert post_predict(client, {"X-API-Key": "cxr_nope"}, image).status_code == 401
    for role in ("reader", "clinician", "admin"):
        response = post_predict(client, headers[role], image, explain=False)
        assert response.status_code == 200, (role, response.text)
    bearer = {"Authorization": headers["reader"]["X-API-Key"].join(["Bearer ", ""])}
    assert post_predict(client, bearer, image, explain=False).status_code == 200


def test_new_reference_is_used_by_next_prediction(
    client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict
) -> None:
    image = synthetic_xray("disc", seed=55)
    first = post_predict(client, headers["reader"], image, explain=False).json()
    added = enroll(client, headers["clinician"], "disc", [synthetic_xray("disc", seed=55)])
    second = post_predict(client, headers["reader"], image, explain=False).json()
    assert second["index_version"] > first["index_version"]
    assert second["neighbors"][0]["reference_id"] == added[0]["id"]
    assert second["neighbors"][0]["distance"] == pytest.approx(0.0, abs=1e-3)


def test_gauges_are_set_at_startup_before_any_prediction(
    app: FastAPI, enrolled: dict[str, list[dict]]
) -> None:
    # A second process on the same database: its gauges come from startup, not a prediction.
    fresh = create_app(app.state.settings)
    with TestClient(fresh) as client:
        metrics = client.get("/metrics").text
        assert "cxr_index_size 12.0" in metrics
        model_version = fresh.state.service.model_version
        assert model_version is not None
        assert f'cxr_active_model_info{{version="{model_version}"}} 1.0' in metrics
    assert fresh.state.metrics is fresh.state.service.metrics


def test_inference_workers_come_from_settings(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    def workers(settings: Settings) -> int:
        state = ServiceState(settings=settings, sessionmaker=lambda: None)
        return state.inference_workers

    monkeypatch.delenv("CXR_INFERENCE_WORKERS", raising=False)
    default = make_settings()
    assert default.inference_workers is None
    assert workers(default) == min(4, os.cpu_count() or 1)
    monkeypatch.setenv("CXR_INFERENCE_WORKERS", "3")
    assert make_settings().inference_workers == 3
    assert workers(make_settings()) == 3
    assert workers(make_settings(inference_workers=7)) == 7


@pytest.mark.usefixtures("restore_thread_policy")
def test_building_a_service_state_leaves_thread_counts_alone(
    make_settings: Callable[..., Settings],
) -> None:
    """Thread counts are the process's policy (training/threads.py), applied at its start; a
    state built later (a bench's in-process timer, a second app) must not change them."""
    # A count that no serving share of this machine equals (one inference worker: all cores).
    mine = (os.cpu_count() or 1) + 1
    apply_thread_policy(ThreadPolicy(kind="test", threads=mine))
    ServiceState(settings=make_settings(), sessionmaker=lambda: None, inference_workers=1)
    assert torch.get_num_threads() == mine
    assert faiss.omp_get_max_threads() == mine


@pytest.mark.usefixtures("restore_thread_policy")
def test_app_start_applies_the_serving_thread_policy(
    app: FastAPI, enrolled: dict[str, list[dict]]
) -> None:
    """The lifespan is the API process's start under uvicorn: torch, FAISS and the model's
    ONNX Runtime session get cores // CXR_INFERENCE_WORKERS threads."""
    cores = os.cpu_count() or 1
    apply_thread_policy(ThreadPolicy(kind="test", threads=cores + 1))
    fresh = create_app(app.state.settings.model_copy(update={"inference_workers": 1}))
    seen: dict[str, object] = {}

    async def start() -> None:
        # In this thread, as uvicorn runs the lifespan in its event loop's thread.
        async with fresh.router.lifespan_context(fresh):
            seen["torch"], seen["faiss"] = torch.get_num_threads(), faiss.omp_get_max_threads()
            request_thread: list[int] = []
            thread = threading.Thread(target=lambda: request_thread.append(torch.get_num_threads()))
            thread.start()
            thread.join()
            seen["request thread"] = request_thread[0]
            bundle = fresh.state.service.bundle
            seen["onnx"] = bundle.model.onnx.threads if bundle.model.onnx else None

    asyncio.run(start())
    assert current_thread_policy() == ThreadPolicy.serving(1)
    assert seen == {"torch": cores, "faiss": cores, "request thread": cores, "onnx": cores}
