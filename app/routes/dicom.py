"""DICOM over HTTP: `POST /dicomweb/studies` (STOW-RS in, reader), `GET /predictions/{id}/sr`
(reader) and `GET /deliveries` (the outbox, admin).

STOW-RS takes `multipart/related; type="application/dicom"` and runs every part through
`app.dicom.receive.receive_instance` (the C-STORE listener's function too), one at a time in a
worker thread under the service's inference limiter, like `/predict`. The answer is the
DICOMweb store response: stored (or acknowledged and skipped) instances in the Referenced SOP
Sequence, with a Retrieve URL to their SR; refused ones in the Failed SOP Sequence with the
DICOM failure reason. HTTP 200 when all were accepted, 202 when some failed, 409 when all did.

The router's lifespan runs the outbox worker in the API process when a destination is set.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from app.db import Prediction
from app.db.session import SessionDep
from app.deps import AdminKey, MetricsDep, OutboxDep, ReaderKey, ServiceDep, SettingsDep
from app.dicom.outbox import OutboxWorker, configured_destination, list_deliveries
from app.dicom.receive import Outcome, Received, receive_instance
from app.dicom.schemas import DeliveriesPublic, DeliveryPublic, DeliveryStatus
from app.schemas import ErrorPublic
from app.schemas_predict import PredictionPublic

logger = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"


@asynccontextmanager
async def dicom_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Deliver queued results from this process while it runs (only with a destination)."""
    settings = app.state.settings
    worker = None
    if configured_destination(settings) is not None:
        worker = OutboxWorker(sessionmaker=app.state.sessionmaker, settings=settings).start()
    app.state.dicom_outbox = worker
    try:
        yield
    finally:
        if worker is not None:
            await anyio.to_thread.run_sync(worker.stop)


router = APIRouter(tags=["dicom"], lifespan=dicom_lifespan)

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorPublic, "description": "The key's role is too low"},
}


# -- STOW-RS ----------------------------------------------------------------------------------


def _boundary(content_type: str) -> bytes:
    """The multipart boundary of a STOW-RS request; 415 saying what to send otherwise."""
    media, _, params = content_type.partition(";")
    values: dict[str, str] = {}
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        values[name.strip().lower()] = value.strip().strip('"')
    part_type = values.get("type", "application/dicom").lower()
    if media.strip().lower() != "multipart/related" or part_type != "application/dicom":
        raise HTTPException(
            415,
            'STOW-RS takes Content-Type: multipart/related; type="application/dicom"; '
            "boundary=...; with one DICOM Part 10 file per part.",
        )
    boundary = values.get("boundary", "")
    if not boundary:
        raise HTTPException(400, "The multipart/related Content-Type has no boundary parameter.")
    return boundary.encode("latin-1")


def split_multipart(body: bytes, boundary: bytes) -> list[tuple[str, bytes]]:
    """(content type, payload) of each part of a multipart body; 400 when it is malformed."""
    delimiter = b"--" + boundary
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise HTTPException(
            400, "The multipart body is malformed (no closing boundary); send it again."
        )
    parts = []
    for chunk in chunks[1:-1]:
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise HTTPException(400, "A multipart part has no header/body separator.")
        content_type = "application/dicom"
        for line in head.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-type":
                content_type = value.strip().lower()
        parts.append((content_type, payload.removesuffix(b"\r\n")))
    return parts


def _item(result: Received, *, base_url: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if result.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [result.sop_class_uid]}
    if result.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [result.sop_instance_uid]}
    if not result.ok:
        item["00081197"] = {"vr": "US", "Value": [result.status]}
    elif result.prediction_id:
        url = f"{base_url}/predictions/{result.prediction_id}/sr"
        item["00081190"] = {"vr": "UR", "Value": [url]}
    return item


@router.post(
    "/dicomweb/studies",
    summary="DICOMweb STOW-RS: predict every frontal chest radiograph; results to the PACS",
    responses={
        **AUTH_ERRORS,
        200: {"description": "Every instance stored (predicted, or acknowledged and skipped)"},
        202: {"description": "Some instances failed (Failed SOP Sequence says which and why)"},
        409: {"description": "Every instance failed"},
        400: {"model": ErrorPublic, "description": "Malformed multipart body"},
        413: {"model": ErrorPublic, "description": "Request over CXR_MAX_REQUEST_MB"},
        415: {"model": ErrorPublic, "description": "Not multipart/related application/dicom"},
        503: {"model": ErrorPublic, "description": "The prediction service is not started"},
    },
)
async def stow_studies(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: ReaderKey,
    service: ServiceDep,
    metrics: MetricsDep,
    outbox: OutboxDep,
) -> Response:
    boundary = _boundary(request.headers.get("content-type", ""))
    api_key_id = key.id
    session.close()  # give the auth check's connection back while the body streams in
    body = await request.body()
    parts = split_multipart(body, boundary)
    if not parts:
        raise HTTPException(400, "The STOW-RS request holds no DICOM part.")
    results: list[Received] = []
    for content_type, payload in parts:
        if content_type.split(";")[0].strip() != "application/dicom":
            results.append(
                Received(Outcome.failed, 0xC000, f"part of type {content_type} is not DICOM")
            )
            continue
        work = partial(
            receive_instance,
            service=service,
            session=session,
            settings=settings,
            data=payload,
            api_key_id=api_key_id,
            via="stow-rs",
        )
        results.append(await anyio.to_thread.run_sync(work, limiter=service.limiter))
    if outbox is not None and any(r.queued for r in results):
        outbox.wake()
    for result in results:
        if result.answer is not None:
            metrics.count_prediction(label=result.answer.label, unknown=result.answer.unknown)
    base_url = str(request.base_url).rstrip("/")
    stored = [_item(r, base_url=base_url) for r in results if r.ok]
    failed = [_item(r, base_url=base_url) for r in results if not r.ok]
    answer: dict[str, Any] = {}
    if stored:
        answer["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if stored else 409)
    return JSONResponse(answer, status_code=status, media_type=DICOM_JSON)


# -- SR of a prediction -----------------------------------------------------------------------


def _answer_of(row: Prediction) -> PredictionPublic:
    """The audit answer of a prediction (the overlay image is not kept in the audit log)."""
    data = dict(row.answer or {})
    data["gradcam"] = None
    return PredictionPublic.model_validate(data)


@router.get(
    "/predictions/{prediction_id}/sr",
    summary="The prediction as a DICOM Structured Report (application/dicom)",
    response_class=Response,
    responses={
        **AUTH_ERRORS,
        200: {"content": {"application/dicom": {}}, "description": "DICOM Part 10 SR"},
        404: {"model": ErrorPublic, "description": "No prediction with this id"},
    },
)
def prediction_sr(prediction_id: str, session: SessionDep, _key: ReaderKey) -> Response:
    row = session.get(Prediction, prediction_id)
    if row is None:
        raise HTTPException(
            404, f"No prediction {prediction_id!r}; use the 'id' of a /predict answer."
        )
    # Imported here: highdicom costs every API process ~100 MB of RSS and ~1 s at start-up
    # (measured, docs/BENCHMARKS.md); only processes that build an SR should pay it.
    from app.dicom.sr import build_sr, to_bytes

    sr = build_sr(_answer_of(row))
    return Response(
        to_bytes(sr),
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="{prediction_id}-sr.dcm"'},
    )


# -- outbox -----------------------------------------------------------------------------------


@router.get(
    "/deliveries",
    response_model=DeliveriesPublic,
    summary="DICOM results outbox: pending, delivered and failed deliveries (newest first)",
    responses=AUTH_ERRORS,
)
def get_deliveries(
    session: SessionDep,
    _key: AdminKey,
    status: Annotated[DeliveryStatus | None, Query(description="Only this status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> DeliveriesPublic:
    rows, count = list_deliveries(session=session, status=status, limit=limit, offset=offset)
    return DeliveriesPublic(data=[DeliveryPublic.model_validate(r) for r in rows], count=count)
