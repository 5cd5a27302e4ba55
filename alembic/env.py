"""Alembic environment: the URL comes from the service settings, never from alembic.ini.

Order of precedence (first found wins):
1. `config.attributes["connection"]`: an open SQLAlchemy Connection (tests, embedding code);
2. `config.attributes["url"]`: a URL string (`app.db.migrate.upgrade_to_head(url)`); passed as
   an attribute because URLs may contain `%` (e.g. `?options=-csearch_path%3D...`), which
   alembic.ini's interpolation would mangle;
3. `sqlalchemy.url` set on the config (command line `-x`-free usage, third-party tools);
4. `app.config.get_settings().database_url` (CXR_DATABASE_URL / CXR_DATA_DIR).

The version table is created in the connection's current schema, so a PostgreSQL URL with a
`search_path` option keeps `alembic_version` next to the tables it describes.
"""

from __future__ import annotations

import logging
from logging.config import fileConfig

from sqlalchemy import Connection, pool

from alembic import context
from app.db.models import Base
from app.db.session import create_db_engine

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

logger = logging.getLogger("alembic.env")


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return str(url)
    from app.config import get_settings

    return get_settings().database_url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER support on SQLite
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=_url().startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a live database (a handed-over connection, or a fresh engine)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_db_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
