"""Shared fixtures: real-service endpoints and the cxr4 data set when present.

Tests that need PostgreSQL or Redis use the `postgres_url` / `redis_url` fixtures. On a machine
without those services they skip with the reason, except under `CXR_REQUIRE_SERVICES=1` (set by
`.ci/run`), where a missing service fails the run: CI must never go green by skipping them.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "CXR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CXR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CXR4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr4"


def _services_required() -> bool:
    return os.environ.get("CXR_REQUIRE_SERVICES", "") not in ("", "0", "false", "no")


def _missing(service: str, reason: str) -> None:
    message = f"{service} is not reachable ({reason})"
    if _services_required():
        pytest.fail(f"{message}, and CXR_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """URL of the machine's PostgreSQL `test` database (skips or fails when it is down)."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(POSTGRES_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # any driver or connection error means "not available"
        _missing("PostgreSQL", f"{POSTGRES_ADMIN_URL}: {exc.__class__.__name__}: {exc}")
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty schema on the machine's PostgreSQL, dropped after the test."""
    import sqlalchemy as sa

    schema = f"cxr_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{postgres_admin_url}?options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the machine's Redis (skips or fails when it is down)."""
    if not _port_open("127.0.0.1", 6379):
        _missing("Redis", REDIS_URL)
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:
        _missing("Redis", f"{REDIS_URL}: {exc.__class__.__name__}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def cxr4() -> Path:
    """The shared cxr4 data set; tests using it skip on a fresh checkout without ../shared."""
    if not (CXR4 / "manifest.csv").exists():
        pytest.skip(f"cxr4 data set not found at {CXR4}")
    return CXR4


@pytest.fixture
def restore_thread_policy() -> Iterator[None]:
    """For tests that apply a thread policy (training/threads.py): the process gets the one it
    had back afterwards, so the test's counts do not leak into later tests."""
    from training.threads import apply_thread_policy, current_thread_policy

    before = current_thread_policy()
    yield
    apply_thread_policy(before)


@pytest.fixture(autouse=True)
def drop_logging_handlers_on_closed_streams() -> Iterator[None]:
    """A command invoked through typer's CliRunner may install a root logging handler on the
    runner's stderr, which is closed when the invocation ends; a later test's first log line
    would then print a "--- Logging error ---" traceback into that test's output."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(getattr(handler, "stream", None), "closed", False):
            root.removeHandler(handler)
