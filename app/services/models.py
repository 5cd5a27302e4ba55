"""Model versions: register a checkpoint, activate one, list them.

`register_model` is how every checkpoint enters the service (the `cxr models add` command, the
retraining job): it checks that the file really is a loadable encoder checkpoint *before*
anything is recorded, copies it atomically into `data_dir/models/<version>.pt` (so the registry
never depends on a file the user may later move or overwrite), and records its sha256, which the
serving side verifies before loading.

`activate_model` is the single place where the active model changes (promotion, rollback, hot
swap after retraining). It makes exactly one model active and bumps `index_version` in the same
transaction, so every API process reloads at its next request.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Model, set_active_model, utcnow
from app.files import atomic_copy, file_sha256, resolve_data_path
from training.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "InvalidCheckpointError",
    "ModelFileMissingError",
    "ModelNotFoundError",
    "activate_model",
    "get_model",
    "list_models",
    "make_version",
    "register_model",
]

SOURCES = ("cli", "retrain", "api", "test", "bench")


class ModelNotFoundError(LookupError):
    """No model with that version (HTTP 404)."""


class InvalidCheckpointError(ValueError):
    """The file is not a loadable encoder checkpoint."""


class ModelFileMissingError(RuntimeError):
    """The model's stored checkpoint is gone or altered; it cannot be activated (HTTP 409)."""


def make_version(sha256: str, *, now: datetime | None = None) -> str:
    """`m-YYYYmmdd-HHMMSS-<sha8>`: sorts by time, and two files never share a version."""
    now = now or datetime.now(UTC)
    return f"m-{now:%Y%m%d-%H%M%S}-{sha256[:8]}"


def register_model(
    *,
    session: Session,
    checkpoint: Path,
    settings: Settings,
    activate: bool = False,
    source: str = "cli",
    metrics: dict[str, Any] | None = None,
) -> Model:
    """Register `checkpoint` as a new model version (committed) and return its row.

    The same file registered twice returns the existing version (idempotent; it is activated if
    asked). `metrics` default to those stored in the checkpoint. Raises `FileNotFoundError`
    or `InvalidCheckpointError` with a message saying what to do.
    """
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} does not exist; give the encoder.pt written by `cxr train`"
        )
    try:
        loaded = load_checkpoint(checkpoint, map_location="cpu")
    except Exception as exc:  # any reason it cannot be served is a bad checkpoint
        raise InvalidCheckpointError(str(exc)) from exc
    digest = file_sha256(checkpoint)
    existing = session.execute(select(Model).where(Model.sha256 == digest)).scalars().first()
    if existing is not None and resolve_data_path(existing.file_path, settings).is_file():
        logger.info("checkpoint already registered", extra={"model_version": existing.version})
        if activate and not existing.active:
            return activate_model(session=session, version=existing.version, settings=settings)
        return existing

    version = make_version(digest)
    rel = Path("models") / f"{version}.pt"
    atomic_copy(checkpoint, settings.data_dir / rel)
    stored = file_sha256(settings.data_dir / rel)
    if stored != digest:  # the source changed while we copied it
        (settings.data_dir / rel).unlink(missing_ok=True)
        raise InvalidCheckpointError(
            f"{checkpoint} changed while it was being copied; wait until it is fully written"
        )
    config = dict(loaded.config or {})
    config.setdefault("encoder_kwargs", dict(loaded.encoder_kwargs or {}))
    config.setdefault("preprocessing", loaded.preprocessing.to_dict())
    config.setdefault("classes", list(loaded.classes or []))
    row = Model(
        version=version,
        file_path=rel.as_posix(),
        sha256=digest,
        encoder_name=loaded.encoder_name,
        embedding_dim=int(loaded.embedding_dim),
        metrics=dict(metrics if metrics is not None else loaded.metrics or {}),
        config=config,
        active=False,
        source=source[:16],
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    logger.info(
        "model registered",
        extra={"model_version": version, "encoder": loaded.encoder_name, "source": source},
    )
    if activate:
        return activate_model(session=session, version=version, settings=settings)
    return row


def get_model(*, session: Session, version: str) -> Model:
    """The model row, or `ModelNotFoundError` naming where to look for valid versions."""
    row = session.get(Model, version)
    if row is None:
        raise ModelNotFoundError(
            f"unknown model version {version!r}; list the registered ones with GET /models"
        )
    return row


def activate_model(*, session: Session, version: str, settings: Settings | None = None) -> Model:
    """Make `version` the only active model and bump `index_version` (committed).

    Every API process serves it from its next request on. Re-activating the active model is a
    no-op. With `settings`, the stored checkpoint is verified first (present, same sha256), so a
    model whose file is gone cannot be activated and take the service down.
    """
    row = get_model(session=session, version=version)
    if row.active:
        return row
    if settings is not None:
        path = resolve_data_path(row.file_path, settings)
        if not path.is_file() or file_sha256(path) != row.sha256:
            raise ModelFileMissingError(
                f"model {version}: its checkpoint {path} is missing or altered, so it cannot be "
                "served; register the checkpoint again with `cxr models add CKPT`"
            )
    previous = session.execute(
        select(Model.version).where(Model.active.is_(True))
    ).scalar_one_or_none()
    for attempt in (1, 2):
        try:
            index_version = set_active_model(session, version)
            session.commit()
            break
        except IntegrityError:
            # A concurrent activation won the single-active unique index: redo ours after it.
            session.rollback()
            if attempt == 2:
                raise
    session.refresh(row)
    logger.info(
        "model activated",
        extra={"model_version": version, "previous": previous, "index_version": index_version},
    )
    return row


def list_models(*, session: Session) -> list[Model]:
    """All registered models, newest first."""
    return list(
        session.execute(select(Model).order_by(Model.created_at.desc(), Model.version.desc()))
        .scalars()
        .all()
    )
