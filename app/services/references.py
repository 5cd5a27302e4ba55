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

No row without its file, no file without its row: every write that touches an image (enroll,
delete, reconcile) holds that image's cross-process lock (`app.services.locks`) across both of
its writes, so no interleaving of requests, threads or processes can separate them. The order
inside is chosen so a crash (kill -9) between the two writes can only leave a file without its
row: enroll writes the file before it commits the row, delete commits the row's removal before
it unlinks the file. `reconcile_references` (run at start-up) removes such orphan files, the
temp files of interrupted writes, and rows whose file vanished from outside.

Labels are normalised (Unicode NFKC, whitespace collapsed) and a label that differs from an
existing class only by case or look-alike characters (Cyrillic o, U+043E, for Latin o) is
refused naming the existing class, so `normal`, `NORMAL` and a Cyrillic-o `Normal` never become
three classes. An image is filed under one label only: enrolling it again under another answers 409.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Reference, bump_index_version, new_id, utcnow
from app.files import atomic_write_bytes
from app.services.locks import reference_locks
from app.services.uploads import decode_upload
from training.imaging import (
    CorruptImageError,
    ImageError,
    ImageFormat,
    sniff_format,
)
from training.imaging.deidentify import clean_for_storage

if TYPE_CHECKING:
    from app.serving.bundle import LoadedModel
    from app.serving.state import ServiceState
    from training.preprocess import Preprocessing

logger = logging.getLogger(__name__)

MAX_LABEL_LENGTH = 64
_EXTENSIONS = {ImageFormat.PNG: "png", ImageFormat.JPEG: "jpg", ImageFormat.DICOM: "dcm"}
#: Reference images live under data_dir/REFERENCES_DIR (content-addressed).
REFERENCES_DIR = "references"
#: Temp files of interrupted writes younger than this may belong to a live writer: kept.
STALE_TEMP_S = 3600.0


#: Non-Latin letters (and punctuation) that render like a Latin one, mapped to it for the
#: "look-alike" comparison of labels. Covers the Cyrillic and Greek homoglyphs of Unicode's
#: confusables list that reach ASCII, plus dash and quote variants NFKC leaves alone.
_LOOKALIKES = str.maketrans(
    {
        **dict.fromkeys("\u0430\u03b1", "a"),
        **dict.fromkeys("\u0432\u03b2", "b"),
        **dict.fromkeys("\u0441\u03f2", "c"),
        **dict.fromkeys("\u0501", "d"),
        **dict.fromkeys("\u0435\u03b5", "e"),
        **dict.fromkeys("\u0433", "r"),
        **dict.fromkeys("\u04bb", "h"),
        **dict.fromkeys("\u0456\u03b9\u0131", "i"),
        **dict.fromkeys("\u0458\u03f3", "j"),
        **dict.fromkeys("\u043a\u03ba", "k"),
        **dict.fromkeys("\u04cf", "l"),
        **dict.fromkeys("\u043c\u03bc", "m"),
        **dict.fromkeys("\u043f\u03b7", "n"),
        **dict.fromkeys("\u043e\u03bf\u03c3", "o"),
        **dict.fromkeys("\u0440\u03c1", "p"),
        **dict.fromkeys("\u051b", "q"),
        **dict.fromkeys("\u0455", "s"),
        **dict.fromkeys("\u0442\u03c4", "t"),
        **dict.fromkeys("\u03c5", "u"),
        **dict.fromkeys("\u03bd\u0475", "v"),
        **dict.fromkeys("\u0461\u051d\u03c9", "w"),
        **dict.fromkeys("\u0445\u03c7", "x"),
        **dict.fromkeys("\u0443\u03b3", "y"),
        **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58", "-"),
        **dict.fromkeys("\u2018\u2019\u201b\u2032", "'"),
    }
)


class InvalidLabelError(ValueError):
    """The class label is empty, too long or contains control characters."""


class ReferenceNotFoundError(LookupError):
    """No reference with that id."""


class ReferenceConflictError(ValueError):
    """The request contradicts what is enrolled (HTTP 409): a look-alike of an existing class,
    or an image that is already filed under another label."""


@dataclass(frozen=True)
class PreparedImage:
    """A validated, de-identified image ready to store.

    `tensor` is the model input `(1, S, S)` made from the same decode when a model was loaded
    at enrollment (so the image is decoded once and embedded without reading it back).
    """

    data: bytes
    sha256: str
    format: ImageFormat
    width: int
    height: int
    tensor: Any = field(default=None, repr=False, compare=False)


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


def normalize_label(label: str | None) -> str:
    """NFKC, every run of whitespace collapsed to one space, trimmed: the stored form of a label
    (so full-width, ligature and non-breaking-space variants are the same class)."""
    return " ".join(unicodedata.normalize("NFKC", label or "").split())


def label_skeleton(label: str) -> str:
    """What a label looks like, for spotting near-duplicates: normalised, case-folded, accents
    dropped and look-alike letters mapped to Latin. Two labels with one skeleton are one class."""
    folded = unicodedata.normalize("NFKD", normalize_label(label).casefold())
    plain = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return plain.translate(_LOOKALIKES)


def validate_label(label: str | None) -> str:
    """The normalised label, or InvalidLabelError saying what is wrong."""
    value = normalize_label(label)
    if not value:
        raise InvalidLabelError("label must not be empty; give the class name, e.g. 'COVID-19'")
    if len(value) > MAX_LABEL_LENGTH:
        raise InvalidLabelError(
            f"label is {len(value)} characters long; use at most {MAX_LABEL_LENGTH}"
        )
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise InvalidLabelError("label must not contain control or invisible characters")
    return value


def prepare_image(
    data: bytes, *, settings: Settings, preprocessing: Preprocessing | None = None
) -> PreparedImage:
    """Validate and clean one upload (`decode_upload`'s limits, then `clean_for_storage`: DICOM
    rebuilt from an allow-list, PNG/JPEG pixels only). Raises the `training.imaging` errors
    (400/413/415, 422 for a degenerate image or one that cannot be cleaned).

    With `preprocessing`, the decoded pixels are also turned into the model input (kept as
    `tensor`), instead of being decoded again from the stored file to embed them.
    """
    pixels = decode_upload(data, settings=settings)
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    tensor = None
    if preprocessing is not None:
        from training.preprocess import preprocess  # torch: only when a model is loaded

        tensor = preprocess(pixels, preprocessing)
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
        tensor=tensor,
    )


def _relative_path(prepared: PreparedImage) -> str:
    return (
        Path(REFERENCES_DIR)
        / prepared.sha256[:2]
        / f"{prepared.sha256}.{_EXTENSIONS[prepared.format]}"
    ).as_posix()


def _store(prepared: PreparedImage, *, settings: Settings) -> tuple[str, bool]:
    """Write the image content-addressed under data_dir (the caller holds its lock).

    Returns (path relative to data_dir, whether this call wrote it). A file already there with
    the right size is kept: the name is its sha256, so it can only hold these bytes.
    """
    rel = _relative_path(prepared)
    target = settings.data_dir / rel
    if target.is_file() and target.stat().st_size == len(prepared.data):
        return rel, False
    atomic_write_bytes(target, prepared.data)
    return rel, True


def image_lock_key(sha256: str) -> str:
    return f"image:{sha256}"


def label_lock_key(label: str) -> str:
    return f"label:{label_skeleton(label)}"


def resolve_label(session: Session, label: str) -> str | None:
    """The existing class that `label` (already normalised) looks like, or None.

    Exact match first; else the class with the same skeleton (case or look-alike variant).
    """
    skeleton = label_skeleton(label)
    existing = session.execute(select(Reference.label).distinct()).scalars().all()
    if label in existing:
        return label
    matches = sorted(e for e in existing if label_skeleton(e) == skeleton)
    return matches[0] if matches else None


def _check_label(session: Session, label: str) -> None:
    existing = resolve_label(session, label)
    if existing is not None and existing != label:
        raise ReferenceConflictError(
            f"label {label!r} differs from the existing class {existing!r} only by case or "
            f"look-alike characters; enroll under {existing!r} (or delete that class's "
            "references first if it is misspelled)"
        )


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
    written: list[Path],
    skip_conflicts: bool = False,
    source: str | None = None,
) -> list[EnrolledReference]:
    """Store files, then add rows (flushed, not committed). The caller holds the images' and
    the label's locks. Paths of files this call created are appended to `written` so the caller
    can remove them if the transaction fails.

    An image already enrolled under `label` is a duplicate (its file is restored if something
    removed it); under another label it is a `ReferenceConflictError`.
    """
    _check_label(session, label)
    shas = {p.sha256 for p in prepared}
    existing = {
        row.sha256: row
        for row in session.execute(select(Reference).where(Reference.sha256.in_(shas))).scalars()
    }
    conflicts = [row for row in existing.values() if row.label != label]
    if conflicts and skip_conflicts:
        skipped = {row.sha256 for row in conflicts}
        prepared = [p for p in prepared if p.sha256 not in skipped]
    elif conflicts:
        row = conflicts[0]
        raise ReferenceConflictError(
            f"{len(conflicts)} image(s) are already enrolled under another label (e.g. reference "
            f"{row.id} as {row.label!r}); an image is filed under one class only. To relabel "
            f"it, DELETE /references/{row.id} first, then enroll it under {label!r}."
        )
    results: list[EnrolledReference] = []
    for item in prepared:
        row = existing.get(item.sha256)
        rel, wrote = _store(item, settings=settings)
        if wrote:
            written.append(settings.data_dir / rel)
        if row is not None:
            if wrote:
                logger.warning(
                    "restored the missing file of an enrolled reference",
                    extra={"reference_id": row.id, "sha256": item.sha256[:12]},
                )
            results.append(_to_result(row, duplicate=True))
            continue
        row = Reference(
            id=new_id(),
            label=label,
            sha256=item.sha256,
            image_path=rel,
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


def _enroll_locked(
    *,
    session: Session,
    groups: dict[str, list[PreparedImage]],
    enrolled_by: int | None,
    settings: Settings,
    skip_conflicts: bool = False,
    source: str | None = None,
) -> tuple[list[EnrolledReference], int | None]:
    """Enroll label -> images in one transaction under their locks; all or nothing.

    Returns the results and the new index_version (None when everything was a duplicate).
    `skip_conflicts` leaves out images enrolled under another label instead of refusing all.
    """
    # End any read transaction the caller's session holds (the auth lookup): we must not wait
    # for a lock inside a transaction, and must read what the previous lock holder committed.
    session.commit()
    keys = [label_lock_key(label) for label in groups]
    keys += [image_lock_key(p.sha256) for items in groups.values() for p in items]
    written: list[Path] = []
    with reference_locks(session, settings, keys):
        try:
            results: list[EnrolledReference] = []
            for label, items in groups.items():
                results += _insert_prepared(
                    session=session,
                    prepared=items,
                    label=label,
                    enrolled_by=enrolled_by,
                    settings=settings,
                    written=written,
                    skip_conflicts=skip_conflicts,
                    source=source,
                )
            version = bump_index_version(session) if any(not r.duplicate for r in results) else None
            session.commit()
        except BaseException:
            session.rollback()
            for path in written:  # still under the lock: nobody else can have claimed them
                if not _path_in_use(session, path, settings=settings):
                    path.unlink(missing_ok=True)
            raise
    return results, version


def _path_in_use(session: Session, path: Path, *, settings: Settings) -> bool:
    rel = path.relative_to(settings.data_dir).as_posix()
    count = session.execute(
        select(func.count()).select_from(Reference).where(Reference.image_path == rel)
    ).scalar_one()
    session.rollback()
    return bool(count)


def enroll_references(
    *,
    session: Session,
    files: Sequence[tuple[str, bytes]],
    label: str,
    enrolled_by: int | None,
    settings: Settings,
    service: ServiceState | None = None,
    source: str = SITE_SOURCE,
) -> list[EnrolledReference]:
    """Enroll uploaded files under `label`; all or nothing, committed, index_version bumped.

    `source` names the hospital the images come from (default `site`: this deployment's own);
    retraining balances label x source, so a site's few images count as much as a vendor's
    thousands.

    With `service` (this process's prediction state), the new references are embedded from
    the decode already done, their embeddings stored, and the service's index moved forward
    by exactly them (`ServiceState.on_references_changed`), so the next prediction neither
    rebuilds the index nor reads an image back.

    Every file is validated before anything is written, so one bad file refuses the whole
    request (its error names the file's position, never its name). Enrolling bytes that are
    already enrolled under `label` returns the existing reference with `duplicate=True`; under
    another label, or with a label that only looks like an existing class, raises
    `ReferenceConflictError` (409).
    """
    label = validate_label(label)
    source = validate_source(source)
    if not files:
        raise InvalidLabelError("no file given; send one or more images as multipart 'file'")
    model = service.enrollment_model() if service is not None else None
    preprocessing = model.preprocessing if model is not None else None
    prepared: list[PreparedImage] = []
    for position, (_filename, data) in enumerate(files, start=1):
        try:
            prepared.append(prepare_image(data, settings=settings, preprocessing=preprocessing))
        except ImageError as exc:
            if len(files) == 1:
                raise
            raise type(exc)(f"file {position} of {len(files)}: {exc}") from exc
    unique = list({p.sha256: p for p in prepared}.values())
    results, version = _enroll_locked(
        session=session,
        groups={label: unique},
        enrolled_by=enrolled_by,
        settings=settings,
        source=source,
    )
    if service is not None and version is not None:
        _announce_enrollment(
            session=session,
            service=service,
            model=model,
            results=results,
            prepared=unique,
            version=version,
        )
    by_sha = {r.sha256: r for r in results}
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
    answers: list[EnrolledReference] = []
    seen: set[str] = set()
    for item in prepared:  # the same bytes twice in one request: the second is a duplicate
        result = by_sha[item.sha256]
        answers.append(replace(result, duplicate=True) if item.sha256 in seen else result)
        seen.add(item.sha256)
    return answers


def _announce_enrollment(
    *,
    session: Session,
    service: ServiceState,
    model: LoadedModel | None,
    results: Sequence[EnrolledReference],
    prepared: Sequence[PreparedImage],
    version: int,
) -> None:
    """Embed the new references with `model`, store the vectors, and tell the service.

    The enrollment is committed already: a failure here is logged, never raised (the service
    falls back to a refresh from the database, which embeds what is missing).
    """
    from app.serving.embeddings import store_embeddings
    from app.serving.state import ReferencesChange

    change = None
    try:
        new = [r for r in results if not r.duplicate]
        tensors = {p.sha256: p.tensor for p in prepared}
        if model is not None and new and all(tensors[r.sha256] is not None for r in new):
            import torch

            batch = torch.stack([tensors[r.sha256] for r in new])
            vectors = model.embed(batch)
            store_embeddings(
                session, model.version, {r.id: v for r, v in zip(new, vectors, strict=True)}
            )
            change = ReferencesChange(
                index_version=version,
                model_version=model.version,
                added=tuple((r.id, r.label, v) for r, v in zip(new, vectors, strict=True)),
            )
    except Exception:
        logger.exception("could not embed new references at enrollment; the service refreshes")
    _notify(session, service, change)


def _notify(session: Session, service: ServiceState, change: Any) -> None:
    """Tell the service about a committed change; failures are logged, not raised (the change
    is committed and the next prediction refreshes anyway)."""
    try:
        service.on_references_changed(session, change=change)
    except Exception:
        logger.exception("on_references_changed failed; the next prediction will refresh")


def list_references(
    *, session: Session, label: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[Reference], int]:
    """A page of references (newest first) and the total count matching `label`.

    `label` is normalised like an enrolled label and resolved to the class it looks like, so
    `?label=normal` lists the class `Normal`.
    """
    query = select(Reference)
    count_query = select(func.count()).select_from(Reference)
    if label is not None:
        wanted = normalize_label(label)
        wanted = resolve_label(session, wanted) or wanted
        query = query.where(Reference.label == wanted)
        count_query = count_query.where(Reference.label == wanted)
    rows = session.execute(
        query.order_by(Reference.created_at.desc(), Reference.id).limit(limit).offset(offset)
    ).scalars()
    return list(rows), int(session.execute(count_query).scalar_one())


def delete_reference(
    *,
    session: Session,
    reference_id: str,
    settings: Settings,
    service: ServiceState | None = None,
) -> int:
    """Delete a reference (its embeddings cascade) and then its file, under the image's lock.

    The row's removal is committed before the file is unlinked: a crash in between leaves only a
    file without a row (removed by `reconcile_references`), never a row without its file.
    Returns the new index_version. Raises ReferenceNotFoundError.
    """
    row = session.get(Reference, reference_id)
    if row is None:
        raise ReferenceNotFoundError(f"no reference with id {reference_id!r}")
    sha256 = row.sha256
    session.commit()  # no transaction open while we wait for the lock
    with reference_locks(session, settings, [image_lock_key(sha256)]):
        row = session.get(Reference, reference_id)
        if row is None:  # deleted by a concurrent request while we waited
            session.rollback()
            raise ReferenceNotFoundError(f"no reference with id {reference_id!r}")
        image_path = row.image_path
        session.execute(delete(Reference).where(Reference.id == reference_id))
        version = bump_index_version(session)
        session.commit()
        session.expunge_all()
        _remove_file(settings.data_dir / image_path, reference_id=reference_id)
    logger.info("reference deleted", extra={"reference_id": reference_id})
    if service is not None:
        from app.serving.state import ReferencesChange

        _notify(session, service, ReferencesChange(index_version=version, removed=(reference_id,)))
    return version


def _remove_file(path: Path, *, reference_id: str | None = None) -> None:
    """Unlink a reference image whose row is gone (the caller holds the image's lock)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.warning("could not remove reference image", extra={"reference_id": reference_id})


@dataclass
class ReconcileReport:
    """What `reconcile_references` repaired."""

    orphan_files: int = 0
    temp_files: int = 0
    missing_files: int = 0
    rows_removed: int = 0


def reconcile_references(*, session: Session, settings: Settings) -> ReconcileReport:
    """Bring rows and files back into one-to-one correspondence (run at start-up).

    - a file under `references/` with no row (a crash between the file write and the commit of
      an enrollment, or between the commit and the unlink of a deletion) is removed;
    - a temp file of an interrupted write older than `STALE_TEMP_S` is removed;
    - a row whose file is missing (removed from outside) is deleted with its embeddings and
      index_version bumped; unless *every* row's file is missing, which means `CXR_DATA_DIR`
      points at the wrong directory: then nothing is deleted and an error is logged.

    Each decision is re-checked under the image's lock, so it is safe while other processes
    enroll and delete.
    """
    report = ReconcileReport()
    root = settings.data_dir / REFERENCES_DIR
    rows = {
        path: (ref_id, sha)
        for ref_id, sha, path in session.execute(
            select(Reference.id, Reference.sha256, Reference.image_path)
        ).all()
    }
    session.rollback()
    now = time.time()
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            if path.name.startswith(".") and path.name.endswith(".part"):
                if now - path.stat().st_mtime > STALE_TEMP_S:
                    path.unlink(missing_ok=True)
                    report.temp_files += 1
                continue
            rel = path.relative_to(settings.data_dir).as_posix()
            if rel in rows:
                continue
            with reference_locks(session, settings, [image_lock_key(path.stem)]):
                if not _path_in_use(session, path, settings=settings):
                    path.unlink(missing_ok=True)
                    report.orphan_files += 1
    missing = {p: v for p, v in rows.items() if not (settings.data_dir / p).is_file()}
    report.missing_files = len(missing)
    if missing and len(missing) == len(rows):
        logger.error(
            "no reference image file exists under the data directory; is CXR_DATA_DIR right? "
            "References were left untouched",
            extra={"references": len(rows), "data_dir": str(settings.data_dir)},
        )
        return report
    for rel, (ref_id, sha) in missing.items():
        with reference_locks(session, settings, [image_lock_key(sha)]):
            if (settings.data_dir / rel).is_file():
                continue
            removed = session.execute(delete(Reference).where(Reference.id == ref_id)).rowcount
            if removed:
                bump_index_version(session)
                report.rows_removed += 1
            session.commit()
        logger.warning(
            "removed a reference whose image file is missing; enroll the image again",
            extra={"reference_id": ref_id, "sha256": sha[:12]},
        )
    if report.orphan_files or report.temp_files or report.rows_removed:
        logger.warning(
            "reconciled reference rows and files",
            extra={
                "orphan_files": report.orphan_files,
                "temp_files": report.temp_files,
                "rows_removed": report.rows_removed,
            },
        )
    return report


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
        if not pending:
            return
        for label in list(pending):
            try:
                results, _version = _enroll_locked(
                    session=session,
                    groups={label: pending[label]},
                    enrolled_by=enrolled_by,
                    settings=settings,
                    skip_conflicts=True,
                    source=name,
                )
            except ReferenceConflictError as exc:  # the label looks like an existing class
                report.skipped += len(pending[label])
                logger.warning("skipped images of the import", extra={"error": str(exc)[:300]})
                continue
            report.skipped += len(pending[label]) - len(results)
            for r in results:
                if r.duplicate:
                    report.duplicates += 1
                else:
                    report.enrolled += 1
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


def reconcile_at_startup(*, sessionmaker: Callable[[], Session], settings: Settings) -> None:
    """`reconcile_references` for the API's start-up: failures are logged, never fatal (the
    service still starts; the next start retries)."""
    try:
        with sessionmaker() as session:
            reconcile_references(session=session, settings=settings)
    except Exception:
        logger.exception("could not reconcile reference rows and files at start-up")
