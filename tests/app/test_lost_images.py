"""No reference row without its image file and no file without its row: under concurrent DELETE
and re-enrollment of the same image through two API instances, after a kill -9 between the
database write and the file write (fault injection in a real child process), and after files
vanish from outside (start-up reconciliation). SQLite file and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import Reference
from app.main import create_app
from app.services.references import reconcile_references
from tests.app.conftest import new_key, png_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def backend_settings(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Settings:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return make_settings(database_url=url)
    return make_settings()


def rows_and_files(app: FastAPI) -> tuple[dict[str, str], set[str]]:
    """{image_path: reference id} from the database and the image files under data_dir."""
    settings: Settings = app.state.settings
    with app.state.sessionmaker() as session:
        rows = {
            path: ref_id
            for ref_id, path in session.execute(sa.select(Reference.id, Reference.image_path))
        }
    root = settings.data_dir / "references"
    files = {
        p.relative_to(settings.data_dir).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    return rows, files


def assert_one_to_one(app: FastAPI) -> None:
    rows, files = rows_and_files(app)
    assert set(rows) == files, {
        "rows without file": sorted(set(rows) - files),
        "files without row": sorted(files - set(rows)),
    }


def post_reference(client: TestClient, key: str, data: bytes, label: str = "Viral"):
    return client.post(
        "/references",
        headers={"X-API-Key": key},
        data={"label": label},
        files={"file": ("x.png", data, "image/png")},
    )


def race_round(
    client_a: TestClient,
    client_b: TestClient,
    admin: str,
    clinician: str,
    ref_id: str,
    image: bytes,
    round_no: int,
) -> dict[str, int]:
    """A deletes `ref_id` while B enrolls the same bytes; returns both answers."""
    barrier = threading.Barrier(2)
    answers: dict[str, int] = {}

    def delete() -> None:
        barrier.wait()
        response = client_a.delete(f"/references/{ref_id}", headers={"X-API-Key": admin})
        answers["delete"] = response.status_code

    def reenroll() -> None:
        barrier.wait()
        if round_no % 2:  # vary the interleaving
            threading.Event().wait(0.002)
        response = post_reference(client_b, clinician, image)
        answers["enroll"] = response.status_code
        answers["duplicate"] = response.json()["references"][0]["duplicate"]

    threads = [threading.Thread(target=delete), threading.Thread(target=reenroll)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return answers


def test_delete_racing_reenroll_never_separates_row_and_file(backend_settings: Settings) -> None:
    """Two API instances: A deletes the reference while B enrolls the same bytes again."""
    app_a, app_b = create_app(backend_settings), create_app(backend_settings)
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b:
        admin = new_key(app_a, "admin")
        clinician = new_key(app_a, "clinician")
        image = png_bytes(41, (48, 48))
        statuses: list[tuple[int, int]] = []
        for round_no in range(30):
            created = post_reference(client_a, clinician, image)
            assert created.status_code == 201, created.text
            ref_id = created.json()["references"][0]["id"]
            answers = race_round(client_a, client_b, admin, clinician, ref_id, image, round_no)
            statuses.append((answers["delete"], answers["enroll"]))
            assert answers["delete"] == 204 and answers["enroll"] == 201, answers
            assert_one_to_one(app_a)
            rows, _files = rows_and_files(app_a)
            if answers["duplicate"]:
                # B saw A's reference: the delete came after, so nothing is left.
                assert rows == {}
            else:
                # B enrolled it anew: its row (and file) must be there.
                assert len(rows) == 1
            # clean up for the next round (whatever is left)
            for left in rows.values():
                client_a.delete(f"/references/{left}", headers={"X-API-Key": admin})
        assert len(statuses) == 30


# -- kill -9 between the two writes ---------------------------------------------------------------

CHILD = """
import os, signal, sys
from app.config import get_settings
from app.db import create_db_engine, create_sessionmaker
import app.services.references as refs

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

settings = get_settings()
session = create_sessionmaker(create_db_engine(settings.database_url))()
if sys.argv[1] == "enroll":
    refs.bump_index_version = die  # after the file is written, before the row is committed
    data = open(sys.argv[2], "rb").read()
    refs.enroll_references(session=session, files=[("x", data)], label="Viral",
                           enrolled_by=None, settings=settings)
else:
    refs._remove_file = die  # after the row's removal is committed, before the unlink
    refs.delete_reference(session=session, reference_id=sys.argv[2], settings=settings)
print("not killed")
"""


def run_and_kill(settings: Settings, *args: str) -> None:
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir)
    env["CXR_DATABASE_URL"] = settings.database_url
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr)


@pytest.fixture
def started(backend_settings: Settings) -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(backend_settings)
    with TestClient(app) as client:
        yield app, client


def test_kill_between_file_write_and_commit_of_an_enrollment(
    started: tuple[FastAPI, TestClient], backend_settings: Settings, tmp_path: Path
) -> None:
    app, _client = started
    upload = tmp_path / "upload.png"
    upload.write_bytes(png_bytes(42))
    run_and_kill(backend_settings, "enroll", str(upload))
    rows, files = rows_and_files(app)
    assert rows == {} and len(files) == 1  # the crash left an orphan file, never a bare row
    # the next start reconciles
    with TestClient(create_app(backend_settings)) as client:
        assert_one_to_one(app)
        assert rows_and_files(app)[1] == set()
        clinician = new_key(app, "clinician")
        again = post_reference(client, clinician, png_bytes(42))
        assert again.status_code == 201 and again.json()["references"][0]["duplicate"] is False
        assert_one_to_one(app)


def test_kill_between_commit_and_unlink_of_a_deletion(
    started: tuple[FastAPI, TestClient], backend_settings: Settings
) -> None:
    app, client = started
    created = post_reference(client, new_key(app, "clinician"), png_bytes(43))
    ref_id = created.json()["references"][0]["id"]
    run_and_kill(backend_settings, "delete", ref_id)
    rows, files = rows_and_files(app)
    assert rows == {} and len(files) == 1
    with TestClient(create_app(backend_settings)):
        assert_one_to_one(app)
        assert rows_and_files(app) == ({}, set())


# -- damage from outside ---------------------------------------------------------------------------


def test_reconcile_removes_rows_whose_file_vanished(
    started: tuple[FastAPI, TestClient], backend_settings: Settings
) -> None:
    app, client = started
    clinician = new_key(app, "clinician")
    kept = post_reference(client, clinician, png_bytes(44)).json()["references"][0]
    lost = post_reference(client, clinician, png_bytes(45)).json()["references"][0]
    rows, _files = rows_and_files(app)
    path = {v: k for k, v in rows.items()}[lost["id"]]
    (backend_settings.data_dir / path).unlink()
    with app.state.sessionmaker() as session:
        report = reconcile_references(session=session, settings=backend_settings)
    assert (report.missing_files, report.rows_removed) == (1, 1)
    assert set(rows_and_files(app)[0].values()) == {kept["id"]}
    assert_one_to_one(app)


def test_reconcile_leaves_everything_when_every_file_is_missing(
    started: tuple[FastAPI, TestClient], backend_settings: Settings, tmp_path: Path
) -> None:
    """A wrong CXR_DATA_DIR must not delete the whole reference set."""
    app, client = started
    clinician = new_key(app, "clinician")
    for seed in (46, 47):
        post_reference(client, clinician, png_bytes(seed))
    elsewhere = backend_settings.model_copy(update={"data_dir": tmp_path / "empty"})
    with app.state.sessionmaker() as session:
        report = reconcile_references(session=session, settings=elsewhere)
    assert (report.missing_files, report.rows_removed) == (2, 0)
    assert len(rows_and_files(app)[0]) == 2


def test_duplicate_enrollment_restores_a_missing_file(
    started: tuple[FastAPI, TestClient], backend_settings: Settings
) -> None:
    app, client = started
    clinician = new_key(app, "clinician")
    first = post_reference(client, clinician, png_bytes(48)).json()["references"][0]
    [path] = rows_and_files(app)[1]
    (backend_settings.data_dir / path).unlink()
    again = post_reference(client, clinician, png_bytes(48))
    assert again.status_code == 201
    item = again.json()["references"][0]
    assert item["duplicate"] is True and item["id"] == first["id"]
    assert (backend_settings.data_dir / path).read_bytes() == png_bytes(48)
    assert_one_to_one(app)
