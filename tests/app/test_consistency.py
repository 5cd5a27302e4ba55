"""Two API processes (two app instances) on one database: a reference enrolled through one and
a model activated through one are used by the other's next prediction. SQLite file and
PostgreSQL (the `postgres_url` fixture: a fresh schema on the machine's server)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.conftest import new_key
from tests.app.conftest_predict import enroll, post_predict, register_in, synthetic_xray


def _two_instances(settings: Settings, checkpoint_a: Path, checkpoint_b: Path) -> None:
    app_a, app_b = create_app(settings), create_app(settings)
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b:
        version_a = register_in(app_a, checkpoint_a)
        clinician = {"X-API-Key": new_key(app_a, "clinician")}
        admin = {"X-API-Key": new_key(app_a, "admin")}
        reader = {"X-API-Key": new_key(app_b, "reader")}  # keys are shared via the database
        enroll(client_a, clinician, "disc", [synthetic_xray("disc", seed=s) for s in range(4)])
        enroll(
            client_a, clinician, "stripes", [synthetic_xray("stripes", seed=s) for s in range(4)]
        )

        query = synthetic_xray("stripes", seed=901)
        first = post_predict(client_b, reader, query, explain=False)
        assert first.status_code == 200, first.text
        first = first.json()
        assert first["model_version"] == version_a and first["label"] == "stripes"

        # Enrolled through A (which refreshes eagerly) -> B's very next prediction uses it.
        added = enroll(client_a, clinician, "stripes", [query])
        second = post_predict(client_b, reader, query, explain=False).json()
        assert second["index_version"] > first["index_version"]
        assert second["neighbors"][0]["reference_id"] == added[0]["id"]
        assert second["neighbors"][0]["distance"] == pytest.approx(0.0, abs=1e-3)
        # B stored nothing new: A computed the embedding; A and B answer the same.
        from_a = post_predict(client_a, reader, query, explain=False).json()
        assert from_a["index_version"] == second["index_version"]
        assert from_a["distances"] == pytest.approx(second["distances"])

        # Deleted through A -> gone from B's next answer.
        deleted = client_a.delete(f"/references/{added[0]['id']}", headers=admin)
        assert deleted.status_code == 204
        third = post_predict(client_b, reader, query, explain=False).json()
        assert added[0]["id"] not in {n["reference_id"] for n in third["neighbors"]}

        # Hot swap through A -> B's next prediction uses model B.
        version_b = register_in(app_a, checkpoint_b, activate=False)
        response = client_a.post(f"/admin/models/{version_b}/activate", headers=admin)
        assert response.status_code == 200, response.text
        fourth = post_predict(client_b, reader, query, explain=True)
        assert fourth.status_code == 200, fourth.text
        assert fourth.json()["model_version"] == version_b
        assert fourth.json()["gradcam"]["label"] == fourth.json()["label"]


def test_two_instances_sqlite_file(
    make_settings: Callable[..., Settings], checkpoint_a: Path, checkpoint_b: Path
) -> None:
    _two_instances(make_settings(), checkpoint_a, checkpoint_b)


@pytest.mark.services
def test_two_instances_postgres(
    make_settings: Callable[..., Settings],
    postgres_url: str,
    checkpoint_a: Path,
    checkpoint_b: Path,
) -> None:
    _two_instances(make_settings(database_url=postgres_url), checkpoint_a, checkpoint_b)
