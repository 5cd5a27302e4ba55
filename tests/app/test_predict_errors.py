"""Every error code of `POST /predict`, each with a JSON detail that says what to fix."""

from __future__ import annotations

import struct
import zlib

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import new_key, png_bytes
from tests.app.conftest_predict import post_predict, register_in, synthetic_xray


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims `width x height` pixels (a bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word.lower() in detail.lower(), detail


def test_bad_images(client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict) -> None:
    reader = headers["reader"]
    png = synthetic_xray("disc", seed=1)
    jpeg = synthetic_xray("disc", seed=1, fmt="JPEG")
    assert_error(post_predict(client, reader, b""), 400, "empty")
    assert_error(post_predict(client, reader, png[: len(png) // 2]), 400)
    corrupt_png = png[:40] + bytes(range(256)) * 4
    assert_error(post_predict(client, reader, corrupt_png), 400)
    assert_error(post_predict(client, reader, jpeg[: len(jpeg) // 2], filename="q.jpg"), 400)
    assert_error(post_predict(client, reader, b"\xff\xd8\xff\xe0" + b"\x00" * 64), 400)
    assert_error(
        post_predict(client, reader, b"patient: DOE, JANE\nnot an image\n" * 4), 415, "PNG"
    )
    assert_error(post_predict(client, reader, b"GIF89a" + b"\x00" * 64), 415)
    assert_error(post_predict(client, reader, png_claiming(50_000, 50_000)), 413, "pixels")


def test_validation_errors(
    client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict
) -> None:
    reader = headers["reader"]
    image = synthetic_xray("disc", seed=2)
    missing = client.post("/predict", headers=reader, data={"other": "x"})
    assert_error(missing, 422, "file")
    for k in (0, 51, "many"):
        assert_error(post_predict(client, reader, image, k=k), 422, "k")
    assert_error(post_predict(client, reader, image, method="svm"), 422, "method")
    assert_error(post_predict(client, reader, image, explain="perhaps"), 422, "explain")
    assert post_predict(client, reader, image, k=50, explain=False).status_code == 200


def test_upload_over_byte_limit(make_settings, checkpoint_a) -> None:
    app = create_app(make_settings(max_upload_mb=0.05))  # 52 kB
    with TestClient(app) as client:
        register_in(app, checkpoint_a)
        reader = {"X-API-Key": new_key(app, "reader")}
        big = png_bytes(seed=3, size=(400, 400))  # pure noise: ~160 kB
        assert len(big) > 0.05 * 1024 * 1024 + 64 * 1024
        # One image: the body limit is the per-file one (52 kB + envelope), not the request's.
        assert_error(post_predict(client, reader, big), 413, "CXR_MAX_UPLOAD_MB", "send it again")
        # Within the envelope allowance but over the per-file limit: refused while reading.
        medium = png_bytes(seed=4, size=(280, 280))
        assert 0.05 * 1024 * 1024 < len(medium) <= 0.05 * 1024 * 1024 + 64 * 1024, len(medium)
        assert_error(post_predict(client, reader, medium), 413, "limit")


def test_no_active_model_then_no_references(
    client: TestClient, app, headers: dict[str, dict[str, str]], checkpoint_a
) -> None:
    reader = headers["reader"]
    image = synthetic_xray("disc", seed=5)
    assert_error(post_predict(client, reader, image), 503, "cxr models add")
    ready = client.get("/ready")
    assert ready.status_code == 503 and "model" in ready.json()["detail"]

    register_in(app, checkpoint_a)
    assert_error(post_predict(client, reader, image), 503, "POST /references")
    ready = client.get("/ready")
    assert ready.status_code == 503 and "references" in ready.json()["detail"]


def test_predict_after_references_deleted_is_503(
    client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict
) -> None:
    for items in enrolled.values():
        for item in items:
            response = client.delete(f"/references/{item['id']}", headers=headers["admin"])
            assert response.status_code == 204, response.text
    image = synthetic_xray("disc", seed=6)
    assert_error(post_predict(client, headers["reader"], image), 503, "references")
