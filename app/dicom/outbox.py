"""The DICOM results outbox: no result lost, no patient data readable at rest.

Every SR and overlay to deliver is a `dicom_deliveries` row written in the same transaction that
records the received instance as predicted, so a crash or a restart never loses one. The
DICOM file is stored encrypted (Fernet, key derived from `CXR_SECRET_KEY`): it must carry the
patient and study identifiers for the PACS to file it, and those must not be readable in the
database. The payload is set to NULL as soon as the destination has acknowledged it.

A worker (`OutboxWorker`, a thread in the API process and in `cxr dicom listen`) sends due rows
by C-STORE or STOW-RS. A failure is retried with exponential back-off
(`dicom_delivery_backoff_s`, doubled, capped at `dicom_delivery_max_backoff_s`); after
`dicom_delivery_attempts` tries the row ends `failed` (its payload kept, still encrypted) and is
listed by `GET /deliveries`. Several processes may run workers on one database: a row is
claimed with a conditional UPDATE (a lease), so each attempt is made by one process only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import DicomDelivery, utcnow
from app.dicom.destination import DicomNode, parse_dicom_destination

logger = logging.getLogger(__name__)

__all__ = [
    "DeliveryError",
    "OutboxWorker",
    "configured_destination",
    "decrypt_payload",
    "deliver_due",
    "enqueue",
    "send_c_store",
    "send_stow",
]

#: How long one process owns a claimed row before another may retry it.
CLAIM_LEASE_S = 120.0
DICOM_PREFIX = "dicom:"
DICOMWEB_PREFIX = "dicomweb:"


class DeliveryError(RuntimeError):
    """The destination refused or could not be reached; the message says which and why."""


def _cipher(settings: Settings) -> Fernet:
    key = hmac.new(settings.secret_bytes, b"cxr-dicom-outbox-v1", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt_payload(data: bytes, settings: Settings) -> bytes:
    return _cipher(settings).encrypt(data)


def decrypt_payload(token: bytes, settings: Settings) -> bytes:
    """The DICOM file of an outbox row; DeliveryError when the secret changed since."""
    try:
        return _cipher(settings).decrypt(token)
    except InvalidToken as exc:
        raise DeliveryError(
            "The stored result cannot be decrypted: CXR_SECRET_KEY changed since it was queued. "
            "Restore the old secret to deliver it."
        ) from exc


def configured_destination(settings: Settings) -> str | None:
    """`dicom:AET@host:port` or `dicomweb:URL` from the settings (C-STORE wins), or None."""
    if settings.dicom_destination:
        return DICOM_PREFIX + str(parse_dicom_destination(settings.dicom_destination))
    if settings.dicomweb_url:
        return DICOMWEB_PREFIX + settings.dicomweb_url.rstrip("/")
    return None


def enqueue(
    *,
    session: Session,
    settings: Settings,
    destination: str,
    prediction_id: str,
    kind: str,
    sop_instance_uid: str,
    data: bytes,
) -> DicomDelivery:
    """Add one result to the outbox (the caller commits, with its own writes)."""
    row = DicomDelivery(
        prediction_id=prediction_id,
        kind=kind,
        sop_instance_uid=sop_instance_uid,
        destination=destination,
        payload=encrypt_payload(data, settings),
        status="pending",
        attempts=0,
        next_attempt_at=utcnow(),
        created_at=utcnow(),
    )
    session.add(row)
    return row


# -- senders ----------------------------------------------------------------------------------


def send_c_store(node: DicomNode, data: bytes, *, settings: Settings) -> None:
    """C-STORE one DICOM file to `node`; DeliveryError unless it answers success/warning."""
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title=settings.dicom_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dicom_timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"association with {node} was not established (rejected or down)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == -1:
        raise DeliveryError(f"{node} did not answer the C-STORE (timeout or aborted)")
    if code != 0 and not 0xB000 <= code <= 0xBFFF and code != 0x0107 and code != 0x0116:
        raise DeliveryError(f"{node} refused the C-STORE with status 0x{code:04X}")


def send_stow(url: str, data: bytes, *, settings: Settings) -> None:
    """STOW-RS one DICOM file to `{url}/studies`; DeliveryError unless it is stored."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    try:
        response = httpx.post(
            f"{url}/studies", content=body, headers=headers, timeout=settings.dicom_timeout_s
        )
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{url} is unreachable ({exc.__class__.__name__})") from exc
    if response.status_code not in (200, 202):
        raise DeliveryError(f"{url} answered HTTP {response.status_code} to the STOW-RS")
    try:
        answer = response.json()
    except ValueError:
        return
    if isinstance(answer, dict) and answer.get("00081198", {}).get("Value"):
        raise DeliveryError(f"{url} listed the instance in its Failed SOP Sequence")


def send(destination: str, data: bytes, *, settings: Settings) -> None:
    """Send one file to a stored destination (`dicom:...` or `dicomweb:...`)."""
    if destination.startswith(DICOM_PREFIX):
        send_c_store(
            parse_dicom_destination(destination[len(DICOM_PREFIX) :]), data, settings=settings
        )
    elif destination.startswith(DICOMWEB_PREFIX):
        send_stow(destination[len(DICOMWEB_PREFIX) :], data, settings=settings)
    else:
        raise DeliveryError(f"unknown destination {destination!r}")


# -- delivery ---------------------------------------------------------------------------------


def backoff_s(attempts: int, settings: Settings) -> float:
    """Delay before the next try after `attempts` failures (exponential, capped)."""
    delay = settings.dicom_delivery_backoff_s * (2.0 ** max(0, attempts - 1))
    return float(min(settings.dicom_delivery_max_backoff_s, delay))


def _claim(session: Session, row_id: str, now: datetime) -> bool:
    result = session.execute(
        update(DicomDelivery)
        .where(
            DicomDelivery.id == row_id,
            DicomDelivery.status == "pending",
            or_(DicomDelivery.claimed_until.is_(None), DicomDelivery.claimed_until < now),
        )
        .values(claimed_until=now + timedelta(seconds=CLAIM_LEASE_S))
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


@dataclass
class DeliveryRound:
    """What one `deliver_due` call did."""

    delivered: int = 0
    retried: int = 0
    failed: int = 0


def deliver_due(
    *,
    sessionmaker: Callable[[], Session],
    settings: Settings,
    limit: int = 50,
    sender: Callable[..., None] = send,
) -> DeliveryRound:
    """Try every pending delivery whose time has come (oldest first); one attempt each."""
    done = DeliveryRound()
    now = utcnow()
    with sessionmaker() as session:
        due = list(
            session.scalars(
                select(DicomDelivery.id)
                .where(
                    DicomDelivery.status == "pending",
                    DicomDelivery.next_attempt_at <= now,
                    or_(DicomDelivery.claimed_until.is_(None), DicomDelivery.claimed_until < now),
                )
                .order_by(DicomDelivery.created_at)
                .limit(limit)
            )
        )
    for row_id in due:
        with sessionmaker() as session:
            if not _claim(session, row_id, utcnow()):
                continue
            row = session.get(DicomDelivery, row_id)
            if row is None or row.payload is None:
                continue
            log = {"delivery_id": row.id, "prediction_id": row.prediction_id, "kind": row.kind}
            try:
                sender(row.destination, decrypt_payload(row.payload, settings), settings=settings)
            except Exception as exc:  # any sender failure is retried, never fatal
                row.attempts += 1
                row.last_error = str(exc)[:1000]
                row.claimed_until = None
                if row.attempts >= settings.dicom_delivery_attempts:
                    row.status = "failed"
                    done.failed += 1
                    logger.error(
                        "DICOM delivery failed for good",
                        extra={**log, "attempts": row.attempts, "error": row.last_error},
                    )
                else:
                    delay = backoff_s(row.attempts, settings)
                    row.next_attempt_at = utcnow() + timedelta(seconds=delay)
                    done.retried += 1
                    logger.warning(
                        "DICOM delivery will be retried",
                        extra={
                            **log,
                            "attempts": row.attempts,
                            "retry_in_s": delay,
                            "error": row.last_error,
                        },
                    )
            else:
                row.attempts += 1
                row.status = "delivered"
                row.delivered_at = utcnow()
                row.payload = None  # purge: the identifiers leave the database with delivery
                row.last_error = None
                row.claimed_until = None
                done.delivered += 1
                logger.info("DICOM result delivered", extra={**log, "attempts": row.attempts})
            session.commit()
    return done


def count_deliveries(session: Session, *, status: str | None = None) -> int:
    query = select(func.count()).select_from(DicomDelivery)
    if status is not None:
        query = query.where(DicomDelivery.status == status)
    return int(session.scalar(query) or 0)


def list_deliveries(
    *, session: Session, status: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[DicomDelivery], int]:
    """Outbox rows, newest first, and the total count (for `GET /deliveries`)."""
    query = select(DicomDelivery).order_by(DicomDelivery.created_at.desc(), DicomDelivery.id)
    if status is not None:
        query = query.where(DicomDelivery.status == status)
    rows = list(session.scalars(query.limit(limit).offset(offset)))
    return rows, count_deliveries(session, status=status)


class OutboxWorker:
    """A daemon thread that calls `deliver_due` every `dicom_delivery_poll_s` until stopped."""

    def __init__(self, *, sessionmaker: Callable[[], Session], settings: Settings) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> OutboxWorker:
        self._thread = threading.Thread(target=self._run, name="cxr-dicom-outbox", daemon=True)
        self._thread.start()
        logger.info("DICOM delivery worker started")
        return self

    def wake(self) -> None:
        """Look for due rows now (called after new results are queued)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deliver_due(sessionmaker=self.sessionmaker, settings=self.settings)
            except Exception:  # the database may be briefly down: log and keep going
                logger.exception("DICOM delivery round failed; retrying")
            self._wake.wait(self.settings.dicom_delivery_poll_s)
            self._wake.clear()
