"""Issue 11 item 2: DICOM de-identification by allow-list, on every path that stores an upload.

The adversarial file carries the PS3.15 basic-profile attributes that survived before
(ClinicalTrialSubjectID, ReasonForTheRequestedProcedure, StudyComments, PlacerOrderNumber...,
text in a ContentSequence), text in the 128-byte preamble and in the file meta
(SourceApplicationEntityTitle, PrivateInformation), a private tag, an overlay and a curve-like
free-text element. Each secret is a unique marker string searched for in the stored bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.db import Prediction, Reference
from app.main import create_app
from tests.app.conftest import new_key
from tests.app.conftest_predict import enroll, post_predict, register_in, synthetic_xray
from training.imaging import decode_image
from training.imaging.deidentify import clean_for_storage, find_identifying_content

SECRETS = {
    "PatientName": "SECRET^NAME",
    "PatientID": "SECRET-PID-1",
    "ClinicalTrialSubjectID": "SECRET-TRIAL-2",
    "ReasonForTheRequestedProcedure": "SECRET REASON 3",
    "StudyComments": "SECRET COMMENT 4",
    "PlacerOrderNumberImagingServiceRequest": "SECRET-ORDER-5",
    "FillerOrderNumberImagingServiceRequest": "SECRET-ORDER-6",
    "RequestingService": "SECRET SERVICE 7",
    "PatientAge": "042Y",
    "InstitutionName": "SECRET HOSPITAL 8",
}
PREAMBLE_SECRET = b"SECRET PREAMBLE 9"
META_SECRET = "SECRETAE10"
PRIVATE_INFO = b"SECRET PRIVATE 11"
CONTENT_TEXT = "SECRET CONTENT TEXT 12"
PRIVATE_TAG = "SECRET PRIVATE TAG 13"
ALL_MARKERS = (
    [v.encode() for v in SECRETS.values() if v.startswith("SECRET")]
    + [PREAMBLE_SECRET, META_SECRET.encode(), PRIVATE_INFO, CONTENT_TEXT.encode()]
    + [PRIVATE_TAG.encode(), b"SECRET"]
)


def hostile_dicom(seed: int = 0, size: tuple[int, int] = (48, 40), **extra: object) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 4096, size=(size[1], size[0]), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = META_SECRET
    meta.PrivateInformationCreatorUID = "1.2.3.4"
    meta.PrivateInformation = PRIVATE_INFO
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = PREAMBLE_SECRET.ljust(128, b"\x00")
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    for keyword, value in SECRETS.items():
        setattr(ds, keyword, value)
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = CONTENT_TEXT
    ds.ContentSequence = [item]
    ds.add_new(0x00291010, "LO", PRIVATE_TAG)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2000
    ds.WindowWidth = 3000
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _assert_clean(stored: bytes) -> None:
    for marker in ALL_MARKERS:
        assert marker not in stored, marker
    assert stored[:128] == b"\x00" * 128
    assert find_identifying_content(stored) == []


def test_hostile_file_is_flagged_then_cleaned_pixel_exact() -> None:
    data = hostile_dicom()
    assert PREAMBLE_SECRET in data and META_SECRET.encode() in data
    found = find_identifying_content(data)
    for keyword in ("ClinicalTrialSubjectID", "StudyComments", "ContentSequence", "Preamble"):
        assert keyword in found, found
    assert "FileMeta.SourceApplicationEntityTitle" in found
    clean = clean_for_storage(data)
    _assert_clean(clean)
    np.testing.assert_array_equal(decode_image(clean), decode_image(data))
    assert clean_for_storage(data) == clean  # deterministic: duplicates stay recognisable
    from pydicom import dcmread

    out = dcmread(io.BytesIO(clean))
    assert out.PatientIdentityRemoved == "YES" and out.ViewPosition == "PA"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert set(out.file_meta.dir()) <= {
        "FileMetaInformationGroupLength",
        "FileMetaInformationVersion",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
    }


def test_enrolled_reference_is_stored_clean(client: TestClient, app, headers, settings) -> None:
    response = client.post(
        "/references",
        headers=headers["clinician"],
        data={"label": "disc"},
        files={"file": ("SECRET^NAME.dcm", hostile_dicom(seed=1), "application/dicom")},
    )
    assert response.status_code == 201, response.text
    with app.state.sessionmaker() as session:
        row = session.get(Reference, response.json()["references"][0]["id"])
        assert row is not None
    _assert_clean((settings.data_dir / row.image_path).read_bytes())


def test_stored_prediction_image_goes_through_the_same_cleaner(
    make_settings, checkpoint_a: Path
) -> None:
    settings = make_settings(store_prediction_images=True, ood_check=False)
    app = create_app(settings)
    with TestClient(app) as client:
        register_in(app, checkpoint_a)
        clinician = {"X-API-Key": new_key(app, "clinician")}
        enroll(client, clinician, "disc", [synthetic_xray("disc", seed=s) for s in range(3)])
        enroll(client, clinician, "stripes", [synthetic_xray("stripes", seed=s) for s in range(3)])
        response = post_predict(
            client,
            {"X-API-Key": new_key(app, "reader")},
            hostile_dicom(seed=2),
            filename="x.dcm",
            content_type="application/dicom",
            explain=False,
        )
        assert response.status_code == 200, response.text
        with app.state.sessionmaker() as session:
            row = session.get(Prediction, response.json()["id"])
            assert row is not None and row.image_path is not None
    _assert_clean((settings.data_dir / row.image_path).read_bytes())


def test_what_cannot_be_cleaned_is_refused_422_and_never_stored(
    client: TestClient, headers, settings
) -> None:
    burned = hostile_dicom(seed=3, BurnedInAnnotation="YES")
    response = client.post(
        "/references",
        headers=headers["clinician"],
        data={"label": "disc"},
        files={"file": ("x.dcm", burned, "application/dicom")},
    )
    assert response.status_code == 422, response.text
    assert "burned" in response.json()["detail"].lower()
    stored = list((settings.data_dir / "references").rglob("*.*"))
    assert stored == []


@pytest.mark.parametrize("implicit", [False, True])
def test_raw_and_implicit_dicom_are_rebuilt_with_a_clean_meta(implicit: bool) -> None:
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset

    source = dcmread(io.BytesIO(hostile_dicom(seed=4)))
    source.file_meta = FileMetaDataset()  # no preamble, no meta: a raw data set
    source.preamble = None
    buf = io.BytesIO()
    source.save_as(buf, implicit_vr=implicit, little_endian=True)
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM"
    clean = clean_for_storage(raw)
    _assert_clean(clean)
    assert clean[128:132] == b"DICM"
    np.testing.assert_array_equal(decode_image(clean), decode_image(raw))
