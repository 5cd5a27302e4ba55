"""`cxr quickstart` through the CLI runner: a tiny synthetic data set and a tiny recipe, from an
empty CXR_DATA_DIR to a service that answers; resumable; refusing another deployment."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import cli
from app.config import get_settings
from app.db import Reference
from app.main import create_app
from tests.app.conftest_predict import make_test_checkpoint, post_predict, synthetic_xray
from tests.app.test_web_browser import write_synthetic_folder

pytestmark = pytest.mark.slow

TINY = ["--encoder", "resnet9_half", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]
KEY = re.compile(r"admin key \(printed once, keep it\): (cxr_\S+)")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_synthetic_folder(tmp_path / "synthetic", per_class=10, seed0=0)


def quickstart(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["quickstart", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_quickstart_trains_enrolls_and_answers(data_dir: Path, source: Path) -> None:
    code, out, err = quickstart("--data", str(source), "--no-serve", "--port", "8123", *TINY)
    assert code == 0, err
    key = KEY.search(out)
    assert key is not None, out
    assert "page: http://127.0.0.1:8123/" in out
    for stage in ("1/4 train", "2/4 register", "3/4 enroll", "4/4 admin key"):
        assert stage in err
    state = json.loads((data_dir / "quickstart.json").read_text())
    assert state["done"] == ["train", "register", "enroll", "admin_key"]
    assert key.group(1) not in (data_dir / "quickstart.json").read_text()  # never stored
    # the train split only: 20 images, 15% val and 15% test held out of the references
    assert 10 <= state["references"]["enrolled"] < 20

    app = create_app(get_settings())
    with TestClient(app) as client:
        admin = {"X-API-Key": key.group(1)}
        models = client.get("/models", headers=admin).json()
        assert [m["active"] for m in models] == [True]
        assert models[0]["version"] == state["model_version"]
        classes = {c["label"]: c["count"] for c in client.get("/classes", headers=admin).json()}
        assert set(classes) == {"disc", "stripes"}
        assert sum(classes.values()) == state["references"]["enrolled"]
        with app.state.sessionmaker() as session:  # each reference says which pack it came from
            assert {r.source for r in session.query(Reference)} == {"synthetic"}
        for kind in ("disc", "stripes"):
            answer = post_predict(client, admin, synthetic_xray(kind, seed=4000), explain=False)
            assert answer.status_code == 200, answer.text
            assert answer.json()["label"] == kind
        assert client.get("/").status_code == 200

    # A rerun resumes: nothing trained again, no second key, no duplicate references.
    code, out, err = quickstart("--data", str(source), "--no-serve", *TINY)
    assert code == 0, err
    assert "already done: train, register, enroll, admin_key" in err
    assert KEY.search(out) is None and "created by an earlier run" in out
    assert (
        json.loads((data_dir / "quickstart.json").read_text())["references"] == state["references"]
    )


def test_quickstart_resumes_an_interrupted_enrollment(
    data_dir: Path, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted mid-enrollment: the rerun keeps the model, finishes the import, and makes
    the key; the checkpoint given is used as is (nothing trained)."""
    import app.services.references as references_service
    import training.train as training_train

    checkpoint = make_test_checkpoint(tmp_path / "given.pt", seed=3)
    real_import = references_service.import_references

    def interrupted(**kwargs: object) -> object:
        raise KeyboardInterrupt

    def no_training(*args: object, **kwargs: object) -> object:
        raise AssertionError("quickstart trained although a checkpoint was given")

    monkeypatch.setattr(training_train, "train", no_training)
    monkeypatch.setattr(references_service, "import_references", interrupted)
    args = ("--data", str(source), "--checkpoint", str(checkpoint), "--no-serve")
    code, out, _err = quickstart(*args)
    assert code == 130 and "admin key" not in out  # Ctrl-C: exit 130, no key printed
    state = json.loads((data_dir / "quickstart.json").read_text())
    assert state["done"] == ["train", "register"]

    monkeypatch.setattr(references_service, "import_references", real_import)
    code, out, err = quickstart(*args)
    assert code == 0, err
    assert "already done: train, register" in err
    assert KEY.search(out) is not None
    state = json.loads((data_dir / "quickstart.json").read_text())
    assert state["done"] == ["train", "register", "enroll", "admin_key"]
    assert state["references"]["enrolled"] >= 10


def test_quickstart_refuses_another_deployment(
    data_dir: Path, source: Path, tmp_path: Path
) -> None:
    # a deployment made by hand: one key
    runner = CliRunner()
    made = runner.invoke(cli, ["keys", "create", "--role", "reader"], catch_exceptions=False)
    assert made.exit_code == 0
    code, out, err = quickstart("--data", str(source), "--no-serve", *TINY)
    assert code == 2
    assert f"CXR_DATA_DIR={data_dir} already holds a deployment not made by quickstart" in err
    assert "1 keys" in err and "empty folder" in err
    assert not (data_dir / "quickstart.json").exists() and out == ""

    # another quickstart's data in a fresh dir: refused, naming what it holds
    other = tmp_path / "other"
    other.mkdir()
    (data_dir / "quickstart.json").write_text(
        json.dumps(
            {"fingerprint": {"sources": [str(other)], "checkpoint_sha256": None}, "done": []}
        )
    )
    code, _out, err = quickstart("--data", str(source), "--no-serve", *TINY)
    assert code == 2 and "quickstart deployment of other data" in err and str(other) in err

    missing = tmp_path / "nowhere"
    code, _out, err = quickstart("--data", str(missing), "--no-serve")
    assert code == 2 and f"--data {missing} does not exist" in err
