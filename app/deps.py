"""FastAPI dependencies shared by every router, as `Annotated` aliases.

`SessionDep` (one session per request), `SettingsDep` (the app's settings), `CurrentKey` (the
authenticated API key, any role) and `ReaderKey` / `ClinicianKey` / `AdminKey` (at least that
role). Routes only declare the alias they need.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.auth import CurrentKey, require_role
from app.config import Settings
from app.db import ApiKey
from app.db.session import SessionDep


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (not re-read from the environment)."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ReaderKey = Annotated[ApiKey, Depends(require_role("reader"))]
ClinicianKey = Annotated[ApiKey, Depends(require_role("clinician"))]
AdminKey = Annotated[ApiKey, Depends(require_role("admin"))]

__all__ = [
    "AdminKey",
    "ClinicianKey",
    "CurrentKey",
    "ReaderKey",
    "SessionDep",
    "SettingsDep",
    "get_app_settings",
]
