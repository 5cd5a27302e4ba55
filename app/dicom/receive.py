"""Receive one DICOM instance (from C-STORE or STOW-RS): check it, predict it, queue its results.

`receive_instance` is the one function both entry points call, so both get the same checks, the
same prediction (`app.services.predict.predict`: same decoder, limits and errors as
`/predict`) and the same outbox. Its answer carries a DICOM status code the entry point turns
into a C-STORE status or a STOW-RS Failed SOP item.

- Instances that are not a frontal chest radiograph (modality other than CR/DX, a lateral view,
  another body part, no pixel data) are acknowledged and skipped with the reason logged; they
  are never predicted.
- Idempotence: the ledger `dicom_instances` keeps a keyed hash of each SOP Instance UID (the UID
  itself identifies a patient's image and is not stored); the same instance sent twice gives one
  prediction, and the second answer names it.
- Nothing of the instance is stored: its identifiers live in memory and in the encrypted outbox
  payload only. A failure leaves no ledger row behind, so a corrected resend is predicted.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import logging
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import DicomInstance, utcnow
from app.dicom.outbox import configured_destination, enqueue
from app.schemas_predict import PredictionPublic
from app.services.predict import PredictionUnavailableError, predict
from app.serving.state import ServiceState
from training.imaging import ImageError, ImageTooLargeError, UnsupportedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SUCCESS",
    "STATUS_TRANSFER_SYNTAX",
    "Outcome",
    "Received",
    "receive_instance",
    "skip_reason",
]

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110  # the service cannot predict right now: send again later
STATUS_OUT_OF_RESOURCES = 0xA700  # over the byte or pixel limit
STATUS_CANNOT_UNDERSTAND = 0xC000  # malformed, or pixels that cannot be decoded
STATUS_TRANSFER_SYNTAX = 0xC122  # compressed with a syntax this server cannot decode

CHEST_MODALITIES = frozenset({"CR", "DX"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO"})
CHEST_BODY_PARTS = frozenset({"", "CHEST", "THORAX", "LUNG", "CHEST_LAT", "TORSO", "PORTABLE"})
#: A ledger row left `processing` this long (a crash mid-prediction) may be taken over.
STALE_PROCESSING = timedelta(minutes=10)


class Outcome(enum.StrEnum):
    predicted = "predicted"
    duplicate = "duplicate"
    skipped = "skipped"
    failed = "failed"


@dataclass
class Received:
    """The answer to one instance. `sop_*` are kept in memory only (for the protocol answer)."""

    outcome: Outcome
    status: int
    reason: str | None = None
    prediction_id: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    answer: PredictionPublic | None = None
    queued: int = 0

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


def uid_hash(uid: str, settings: Settings) -> str:
    """Keyed hash of a SOP Instance UID: stable per deployment, not reversible without the
    secret, so the ledger can recognise a resend without storing the UID."""
    return hmac.new(settings.secret_bytes, f"dicom-sop:{uid}".encode(), hashlib.sha256).hexdigest()


def _parse(data: bytes) -> Any:
    """The data set (pixel data left encoded), or CorruptImage-like ValueError."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        # Touch every element now: a truncated or garbled stream fails here, not later.
        for _elem in ds.iterall():
            pass
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        raise ValueError("it has no SOP Class/Instance UID (not a DICOM instance)")
    return ds


def skip_reason(ds: Any) -> str | None:
    """Why this instance is not a frontal chest radiograph, or None when it is one."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in CHEST_MODALITIES:
        return f"modality {modality or 'missing'} is not a radiograph (CR or DX)"
    view = str(ds.get("ViewPosition", "") or "").upper().strip()
    if view in LATERAL_VIEWS:
        return f"view position {view} is a lateral view, not frontal"
    for item in ds.get("ViewCodeSequence", []) or []:
        meaning = str(item.get("CodeMeaning", "")).lower()
        if "lateral" in meaning:
            return f"view code '{meaning}' is a lateral view, not frontal"
    body = str(ds.get("BodyPartExamined", "") or "").upper().strip()
    if body not in CHEST_BODY_PARTS:
        return f"body part {body} is not the chest"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "the instance has no pixel data"
    return None


def _failure_status(exc: Exception) -> int:
    if isinstance(exc, ImageTooLargeError):
        return STATUS_OUT_OF_RESOURCES
    if isinstance(exc, UnsupportedImageError):
        return STATUS_TRANSFER_SYNTAX if "compressed" in str(exc) else STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, PredictionUnavailableError):
        return STATUS_PROCESSING_FAILURE
    return STATUS_CANNOT_UNDERSTAND


def _claim_ledger(session: Session, key: str) -> DicomInstance | None:
    """Insert the ledger row as `processing`; the existing row when it is already there (and
    not a stale `processing` row, which is taken over)."""
    existing = session.get(DicomInstance, key)
    if existing is not None:
        if existing.status == "processing" and existing.created_at < utcnow() - STALE_PROCESSING:
            existing.created_at = utcnow()
            session.commit()
            return None
        return existing
    session.add(DicomInstance(uid_hash=key, status="processing", created_at=utcnow()))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return session.get(DicomInstance, key)
    return None


def _release_ledger(session: Session, key: str) -> None:
    session.rollback()
    row = session.get(DicomInstance, key)
    if row is not None and row.status == "processing":
        session.delete(row)
        session.commit()


def receive_instance(
    *,
    service: ServiceState,
    session: Session,
    settings: Settings,
    data: bytes,
    api_key_id: int | None = None,
    via: str = "dicom",
) -> Received:
    """Check, predict and queue the results of one DICOM instance (Part 10 or raw data set).

    Never raises for bad input: the answer's `status` is the DICOM status to send back, and a
    log line says why (without identifiers).
    """
    log: dict[str, Any] = {"via": via, "bytes": len(data)}
    if len(data) > settings.max_upload_bytes:
        reason = (
            f"the instance is {len(data)} bytes, over the limit of {settings.max_upload_bytes} "
            "(CXR_MAX_UPLOAD_MB)"
        )
        logger.warning("DICOM instance refused", extra={**log, "reason": reason})
        return Received(Outcome.failed, STATUS_OUT_OF_RESOURCES, reason)
    try:
        ds = _parse(data)
    except Exception as exc:  # pydicom raises many types on damaged input
        reason = f"the DICOM data cannot be parsed ({exc.__class__.__name__}); it is malformed"
        logger.warning("DICOM instance refused", extra={**log, "reason": reason})
        return Received(Outcome.failed, STATUS_CANNOT_UNDERSTAND, reason)
    sop_class = str(ds.SOPClassUID)
    sop_instance = str(ds.SOPInstanceUID)
    key = uid_hash(sop_instance, settings)
    log["instance"] = key[:12]
    base = {"sop_class_uid": sop_class, "sop_instance_uid": sop_instance}

    existing = _claim_ledger(session, key)
    if existing is not None:
        logger.info(
            "DICOM instance already received",
            extra={**log, "status": existing.status, "prediction_id": existing.prediction_id},
        )
        outcome = Outcome.skipped if existing.status == "skipped" else Outcome.duplicate
        return Received(
            outcome,
            STATUS_SUCCESS,
            existing.reason or "already received",
            prediction_id=existing.prediction_id,
            **base,
        )

    reason = skip_reason(ds)
    if reason is not None:
        row = session.get(DicomInstance, key)
        if row is not None:
            row.status = "skipped"
            row.reason = reason
            session.commit()
        logger.info("DICOM instance skipped", extra={**log, "reason": reason})
        return Received(Outcome.skipped, STATUS_SUCCESS, reason, **base)

    try:
        answer = predict(
            service=service,
            session=session,
            data=data,
            settings=settings,
            api_key_id=api_key_id,
            explain=True,
        )
        destination = configured_destination(settings)
        results = []
        if destination is not None:
            # Imported here: highdicom costs ~100 MB of RSS and ~1 s at import (measured,
            # docs/BENCHMARKS.md); an API process that never sends results does not pay it.
            from app.dicom.sr import build_overlay, build_sr, to_bytes

            sr = build_sr(answer, source=ds)
            results.append(("sr", str(sr.SOPInstanceUID), to_bytes(sr)))
            overlay = build_overlay(answer, source=ds)
            if overlay is not None:
                results.append(("overlay", str(overlay.SOPInstanceUID), to_bytes(overlay)))
    except (ImageError, PredictionUnavailableError, ValueError) as exc:
        _release_ledger(session, key)
        status = _failure_status(exc)
        logger.warning(
            "DICOM instance not predicted",
            extra={**log, "reason": str(exc)[:300], "status": f"0x{status:04X}"},
        )
        return Received(Outcome.failed, status, str(exc), **base)
    except Exception:
        _release_ledger(session, key)
        logger.exception("DICOM instance failed unexpectedly", extra=log)
        return Received(
            Outcome.failed,
            STATUS_PROCESSING_FAILURE,
            "internal error; the operators can find it in the log",
            **base,
        )

    for kind, uid, payload in results:
        enqueue(
            session=session,
            settings=settings,
            destination=destination or "",
            prediction_id=answer.id,
            kind=kind,
            sop_instance_uid=uid,
            data=payload,
        )
    row = session.get(DicomInstance, key)
    if row is not None:
        row.status = "predicted"
        row.prediction_id = answer.id
    session.commit()
    if destination is None:
        logger.warning(
            "no DICOM destination configured (CXR_DICOM_DESTINATION or CXR_DICOMWEB_URL): the "
            "SR is only available from GET /predictions/{id}/sr",
            extra={**log, "prediction_id": answer.id},
        )
    logger.info(
        "DICOM instance predicted",
        extra={**log, "prediction_id": answer.id, "queued": len(results)},
    )
    return Received(
        Outcome.predicted,
        STATUS_SUCCESS,
        prediction_id=answer.id,
        answer=answer,
        queued=len(results),
        **base,
    )
