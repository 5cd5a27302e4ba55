"""Helpers for the DICOM tests: synthetic chest radiographs as DICOM (with patient identifiers,
to check they never reach the database, files or logs), STOW-RS bodies, and `FakePacs`, a real
pynetdicom C-STORE SCP that keeps what it receives in memory (the destination in tests that do
not need Orthanc)."""

from __future__ import annotations

import io
import socket
import threading
import uuid
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from tests.app.conftest_predict import synthetic_xray

PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-4711-0815"
SECRET_BITS = [b"DOE^JANE", b"PID-4711-0815", b"ACC-99812", b"General Hospital"]


def chest_dataset(
    kind: str = "disc",
    seed: int = 0,
    *,
    size: tuple[int, int] = (96, 96),
    modality: str = "DX",
    view: str | None = "PA",
    pixels: bool = True,
    study_uid: str | None = None,
    sop_uid: str | None = None,
) -> Dataset:
    """A DX chest radiograph (8-bit MONOCHROME2) of a synthetic class, with identifiers."""
    png = synthetic_xray(kind, seed=seed, size=size)
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-99812"
    ds.StudyID = "1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.InstitutionName = "General Hospital"
    ds.ReferringPhysicianName = "DOE^JOHN"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    if view is not None:
        ds.ViewPosition = view
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if pixels:
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
    return ds


def to_part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def chest_dicom(kind: str = "disc", seed: int = 0, **kwargs: Any) -> bytes:
    return to_part10(chest_dataset(kind, seed, **kwargs))


def compressed_dicom(seed: int = 0) -> bytes:
    """A chest radiograph declared JPEG Lossless (process 14): no decoder for it here."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    ds = chest_dataset("disc", seed)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(range(256)) * 8 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return to_part10(ds)


def stow_body(parts: list[bytes], *, content_type: str = "application/dicom") -> tuple[bytes, str]:
    """A STOW-RS request body and its Content-Type header."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakePacs:
    """A pynetdicom storage SCP on localhost keeping every received data set (a real DICOM
    node: associations, contexts and statuses are the protocol's, only storage is a list)."""

    def __init__(self, port: int | None = None, ae_title: str = "FAKEPACS") -> None:
        self.port = port or free_port()
        self.ae_title = ae_title
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def start(self) -> FakePacs:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def by_modality(self, modality: str) -> list[Dataset]:
        with self._lock:
            return [ds for ds in self.received if ds.Modality == modality]
