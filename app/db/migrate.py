"""Bring a database schema to the latest Alembic revision, from the app or any CLI command.

Where the migration scripts are: `alembic/` at the project root (next to `app/`). An installed
wheel only ships the Python packages, so `find_script_location()` looks, in order, at
`$CXR_ALEMBIC_DIR`, `<project root>/alembic` (resolved from this file: works for a checkout and an
editable install) and `./alembic`; deployments from a wheel set `CXR_ALEMBIC_DIR` or run from a
directory that holds `alembic/` (the Docker image copies it to the working directory).

Several processes may start at once (`cxr serve --workers 4`, an API and a worker); upgrades are
serialised with a PostgreSQL advisory lock, or a file lock next to the SQLite database, so
only one of them runs DDL and the others find the schema already at head.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from alembic import command
from app.config import Settings
from app.db.session import create_db_engine, create_sessionmaker

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Arbitrary constant key for pg_advisory_lock ("cxr" + "mig").
_PG_LOCK_KEY = 0x637872_6D6967


class MigrationScriptsNotFoundError(RuntimeError):
    """The alembic/ directory could not be located."""


def find_script_location() -> Path:
    """The directory holding `env.py` and `versions/` (see the module docstring)."""
    candidates = []
    if env := os.environ.get("CXR_ALEMBIC_DIR"):
        candidates.append(Path(env))
    candidates += [PROJECT_ROOT / "alembic", Path.cwd() / "alembic"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate.resolve()
    raise MigrationScriptsNotFoundError(
        "Alembic migrations not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); set CXR_ALEMBIC_DIR to the project's alembic/ directory."
    )


def alembic_config(url: str | None = None, *, connection: Connection | None = None) -> Config:
    """An Alembic `Config` for `url` (or an open connection) without reading alembic.ini's URL.

    The URL travels in `config.attributes`, not `set_main_option`, because configparser would
    interpret `%` in URLs such as `?options=-csearch_path%3Dschema`.
    """
    ini = PROJECT_ROOT / "alembic.ini"
    cfg = Config(str(ini) if ini.is_file() else None)
    cfg.set_main_option("script_location", str(find_script_location()))
    cfg.attributes["skip_logging_config"] = True  # the app owns logging configuration
    if url is not None:
        cfg.attributes["url"] = url
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest revision id among the migration scripts."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at (None for an empty database)."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on SQLite's own locking
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def upgrade_to_head(url: str | Settings) -> str | None:
    """Upgrade the database at `url` to the newest revision; idempotent and process-safe.

    Returns the revision now current. Cheap when already at head (one query).
    """
    url_str = url.database_url if isinstance(url, Settings) else url
    head = head_revision()
    sa_url = make_url(url_str)
    engine = create_db_engine(url_str)
    try:
        if sa_url.get_backend_name() == "sqlite":
            database = sa_url.database or ""
            in_memory = database in ("", ":memory:") or database.startswith("file:")
            lock = (
                contextlib.nullcontext()
                if in_memory
                else _file_lock(Path(database).with_name(Path(database).name + ".migrate.lock"))
            )
            with lock, engine.connect() as conn:
                return _upgrade(conn, head)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                return _upgrade(conn, head)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def _upgrade(conn: Connection, head: str | None) -> str | None:
    current = MigrationContext.configure(conn).get_current_revision()
    conn.commit()
    if current == head:
        return current
    logger.info("migrating database schema", extra={"from_revision": current, "to": head})
    command.upgrade(alembic_config(connection=conn), "head")
    conn.commit()
    return head


def prepare_database(settings: Settings) -> sessionmaker[Session]:
    """What every CLI command that touches the database does first: bring the schema to head
    (when `auto_migrate`, the default; so `cxr keys create` works on a fresh ./var before the
    first `cxr serve`) and return a sessionmaker. Dispose of `factory.kw["bind"]` when done."""
    if settings.auto_migrate:
        upgrade_to_head(settings.database_url)
    return create_sessionmaker(create_db_engine(settings.database_url))
