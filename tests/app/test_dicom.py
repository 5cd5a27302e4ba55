"""DICOM over HTTP: the SR of a prediction, STOW-RS in, the outbox out (to a real pynetdicom
storage SCP standing in for the PACS), and no patient identifiers at rest.

Orthanc end-to-end tests are in `test_dicom_orthanc.py`; the C-STORE listener's in
`test_dicom_listener.py`.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.models import DicomDelivery, DicomInstance, Prediction
from app.dicom.destination import parse_dicom_destination
from app.dicom.sr import DISCLAIMER, read_sr
from app.main import create_app
from tests.app.conftest import new_key
from tests.app.conftest_predict import enroll_classes, post_predict, register_in
from tests.app.dicom_helpers import (
    PATIENT_ID,
    PATIENT_NAME,
    SECRET_BITS,
    FakePacs,
    chest_dicom,
    compressed_dicom,
    free_port,
    stow_body,
)

FAST_OUTBOX = {
    "dicom_delivery_backoff_s": 0.05,
    "dicom_delivery_max_backoff_s": 0.2,
    "dicom_delivery_poll_s": 0.05,
    "dicom_timeout_s": 5.0,
}


def stow(client: TestClient, key: dict[str, str], parts: list[bytes], **kwargs: Any) -> Any:
    body, content_type = stow_body(parts, **kwargs)
    return client.post(
        "/dicomweb/studies", headers={**key, "Content-Type": content_type}, content=body
    )


def items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return answer.get(tag, {}).get("Value", [])


def sr_url_prediction_id(item: dict[str, Any]) -> str:
    return item["00081190"]["Value"][0].rsplit("/", 2)[-2]


@contextmanager
def serving(
    make_settings: Callable[..., Settings], checkpoint: Path, *, enroll: bool = True, **overrides
) -> Iterator[tuple[FastAPI, TestClient, dict[str, dict[str, str]]]]:
    """An app with model A active and both synthetic classes enrolled."""
    app = create_app(make_settings(**overrides))
    with TestClient(app) as client:
        keys = {r: {"X-API-Key": new_key(app, r)} for r in ("reader", "clinician", "admin")}
        register_in(app, checkpoint)
        if enroll:
            enroll_classes(client, keys["clinician"])
        yield app, client, keys


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def count(app: FastAPI, model: Any, *where: Any) -> int:
    with app.state.sessionmaker() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(model).where(*where)))


# -- SR of a prediction -----------------------------------------------------------------------


def test_prediction_sr_carries_the_answer(client, headers, enrolled, make_xray) -> None:
    answer = post_predict(client, headers["reader"], make_xray("disc", seed=7)).json()
    response = client.get(f"/predictions/{answer['id']}/sr", headers=headers["reader"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(response.content))
    assert ds.Modality == "SR" and ds.SOPClassUID.name == "Comprehensive SR Storage"
    summary = read_sr(ds)
    assert summary.label == answer["label"] == "disc"
    assert summary.confidence == pytest.approx(answer["confidence"])
    assert summary.unknown is answer["unknown"]
    assert summary.distances == pytest.approx(answer["distances"])
    assert summary.neighbors == [n["reference_id"] for n in answer["neighbors"]]
    assert summary.model_version == answer["model_version"]
    assert summary.index_version == answer["index_version"]
    assert summary.prediction_id == answer["id"]
    assert summary.disclaimer == DISCLAIMER and "Not a diagnosis" in DISCLAIMER
    # an upload has no patient: the patient module is empty, nothing is invented
    assert str(ds.PatientName) == "" and ds.PatientID in ("", None)
    # the same prediction gives the same instance
    again = pydicom.dcmread(
        io.BytesIO(client.get(f"/predictions/{answer['id']}/sr", headers=headers["reader"]).content)
    )
    assert again.SOPInstanceUID == ds.SOPInstanceUID
    missing = client.get("/predictions/nope/sr", headers=headers["reader"])
    assert missing.status_code == 404 and "prediction" in missing.json()["detail"]


# -- STOW-RS in -------------------------------------------------------------------------------


def test_stow_predicts_like_predict(client, headers, enrolled, app) -> None:
    data = chest_dicom("stripes", seed=3)
    direct = post_predict(
        client, headers["reader"], data, filename="x.dcm", content_type="application/dicom"
    ).json()
    response = stow(client, headers["reader"], [data])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    stored = items(response.json(), "00081199")
    assert len(stored) == 1 and "00081198" not in response.json()
    sent = pydicom.dcmread(io.BytesIO(data))
    assert stored[0]["00081155"]["Value"] == [sent.SOPInstanceUID]
    prediction_id = sr_url_prediction_id(stored[0])
    sr = read_sr(
        pydicom.dcmread(
            io.BytesIO(
                client.get(f"/predictions/{prediction_id}/sr", headers=headers["reader"]).content
            )
        )
    )
    assert sr.label == direct["label"] == "stripes"
    assert sr.distances == pytest.approx(direct["distances"], abs=1e-5)
    assert sr.neighbors == [n["reference_id"] for n in direct["neighbors"]]


def test_stow_skips_what_is_not_a_frontal_chest_radiograph(client, headers, enrolled, app, caplog):
    caplog.set_level(logging.INFO)
    before = count(app, Prediction)
    others = [
        chest_dicom("disc", 1, modality="MR"),
        chest_dicom("disc", 2, view="LL"),
        chest_dicom("disc", 3, pixels=False),
    ]
    response = stow(client, headers["reader"], others)
    assert response.status_code == 200, response.text
    stored = items(response.json(), "00081199")
    assert len(stored) == 3 and all("00081190" not in item for item in stored)
    assert count(app, Prediction) == before  # acknowledged, never diagnosed
    reasons = [
        r.__dict__.get("reason", "") for r in caplog.records if r.msg == "DICOM instance skipped"
    ]
    assert any("modality MR" in r for r in reasons)
    assert any("lateral" in r for r in reasons)
    assert any("no pixel data" in r for r in reasons)


def test_same_instance_twice_gives_one_prediction(client, headers, enrolled, app) -> None:
    data = chest_dicom("disc", seed=5)
    first = stow(client, headers["reader"], [data])
    second = stow(client, headers["reader"], [data, data])
    assert first.status_code == second.status_code == 200
    ids = {sr_url_prediction_id(i) for r in (first, second) for i in items(r.json(), "00081199")}
    assert len(ids) == 1
    assert count(app, Prediction) == 1
    assert count(app, DicomInstance) == 1


def test_stow_bad_input_is_answered_the_dicom_way(client, headers, enrolled, app, make_settings):
    good = chest_dicom("disc", seed=9)
    other = chest_dicom("disc", seed=10)
    truncated = other[: len(other) // 2]  # cut inside the pixel data
    garbage = b"\x00" * 200 + b"not dicom at all"
    response = stow(client, headers["reader"], [good, truncated, garbage, compressed_dicom()])
    assert response.status_code == 202, response.text
    failed = items(response.json(), "00081198")
    statuses = sorted(item["00081197"]["Value"][0] for item in failed)
    assert statuses == [0xC000, 0xC000, 0xC122]
    assert len(items(response.json(), "00081199")) == 1
    assert count(app, Prediction) == 1
    # nothing half-recorded: failures leave no ledger row, so a corrected resend is predicted
    assert count(app, DicomInstance) == 1
    everything_bad = stow(client, headers["reader"], [garbage])
    assert everything_bad.status_code == 409
    wrong_type = client.post(
        "/dicomweb/studies",
        headers={**headers["reader"], "Content-Type": "application/json"},
        content=b"{}",
    )
    assert wrong_type.status_code == 415 and "multipart/related" in wrong_type.json()["detail"]
    body, content_type = stow_body([good])
    cut = client.post(
        "/dicomweb/studies",
        headers={**headers["reader"], "Content-Type": content_type},
        content=body[: len(body) // 2],
    )
    assert cut.status_code == 400 and "malformed" in cut.json()["detail"]


def test_stow_limits_are_the_predict_limits(make_settings, checkpoint_a) -> None:
    limits = {"max_upload_mb": 0.05, "max_pixels": 150 * 150}
    with serving(make_settings, checkpoint_a, **limits) as (_app, client, keys):
        too_many_pixels = chest_dicom("disc", 1, size=(160, 160))  # 26 kB, 25600 pixels
        over_bytes = chest_dicom("disc", 2, size=(240, 240))  # 58 kB
        response = stow(client, keys["reader"], [too_many_pixels, over_bytes])
        assert response.status_code == 409, response.text
        statuses = [i["00081197"]["Value"][0] for i in items(response.json(), "00081198")]
        assert statuses == [0xA700, 0xA700]


def test_stow_without_model_is_a_processing_failure(make_settings, checkpoint_a) -> None:
    app = create_app(make_settings())
    with TestClient(app) as client:
        key = {"X-API-Key": new_key(app, "reader")}
        response = stow(client, key, [chest_dicom("disc", 1)])
        assert response.status_code == 409
        assert items(response.json(), "00081198")[0]["00081197"]["Value"] == [0x0110]


# -- outbox -----------------------------------------------------------------------------------


def test_destination_must_be_aet_at_host_port(make_settings) -> None:
    assert str(parse_dicom_destination("ORTHANC@pacs:4242")) == "ORTHANC@pacs:4242"
    for bad in ("pacs:4242", "ORTHANC@pacs", "ORTHANC@pacs:0", "@pacs:11", "A" * 17 + "@h:1"):
        with pytest.raises(ValueError, match="AET@host:port"):
            make_settings(dicom_destination=bad)


def test_results_wait_for_the_destination_and_arrive_once(make_settings, checkpoint_a) -> None:
    pacs = FakePacs(port=free_port())  # not started: the destination is down
    with serving(
        make_settings, checkpoint_a, dicom_destination=pacs.destination, **FAST_OUTBOX
    ) as (app, client, keys):
        sent = [chest_dicom("disc", 20), chest_dicom("stripes", 21)]
        response = stow(client, keys["reader"], sent)
        assert response.status_code == 200, response.text
        assert wait_for(lambda: count(app, DicomDelivery, DicomDelivery.attempts >= 2) == 4)
        listed = client.get("/deliveries", headers=keys["admin"]).json()
        assert listed["count"] == 4
        assert {d["status"] for d in listed["data"]} == {"pending"}
        assert all(
            "refused" in d["last_error"] or "not established" in d["last_error"]
            for d in listed["data"]
        )
        assert "payload" not in listed["data"][0]
        pacs.start()
        try:
            assert wait_for(
                lambda: count(app, DicomDelivery, DicomDelivery.status == "delivered") == 4
            )
            time.sleep(0.3)  # nothing is sent twice afterwards
            srs, overlays = pacs.by_modality("SR"), pacs.by_modality("OT")
        finally:
            pacs.stop()
        assert len(srs) == 2 and len(overlays) == 2
        assert count(app, DicomDelivery, DicomDelivery.payload.is_not(None)) == 0  # purged
    sources = {pydicom.dcmread(io.BytesIO(d)).StudyInstanceUID: d for d in sent}
    for sr in srs:
        # filed with the right patient, in the source study, referencing the source image
        assert sr.StudyInstanceUID in sources
        source = pydicom.dcmread(io.BytesIO(sources[sr.StudyInstanceUID]))
        assert str(sr.PatientName) == PATIENT_NAME and sr.PatientID == PATIENT_ID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert read_sr(sr).source_sop_instance_uid == source.SOPInstanceUID
        assert read_sr(sr).label in ("disc", "stripes")
    for overlay in overlays:
        assert overlay.StudyInstanceUID in sources and overlay.PhotometricInterpretation == "RGB"
        assert overlay.Rows == overlay.Columns == 96  # same size as the radiograph


def test_results_survive_a_restart(make_settings, checkpoint_a) -> None:
    pacs = FakePacs(port=free_port())
    with serving(
        make_settings, checkpoint_a, dicom_destination=pacs.destination, **FAST_OUTBOX
    ) as (_app, client, keys):
        assert stow(client, keys["reader"], [chest_dicom("disc", 30)]).status_code == 200
    pacs.start()
    try:
        again = create_app(make_settings(dicom_destination=pacs.destination, **FAST_OUTBOX))
        with TestClient(again):
            assert wait_for(lambda: len(pacs.received) == 2)
            time.sleep(0.3)
        assert len(pacs.received) == 2
    finally:
        pacs.stop()


def test_a_delivery_that_keeps_failing_ends_failed(make_settings, checkpoint_a) -> None:
    pacs = FakePacs(port=free_port())
    with serving(
        make_settings,
        checkpoint_a,
        dicom_destination=pacs.destination,
        **{**FAST_OUTBOX, "dicom_delivery_attempts": 3},
    ) as (app, client, keys):
        assert stow(client, keys["reader"], [chest_dicom("disc", 40)]).status_code == 200
        assert wait_for(lambda: count(app, DicomDelivery, DicomDelivery.status == "failed") == 2)
        failed = client.get("/deliveries", params={"status": "failed"}, headers=keys["admin"])
        assert failed.status_code == 200
        rows = failed.json()["data"]
        assert len(rows) == 2 and {r["kind"] for r in rows} == {"sr", "overlay"}
        assert all(r["attempts"] == 3 and r["last_error"] for r in rows)
        assert client.get("/deliveries", headers=keys["reader"]).status_code == 403


def test_identifiers_never_reach_db_disk_or_logs(
    make_settings, checkpoint_a, caplog, capfd
) -> None:
    """Patient and study identifiers go to the PACS and nowhere else: the database holds them
    only encrypted until delivery (then not at all), files and logs never."""
    caplog.set_level(logging.DEBUG)
    pacs = FakePacs(port=free_port())
    settings = make_settings(dicom_destination=pacs.destination, log_level="DEBUG", **FAST_OUTBOX)
    sent = chest_dicom("disc", 50)
    source = pydicom.dcmread(io.BytesIO(sent))
    uid_bits = [source.SOPInstanceUID.encode(), source.StudyInstanceUID.encode()]

    def assert_clean() -> None:
        engine = sa.create_engine(settings.database_url)
        with engine.connect() as conn:
            for table in sa.inspect(engine).get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    blob = repr(tuple(row)).encode()
                    assert not any(bit in blob for bit in SECRET_BITS + uid_bits), table
        engine.dispose()
        for path in Path(settings.data_dir).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(bit in data for bit in SECRET_BITS + uid_bits), path

    with serving(
        make_settings,
        checkpoint_a,
        dicom_destination=pacs.destination,
        log_level="DEBUG",
        **FAST_OUTBOX,
    ) as (app, client, keys):
        response = stow(client, keys["reader"], [sent])
        assert response.status_code == 200
        assert wait_for(lambda: count(app, DicomDelivery, DicomDelivery.attempts >= 1) == 2)
        assert_clean()  # queued: encrypted
        pacs.start()
        try:
            assert wait_for(
                lambda: count(app, DicomDelivery, DicomDelivery.status == "delivered") == 2
            )
        finally:
            pacs.stop()
        assert_clean()  # delivered: purged
    assert {str(ds.PatientName) for ds in pacs.received} == {PATIENT_NAME}
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    out, err = capfd.readouterr()
    for text in (logged, out, err):
        for bit in SECRET_BITS + uid_bits:
            assert bit.decode() not in text
