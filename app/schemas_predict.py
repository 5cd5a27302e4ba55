"""HTTP schemas of the prediction side: the `POST /predict` answer and model versions.

`PredictionPublic` is exactly the answer fixed by the product contract (SPEC.md); its field set
must not change without keeping the old form working.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["knn", "mean_distance"]


class NeighborPublic(BaseModel):
    """One of the k nearest references, nearest first."""

    reference_id: str
    label: str
    distance: float = Field(ge=0.0, le=2.0, description="Euclidean distance of unit vectors")


class GradcamPublic(BaseModel):
    """Grad-CAM of the similarity to the predicted class, blended on the upload."""

    label: str = Field(description="The class whose similarity is explained (the answer's label)")
    overlay_png: str = Field(description="base64 PNG, same aspect ratio as the upload")


class PredictionPublic(BaseModel):
    """The answer of `POST /predict` (kept in the audit log under `id`)."""

    id: str = Field(description="Prediction id (kept in the audit log)")
    label: str = Field(examples=["COVID-19"])
    unknown: bool = Field(
        description="True when the image is far from every enrolled class; `label` is then the "
        "nearest class and the caller decides"
    )
    confidence: float = Field(ge=0.0, le=1.0)
    distances: dict[str, float] = Field(description="Mean distance to each enrolled class")
    neighbors: list[NeighborPublic]
    outlier_score: float
    outlier_threshold: float
    gradcam: GradcamPublic | None = Field(description="null when explain=false")
    model_version: str
    index_version: int


class ModelPublic(BaseModel):
    """A registered model version (`GET /models`, activation answer)."""

    model_config = ConfigDict(from_attributes=True)

    version: str
    created_at: datetime
    metrics: dict[str, Any] | None = None
    active: bool
    encoder_name: str
    embedding_dim: int
    source: str


__all__ = ["GradcamPublic", "Method", "ModelPublic", "NeighborPublic", "PredictionPublic"]
