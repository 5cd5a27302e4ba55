"""Model versions: register (service + `cxr models add`), list, activate, roles, hot swap."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.config import get_settings
from app.db import Model, get_index_version
from app.services.models import (
    InvalidCheckpointError,
    ModelNotFoundError,
    activate_model,
    list_models,
    register_model,
)
from tests.app.conftest_predict import post_predict, register_in, synthetic_xray


def test_register_copies_checksums_and_is_idempotent(
    client: TestClient, app: FastAPI, checkpoint_a: Path, checkpoint_b: Path
) -> None:
    settings = app.state.settings
    with app.state.sessionmaker() as session:
        row = register_model(session=session, checkpoint=checkpoint_a, settings=settings)
        assert row.version.startswith("m-") and row.version.endswith(row.sha256[:8])
        assert not row.active
        stored = settings.data_dir / row.file_path
        assert stored.is_file() and stored.read_bytes() == checkpoint_a.read_bytes()
        assert row.encoder_name == "resnet9_half" and row.embedding_dim == 32
        assert row.metrics["seed"] == 0
        assert row.config["preprocessing"]["image_size"] == 64
        again = register_model(session=session, checkpoint=checkpoint_a, settings=settings)
        assert again.version == row.version
        other = register_model(
            session=session, checkpoint=checkpoint_b, settings=settings, metrics={"x": 1}
        )
        assert other.version != row.version and other.metrics == {"x": 1}
        assert list_models(session=session)[0].version == other.version
        with pytest.raises(ModelNotFoundError):
            activate_model(session=session, version="m-nope", settings=settings)


def test_register_refuses_what_is_not_a_checkpoint(
    client: TestClient, app: FastAPI, tmp_path: Path
) -> None:
    bogus = tmp_path / "encoder.pt"
    bogus.write_bytes(b"not a checkpoint")
    with app.state.sessionmaker() as session:
        with pytest.raises(InvalidCheckpointError, match="cxr train"):
            register_model(session=session, checkpoint=bogus, settings=app.state.settings)
        with pytest.raises(FileNotFoundError):
            register_model(
                session=session, checkpoint=tmp_path / "missing.pt", settings=app.state.settings
            )
        assert session.execute(select(func.count()).select_from(Model)).scalar_one() == 0
    assert not (app.state.settings.data_dir / "models").exists() or not any(
        (app.state.settings.data_dir / "models").iterdir()
    )


def test_routes_list_activate_and_roles(
    client: TestClient, app: FastAPI, headers: dict, checkpoint_a: Path, checkpoint_b: Path
) -> None:
    version_a = register_in(app, checkpoint_a, activate=True)
    version_b = register_in(app, checkpoint_b, activate=False)
    for role in ("reader", "clinician"):
        assert client.get("/models", headers=headers[role]).status_code == 403
        response = client.post(f"/admin/models/{version_b}/activate", headers=headers[role])
        assert response.status_code == 403
    assert client.get("/models").status_code == 401

    listed = client.get("/models", headers=headers["admin"])
    assert listed.status_code == 200, listed.text
    by_version = {m["version"]: m for m in listed.json()}
    assert set(by_version) == {version_a, version_b}
    assert by_version[version_a]["active"] and not by_version[version_b]["active"]
    assert {"version", "created_at", "metrics", "active"} <= set(by_version[version_a])

    with app.state.sessionmaker() as session:
        before = get_index_version(session)
    response = client.post(f"/admin/models/{version_b}/activate", headers=headers["admin"])
    assert response.status_code == 200, response.text
    assert response.json()["version"] == version_b and response.json()["active"]
    with app.state.sessionmaker() as session:
        assert get_index_version(session) == before + 1
        active = session.execute(select(Model.version).where(Model.active.is_(True))).all()
        assert active == [(version_b,)]

    rollback = client.post(f"/admin/models/{version_a}/activate", headers=headers["admin"])
    assert rollback.status_code == 200 and rollback.json()["version"] == version_a
    missing = client.post("/admin/models/m-unknown/activate", headers=headers["admin"])
    assert missing.status_code == 404 and "GET /models" in missing.json()["detail"]


def test_activating_a_model_with_a_missing_file_is_refused(
    client: TestClient, app: FastAPI, headers: dict, checkpoint_b: Path
) -> None:
    version = register_in(app, checkpoint_b, activate=False)
    with app.state.sessionmaker() as session:
        path = app.state.settings.data_dir / session.get(Model, version).file_path
    path.unlink()
    response = client.post(f"/admin/models/{version}/activate", headers=headers["admin"])
    assert response.status_code == 409 and "cxr models add" in response.json()["detail"]


def test_hot_swap_next_prediction_uses_the_new_model(
    client: TestClient,
    app: FastAPI,
    headers: dict,
    enrolled: dict,
    model_version: str,
    checkpoint_b: Path,
) -> None:
    image = synthetic_xray("stripes", seed=77)
    first = post_predict(client, headers["reader"], image, explain=False).json()
    assert first["model_version"] == model_version
    version_b = register_in(app, checkpoint_b, activate=False)
    response = client.post(f"/admin/models/{version_b}/activate", headers=headers["admin"])
    assert response.status_code == 200
    second = post_predict(client, headers["reader"], image, explain=True)
    assert second.status_code == 200, second.text
    answer = second.json()
    assert answer["model_version"] == version_b
    assert answer["index_version"] > first["index_version"]
    assert answer["label"] == "stripes"
    # The references were re-embedded by model B (enrolled before B existed).
    assert answer["distances"] != first["distances"]


def test_cli_models_add_prints_the_version_alone(
    data_dir: Path, checkpoint_a: Path, tmp_path: Path
) -> None:
    from app.cli import cli

    runner = CliRunner()
    assert not data_dir.exists()  # a fresh ./var: the command migrates it first
    result = runner.invoke(cli, ["models", "add", str(checkpoint_a), "--activate"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("m-")
    version = lines[0]

    from app.db.migrate import prepare_database

    factory = prepare_database(get_settings())
    try:
        with factory() as session:
            row = session.get(Model, version)
            assert row is not None and row.active and row.source == "cli"
    finally:
        factory.kw["bind"].dispose()

    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    result = runner.invoke(cli, ["models", "add", str(bad)])
    assert result.exit_code == 2
    assert result.stdout == "" and "cxr train" in result.stderr


def _cli_add(runner: CliRunner, checkpoint: Path, *extra: str) -> str:
    from app.cli import cli

    result = runner.invoke(cli, ["models", "add", str(checkpoint), *extra])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_cli_models_list_shows_every_version_and_the_active_one(
    data_dir: Path, checkpoint_a: Path, checkpoint_b: Path
) -> None:
    from app.cli import cli

    runner = CliRunner()
    first = _cli_add(runner, checkpoint_a, "--activate")
    second = _cli_add(runner, checkpoint_b)
    result = runner.invoke(cli, ["models", "list"])
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split("\t")[:2] == ["version", "active"]
    by_version = {row.split("\t")[0]: row.split("\t") for row in rows}
    assert set(by_version) == {first, second}
    assert by_version[first][1] == "active" and by_version[second][1] == "-"
    assert by_version[first][4] == "cli"


def test_cli_models_activate_switches_and_refuses_unknown_versions(
    data_dir: Path, checkpoint_a: Path, checkpoint_b: Path
) -> None:
    from app.cli import cli

    runner = CliRunner()
    first = _cli_add(runner, checkpoint_a, "--activate")
    second = _cli_add(runner, checkpoint_b)
    result = runner.invoke(cli, ["models", "activate", second])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == second
    listed = runner.invoke(cli, ["models", "list"]).stdout.splitlines()[1:]
    active = {row.split("\t")[0] for row in listed if row.split("\t")[1] == "active"}
    assert active == {second} and first != second
    missing = runner.invoke(cli, ["models", "activate", "m-nope"])
    assert missing.exit_code == 2
    assert missing.stdout == "" and "m-nope" in missing.stderr
