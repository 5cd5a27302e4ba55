"""POST/GET/DELETE /references and GET /classes through the app, plus the cross-cutting
service behaviour they exercise: upload limits, de-identification, request ids, metrics,
readiness, JSON errors, and two app instances sharing one database."""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import Reference, get_index_version
from app.main import create_app
from tests.app.conftest import dicom_bytes, jpeg_bytes, new_key, png_bytes

H = dict[str, dict[str, str]]


def enroll(
    client: TestClient, headers: dict[str, str], files: list[tuple[str, bytes]], label: str | None
) -> Any:
    data = {"label": label} if label is not None else {}
    multipart = [("file", (name, content, "application/octet-stream")) for name, content in files]
    return client.post("/references", headers=headers, files=multipart, data=data)


def index_version(app: FastAPI) -> int:
    with app.state.sessionmaker() as session:
        return get_index_version(session)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- enrollment -------------------------------------------------------------------------------


def test_enroll_png_stores_content_addressed(
    client: TestClient, app: FastAPI, headers: H, settings: Settings
) -> None:
    before = index_version(app)
    response = enroll(client, headers["clinician"], [("a.png", png_bytes(1))], "COVID-19")
    assert response.status_code == 201, response.text
    [item] = response.json()["references"]
    assert set(item) == {"id", "label", "sha256", "created_at", "duplicate"}
    assert item["label"] == "COVID-19" and item["duplicate"] is False
    stored = settings.data_dir / "references" / item["sha256"][:2] / f"{item['sha256']}.png"
    assert stored.read_bytes() == png_bytes(1)
    assert index_version(app) == before + 1
    with app.state.sessionmaker() as session:
        row = session.get(Reference, item["id"])
        assert row is not None
        assert (row.width, row.height, row.source_format) == (64, 64, "png")
        assert row.image_path == f"references/{item['sha256'][:2]}/{item['sha256']}.png"


def test_enroll_several_files_jpeg_and_dicom(client: TestClient, headers: H) -> None:
    files = [("a.png", png_bytes(2)), ("b.jpg", jpeg_bytes(3)), ("c.dcm", dicom_bytes(4))]
    response = enroll(client, headers["clinician"], files, "  Normal ")
    assert response.status_code == 201, response.text
    refs = response.json()["references"]
    assert [r["label"] for r in refs] == ["Normal"] * 3  # trimmed
    assert len({r["id"] for r in refs}) == 3


def test_duplicate_returns_existing(client: TestClient, app: FastAPI, headers: H) -> None:
    first = enroll(client, headers["clinician"], [("a.png", png_bytes(5))], "Viral").json()
    version = index_version(app)
    again = enroll(client, headers["admin"], [("copy.png", png_bytes(5))], "Viral")
    assert again.status_code == 201
    [item] = again.json()["references"]
    assert item["duplicate"] is True
    assert item["id"] == first["references"][0]["id"]
    assert index_version(app) == version  # nothing changed, nothing to reload
    # the same bytes twice in one request: one new reference, one duplicate
    both = enroll(client, headers["clinician"], [("x.png", png_bytes(6))] * 2, "Viral").json()
    assert [r["duplicate"] for r in both["references"]] == [False, True]
    assert client.get("/classes", headers=headers["reader"]).json() == [
        {"label": "Viral", "count": 2}
    ]


@pytest.mark.parametrize(
    ("name", "content", "status"),
    [
        ("empty.png", b"", 400),
        ("notes.png", b"this is a text file, renamed to .png\n" * 4, 415),
        ("truncated.png", png_bytes(7, (128, 128))[:300], 400),
        ("truncated.jpg", jpeg_bytes(8, (128, 128))[:400], 400),
        # cuts inside the JPEG header used to escape Pillow as KeyError('MPO') -> 500
        ("jpeg-magic.jpg", jpeg_bytes(8)[:3], 400),
        ("jpeg-20.jpg", jpeg_bytes(8)[:20], 400),
        ("jpeg-10pct.jpg", jpeg_bytes(8)[: len(jpeg_bytes(8)) // 10], 400),
        ("jpeg-90pct.jpg", jpeg_bytes(8)[: len(jpeg_bytes(8)) * 9 // 10], 400),
        ("png-header.png", png_bytes(7)[:33], 400),
        ("png-10pct.png", png_bytes(7)[: len(png_bytes(7)) // 10], 400),
        ("png-90pct.png", png_bytes(7)[: len(png_bytes(7)) * 9 // 10], 400),
        ("bomb.png", png_claiming(50_000, 50_000), 413),
        ("bad.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10, 400),
    ],
)
def test_bad_images_are_refused(
    client: TestClient, app: FastAPI, headers: H, name: str, content: bytes, status: int
) -> None:
    response = enroll(client, headers["clinician"], [(name, content)], "Normal")
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]
    with app.state.sessionmaker() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Reference)) == 0


def test_one_bad_file_refuses_the_batch(client: TestClient, app: FastAPI, headers: H) -> None:
    files = [("ok.png", png_bytes(9)), ("bad.png", b"GIF89a not really")]
    response = enroll(client, headers["clinician"], files, "Normal")
    assert response.status_code == 415
    assert "file 2 of 2" in response.json()["detail"]
    with app.state.sessionmaker() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Reference)) == 0


@pytest.mark.parametrize(
    ("label", "files", "fragment"),
    [
        (None, [("a.png", png_bytes(10))], "label"),
        ("Normal", [], "file"),
        ("   ", [("a.png", png_bytes(10))], "label"),
        ("x" * 65, [("a.png", png_bytes(10))], "64"),
        ("bad\x00label", [("a.png", png_bytes(10))], "control"),
    ],
)
def test_missing_or_invalid_fields_are_422(
    client: TestClient, headers: H, label: str | None, files: list[tuple[str, bytes]], fragment: str
) -> None:
    response = enroll(client, headers["clinician"], files, label)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]


def test_over_the_byte_limit_is_413(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(max_upload_mb=0.01, max_request_mb=0.05))
    with TestClient(app) as client:
        key = {"X-API-Key": new_key(app, "clinician")}
        big = png_bytes(11, (256, 256))  # ~65 kB of noise > 10 kB per file
        response = enroll(client, key, [("big.png", big)], "Normal")
        assert response.status_code == 413, response.text
        assert "limit" in response.json()["detail"]
        # a whole request over max_request_mb is cut off while streaming
        response = enroll(client, key, [("big.png", big)] * 2, "Normal")
        assert response.status_code == 413
        assert "X-Request-ID" in response.headers


def test_dicom_identifiers_never_reach_db_disk_or_logs(
    make_settings: Callable[..., Settings],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    app = create_app(make_settings(log_level="DEBUG"))
    secret_bits = [b"DOE", b"JANE", b"PID-4711-0815", b"General Hospital"]
    caplog.set_level(logging.DEBUG)
    with TestClient(app) as client:
        key = {"X-API-Key": new_key(app, "clinician")}
        content = dicom_bytes(12, patient_name="DOE^JANE", patient_id="PID-4711-0815")
        response = enroll(client, key, [("DOE_JANE_PID-4711-0815.dcm", content)], "Normal")
        assert response.status_code == 201, response.text
        listed = client.get("/references", headers=key).text
    # database: every column of every table
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as conn:
        for table in sa.inspect(engine).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                blob = repr(tuple(row)).encode()
                assert not any(bit in blob for bit in secret_bits), table
    engine.dispose()
    # disk: every file under the data dir (the DB, its WAL, the stored image)
    files = [p for p in Path(settings.data_dir).rglob("*") if p.is_file()]
    assert any(p.suffix == ".dcm" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(bit in data for bit in secret_bits), path
    # logs and API output
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    out, err = capfd.readouterr()
    for text in (logged, out, err, listed, response.text):
        assert not any(bit.decode() in text for bit in secret_bits)


# -- listing, deletion, classes ---------------------------------------------------------------


def test_list_filter_and_paginate(client: TestClient, headers: H) -> None:
    for i in range(5):
        enroll(client, headers["clinician"], [(f"{i}.png", png_bytes(100 + i))], "Normal")
    for i in range(3):
        enroll(client, headers["clinician"], [(f"{i}.png", png_bytes(200 + i))], "COVID-19")
    reader = headers["reader"]
    everything = client.get("/references", headers=reader).json()
    assert everything["count"] == 8 and len(everything["data"]) == 8
    page = client.get("/references", headers=reader, params={"limit": 2, "offset": 1}).json()
    assert page["count"] == 8
    assert [r["id"] for r in page["data"]] == [r["id"] for r in everything["data"][1:3]]
    covid = client.get("/references", headers=reader, params={"label": "COVID-19"}).json()
    assert covid["count"] == 3 and {r["label"] for r in covid["data"]} == {"COVID-19"}
    assert set(covid["data"][0]) >= {"id", "label", "sha256", "width", "height", "created_at"}
    none = client.get("/references", headers=reader, params={"label": "Nope"}).json()
    assert none == {"data": [], "count": 0}
    bad = client.get("/references", headers=reader, params={"limit": 0})
    assert bad.status_code == 422 and "limit" in bad.json()["detail"]
    # An offset past what the database's integers hold is the caller's error, not a 500.
    huge = client.get("/references", headers=reader, params={"offset": 2**90})
    assert huge.status_code == 422 and "offset" in huge.json()["detail"]
    assert client.get("/classes", headers=reader).json() == [
        {"label": "COVID-19", "count": 3},
        {"label": "Normal", "count": 5},
    ]


def test_delete_reference(client: TestClient, app: FastAPI, headers: H, settings: Settings) -> None:
    item = enroll(client, headers["clinician"], [("a.png", png_bytes(13))], "Normal").json()
    ref = item["references"][0]
    stored = settings.data_dir / "references" / ref["sha256"][:2] / f"{ref['sha256']}.png"
    assert stored.exists()
    version = index_version(app)
    response = client.delete(f"/references/{ref['id']}", headers=headers["admin"])
    assert response.status_code == 204 and response.content == b""
    assert not stored.exists()
    assert index_version(app) == version + 1
    assert client.get("/references", headers=headers["reader"]).json()["count"] == 0
    assert client.get("/classes", headers=headers["reader"]).json() == []
    again = client.delete(f"/references/{ref['id']}", headers=headers["admin"])
    assert again.status_code == 404 and "GET /references" in again.json()["detail"]
    # enrolling it again works (not a duplicate any more)
    back = enroll(client, headers["clinician"], [("a.png", png_bytes(13))], "Normal").json()
    assert back["references"][0]["duplicate"] is False and stored.exists()


# -- service hooks, readiness, observability ----------------------------------------------------


class FakeService:
    def __init__(self, ok: bool = True) -> None:
        self.calls = 0
        self.ok = ok

    def on_references_changed(self, session: sa.orm.Session, *, change: object = None) -> None:
        assert isinstance(session, sa.orm.Session)
        self.calls += 1

    def enrollment_model(self) -> None:
        return None

    def readiness(self) -> tuple[bool, list[str]]:
        return (True, []) if self.ok else (False, ["no references enrolled"])


def test_service_hook_and_readiness(client: TestClient, app: FastAPI, headers: H) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    fake = FakeService()
    app.state.service = fake
    enroll(client, headers["clinician"], [("a.png", png_bytes(14))], "Normal")
    enroll(client, headers["clinician"], [("a.png", png_bytes(14))], "Normal")  # duplicate
    assert fake.calls == 1
    ref_id = client.get("/references", headers=headers["reader"]).json()["data"][0]["id"]
    client.delete(f"/references/{ref_id}", headers=headers["admin"])
    assert fake.calls == 2
    assert client.get("/ready").status_code == 200
    app.state.service = FakeService(ok=False)
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["detail"] == "not ready: no references enrolled"
    app.state.service = None
    response = client.get("/ready")
    assert response.status_code == 503 and "cxr models add" in response.json()["detail"]


def test_request_id_metrics_and_json_500(client: TestClient, app: FastAPI, headers: H) -> None:
    response = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    generated = client.get("/health", headers={"X-Request-ID": "bad id with spaces\n"})
    assert generated.headers["X-Request-ID"] != "bad id with spaces\n"
    client.delete("/references/nope", headers=headers["admin"])
    client.get("/no/such/route")

    def boom() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/boom", boom)
    crashed = client.get("/boom")
    assert crashed.status_code == 500
    assert crashed.headers["X-Request-ID"] in crashed.json()["detail"]
    app.state.metrics.count_prediction(label="Normal", unknown=False)
    app.state.metrics.set_index(size=3, version=7)
    app.state.metrics.set_active_model("v1")
    text = client.get("/metrics").text
    assert 'route="/references/{reference_id}",status="404"' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "cxr_http_request_duration_seconds_bucket" in text
    assert "cxr_index_size 3.0" in text
    assert 'cxr_active_model_info{version="v1"} 1.0' in text
    assert 'cxr_predictions_total{label="Normal",unknown="false"} 1.0' in text


def test_apps_have_separate_metric_registries(settings: Settings) -> None:
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics.registry is not second.state.metrics.registry


def test_production_refuses_default_secret(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import InsecureSettingsError

    monkeypatch.delenv("CXR_SECRET_KEY")
    with pytest.raises(InsecureSettingsError, match="CXR_SECRET_KEY"):
        Settings(environment="production", data_dir=data_dir)
    with pytest.raises(InsecureSettingsError):
        Settings(environment="production", data_dir=data_dir, secret_key="  ")
    ok = Settings(environment="production", data_dir=data_dir, secret_key="s3cret-" * 6)
    assert create_app(ok).state.settings is ok


# -- several processes on one database ---------------------------------------------------------


def _two_apps_share(first: FastAPI, second: FastAPI) -> None:
    with TestClient(first) as one, TestClient(second) as two:
        key_one = {"X-API-Key": new_key(first, "admin")}
        key_two = {"X-API-Key": new_key(second, "admin")}
        made = enroll(one, key_one, [("a.png", png_bytes(15))], "Normal").json()
        listed = two.get("/references", headers=key_two).json()
        assert [r["id"] for r in listed["data"]] == [made["references"][0]["id"]]
        assert two.get("/references", headers=key_one).status_code == 200  # same key table
        assert (
            two.delete(f"/references/{listed['data'][0]['id']}", headers=key_two).status_code == 204
        )
        assert one.get("/references", headers=key_one).json()["count"] == 0
        assert index_version(first) == index_version(second) == 2


def test_two_apps_share_sqlite(make_settings: Callable[..., Settings]) -> None:
    _two_apps_share(create_app(make_settings()), create_app(make_settings()))


@pytest.mark.services
def test_two_apps_share_postgres(make_settings: Callable[..., Settings], postgres_url: str) -> None:
    _two_apps_share(
        create_app(make_settings(database_url=postgres_url)),
        create_app(make_settings(database_url=postgres_url)),
    )


def test_database_down_is_503_not_500(make_settings: Callable[..., Settings]) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:9/nowhere?connect_timeout=2"
    app = create_app(make_settings(database_url=url, auto_migrate=False))
    with TestClient(app) as client:
        response = client.get("/classes", headers={"X-API-Key": "cxr_whatever"})
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        ready = client.get("/ready")
        assert ready.status_code == 503 and "database unreachable" in ready.json()["detail"]


def test_nul_bytes_in_path_or_query_are_422_not_500_on_postgres(
    make_settings: Callable[..., Settings], postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL refuses NUL in text parameters (psycopg DataError); SQLite accepts them.
    app = create_app(make_settings(database_url=postgres_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        admin = {"X-API-Key": new_key(app, "admin")}
        caplog.set_level(logging.INFO)
        for method, url in [
            ("GET", "/references?label=secret%00name"),
            ("DELETE", "/references/secret%00name"),
            ("POST", "/admin/models/secret%00name/activate"),
            ("GET", "/jobs/secret%00name"),
        ]:
            response = client.request(method, url, headers=admin)
            assert response.status_code == 422, (url, response.text)
            assert "NUL" in response.json()["detail"]
    assert "secret" not in caplog.text  # the refused value is not logged
