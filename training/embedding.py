"""Images to embeddings with a loaded encoder: the one path used by training, evaluation,
serving (index rebuilds, enrollment, `/predict`) and the retrain.

``decode_image`` → ``preprocess`` (the one pixel path) → encoder forward in inference mode.
The encoders L2-normalise their output, so these are the vectors the reference index compares;
an image embedded for evaluation is the same vector the service would store for it.

``training/`` never imports ``app/``: the service imports this module, not the reverse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.imaging import decode_image
from training.preprocess import Preprocessing, preprocess

log = logging.getLogger(__name__)

__all__ = [
    "EmbeddedFiles",
    "embed_files",
    "embed_images",
    "embed_samples",
    "embed_tensors",
]

#: Files decoded per step of `embed_files` (bounds the memory of large sources).
DECODE_CHUNK = 256


def _device_of(encoder: nn.Module) -> torch.device:
    param = next(encoder.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def embed_tensors(
    encoder: nn.Module,
    tensors: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Embeddings ``(N, dim)`` float32 of preprocessed ``(1, S, S)`` tensors or a batch.

    ``device`` defaults to the encoder's. Runs under ``torch.inference_mode``. An encoder in
    training mode is switched to eval for the call and back after (the training loop embeds
    its validation split this way); one already in eval mode is not touched, so the service's
    shared encoder is never written to by concurrent request threads.
    """
    was_training = encoder.training
    if was_training:
        encoder.eval()
    dev = torch.device(device) if device is not None else _device_of(encoder)
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(tensors), batch_size):
                chunk = tensors[start : start + batch_size]
                x = chunk if isinstance(chunk, torch.Tensor) else torch.stack(list(chunk))
                x = x.to(dev, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if autocast_dtype is not None:
                    with torch.autocast(dev.type, dtype=autocast_dtype):
                        emb = encoder(x)
                else:
                    emb = encoder(x)
                out.append(emb.float().cpu().numpy())
    finally:
        if was_training:
            encoder.train()
    if not out:
        return np.zeros((0, int(getattr(encoder, "embedding_dim", 0))), dtype=np.float32)
    emb = out[0] if len(out) == 1 else np.concatenate(out)
    return np.ascontiguousarray(emb, dtype=np.float32)


def embed_images(
    encoder: nn.Module,
    images: Sequence[np.ndarray],
    spec: Preprocessing,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Embed decoded images (``float32 (H, W)`` in ``[0, 1]``) through the shared preprocessing."""
    return embed_tensors(
        encoder, [preprocess(img, spec) for img in images], batch_size=batch_size, device=device
    )


@dataclass(frozen=True)
class EmbeddedFiles:
    """What `embed_files` made of a list of paths.

    ``vectors[i]`` is the embedding of ``paths[rows[i]]``; ``unreadable`` maps the position of
    each file that could not be read or decoded to the reason (the caller decides whether that
    is an error, a warning or a skipped reference).
    """

    vectors: np.ndarray
    rows: list[int]
    unreadable: dict[int, str] = field(default_factory=dict)


def embed_files(
    encoder: nn.Module,
    paths: Sequence[str | Path],
    spec: Preprocessing,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> EmbeddedFiles:
    """Decode, preprocess and embed image files, chunk by chunk (memory stays bounded).

    A file that cannot be read (``OSError``) or decoded (``ImageError``, a ``ValueError``) is
    reported in ``unreadable`` rather than aborting the others.
    """
    vectors: list[np.ndarray] = []
    rows: list[int] = []
    unreadable: dict[int, str] = {}
    chunk = max(batch_size, DECODE_CHUNK)
    for start in range(0, len(paths), chunk):
        tensors: list[torch.Tensor] = []
        for row in range(start, min(start + chunk, len(paths))):
            try:
                tensors.append(preprocess(decode_image(Path(paths[row])), spec))
            except (ValueError, OSError) as exc:
                unreadable[row] = f"{exc.__class__.__name__}: {exc}"
                continue
            rows.append(row)
        if tensors:
            vectors.append(embed_tensors(encoder, tensors, batch_size=batch_size, device=device))
    if vectors:
        emb = np.concatenate(vectors)
    else:
        emb = np.zeros((0, int(getattr(encoder, "embedding_dim", 0))), dtype=np.float32)
    return EmbeddedFiles(vectors=emb, rows=rows, unreadable=unreadable)


def embed_samples(
    encoder: nn.Module,
    samples: Sequence[Any],
    spec: Preprocessing,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, list[str], list[Any]]:
    """Embed ``Sample``s; returns ``(embeddings, labels, kept)``, row for row.

    Unreadable images are skipped (named in one warning) rather than aborting an evaluation.
    """
    done = embed_files(
        encoder, [s.path for s in samples], spec, batch_size=batch_size, device=device
    )
    if done.unreadable:
        named = [f"{Path(samples[i].path).name} ({why})" for i, why in done.unreadable.items()]
        log.warning("skipped %d unreadable images: %s", len(named), ", ".join(named[:10]))
    kept = [samples[i] for i in done.rows]
    return done.vectors, [s.label for s in kept], kept
