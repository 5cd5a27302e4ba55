"""`cxr keys ...`, `cxr references import` and the command registration, through typer's
CliRunner on the real `cxr` app, with CXR_DATA_DIR pointing at a temp dir (a fresh ./var)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.commands import register
from app.config import get_settings
from app.main import create_app
from tests.app.conftest import dicom_bytes, jpeg_bytes, png_bytes


@pytest.fixture
def cli(data_dir: Path) -> typer.Typer:
    """`app.cli.cli`; while another package's commands are still missing from this build,
    an equivalent app with the same `register()` wiring."""
    try:
        from app.cli import cli as real_cli
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith(("training", "index")):
            raise
        app = typer.Typer()
        bench = typer.Typer()
        app.add_typer(bench, name="bench")
        register(app, bench)
        return app
    return real_cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_registers_service_commands() -> None:
    app, bench = typer.Typer(), typer.Typer()
    register(app, bench)
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert {"serve", "keys", "references"} <= names
    models = next(g.typer_instance for g in app.registered_groups if g.name == "models")
    assert {c.name for c in models.registered_commands} == {"add", "list", "activate"}


def test_keys_create_prints_only_the_key(
    cli: typer.Typer, runner: CliRunner, data_dir: Path
) -> None:
    assert not data_dir.exists()  # a fresh ./var: the command migrates it first
    result = runner.invoke(cli, ["keys", "create", "--role", "clinician", "--name", "ci"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxr_")
    key = lines[0]
    assert key not in result.stderr
    app = create_app(get_settings())
    with TestClient(app) as client:
        assert client.get("/classes", headers={"X-API-Key": key}).status_code == 200
        assert client.delete("/references/x", headers={"X-API-Key": key}).status_code == 403
    listed = runner.invoke(cli, ["keys", "list"])
    assert listed.exit_code == 0 and "clinician" in listed.stdout and key not in listed.stdout
    key_id = listed.stdout.splitlines()[1].split("\t")[0]
    assert runner.invoke(cli, ["keys", "revoke", key_id]).exit_code == 0
    with TestClient(create_app(get_settings())) as client:
        assert client.get("/classes", headers={"X-API-Key": key}).status_code == 401


def test_keys_create_rejects_unknown_role(cli: typer.Typer, runner: CliRunner) -> None:
    result = runner.invoke(cli, ["keys", "create", "--role", "root"])
    assert result.exit_code == 2
    assert result.stdout == ""


def test_production_with_default_secret_refuses(
    cli: typer.Typer, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_ENVIRONMENT", "production")
    monkeypatch.delenv("CXR_SECRET_KEY")
    result = runner.invoke(cli, ["keys", "create", "--role", "admin"])
    assert result.exit_code == 2 and "CXR_SECRET_KEY" in result.stderr
    assert result.stdout == ""


def test_references_import_counts(
    cli: typer.Typer, runner: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    src = tmp_path / "src"
    (src / "Normal").mkdir(parents=True)
    (src / "COVID-19").mkdir()
    for i in range(3):
        (src / "Normal" / f"n{i}.png").write_bytes(png_bytes(300 + i))
    (src / "Normal" / "copy.png").write_bytes(png_bytes(300))  # duplicate content
    (src / "COVID-19" / "c0.jpg").write_bytes(jpeg_bytes(310))
    (src / "COVID-19" / "c1.dcm").write_bytes(dicom_bytes(311))
    (src / "COVID-19" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = runner.invoke(cli, ["references", "import", str(src)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == (
        "enrolled 5, duplicates 1, skipped 1 unreadable or invalid, of 7 files"
    )
    again = runner.invoke(cli, ["references", "import", str(src)])
    assert "enrolled 0, duplicates 6, skipped 1" in again.stdout
    app = create_app(get_settings())
    with TestClient(app) as client:
        from tests.app.conftest import new_key

        key = {"X-API-Key": new_key(app, "reader")}
        assert client.get("/classes", headers=key).json() == [
            {"label": "COVID-19", "count": 2},
            {"label": "Normal", "count": 3},
        ]
    missing = runner.invoke(cli, ["references", "import", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


@pytest.mark.usefixtures("restore_thread_policy")
def test_a_command_starts_its_process_with_the_training_thread_policy(
    cli: typer.Typer, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cxr` applies the process's thread policy before the command: a command that is not a
    server runs one job, on the idle cores (here: an idle machine, so every core)."""
    import os

    import faiss
    import torch

    from training.threads import ThreadPolicy, apply_thread_policy, current_thread_policy

    cores = os.cpu_count() or 1
    apply_thread_policy(ThreadPolicy(kind="test", threads=cores + 1))
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    result = runner.invoke(cli, ["keys", "list"])
    assert result.exit_code == 0, result.output
    assert current_thread_policy().kind == "training"
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (cores, cores)
