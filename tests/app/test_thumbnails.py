"""`GET /references/{id}/image?size=N`: pixels only, bounded, cached, de-identified."""

from __future__ import annotations

import io

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from tests.app.conftest import dicom_bytes


def _png_with_text(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    arr[: size[1] // 2] //= 4  # a dark top half, to check the pixels survive the resize
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Patient DOE^JANE PID-4711-0815")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _enroll(client: TestClient, headers: dict[str, str], name: str, data: bytes) -> str:
    response = client.post(
        "/references", headers=headers, data={"label": "Normal"}, files={"file": (name, data)}
    )
    assert response.status_code == 201, response.text
    return response.json()["references"][0]["id"]


def test_thumbnail_is_bounded_pixels_only_and_true_to_the_image(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    original = _png_with_text(1, (300, 200))
    ref_id = _enroll(client, headers["clinician"], "DOE_JANE.png", original)

    response = client.get(f"/references/{ref_id}/image?size=90", headers=headers["reader"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == (90, 60)  # longer side = size, aspect kept
    assert thumb.mode == "L"
    assert not thumb.info.get("Comment") and b"DOE" not in response.content
    pixels = np.asarray(thumb, dtype=np.float32)
    source = np.asarray(Image.open(io.BytesIO(original)), dtype=np.float32)
    # the dark half stays dark and the mean brightness is kept (a resize, not a placeholder)
    assert pixels[:25].mean() < 0.4 * pixels[35:].mean()
    assert abs(pixels.mean() - source.mean()) < 3.0

    default = client.get(f"/references/{ref_id}/image", headers=headers["reader"])
    assert Image.open(io.BytesIO(default.content)).size == (128, 85)
    small = client.get(f"/references/{ref_id}/image?size=512", headers=headers["reader"])
    assert Image.open(io.BytesIO(small.content)).size == (300, 200)  # never enlarged


def test_dicom_thumbnail_carries_no_identifiers(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    data = dicom_bytes(3, (80, 40), patient_name="DOE^JANE", patient_id="PID-4711-0815")
    ref_id = _enroll(client, headers["clinician"], "scan.dcm", data)
    response = client.get(f"/references/{ref_id}/image?size=32", headers=headers["reader"])
    assert response.status_code == 200
    assert response.content.startswith(b"\x89PNG")
    for identifier in (b"DOE", b"PID-4711", b"General Hospital", b"19700101"):
        assert identifier not in response.content
    assert Image.open(io.BytesIO(response.content)).size == (32, 16)


def test_thumbnail_errors_and_cache(
    app: FastAPI, client: TestClient, headers: dict[str, dict[str, str]], settings
) -> None:
    reader = headers["reader"]
    ref_id = _enroll(client, headers["clinician"], "a.png", _png_with_text(2, (64, 64)))
    for size in (0, 15, 513, "big"):
        bad = client.get(f"/references/{ref_id}/image?size={size}", headers=reader)
        assert bad.status_code == 422, size
        assert "size" in bad.json()["detail"]
    unknown = client.get("/references/nope/image", headers=reader)
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]

    cache = app.state.thumbnail_cache
    first = client.get(f"/references/{ref_id}/image?size=64", headers=reader)
    hits = cache.hits
    second = client.get(f"/references/{ref_id}/image?size=64", headers=reader)
    assert second.content == first.content and cache.hits == hits + 1
    assert "private" in second.headers["cache-control"]
    etag = second.headers["etag"]
    not_modified = client.get(
        f"/references/{ref_id}/image?size=64", headers={**reader, "If-None-Match": etag}
    )
    assert not_modified.status_code == 304 and not_modified.content == b""

    # the file vanished from disk (uncached size): a 404 that says what to do, not a 500
    for path in settings.data_dir.glob("references/*/*.png"):
        path.unlink()
    missing = client.get(f"/references/{ref_id}/image?size=40", headers=reader)
    assert missing.status_code == 404
    assert "enroll the image again" in missing.json()["detail"]
    # deleted references are gone from the route even though the cache still holds their pixels
    assert client.delete(f"/references/{ref_id}", headers=headers["admin"]).status_code == 204
    assert client.get(f"/references/{ref_id}/image?size=64", headers=reader).status_code == 404


def test_thumbnail_cache_is_bounded() -> None:
    from app.services.thumbnails import Thumbnail, ThumbnailCache

    cache = ThumbnailCache(max_bytes=1000)
    for i in range(10):
        cache.put((f"sha{i}", 64), Thumbnail(png=b"x" * 300, etag=str(i), width=1, height=1))
    assert cache.size_bytes <= 1000
    assert cache.get(("sha9", 64)) is not None and cache.get(("sha0", 64)) is None
