"""Reference images: enrollment (upload and bulk import), listing, deletion, classes.

Ingest order matters for privacy and safety: the bytes are checked against the size limit,
decoded once under the upload limits (`app.services.uploads.decode_upload`: size and shape from
the header, a decode slot, the pixel and memory budgets), cleaned (`clean_for_storage`: DICOM
rebuilt from an allow-list, PNG/JPEG reduced to their pixels), and only then hashed and written.
The stored file, its sha256 and its database row therefore never contain patient identifiers,
and logs only ever carry the sha256 prefix, never file names (which often hold patient names in
hospital exports).

Images are content-addressed: `references/<sha[:2]>/<sha>.<ext>` under `data_dir`, written to a
temp file and renamed, so a crash never leaves a half-written image under a valid name and the
same image enrolled twice is stored once (and reported as `duplicate`).

Every change bumps `service_state.index_version` in the same transaction, so other API processes
see the references and the new version together.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Reference, bump_index_version, new_id, utcnow
from app.files import atomic_write_bytes
from app.services.uploads import decode_upload
from training.deidentify import clean_for_storage
from training.imaging import (
    CorruptImageError,
    ImageError,
    ImageFormat,
    sniff_format,
)

logger = logging.getLogger(__name__)

MAX_LABEL_LENGTH = 64
_EXTENSIONS = {ImageFormat.PNG: "png", ImageFormat.JPEG: "jpg", ImageFormat.DICOM: "dcm"}


class InvalidLabelError(ValueError):
    """The class label is empty, too long or contains control characters."""


class ReferenceNotFoundError(LookupError):
    """No reference with that id."""


@dataclass(frozen=True)
class PreparedImage:
    """A validated, de-identified image ready to store."""

    data: bytes
    sha256: str
    format: ImageFormat
    width: int
    height: int


@dataclass(frozen=True)
class EnrolledReference:
    """Result of enrolling one file; `duplicate` when the bytes were already enrolled."""

    id: str
    label: str
    sha256: str
    created_at: datetime
    duplicate: bool
    width: int
    height: int
    source_format: str


@dataclass(frozen=True)
class ClassCount:
    label: str
    count: int


@dataclass
class ImportReport:
    """Counts of a bulk import (`cxr references import`)."""

    total: int = 0
    enrolled: int = 0
    duplicates: int = 0
    skipped: int = 0


def validate_label(label: str | None) -> str:
    """Trimmed label, or InvalidLabelError saying what is wrong. Any new label is a new class."""
    value = unicodedata.normalize("NFC", (label or "").strip())
    if not value:
        raise InvalidLabelError("label must not be empty; give the class name, e.g. 'COVID-19'")
    if len(value) > MAX_LABEL_LENGTH:
        raise InvalidLabelError(
            f"label is {len(value)} characters long; use at most {MAX_LABEL_LENGTH}"
        )
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise InvalidLabelError("label must not contain control or invisible characters")
    return value


def prepare_image(data: bytes, *, settings: Settings) -> PreparedImage:
    """Validate and clean one upload (`decode_upload`'s limits, then `clean_for_storage`: DICOM
    rebuilt from an allow-list, PNG/JPEG pixels only). Raises the `training.imaging` errors
    (400/413/415, 422 for a degenerate image or one that cannot be cleaned)."""
    pixels = decode_upload(data, settings=settings)
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    del pixels
    fmt = sniff_format(data)
    if fmt is None:  # decode_image accepted it, so this cannot happen; keep mypy and us honest
        raise CorruptImageError("The image format could not be identified.")
    data = clean_for_storage(data)
    return PreparedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        width=width,
        height=height,
    )


def _store(prepared: PreparedImage, *, settings: Settings) -> str:
    """Write the image content-addressed under data_dir; returns the path relative to it."""
    rel = (
        Path("references")
        / prepared.sha256[:2]
        / f"{prepared.sha256}.{_EXTENSIONS[prepared.format]}"
    )
    target = settings.data_dir / rel
    if target.is_file() and target.stat().st_size == len(prepared.data):
        return rel.as_posix()
    atomic_write_bytes(target, prepared.data)
    return rel.as_posix()


def _to_result(row: Reference, *, duplicate: bool) -> EnrolledReference:
    return EnrolledReference(
        id=row.id,
        label=row.label,
        sha256=row.sha256,
        created_at=row.created_at,
        duplicate=duplicate,
        width=row.width,
        height=row.height,
        source_format=row.source_format,
    )


SITE_SOURCE = "site"
_SOURCE_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")


def validate_source(source: str) -> str:
    """A source name: 1-64 letters, digits, space, dot, dash or underscore (it is logged and
    shown to admins, so nothing that could carry markup or a patient's name in free text)."""
    text = (source or "").strip()
    if not _SOURCE_CHARS.match(text):
        raise InvalidLabelError(
            "source must be 1-64 characters of letters, digits, space, '.', '-' or '_' and "
            f"start with a letter or digit (got {text[:70]!r})"
        )
    return text


def _insert_prepared(
    *,
    session: Session,
    prepared: Sequence[PreparedImage],
    label: str,
    enrolled_by: int | None,
    settings: Settings,
    source: str | None = None,
) -> list[EnrolledReference]:
    """Store files and add rows (flushed, not committed); duplicates resolved against the DB."""
    shas = {p.sha256 for p in prepared}
    existing = {
        row.sha256: row
        for row in session.execute(select(Reference).where(Reference.sha256.in_(shas))).scalars()
    }
    results: list[EnrolledReference] = []
    for item in prepared:
        row = existing.get(item.sha256)
        if row is not None:
            if row.label != label:
                logger.warning(
                    "duplicate image enrolled under another label; keeping the first",
                    extra={"sha256": item.sha256[:12], "existing_label": row.label, "label": label},
                )
            results.append(_to_result(row, duplicate=True))
            continue
        row = Reference(
            id=new_id(),
            label=label,
            sha256=item.sha256,
            image_path=_store(item, settings=settings),
            width=item.width,
            height=item.height,
            source_format=item.format.value,
            enrolled_by=enrolled_by,
            source=source,
            created_at=utcnow(),
        )
        session.add(row)
        existing[item.sha256] = row
        results.append(_to_result(row, duplicate=False))
    session.flush()
    return results


def enroll_references(
    *,
    session: Session,
    files: Sequence[tuple[str, bytes]],
    label: str,
    enrolled_by: int | None,
    settings: Settings,
    source: str = SITE_SOURCE,
) -> list[EnrolledReference]:
    """Enroll uploaded files under `label`; all or nothing, committed, index_version bumped.

    `source` names the hospital the images come from (default `site`: this deployment's own);
    retraining balances label x source, so a site's few images count as much as a vendor's
    thousands.

    Every file is validated before anything is written, so one bad file refuses the whole
    request (its error names the file's position, never its name). Enrolling bytes that are
    already enrolled returns the existing reference with `duplicate=True` (its original label).
    """
    label = validate_label(label)
    if not files:
        raise InvalidLabelError("no file given; send one or more images as multipart 'file'")
    prepared: list[PreparedImage] = []
    for position, (_filename, data) in enumerate(files, start=1):
        try:
            prepared.append(prepare_image(data, settings=settings))
        except ImageError as exc:
            if len(files) == 1:
                raise
            raise type(exc)(f"file {position} of {len(files)}: {exc}") from exc
    for attempt in (1, 2):
        try:
            results = _insert_prepared(
                session=session,
                prepared=prepared,
                label=label,
                enrolled_by=enrolled_by,
                settings=settings,
                source=validate_source(source),
            )
            if any(not r.duplicate for r in results):
                bump_index_version(session)
            session.commit()
            break
        except IntegrityError:
            # Another process enrolled the same bytes between our lookup and commit: retry once,
            # the second pass finds them as duplicates.
            session.rollback()
            if attempt == 2:
                raise
    for r in results:
        logger.info(
            "reference enrolled",
            extra={
                "reference_id": r.id,
                "sha256": r.sha256[:12],
                "label": r.label,
                "duplicate": r.duplicate,
            },
        )
    return results


def list_references(
    *, session: Session, label: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[Reference], int]:
    """A page of references (newest first) and the total count matching `label`."""
    query = select(Reference)
    count_query = select(func.count()).select_from(Reference)
    if label is not None:
        query = query.where(Reference.label == label)
        count_query = count_query.where(Reference.label == label)
    rows = session.execute(
        query.order_by(Reference.created_at.desc(), Reference.id).limit(limit).offset(offset)
    ).scalars()
    return list(rows), int(session.execute(count_query).scalar_one())


def delete_reference(*, session: Session, reference_id: str, settings: Settings) -> None:
    """Delete a reference (its embeddings cascade), bump index_version, then remove its file
    when no other reference points at it. Raises ReferenceNotFoundError."""
    row = session.get(Reference, reference_id)
    if row is None:
        raise ReferenceNotFoundError(f"no reference with id {reference_id!r}")
    image_path = row.image_path
    session.execute(delete(Reference).where(Reference.id == reference_id))
    bump_index_version(session)
    session.commit()
    session.expunge_all()
    still_used = session.execute(
        select(func.count()).select_from(Reference).where(Reference.image_path == image_path)
    ).scalar_one()
    if not still_used:
        try:
            (settings.data_dir / image_path).unlink(missing_ok=True)
        except OSError:
            logger.warning("could not remove reference image", extra={"reference_id": reference_id})
    logger.info("reference deleted", extra={"reference_id": reference_id})


def list_classes(*, session: Session) -> list[ClassCount]:
    """Enrolled classes and their reference counts, by label."""
    rows = session.execute(
        select(Reference.label, func.count()).group_by(Reference.label).order_by(Reference.label)
    ).all()
    return [ClassCount(label=label, count=int(count)) for label, count in rows]


def import_references(
    *,
    session: Session,
    source: Path,
    settings: Settings,
    progress: Callable[[int, int], None] | None = None,
    enrolled_by: int | None = None,
    batch_size: int = 64,
    source_name: str | None = None,
) -> ImportReport:
    """Enroll every labeled image of `source` (any source `training.data.load_source` reads).

    Unreadable or invalid files are skipped and counted (never fatal: a bootstrap import of
    thousands of files should not stop at one bad export); already-enrolled images count as
    duplicates. Commits in batches; bumps index_version once per batch that added references.
    `progress(done, total)` is called after each file.
    """
    # heavy import (torch); only the import needs it
    from training.data import load_source
    from training.data import source_name as default_source_name

    name = validate_source(source_name or default_source_name(source))
    samples = load_source(Path(source), name=name)
    report = ImportReport(total=len(samples))
    pending: dict[str, list[PreparedImage]] = {}
    pending_count = 0

    def flush() -> None:
        nonlocal pending_count
        added = False
        for label, items in pending.items():
            for r in _insert_prepared(
                session=session,
                prepared=items,
                label=label,
                enrolled_by=enrolled_by,
                settings=settings,
                source=name,
            ):
                if r.duplicate:
                    report.duplicates += 1
                else:
                    report.enrolled += 1
                    added = True
        if added:
            bump_index_version(session)
        session.commit()
        pending.clear()
        pending_count = 0

    seen: set[str] = set()
    for done, sample in enumerate(samples, start=1):
        try:
            label = validate_label(sample.label)
            prepared = prepare_image(Path(sample.path).read_bytes(), settings=settings)
        except (ImageError, InvalidLabelError, OSError) as exc:
            report.skipped += 1
            logger.debug("skipped unreadable file", extra={"error": str(exc)[:200]})
        else:
            if prepared.sha256 in seen:
                report.duplicates += 1
            else:
                seen.add(prepared.sha256)
                pending.setdefault(label, []).append(prepared)
                pending_count += 1
                if pending_count >= batch_size:
                    flush()
        if progress is not None:
            progress(done, report.total)
    flush()
    logger.info(
        "references imported",
        extra={
            "total": report.total,
            "enrolled": report.enrolled,
            "duplicates": report.duplicates,
            "skipped": report.skipped,
        },
    )
    return report
