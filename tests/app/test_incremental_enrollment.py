"""Enrollment moves the serving index forward by exactly the new references: each image is
decoded once (no read-back to embed it), the index is not rebuilt from the database, and the
answers equal those of a service built from scratch on the same references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import app.services.uploads as uploads_service
import app.serving.embeddings as embeddings_module
import app.serving.state as state_module
import training.embedding as embedding_module
from app.config import Settings
from app.main import create_app
from tests.app.conftest import new_key
from tests.app.conftest_predict import enroll, post_predict, register_in, synthetic_xray

H = dict[str, dict[str, str]]


def counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def comparable(answer: dict) -> tuple:
    return (
        answer["label"],
        round(answer["confidence"], 5),
        answer["unknown"],
        [(n["reference_id"], round(n["distance"], 5)) for n in answer["neighbors"]],
        {k: round(v, 5) for k, v in answer["distances"].items()},
    )


def test_enrollment_and_deletion_update_the_index_in_place(
    client: TestClient,
    app: FastAPI,
    headers: H,
    enrolled: dict[str, list[dict]],
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
) -> None:
    service = app.state.service
    query = synthetic_xray("disc", seed=777)
    before = post_predict(client, headers["reader"], query, explain=False).json()

    builds = counting(monkeypatch, state_module.ServiceState, "_build")
    read_backs = counting(monkeypatch, embedding_module, "decode_image")
    decodes = counting(monkeypatch, uploads_service, "decode_image")
    added = enroll(client, headers["clinician"], "disc", [query, synthetic_xray("disc", seed=778)])
    assert len(decodes) == 2  # one decode per uploaded file ...
    assert read_backs == [] and builds == []  # ... no read-back, no rebuild
    bundle = service.bundle
    assert bundle.index_version == before["index_version"] + 1
    assert {a["id"] for a in added} <= set(bundle.index.ids)

    after = post_predict(client, headers["reader"], query, explain=False).json()
    assert builds == []
    assert after["index_version"] == bundle.index_version
    assert after["neighbors"][0]["reference_id"] == added[0]["id"]
    assert after["neighbors"][0]["distance"] == pytest.approx(0.0, abs=1e-3)

    deleted = client.delete(f"/references/{added[0]['id']}", headers=headers["admin"])
    assert deleted.status_code == 204
    assert builds == [] and added[0]["id"] not in service.bundle.index.ids
    bundle.index.wait_calibrated(timeout=60)
    service.bundle.index.wait_calibrated(timeout=60)
    incremental = post_predict(client, headers["reader"], query, explain=False).json()

    # A second process started now builds from the database: it must answer the same.
    other = create_app(app.state.settings)
    with TestClient(other) as other_client:
        fresh = post_predict(other_client, headers["reader"], query, explain=False).json()
    assert fresh["index_version"] == incremental["index_version"]
    assert comparable(fresh) == comparable(incremental)


def test_another_process_catches_up_by_difference(
    make_settings: Callable[..., Settings], checkpoint_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B did not make the change: it refreshes from the database, embedding only what is new."""
    settings = make_settings()
    app_a, app_b = create_app(settings), create_app(settings)
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b:
        register_in(app_a, checkpoint_a)
        clinician = {"X-API-Key": new_key(app_a, "clinician")}
        reader = {"X-API-Key": new_key(app_a, "reader")}
        for kind in ("disc", "stripes"):
            enroll(client_a, clinician, kind, [synthetic_xray(kind, seed=s) for s in range(4)])
        query = synthetic_xray("stripes", seed=900)
        assert post_predict(client_b, reader, query, explain=False).status_code == 200
        index_before = app_b.state.service.bundle.index
        computed = counting(monkeypatch, embeddings_module, "compute_embeddings")
        added = enroll(client_a, clinician, "stripes", [query])
        answer = post_predict(client_b, reader, query, explain=False).json()
        assert answer["neighbors"][0]["reference_id"] == added[0]["id"]
        assert computed == []  # A stored the embedding at enrollment; B fetched it
        assert len(index_before) == 8  # B's previous bundle was not changed under it
        assert len(app_b.state.service.bundle.index) == 9
