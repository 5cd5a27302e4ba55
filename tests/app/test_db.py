"""The database layer on SQLite and PostgreSQL: every table round-trips, timestamps come back
UTC-aware, cascades fire (SQLite needs PRAGMA foreign_keys), and `index_version` increments are
never lost under concurrent writers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import (
    ApiKey,
    Embedding,
    Job,
    Model,
    Prediction,
    Reference,
    bump_index_version,
    create_db_engine,
    create_sessionmaker,
    get_active_model,
    get_index_version,
    set_active_model,
)
from app.db.migrate import prepare_database, upgrade_to_head


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cxr.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_to_head(url)
    yield url


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    engine = create_db_engine(db_url)
    with create_sessionmaker(engine)() as s:
        yield s
    engine.dispose()


def _model(version: str) -> Model:
    return Model(
        version=version,
        file_path=f"models/{version}.pt",
        sha256="ab" * 32,
        encoder_name="tiny",
        embedding_dim=4,
        metrics={"balanced_accuracy": 0.9},
        config={"epochs": 1},
    )


def _reference(n: int) -> Reference:
    sha = f"{n:064x}"
    return Reference(
        label="Normal",
        sha256=sha,
        image_path=f"references/{sha[:2]}/{sha}.png",
        width=8,
        height=8,
        source_format="png",
    )


def test_all_tables_round_trip(session: Session) -> None:
    key = ApiKey(name="k", role="admin", key_hash="h" * 64, prefix="cxr_abcdef")
    ref = _reference(1)
    session.add_all([key, ref, _model("v1")])
    session.flush()
    ref.enrolled_by = key.id
    vector = np.arange(4, dtype=np.float32)
    session.add(Embedding(reference_id=ref.id, model_version="v1", vector=vector.tobytes()))
    session.add(Job(kind="retrain", params={"epochs": 2}))
    session.add(
        Prediction(
            api_key_id=key.id,
            model_version="v1",
            index_version=3,
            method="knn",
            label="Normal",
            unknown=False,
            confidence=0.5,
            answer={"label": "Normal", "distances": {"Normal": 0.1}},
        )
    )
    session.commit()
    session.expunge_all()
    got = session.get(Reference, ref.id)
    assert got is not None and got.enrolled_by == key.id and len(got.id) == 32
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - got.created_at).total_seconds()) < 60
    emb = session.get(Embedding, (ref.id, "v1"))
    assert emb is not None
    assert np.array_equal(np.frombuffer(emb.vector, dtype=np.float32), vector)
    job = session.scalars(sa.select(Job)).one()
    assert (job.status, job.progress, job.params, job.metrics) == (
        "queued",
        0.0,
        {"epochs": 2},
        None,
    )
    pred = session.scalars(sa.select(Prediction)).one()
    assert pred.answer["distances"] == {"Normal": 0.1} and pred.image_path is None
    assert session.get(Model, "v1").metrics == {"balanced_accuracy": 0.9}  # type: ignore[union-attr]


def test_embeddings_cascade(session: Session) -> None:
    refs = [_reference(i) for i in range(3)]
    session.add_all([*refs, _model("v1"), _model("v2")])
    session.flush()
    for ref in refs:
        for version in ("v1", "v2"):
            session.add(Embedding(reference_id=ref.id, model_version=version, vector=b"\0" * 16))
    session.commit()
    session.execute(sa.delete(Reference).where(Reference.id == refs[0].id))
    session.commit()
    assert session.scalar(sa.select(sa.func.count()).select_from(Embedding)) == 4
    session.execute(sa.delete(Model).where(Model.version == "v1"))
    session.commit()
    assert session.scalar(sa.select(sa.func.count()).select_from(Embedding)) == 2
    with pytest.raises(sa.exc.IntegrityError):  # foreign keys are enforced (SQLite too)
        session.add(Embedding(reference_id="missing", model_version="v2", vector=b""))
        session.commit()
    session.rollback()


def test_active_model_switch(session: Session) -> None:
    session.add_all([_model("v1"), _model("v2")])
    session.commit()
    assert get_active_model(session) is None
    start = get_index_version(session)
    assert set_active_model(session, "v1") == start + 1
    session.commit()
    assert set_active_model(session, "v2") == start + 2
    session.commit()
    active = get_active_model(session)
    assert active is not None and active.version == "v2"
    with pytest.raises(LookupError):
        set_active_model(session, "nope")


def test_index_version_concurrent_bumps(db_url: str) -> None:
    engine = create_db_engine(db_url)
    factory = create_sessionmaker(engine)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(15):
                with factory() as s:
                    bump_index_version(s)
                    s.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with factory() as s:
        assert get_index_version(s) == 60
    engine.dispose()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_prepare_database_on_fresh_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh" / "var")
    factory = prepare_database(settings)
    with factory() as s:
        assert get_index_version(s) == 0
    factory.kw["bind"].dispose()
    assert (tmp_path / "fresh" / "var" / "cxr.db").exists()
    assert settings.database_url == f"sqlite:///{tmp_path / 'fresh' / 'var' / 'cxr.db'}"
