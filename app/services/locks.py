"""Cross-process named locks that serialise every write touching one reference image or label.

Why: a reference is two writes that cannot share one transaction, a database row and a file
under `data_dir`. `DELETE /references/{id}` racing a re-enrollment of the same bytes, run by
another thread or another API process, could unlink the file after the other side had decided
to keep it (a row without its file) or report `duplicate` for a row about to vanish. Holding the
image's lock across "database commit + file write/unlink" makes those two steps one critical
section for every process, so only a crash (never an interleaving) can separate them, and a
crash only ever leaves a file without its row, which start-up reconciliation removes.

Backends: PostgreSQL session advisory locks on a connection of their own (released by the
server if the process dies, and shared by every host that shares the database); SQLite (one
host by construction) `flock` on lock files under `data_dir/locks` (released by the kernel when
the process dies). Keys are hashed into 256 lock files / 2^32 advisory keys; a collision only
serialises two unrelated writes.

Callers must not hold an open write transaction while they wait for a lock (commit or roll back
first): the lock holder may need the database to finish.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from app.config import Settings

__all__ = ["reference_locks"]

#: First key of the two-int advisory lock: keeps our locks apart from other users' (ASCII "CXR1").
ADVISORY_NAMESPACE = 0x43585231
LOCK_DIR = "locks"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _engine(session: Session) -> Engine:
    bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


@contextmanager
def reference_locks(session: Session, settings: Settings, keys: Iterable[str]) -> Iterator[None]:
    """Hold exclusive locks on every key (e.g. ``image:<sha256>``, ``label:<skeleton>``).

    Locks are taken in a fixed order, so two callers asking for overlapping sets never deadlock.
    """
    engine = _engine(session)
    if engine.dialect.name == "postgresql":
        ids = sorted({int.from_bytes(_digest(k)[:4], "big", signed=True) for k in keys})
        with engine.connect() as conn:
            try:
                for lock_id in ids:
                    conn.execute(
                        text("SELECT pg_advisory_lock(:ns, :id)"),
                        {"ns": ADVISORY_NAMESPACE, "id": lock_id},
                    )
                conn.commit()
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock_all()"))
                conn.commit()
        return
    buckets = sorted({_digest(k)[:1].hex() for k in keys})
    directory = settings.data_dir / LOCK_DIR
    directory.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for bucket in buckets:
            fd = os.open(directory / f"{bucket}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)
        yield
