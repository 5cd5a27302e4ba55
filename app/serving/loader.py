"""Loading the active model for serving: the checkpoint file checked against its registered
sha256, loaded onto the serving device, frozen, with its ONNX Runtime session for the CPU forward
(`CXR_ONNX`) and its micro-batcher when configured."""

from __future__ import annotations

import dataclasses

import torch

from app.config import Settings
from app.db import Model
from app.files import file_sha256, resolve_data_path
from app.serving.batcher import MicroBatcher
from app.serving.bundle import LoadedModel
from app.serving.onnx_runtime import load_onnx_encoder
from training.checkpoint import load_checkpoint

__all__ = ["ModelFileError", "load_model"]


class ModelFileError(RuntimeError):
    """The active model's checkpoint file is missing, altered or unreadable."""


def load_model(row: Model, *, settings: Settings, device: torch.device) -> LoadedModel:
    """The model of registry row `row`, ready to serve; `ModelFileError` says what to restore."""
    path = resolve_data_path(row.file_path, settings)
    if not path.is_file():
        raise ModelFileError(
            f"model {row.version}: checkpoint file {path} is missing; restore it or "
            "register the checkpoint again with `cxr models add CKPT --activate`"
        )
    digest = file_sha256(path)
    if digest != row.sha256:
        raise ModelFileError(
            f"model {row.version}: checkpoint file {path} does not match its registered "
            f"sha256 (file changed on disk); restore the original or register it again"
        )
    loaded = load_checkpoint(path, map_location=str(device))
    encoder = loaded.encoder.to(device).eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    model = LoadedModel(
        version=row.version,
        sha256=digest,
        encoder=encoder,
        preprocessing=loaded.preprocessing,
        device=device,
        embedding_dim=int(loaded.embedding_dim),
        encoder_name=str(loaded.encoder_name),
        trained_classes=tuple(loaded.classes or ()),
        onnx=load_onnx_encoder(
            encoder,
            sha256=digest,
            image_size=loaded.preprocessing.image_size,
            models_dir=settings.models_dir,
        )
        if settings.onnx == "auto" and device.type == "cpu"
        else None,
    )
    if settings.predict_batch_max <= 1:
        return model
    batcher = MicroBatcher(
        model.forward,
        max_batch=settings.predict_batch_max,
        max_wait_s=settings.predict_batch_wait_ms / 1000.0,
    )
    return dataclasses.replace(model, batcher=batcher)
