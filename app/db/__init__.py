"""Database layer: ORM models, engine/session factories, and the shared `index_version` counter.

`bump_index_version` / `get_index_version` are how API processes learn that references or the
active model changed: every writer bumps the counter in the same transaction as its change, every
reader compares it with the version it has loaded.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app.db.models import (
    ApiKey,
    Base,
    Embedding,
    Job,
    Model,
    Prediction,
    Reference,
    ServiceStateRow,
    new_id,
    utcnow,
)
from app.db.session import SessionDep, create_db_engine, create_sessionmaker, get_session

__all__ = [
    "ApiKey",
    "Base",
    "Embedding",
    "Job",
    "Model",
    "Prediction",
    "Reference",
    "ServiceStateRow",
    "SessionDep",
    "bump_index_version",
    "create_db_engine",
    "create_sessionmaker",
    "get_active_model",
    "get_index_version",
    "get_session",
    "insert_embeddings_ignoring_duplicates",
    "new_id",
    "set_active_model",
    "utcnow",
]

SERVICE_STATE_ID = 1


def bump_index_version(session: Session) -> int:
    """Atomically increment `service_state.index_version` and return the new value.

    A single `UPDATE ... SET index_version = index_version + 1 RETURNING` so concurrent writers
    (several API processes, a worker, the CLI) never lose an increment. Runs inside the caller's
    transaction: commit it together with the change it announces. The row is created by the
    initial migration; it is re-created here if someone emptied the table.
    """
    stmt = (
        update(ServiceStateRow)
        .where(ServiceStateRow.id == SERVICE_STATE_ID)
        .values(index_version=ServiceStateRow.index_version + 1, updated_at=utcnow())
        .returning(ServiceStateRow.index_version)
    )
    version = session.execute(stmt).scalar_one_or_none()
    if version is None:
        session.add(ServiceStateRow(id=SERVICE_STATE_ID, index_version=1, updated_at=utcnow()))
        session.flush()
        version = 1
    return int(version)


def get_index_version(session: Session) -> int:
    """The current `index_version` (0 when nothing was ever enrolled)."""
    version = session.execute(
        select(ServiceStateRow.index_version).where(ServiceStateRow.id == SERVICE_STATE_ID)
    ).scalar_one_or_none()
    return int(version or 0)


def get_active_model(session: Session) -> Model | None:
    """The active model row, or None when no model was activated yet."""
    return session.execute(select(Model).where(Model.active.is_(True))).scalar_one_or_none()


def set_active_model(session: Session, version: str) -> int:
    """Make `version` the only active model and bump `index_version`; returns the new version.

    Two statements (clear, then set) because PostgreSQL checks the partial unique index on
    `active` row by row. The caller commits. Raises `LookupError` for an unknown version.
    """
    if session.get(Model, version) is None:
        raise LookupError(f"unknown model version {version!r}")
    session.execute(
        update(Model).where(Model.active.is_(True), Model.version != version).values(active=False)
    )
    session.execute(update(Model).where(Model.version == version).values(active=True))
    session.expire_all()
    return bump_index_version(session)


def insert_embeddings_ignoring_duplicates(session: Session) -> Any:
    """`INSERT INTO embeddings ... ON CONFLICT DO NOTHING` on SQLite and PostgreSQL.

    Serving processes and retrain jobs may embed the same reference for the same model at once;
    the second writer's row is skipped instead of failing the whole batch. Other backends get a
    plain INSERT.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(Embedding).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(Embedding).on_conflict_do_nothing()
    return insert(Embedding)
