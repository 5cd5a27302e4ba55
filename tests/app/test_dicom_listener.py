"""`cxr dicom listen`: the C-STORE SCP, driven by a real pynetdicom SCU over TCP.

The listener shares the app's prediction service and database; results go to `FakePacs`
(a pynetdicom storage SCP). Bad input (malformed data sets, compressed syntaxes without a
decoder, over-limit data sets, an association dropped mid-transfer) must get a failure status
or nothing, never crash the listener, and never leave a prediction or ledger row behind.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from typer.testing import CliRunner

from app.cli import cli
from app.db.models import DicomInstance, Prediction
from app.dicom.listener import DicomListener
from app.dicom.sr import read_sr
from tests.app.conftest_predict import post_predict, synthetic_xray
from tests.app.dicom_helpers import (
    FakePacs,
    chest_dataset,
    compressed_dicom,
)
from tests.app.test_dicom import FAST_OUTBOX, count, serving, wait_for


def _ae(timeout: float = 180.0) -> Any:
    """An SCU for the chest radiographs of the tests (DX, uncompressed and JPEG Lossless)."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation as DX
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="TESTSCU")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1):
        ae.add_requested_context(DX, syntax)  # one context each: the peer accepts all three
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def c_echo(port: int) -> int | None:
    assoc = _ae().associate("127.0.0.1", port, ae_title="CXR")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def c_store(port: int, dataset: Any) -> int | None:
    """C-STORE a Dataset or a Part 10 file path; the status, or None without an answer."""
    assoc = _ae().associate("127.0.0.1", port, ae_title="CXR")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def malformed_file(tmp_path: Path) -> Path:
    """A valid file meta followed by garbage where the data set should be."""
    good = chest_dataset("disc", 70)
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, good.file_meta, enforce_standard=True)
    path = tmp_path / "malformed.dcm"
    path.write_bytes(fp.getvalue() + b"\x08\x00\x16\x00UI\xff\xff" + b"\xde\xad\xbe\xef" * 50)
    return path


def drop_mid_transfer(port: int, dataset: Any) -> None:
    """Start a C-STORE and cut the TCP connection after the first data fragments."""
    ae = _ae(timeout=10.0)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
    assert assoc.is_established
    transport = assoc.dul.socket
    original = transport.send
    calls = {"n": 0}

    def send(data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # command, first data fragment, then the line goes dead
            transport.socket.shutdown(socket.SHUT_RDWR)
            transport.socket.close()
            raise OSError("connection dropped by the test")
        original(data)

    transport.send = send
    with contextlib.suppress(Exception):
        assoc.send_c_store(dataset)
    assoc.abort()


WARM_UP = 1  # predictions the fixture makes before the listener starts


@pytest.fixture
def listening(make_settings, checkpoint_a) -> Iterator[tuple[Any, DicomListener, FakePacs]]:
    pacs = FakePacs().start()
    try:
        with serving(
            make_settings,
            checkpoint_a,
            dicom_destination=pacs.destination,
            max_upload_mb=0.05,
            **FAST_OUTBOX,
        ) as (app, client, keys):
            # warm up (model load, ONNX session) so the C-STOREs below are answered quickly
            post_predict(client, keys["reader"], synthetic_xray("disc", seed=1))
            listener = DicomListener(
                settings=app.state.settings,
                service=app.state.service,
                sessions=app.state.sessionmaker,
                outbox=app.state.dicom_outbox,
                host="127.0.0.1",
                port=0,
            ).start()
            try:
                yield app, listener, pacs
            finally:
                listener.stop()
    finally:
        pacs.stop()


def test_echo_and_store_send_results_to_the_pacs(listening) -> None:
    app, listener, pacs = listening
    assert c_echo(listener.port) == 0x0000
    source = chest_dataset("stripes", 60)
    assert c_store(listener.port, source) == 0x0000
    assert wait_for(lambda: len(pacs.received) == 2)
    [sr] = pacs.by_modality("SR")
    [overlay] = pacs.by_modality("OT")
    assert sr.StudyInstanceUID == overlay.StudyInstanceUID == source.StudyInstanceUID
    summary = read_sr(sr)
    assert summary.label == "stripes" and summary.source_sop_instance_uid == source.SOPInstanceUID
    assert count(app, Prediction) == 1 + WARM_UP


def test_store_skips_non_frontal_and_dedups(listening) -> None:
    app, listener, _pacs = listening
    assert c_store(listener.port, chest_dataset("disc", 61, modality="CT")) == 0x0000
    assert c_store(listener.port, chest_dataset("disc", 62, view="RL")) == 0x0000
    assert count(app, Prediction) == WARM_UP
    again = chest_dataset("disc", 63)
    assert c_store(listener.port, again) == 0x0000
    assert c_store(listener.port, again) == 0x0000
    assert count(app, Prediction) == 1 + WARM_UP


def test_bad_input_gets_a_failure_status_and_the_listener_survives(
    listening, tmp_path, caplog, monkeypatch
) -> None:
    from pynetdicom import _config

    # send files as they are on disk (the SCU would otherwise parse and re-encode them)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    app, listener, _pacs = listening
    assert c_store(listener.port, malformed_file(tmp_path)) == 0xC000
    compressed = tmp_path / "compressed.dcm"
    compressed.write_bytes(compressed_dicom(71))
    assert c_store(listener.port, compressed) == 0xC122
    huge = chest_dataset("disc", 72, size=(240, 240))  # 58 kB over the 0.05 MB limit
    assert c_store(listener.port, huge) == 0xA700
    drop_mid_transfer(listener.port, chest_dataset("disc", 73, size=(240, 240)))
    assert count(app, Prediction) == WARM_UP and count(app, DicomInstance) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "app.dicom.receive"]
    assert messages.count("DICOM instance refused") >= 2
    assert "DICOM instance not predicted" in messages
    # still serving, and still predicting
    assert c_echo(listener.port) == 0x0000
    assert c_store(listener.port, chest_dataset("disc", 74)) == 0x0000
    assert count(app, Prediction) == 1 + WARM_UP


def test_cli_listen_is_registered() -> None:
    result = CliRunner().invoke(cli, ["dicom", "listen", "--help"])
    assert result.exit_code == 0
    assert "--ae-title" in result.output and "--port" in result.output
