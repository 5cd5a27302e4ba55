"""Compatibility: the serving state moved to the `app.serving` package.

`app.serving.state` (ServiceState), `app.serving.bundle` (ModelBundle, LoadedModel),
`app.serving.loader` (model loading), `app.serving.embeddings` (the embeddings store),
`app.files` (data-directory paths). Kept only for `app/main.py`, `app/routes/predict.py` and
`app/bench.py`, which parallel work is rewriting; import from the new modules and delete this
file once those are merged.
"""

from app.files import file_sha256, resolve_data_path
from app.serving.bundle import LoadedModel, ModelBundle
from app.serving.loader import ModelFileError
from app.serving.state import (
    NO_MODEL_REASON,
    NO_REFERENCES_REASON,
    DatabaseTarget,
    ReferencesChange,
    ServiceState,
)

__all__ = [
    "NO_MODEL_REASON",
    "NO_REFERENCES_REASON",
    "DatabaseTarget",
    "LoadedModel",
    "ModelBundle",
    "ModelFileError",
    "ReferencesChange",
    "ServiceState",
    "file_sha256",
    "resolve_data_path",
]
