"""`POST /references` (clinician), `GET /references` (reader), `DELETE /references/{id}` (admin).

Enrollment answers 201 even when every file was a duplicate (the spec fixes 201 for the
endpoint); `duplicate: true` on an item says it was already enrolled and nothing was stored.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)

from app.db.session import SessionDep
from app.deps import AdminKey, ClinicianKey, ReaderKey, SettingsDep, single_form_fields
from app.schemas import (
    ErrorPublic,
    ReferenceEnrolledPublic,
    ReferencePublic,
    ReferencesEnrolledPublic,
    ReferencesPublic,
)
from app.services.references import (
    SITE_SOURCE,
    ReferenceConflictError,
    ReferenceNotFoundError,
    delete_reference,
    enroll_references,
    list_references,
)
from app.services.thumbnails import (
    DEFAULT_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    ReferenceImageMissingError,
    ThumbnailCache,
    reference_thumbnail,
)
from app.serving.state import ServiceState
from training.imaging import ImageTooLargeError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/references", tags=["references"])

AUTH_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorPublic, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorPublic, "description": "The key's role is too low"},
}
UPLOAD_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorPublic, "description": "Unreadable or corrupt image"},
    413: {"model": ErrorPublic, "description": "Over the byte or pixel limit"},
    415: {"model": ErrorPublic, "description": "Not PNG, JPEG or DICOM"},
    422: {"model": ErrorPublic, "description": "Missing, repeated or invalid field"},
}
CONFLICT_ERRORS: dict[int | str, dict[str, object]] = {
    409: {
        "model": ErrorPublic,
        "description": "The image is enrolled under another label, or the label only differs "
        "from an existing class by case or look-alike characters",
    },
}
CHUNK = 1024 * 1024


def read_upload(upload: UploadFile, *, limit: int) -> bytes:
    """Read an upload chunk by chunk, refusing (413) as soon as it exceeds `limit` bytes."""
    upload.file.seek(0)
    chunks: list[bytes] = []
    size = 0
    while chunk := upload.file.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise ImageTooLargeError(
                f"A file is over the upload limit of {limit} bytes; compress or downscale it."
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _service(request: Request) -> ServiceState | None:
    """This process's prediction state, told about every change so its next prediction uses
    it without a rebuild (other processes poll `index_version`)."""
    return getattr(request.app.state, "service", None)


@router.post(
    "",
    status_code=201,
    response_model=ReferencesEnrolledPublic,
    responses={**AUTH_ERRORS, **UPLOAD_ERRORS, **CONFLICT_ERRORS},
    summary="Enroll one or more reference images under a class label",
    dependencies=[Depends(single_form_fields("label"))],
)
def create_references(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: ClinicianKey,
    file: Annotated[list[UploadFile], File(description="One or more PNG, JPEG or DICOM images")],
    label: Annotated[str, Form(description="Class label (new labels create a new class)")],
    source: Annotated[
        str,
        Form(
            max_length=64,
            description="The hospital or scanner the images come from (default: site). "
            "Retraining gives each source's classes equal weight.",
        ),
    ] = SITE_SOURCE,
) -> ReferencesEnrolledPublic:
    if len(file) > settings.max_files_per_request:
        raise HTTPException(
            status_code=413,
            detail=f"{len(file)} files in one request; send at most "
            f"{settings.max_files_per_request} per request",
        )
    files = [
        (upload.filename or "", read_upload(upload, limit=settings.max_upload_bytes))
        for upload in file
    ]
    try:
        enrolled = enroll_references(
            session=session,
            files=files,
            label=label,
            enrolled_by=key.id,
            settings=settings,
            service=_service(request),
            source=source,
        )
    except ReferenceConflictError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    return ReferencesEnrolledPublic(
        references=[ReferenceEnrolledPublic.model_validate(item) for item in enrolled]
    )


@router.get(
    "",
    response_model=ReferencesPublic,
    responses=AUTH_ERRORS,
    summary="List enrolled references (newest first)",
)
def read_references(
    session: SessionDep,
    _key: ReaderKey,
    label: Annotated[str | None, Query(max_length=64, description="Only this class")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="rows to skip")] = 0,
) -> ReferencesPublic:
    rows, count = list_references(session=session, label=label, limit=limit, offset=offset)
    return ReferencesPublic(data=[ReferencePublic.model_validate(r) for r in rows], count=count)


@router.delete(
    "/{reference_id}",
    status_code=204,
    response_class=Response,
    responses={**AUTH_ERRORS, 404: {"model": ErrorPublic, "description": "Unknown reference"}},
    summary="Delete a reference (its embeddings go with it)",
)
def remove_reference(
    request: Request,
    reference_id: str,
    session: SessionDep,
    settings: SettingsDep,
    _key: AdminKey,
) -> Response:
    try:
        delete_reference(
            session=session,
            reference_id=reference_id,
            settings=settings,
            service=_service(request),
        )
    except ReferenceNotFoundError as exc:
        raise HTTPException(
            status_code=404,
            detail=f"{exc.args[0]}; list references with GET /references",
        ) from exc
    return Response(status_code=204)


@router.get(
    "/{reference_id}/image",
    response_class=Response,
    responses={
        **AUTH_ERRORS,
        200: {"content": {"image/png": {}}, "description": "8-bit grayscale PNG, pixels only"},
        404: {"model": ErrorPublic, "description": "Unknown reference, or its file is missing"},
        422: {"model": ErrorPublic, "description": "size out of range"},
    },
    summary="A de-identified thumbnail of a reference (pixels only, longer side <= size)",
)
def read_reference_image(
    request: Request,
    reference_id: str,
    session: SessionDep,
    settings: SettingsDep,
    _key: ReaderKey,
    size: Annotated[
        int, Query(ge=MIN_SIZE, le=MAX_SIZE, description="longer side in pixels (never enlarged)")
    ] = DEFAULT_SIZE,
) -> Response:
    cache: ThumbnailCache | None = getattr(request.app.state, "thumbnail_cache", None)
    try:
        thumb = reference_thumbnail(
            session=session, reference_id=reference_id, size=size, settings=settings, cache=cache
        )
    except (ReferenceNotFoundError, ReferenceImageMissingError) as exc:
        raise HTTPException(status_code=404, detail=str(exc.args[0])) from exc
    # Content-addressed, so the browser may keep it; `private`: only the caller's cache.
    headers = {"ETag": thumb.etag, "Cache-Control": "private, max-age=86400, immutable"}
    if request.headers.get("if-none-match") == thumb.etag:
        return Response(status_code=304, headers=headers)
    return Response(content=thumb.png, media_type="image/png", headers=headers)
