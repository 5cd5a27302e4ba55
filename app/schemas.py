"""Shared HTTP schemas, one class per direction (`...Public` goes out). Prediction and model
schemas live in `app/schemas_predict.py`."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ErrorPublic(BaseModel):
    """Every error response: a message that tells the caller what to fix."""

    detail: str = Field(examples=["Missing API key: send it as 'X-API-Key: KEY' ..."])


class HealthPublic(BaseModel):
    status: str = Field(examples=["ok"])


class ReadyPublic(BaseModel):
    status: str = Field(examples=["ready"])
    index_version: int | None = None
    model_version: str | None = None


class ReferenceEnrolledPublic(BaseModel):
    """One enrolled file. `duplicate` is true when the same image bytes were already enrolled:
    the existing reference is returned and nothing new is stored."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    label: str
    sha256: str
    created_at: datetime
    duplicate: bool


class ReferencesEnrolledPublic(BaseModel):
    references: list[ReferenceEnrolledPublic]


class ReferencePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    label: str
    sha256: str
    width: int
    height: int
    source_format: str
    created_at: datetime


class ReferencesPublic(BaseModel):
    """A page of references; `count` is the total number matching the filter."""

    data: list[ReferencePublic]
    count: int


class ClassPublic(BaseModel):
    label: str
    count: int


class ApiKeyPublic(BaseModel):
    """A key as shown to administrators: never the key or its hash."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
