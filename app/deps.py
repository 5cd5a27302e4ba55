"""FastAPI dependencies shared by every router, as `Annotated` aliases.

`SessionDep` (one session per request), `SettingsDep` (the app's settings), `CurrentKey` (the
authenticated API key, any role) and `ReaderKey` / `ClinicianKey` / `AdminKey` (at least that
role). Routes only declare the alias they need.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request

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


def single_form_fields(*names: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing (422) a multipart body that repeats one of `names`.

    FastAPI binds a scalar form field to the *last* occurrence, so two `file` parts to /predict
    or two `label` fields to /references would silently answer for one of them. The form is
    already parsed (and cached on the request) when dependencies run, so this costs nothing.
    """

    async def dependency(request: Request) -> None:
        form = await request.form()
        for name in names:
            count = len(form.getlist(name))
            if count > 1:
                raise HTTPException(
                    status_code=422,
                    detail=f"{count} '{name}' fields in one request; send exactly one "
                    f"(it is ambiguous which one you meant)",
                )

    return dependency


__all__ = [
    "AdminKey",
    "ClinicianKey",
    "CurrentKey",
    "ReaderKey",
    "SessionDep",
    "SettingsDep",
    "get_app_settings",
    "single_form_fields",
]
