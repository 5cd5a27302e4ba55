"""HTTP schemas of the DICOM side (outgoing: `...Public`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeliveryStatus = Literal["pending", "delivered", "failed"]


class DeliveryPublic(BaseModel):
    """One result in the DICOM outbox (never its content: that carries patient identifiers)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    prediction_id: str
    kind: str = Field(description="sr (Structured Report) or overlay (secondary capture)")
    sop_instance_uid: str = Field(description="UID of the result instance (ours, not the image's)")
    destination: str = Field(description="dicom:AET@host:port or dicomweb:URL")
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveriesPublic(BaseModel):
    data: list[DeliveryPublic]
    count: int


__all__ = ["DeliveriesPublic", "DeliveryPublic", "DeliveryStatus"]
