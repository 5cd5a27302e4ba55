"""Authentication and role checks.

A key comes as `X-API-Key: KEY` or `Authorization: Bearer KEY`. Missing, unknown or revoked keys
get 401 with `WWW-Authenticate`; a valid key with too low a role gets 403. Both messages say what
to do. The two security schemes are declared so the OpenAPI document (and Schemathesis) know
how to authenticate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import ROLES, Settings
from app.db import ApiKey
from app.db.session import SessionDep
from app.services.keys import authenticate_api_key, role_allows

logger = logging.getLogger(__name__)

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="API key from `cxr keys create`."
)
bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")

WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="cxr", charset="UTF-8"'}


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=detail, headers=WWW_AUTHENTICATE
    )


MISSING_KEY_DETAIL = (
    "Missing API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY' "
    "(an administrator creates keys with `cxr keys create --role reader`)."
)
INVALID_KEY_DETAIL = (
    "Invalid API key: it is unknown or was revoked. Check for copy/paste errors or ask "
    "an administrator for a new key (`cxr keys create`)."
)


def resolve_key(*, session: Session, key: str, settings: Settings) -> ApiKey:
    """The live key row for the plaintext `key`, or the 401 saying what to do."""
    if not key:
        raise _unauthorized(MISSING_KEY_DETAIL)
    row = authenticate_api_key(session=session, key=key, settings=settings)
    if row is None:
        raise _unauthorized(INVALID_KEY_DETAIL)
    return row


def key_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The key from raw ASGI headers (`X-API-Key`, else `Authorization: Bearer`), or ""."""
    api_key = bearer_key = ""
    for name, value in headers:
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
        elif name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                bearer_key = credentials.strip()
    return api_key or bearer_key


async def get_current_key(
    request: Request,
    session: SessionDep,
    header_key: Annotated[str | None, Depends(api_key_header)],
    bearer_credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The authenticated key row, or 401. Stored on `request.state.api_key` for logging.

    Requests with a body were already authenticated, before the body was read, by
    `app.main.AuthBeforeBodyMiddleware`; its result is reused (one lookup per request, and no
    thread hand-off: this dependency is `async` so only the database lookup leaves the loop).
    """
    pre: ApiKey | None = getattr(request.state, "preauthenticated_key", None)
    if pre is not None:
        request.state.api_key = pre
        return pre
    key = (header_key or "").strip() or (
        bearer_credentials.credentials.strip() if bearer_credentials else ""
    )
    lookup = partial(resolve_key, session=session, key=key, settings=request.app.state.settings)
    row = await anyio.to_thread.run_sync(lookup)
    request.state.api_key = row
    return row


CurrentKey = Annotated[ApiKey, Depends(get_current_key)]

_ROLE_DEPENDENCIES: dict[str, Callable[..., ApiKey]] = {}


def check_role(key: ApiKey, role: str) -> None:
    """403 (saying which role is needed) when `key`'s role is below `role`."""
    if not role_allows(key.role, role):
        logger.info(
            "role too low",
            extra={"key_id": key.id, "key_role": key.role, "required_role": role},
        )
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"This action needs the '{role}' role or higher; your key "
            f"({key.prefix}...) has the '{key.role}' role. Ask an administrator for a "
            f"key with the '{role}' role.",
        )


def require_role(role: str) -> Callable[..., ApiKey]:
    """A dependency that returns the current key if its role is at least `role`, else 403.

    The same function object is returned for the same role, so FastAPI resolves it once per
    request even when a route and its router both declare it.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if role in _ROLE_DEPENDENCIES:
        return _ROLE_DEPENDENCIES[role]

    async def dependency(key: CurrentKey) -> ApiKey:  # async: no thread hand-off for a compare
        check_role(key, role)
        return key

    dependency.required_role = role  # type: ignore[attr-defined]  # read by the body guard
    dependency.__name__ = f"require_{role}"
    _ROLE_DEPENDENCIES[role] = dependency
    return dependency
