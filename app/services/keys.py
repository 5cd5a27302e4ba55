"""API keys: creation, lookup, revocation.

A key is `cxr_` + 43 url-safe characters (256 bits). Only `HMAC-SHA256(secret_key, key)` is
stored, so a leaked database yields neither usable keys nor, without the secret, a way to test
guesses offline. Lookup is by the hash (unique index): the comparison happens on fixed-length
digests, not on the secret itself, so response timing does not reveal key prefixes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import ROLES, Settings, get_settings
from app.db import ApiKey, utcnow

logger = logging.getLogger(__name__)

KEY_PREFIX = "cxr_"
#: How many leading characters are kept in clear (`prefix` column) to tell keys apart in logs.
PREFIX_CHARS = 10
#: `last_used_at` is refreshed at most this often, so reads do not each become a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}


class UnknownRoleError(ValueError):
    """A role outside reader|clinician|admin."""


def hash_api_key(key: str, *, secret: bytes) -> str:
    """HMAC-SHA256 hex digest of `key` keyed with the service secret."""
    return hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()


def role_allows(role: str, required: str) -> bool:
    """Whether `role` is at least `required` (reader < clinician < admin)."""
    return ROLE_RANK.get(role, -1) >= ROLE_RANK[required]


def create_api_key(
    *, session: Session, role: str, name: str | None = None, settings: Settings | None = None
) -> tuple[ApiKey, str]:
    """Create and commit a key; returns the row and the plaintext, which exists only here."""
    if role not in ROLE_RANK:
        raise UnknownRoleError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    settings = settings or get_settings()
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=(name or f"{role} key").strip()[:128],
        role=role,
        key_hash=hash_api_key(plaintext, secret=settings.secret_bytes),
        prefix=plaintext[:PREFIX_CHARS],
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    logger.info("api key created", extra={"key_id": row.id, "role": role, "key_prefix": row.prefix})
    return row, plaintext


def authenticate_api_key(
    *, session: Session, key: str, settings: Settings, touch: bool = True
) -> ApiKey | None:
    """The live (not revoked) key row for `key`, or None. Refreshes `last_used_at` lazily."""
    if not key or len(key) > 256:
        return None
    digest = hash_api_key(key, secret=settings.secret_bytes)
    row = session.execute(select(ApiKey).where(ApiKey.key_hash == digest)).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    # Belt and braces: the lookup already matched, compare digests in constant time anyway.
    if not hmac.compare_digest(row.key_hash, digest):
        return None
    now = utcnow()
    if touch and (row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION):
        row.last_used_at = now
        try:
            session.commit()
        except Exception:  # a busy database must not turn a valid request into an error
            session.rollback()
            logger.warning("could not record last_used_at", extra={"key_id": row.id})
    return row


def revoke_api_key(*, session: Session, key_id: int) -> ApiKey:
    """Revoke a key by id (idempotent). Raises LookupError for an unknown id."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise LookupError(f"no API key with id {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
        logger.info("api key revoked", extra={"key_id": row.id, "key_prefix": row.prefix})
    return row


def list_api_keys(*, session: Session) -> list[ApiKey]:
    """All keys, oldest first (hashes included in the rows; never print them)."""
    return list(session.execute(select(ApiKey).order_by(ApiKey.id)).scalars())
