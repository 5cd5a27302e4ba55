"""`POST /predict` (reader): classify one chest X-ray against the enrolled references.

The route only does HTTP work: it refuses an oversized body while it streams in (413 before the
multipart parser spools it), reads the file with the byte limit, then runs the whole CPU part
(`app.services.predict.predict`: decode, preprocess, forward, search, Grad-CAM, audit row) in a
worker thread under the service's capacity limiter, so the event loop keeps serving health
checks and other requests while at most `inference_workers` inferences share the cores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.routing import APIRoute
from starlette.types import Message

from app.db.session import SessionDep
from app.deps import ReaderKey, SettingsDep, single_form_fields
from app.schemas import ErrorPublic
from app.schemas_predict import Method, PredictionPublic
from app.services.predict import MAX_K, PredictionUnavailableError, predict
from app.state import ServiceState
from training.imaging import ImageTooLargeError

logger = logging.getLogger(__name__)

#: Room for the multipart envelope (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
CHUNK = 1024 * 1024


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"The upload is over the limit of {limit} bytes (CXR_MAX_UPLOAD_MB); "
        "compress or downscale the image and send it again.",
    )


class UploadLimitRoute(APIRoute):
    """An APIRoute that caps the request body at the per-file upload limit plus envelope.

    The app-wide limit is sized for multi-file enrollment; a prediction carries one image, so it
    gets the tighter per-file limit, checked from Content-Length and while streaming, before
    FastAPI's form parsing spools the body to disk.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited_handler(request: Request) -> Response:
            settings = request.app.state.settings
            file_limit = settings.max_upload_bytes
            limit = file_limit + MULTIPART_OVERHEAD
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(file_limit)
            receive = request.receive
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise _too_large(file_limit)
                return message

            return await handler(Request(request.scope, limited_receive))

        return limited_handler


router = APIRouter(tags=["predict"], route_class=UploadLimitRoute)

PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorPublic, "description": "Empty, unreadable or corrupt image"},
    401: {"model": ErrorPublic, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorPublic, "description": "The key's role is too low"},
    413: {"model": ErrorPublic, "description": "Over the byte or pixel limit"},
    415: {"model": ErrorPublic, "description": "Not PNG, JPEG or DICOM"},
    422: {"model": ErrorPublic, "description": "Missing or repeated file, invalid k / method"},
    503: {"model": ErrorPublic, "description": "No active model or no references enrolled"},
}


def _service(request: Request) -> ServiceState:
    service: ServiceState | None = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(
            status_code=503,
            detail="The prediction service is not started; check the server log.",
        )
    return service


async def read_upload(upload: UploadFile, *, limit: int) -> bytes:
    """Read the upload chunk by chunk, refusing (413) as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise ImageTooLargeError(
                f"The file is over the upload limit of {limit} bytes (CXR_MAX_UPLOAD_MB); "
                "compress or downscale it."
            )
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/predict",
    response_model=PredictionPublic,
    responses=PREDICT_ERRORS,
    summary="Predict the class of a chest X-ray (k-NN or mean distance to enrolled classes)",
    dependencies=[Depends(single_form_fields("file"))],
)
async def create_prediction(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: ReaderKey,
    file: Annotated[UploadFile, File(description="The chest X-ray: PNG, JPEG or DICOM")],
    explain: Annotated[
        bool, Query(description="Add a Grad-CAM overlay (false skips it; faster)")
    ] = True,
    k: Annotated[
        int | None,
        Query(ge=1, le=MAX_K, description="Neighbours to vote/return (default CXR_DEFAULT_K)"),
    ] = None,
    method: Annotated[
        Method, Query(description="knn: distance-weighted vote; mean_distance: nearest class")
    ] = "knn",
) -> PredictionPublic:
    service = _service(request)
    data = await read_upload(file, limit=settings.max_upload_bytes)
    api_key_id = key.id
    # Give the connection the auth check used back to the pool now: requests queued for the
    # inference limiter must not hold database connections (with 32 clients they exhausted
    # the pool and timed out: measured). The session checks one out again in the worker.
    session.close()
    work = partial(
        predict,
        service=service,
        session=session,
        data=data,
        settings=settings,
        api_key_id=api_key_id,
        explain=explain,
        k=k,
        method=method,
    )
    try:
        answer = await anyio.to_thread.run_sync(work, limiter=service.limiter)
    except PredictionUnavailableError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.count_prediction(label=answer.label, unknown=answer.unknown)
    return answer
