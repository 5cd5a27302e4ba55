"""Issue 11 item 3: PHI in PNG/JPEG metadata (tEXt/iTXt/zTXt, eXIf, XMP, COM...) was stored byte
for byte. Stored files now hold the pixels only, decoded exactly as the upload was."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from app.db import Reference
from tests.app.conftest_predict import synthetic_xray
from training.imaging import decode_image
from training.imaging.deidentify import clean_for_storage, find_identifying_content

MARKERS = [b"SECRET-TEXT", b"SECRET-ITXT", b"SECRET-EXIF", b"SECRET-XMP", b"SECRET-COM"]


def _image(size: tuple[int, int] = (96, 80)) -> Image.Image:
    return Image.open(io.BytesIO(synthetic_xray("disc", seed=3, size=size))).convert("L")


def hostile_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", "SECRET-TEXT Doe^Jane")
    info.add_itxt("Comment", "SECRET-ITXT", lang="en", tkey="Kommentar")
    info.add_text("Author", "SECRET-ZTXT " * 50, zip=True)
    exif = Image.Exif()
    exif[0x013B] = "SECRET-EXIF artist"  # Artist
    buf = io.BytesIO()
    _image().save(buf, format="PNG", pnginfo=info, exif=exif.tobytes())
    return buf.getvalue() + b"SECRET-TRAILER after IEND"


def hostile_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x013B] = "SECRET-EXIF artist"
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _image((96, 64)).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>SECRET-XMP</x:xmpmeta>"
    com = b"SECRET-COM scanned by Dr Who"
    extra = (
        b"\xff\xe1" + len(xmp + b"..").to_bytes(2, "big") + xmp
        + b"\xff\xfe" + len(com + b"..").to_bytes(2, "big") + com
    )  # fmt: skip
    return data[:2] + extra + data[2:] + b"SECRET-TRAILER"


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_cleaning_keeps_pixels_and_drops_every_text(kind: str) -> None:
    data = hostile_png() if kind == "png" else hostile_jpeg()
    assert find_identifying_content(data)
    clean = clean_for_storage(data)
    for marker in [*MARKERS, b"SECRET"]:
        assert marker not in clean
    assert find_identifying_content(clean) == []
    np.testing.assert_array_equal(decode_image(clean), decode_image(data))
    assert clean_for_storage(clean) == clean


def test_jpeg_orientation_survives_cleaning() -> None:
    data = hostile_jpeg(orientation=6)
    before = decode_image(data)
    assert before.shape == (96, 64)  # rotated by the EXIF orientation: (H, W) swapped
    after = decode_image(clean_for_storage(data))
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_enrolled_file_on_disk_holds_no_metadata(
    kind: str, client: TestClient, app, headers, settings
) -> None:
    data = hostile_png() if kind == "png" else hostile_jpeg()
    response = client.post(
        "/references",
        headers=headers["clinician"],
        data={"label": "disc"},
        files={"file": (f"x.{kind}", data, f"image/{kind}")},
    )
    assert response.status_code == 201, response.text
    with app.state.sessionmaker() as session:
        row = session.get(Reference, response.json()["references"][0]["id"])
        assert row is not None
    stored = (settings.data_dir / row.image_path).read_bytes()
    assert b"SECRET" not in stored
    np.testing.assert_array_equal(decode_image(stored), decode_image(data))
