"""Fixtures for service tests: a temp data dir, settings, the app and its client, one API key
per role, and synthetic images (PIL-drawn noise; never real patient data).

Everything runs on the embedded default (SQLite under a temp `CXR_DATA_DIR`) unless a test
asks for `postgres_url`. The environment is pointed at the same data dir, so code that calls
`get_settings()` (CLI commands, workers) agrees with the app under test.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.services.keys import create_api_key

TEST_SECRET = "test-secret-not-for-production"
ROLES = ("reader", "clinician", "admin")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh CXR_DATA_DIR (also exported, with the secret, for get_settings() callers)."""
    path = tmp_path / "var"
    monkeypatch.setenv("CXR_DATA_DIR", str(path))
    monkeypatch.setenv("CXR_SECRET_KEY", TEST_SECRET)
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    monkeypatch.delenv("CXR_BROKER_URL", raising=False)
    monkeypatch.delenv("CXR_ENVIRONMENT", raising=False)
    return path


@pytest.fixture
def make_settings(data_dir: Path) -> Callable[..., Settings]:
    """Settings for the temp data dir; keyword overrides (e.g. max_upload_mb=0.01)."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": data_dir,
            "secret_key": TEST_SECRET,
            "device": "cpu",
            "log_level": "INFO",
        }
        values.update(overrides)
        return Settings(**values)

    return factory


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client with the lifespan running (schema migrated, engine open)."""
    with TestClient(app) as test_client:
        yield test_client


def new_key(app: FastAPI, role: str, name: str | None = None) -> str:
    """Create a key in the app's database; returns the plaintext."""
    with app.state.sessionmaker() as session:
        _row, plaintext = create_api_key(
            session=session, role=role, name=name or f"test {role}", settings=app.state.settings
        )
    return plaintext


@pytest.fixture
def keys(client: TestClient, app: FastAPI) -> dict[str, str]:
    """One plaintext API key per role: {"reader": ..., "clinician": ..., "admin": ...}."""
    return {role: new_key(app, role) for role in ROLES}


@pytest.fixture
def headers(keys: dict[str, str]) -> dict[str, dict[str, str]]:
    """Ready-made auth headers per role."""
    return {role: {"X-API-Key": key} for role, key in keys.items()}


# -- synthetic images -------------------------------------------------------------------------


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 64), mode: str = "L") -> bytes:
    """A noisy grayscale PNG, different for every seed."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def dicom_bytes(
    seed: int = 0,
    size: tuple[int, int] = (32, 32),
    *,
    patient_name: str | None = "DOE^JANE",
    patient_id: str = "PID-4711-0815",
    pixels: np.ndarray | None = None,
    bits_stored: int | None = None,
    transfer_syntax: str | None = None,
    pixel_data: bytes | None = None,
) -> bytes:
    """A MONOCHROME2 DICOM: 16-bit (12 stored) random pixels with patient identifiers set (to
    test de-identification), or ``pixels`` as given (8- or 16-bit, every bit stored unless
    ``bits_stored``) with none when ``patient_name`` is None; ``pixel_data`` (encapsulated,
    with its ``transfer_syntax``) replaces the raw pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if pixels is None:
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 4096, size=(size[1], size[0]), dtype=np.uint16)
        bits_stored = bits_stored or 12
    else:
        arr = pixels
    allocated = 8 if arr.dtype == np.uint8 else 16
    stored = bits_stored or allocated
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if patient_name is not None:
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.InstitutionName = "General Hospital"
        ds.ReferringPhysicianName = "DOE^JOHN"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = allocated
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixel_data if pixel_data is not None else arr.tobytes()
    if pixel_data is not None:
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    return png_bytes


@pytest.fixture
def make_jpeg() -> Callable[..., bytes]:
    return jpeg_bytes


@pytest.fixture
def make_dicom() -> Callable[..., bytes]:
    return dicom_bytes


from tests.app.conftest_predict import *  # noqa
