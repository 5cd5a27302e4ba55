"""Issue 11 item 8, the smaller defects: the same pixels answer the same as PNG and DICOM; a
corrupt JPEG 2000 DICOM is a clean 400; HEAD on the probes; error bodies stay bounded whatever
the input; production refuses a short secret."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import MIN_PRODUCTION_SECRET_LENGTH, InsecureSettingsError, Settings
from tests.app.conftest import dicom_bytes
from tests.app.conftest_predict import post_predict, synthetic_xray
from training.imaging import decode_image

H = dict[str, dict[str, str]]
MB = 1024 * 1024


def low_contrast(bits: int, seed: int = 0) -> np.ndarray:
    """A disc phantom squeezed into a narrow band of grey values (8 or 16 bit)."""
    disc = np.asarray(Image.open(io.BytesIO(synthetic_xray("disc", seed=seed))), np.float32)
    unit = disc / 255.0
    if bits == 8:
        return (100 + unit * 40).astype(np.uint8)  # 100..140 of 255
    return (1500 + unit * 600).astype(np.uint16)  # 1500..2100 of a 12-bit range


def as_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def as_dicom(pixels: np.ndarray, *, transfer_syntax=None, pixel_data: bytes | None = None) -> bytes:
    """An uncompressed MONOCHROME2 DICOM of ``pixels`` (or ``pixel_data`` as given)."""
    return dicom_bytes(
        pixels=pixels, patient_name=None, transfer_syntax=transfer_syntax, pixel_data=pixel_data
    )


# -- same pixels, same answer ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16])
def test_png_and_dicom_of_the_same_pixels_decode_alike(bits: int) -> None:
    pixels = low_contrast(bits)
    from_png = decode_image(as_png(pixels))
    from_dicom = decode_image(as_dicom(pixels))
    assert from_png.shape == from_dicom.shape
    np.testing.assert_allclose(from_dicom, from_png, atol=1e-6)
    # low contrast stays low contrast (it used to be stretched to 0..1 for DICOM only)
    assert float(from_dicom.max() - from_dicom.min()) < 0.2


@pytest.mark.parametrize("bits", [8, 16])
def test_png_and_dicom_of_the_same_pixels_get_the_same_answer(
    client: TestClient, headers: H, enrolled, bits: int
) -> None:
    pixels = low_contrast(bits, seed=7)
    answers = [
        post_predict(client, headers["reader"], data, filename=name, explain=False).json()
        for name, data in (("q.png", as_png(pixels)), ("q.dcm", as_dicom(pixels)))
    ]
    png_answer, dicom_answer = answers
    assert dicom_answer["label"] == png_answer["label"]
    assert dicom_answer["unknown"] == png_answer["unknown"]
    for label, distance in png_answer["distances"].items():
        assert abs(dicom_answer["distances"][label] - distance) < 1e-4, (label, answers)


def test_windowed_dicom_still_uses_its_window() -> None:
    """The fixed bit-depth scale is only for files that ask for no display transform."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    pixels = low_contrast(16)
    ds = dcmread(DicomBytesIO(as_dicom(pixels)))
    ds.WindowCenter, ds.WindowWidth = 1800, 600
    buf = io.BytesIO()
    ds.save_as(buf)
    windowed = decode_image(buf.getvalue())
    assert float(windowed.max() - windowed.min()) > 0.9


# -- a corrupt JPEG 2000 DICOM -----------------------------------------------------------------


def corrupt_jpeg2000_dicom() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    # a J2K codestream start (SOC, SIZ marker) followed by garbage
    frame = b"\xff\x4f\xff\x51\x00\x2f" + bytes(range(256)) * 8
    return as_dicom(
        np.zeros((64, 64), np.uint16),
        transfer_syntax=JPEG2000Lossless,
        pixel_data=encapsulate([frame]),
    )


def test_corrupt_jpeg2000_dicom_is_400_without_address_or_traceback(
    client: TestClient, headers: H, enrolled, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    data = corrupt_jpeg2000_dicom()
    for response in (
        post_predict(client, headers["reader"], data, filename="x.dcm"),
        client.post(
            "/references",
            headers=headers["clinician"],
            data={"label": "disc"},
            files={"file": ("x.dcm", data, "application/dicom")},
        ),
    ):
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "JPEG 2000" in detail and "Export it again" in detail
        assert "0x" not in detail, detail
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records)


# -- HEAD on the probes ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_head_on_the_probes(client: TestClient, enrolled, path: str) -> None:
    get = client.get(path)
    head = client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""


def test_head_ready_is_503_when_get_is(client: TestClient) -> None:
    """No model yet: HEAD agrees with GET."""
    assert client.head("/ready").status_code == client.get("/ready").status_code


# -- error bodies are bounded ------------------------------------------------------------------


def test_a_5mb_encoder_name_is_not_echoed(client: TestClient, headers: H) -> None:
    response = client.post(
        "/admin/retrain", headers=headers["admin"], json={"encoder": "E" * (5 * MB)}
    )
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 4096, len(response.content)
    assert "unknown encoder" in response.json()["detail"]
    assert "omitted" in response.json()["detail"]


def test_a_5mb_label_is_not_echoed(client: TestClient, headers: H, enrolled) -> None:
    response = client.post(
        "/references",
        headers=headers["clinician"],
        data={"label": "L" * (5 * MB)},
        files={"file": ("x.png", synthetic_xray("disc", seed=3), "image/png")},
    )
    assert 400 <= response.status_code < 500, response.text[:300]
    assert len(response.content) < 4096, len(response.content)


def test_a_huge_unknown_query_value_is_not_echoed(client: TestClient, headers: H, enrolled) -> None:
    response = post_predict(
        client, headers["reader"], synthetic_xray("disc", seed=4), method="m" * 6000
    )
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 4096, len(response.content)


# -- production refuses a short secret ---------------------------------------------------------


@pytest.mark.parametrize("secret", ["abcde", "x" * (MIN_PRODUCTION_SECRET_LENGTH - 1), "   "])
def test_production_refuses_a_short_secret(tmp_path, secret: str) -> None:
    with pytest.raises(InsecureSettingsError, match="CXR_SECRET_KEY"):
        Settings(data_dir=tmp_path, environment="production", secret_key=secret)


def test_production_accepts_a_long_secret(tmp_path) -> None:
    settings = Settings(
        data_dir=tmp_path, environment="production", secret_key="k" * MIN_PRODUCTION_SECRET_LENGTH
    )
    assert settings.environment == "production"
