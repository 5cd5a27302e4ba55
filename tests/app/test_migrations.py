"""Alembic is the only schema changer: up, down and up again on SQLite and PostgreSQL, and the
ORM models match what the migrations build (autogenerate finds nothing to do)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from alembic import command
from app.db import Base, bump_index_version, create_db_engine, get_index_version
from app.db.migrate import (
    alembic_config,
    current_revision,
    find_script_location,
    head_revision,
    upgrade_to_head,
)

TABLES = {
    "api_keys",
    "references",
    "embeddings",
    "models",
    "jobs",
    "predictions",
    "service_state",
}


def _tables(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diffs(url: str) -> list[object]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    assert upgrade_to_head(url) == head_revision()
    assert TABLES | {"alembic_version"} <= _tables(url)
    assert _diffs(url) == []
    engine = create_db_engine(url)
    with engine.connect() as conn:
        command.downgrade(alembic_config(connection=conn), "base")
        conn.commit()
    engine.dispose()
    assert _tables(url) - {"alembic_version"} == set()
    assert current_revision(url) is None
    assert upgrade_to_head(url) == head_revision()
    assert upgrade_to_head(url) == head_revision()  # idempotent
    assert _diffs(url) == []
    engine = create_db_engine(url)
    with sa.orm.Session(engine) as session:
        assert get_index_version(session) == 0
        assert bump_index_version(session) == 1
        session.commit()
    engine.dispose()


def test_script_location_is_found() -> None:
    assert (find_script_location() / "versions").is_dir()
    assert head_revision() is not None


def test_sqlite_upgrade_downgrade_upgrade(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'db' / 'cxr.db'}")


@pytest.mark.services
def test_postgres_upgrade_downgrade_upgrade(postgres_url: str) -> None:
    _round_trip(postgres_url)
    schema = sa.engine.make_url(postgres_url).query["options"].split("=", 1)[1]
    engine = create_db_engine(postgres_url)
    with engine.connect() as conn:
        where = set(
            conn.execute(
                sa.text(
                    "SELECT table_schema FROM information_schema.tables "
                    "WHERE table_name = 'alembic_version'"
                )
            ).scalars()
        )
    engine.dispose()
    assert schema in where  # the version table lives in the test's schema, next to the tables


def test_models_single_active_enforced(tmp_path: Path) -> None:
    from app.db import Model, set_active_model

    url = f"sqlite:///{tmp_path / 'cxr.db'}"
    upgrade_to_head(url)
    engine = create_db_engine(url)
    with sa.orm.Session(engine) as session:
        for version in ("a", "b"):
            session.add(
                Model(
                    version=version,
                    file_path=f"models/{version}.pt",
                    sha256="0" * 64,
                    encoder_name="tiny",
                    embedding_dim=8,
                )
            )
        session.commit()
        set_active_model(session, "a")
        session.commit()
        set_active_model(session, "b")
        session.commit()
        active = session.scalars(sa.select(Model.version).where(Model.active.is_(True))).all()
        assert active == ["b"]
        with pytest.raises(sa.exc.IntegrityError):
            session.execute(sa.update(Model).values(active=True))
    engine.dispose()
