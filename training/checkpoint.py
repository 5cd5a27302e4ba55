"""Self-describing encoder checkpoints.

One file holds everything needed to rebuild and use an encoder without the code or config
that trained it: the architecture name and its arguments, the embedding size, the
:class:`~training.preprocess.Preprocessing` (image size, normalisation), the class names seen in
training, the training config and metrics, and a ``format_version``. The service registers such
files as model versions; a GPU box can train one and ship it to a CPU deployment.

Saving is atomic (temporary file in the same directory, then ``os.replace``) so that a reader —
the service watching a run directory, or a crash mid-save — never sees a half-written file.
Loading uses ``torch.load(weights_only=True)``: a checkpoint is data, never code.

The resume format lives here too: ``last.pt`` (:func:`save_training_state`,
:func:`read_training_state`, :func:`restore_training_state`) holds the whole training state
after the last finished epoch, so ``cxr train --resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.encoders import Encoder, create_encoder
from training.preprocess import Preprocessing

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RESUMED_PARTS",
    "CheckpointError",
    "LoadedEncoder",
    "TrainingProgress",
    "atomic_torch_save",
    "capture_rng",
    "load_checkpoint",
    "read_training_state",
    "restore_training_state",
    "save_checkpoint",
    "save_training_state",
]

FORMAT = "cxr-encoder"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable checkpoint of a format version this code understands."""


@dataclass
class LoadedEncoder:
    """An encoder rebuilt from a checkpoint (in eval mode) and what it was trained with."""

    encoder: Encoder
    preprocessing: Preprocessing
    classes: list[str]
    embedding_dim: int
    encoder_name: str
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_at: str | None = None


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace``.

    Same directory so the rename never crosses file systems (which would not be atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value: Any) -> Any:
    """JSON-like copy (dicts, lists, str, numbers, bool, None) so ``weights_only`` loads it."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def save_checkpoint(
    path: Path | str,
    *,
    encoder: nn.Module,
    encoder_name: str,
    encoder_kwargs: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing,
    classes: Sequence[str],
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically; returns ``path``.

    ``encoder_kwargs`` are the architecture arguments besides ``embedding_dim`` (never a
    ``weights`` path: the weights are in the file).
    """
    kwargs = {k: v for k, v in dict(encoder_kwargs or {}).items() if k != "weights"}
    embedding_dim = int(getattr(encoder, "embedding_dim", kwargs.pop("embedding_dim", 0)))
    kwargs.pop("embedding_dim", None)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "encoder_name": encoder_name,
        "encoder_kwargs": _plain(kwargs),
        "embedding_dim": embedding_dim,
        "preprocessing": preprocessing.to_dict(),
        "classes": [str(c) for c in classes],
        "config": _plain(dict(config or {})),
        "metrics": _plain(dict(metrics or {})),
        "state_dict": state,
    }
    return atomic_torch_save(payload, path)


def _fail(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a usable cxr encoder checkpoint: {why}. Use the encoder.pt written by "
        "`cxr train` (or re-train to produce one)."
    )


def read_checkpoint(path: Path | str, *, map_location: str | torch.device = "cpu") -> dict:
    """The raw, validated checkpoint dict (for tools that need the metadata only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle of code, random bytes...
        raise _fail(
            path,
            f"cannot be read ({exc.__class__.__name__}: {exc}); the file may be "
            "truncated or of another kind",
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _fail(path, "it is not a cxr checkpoint (a bare state dict or another tool's file?)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise _fail(
            path,
            f"format_version {version!r} is not supported (this code reads 1..{FORMAT_VERSION}); "
            "upgrade the cxr package",
        )
    for key in ("encoder_name", "embedding_dim", "preprocessing", "classes", "state_dict"):
        if key not in payload:
            raise _fail(path, f"the field {key!r} is missing")
    return payload


def load_checkpoint(path: Path | str, *, map_location: str | torch.device = "cpu") -> LoadedEncoder:
    """Rebuild the encoder of a checkpoint (eval mode) with its preprocessing and metadata."""
    path = Path(path).expanduser()
    payload = read_checkpoint(path, map_location=map_location)
    name = payload["encoder_name"]
    kwargs = dict(payload.get("encoder_kwargs") or {})
    try:
        preprocessing = Preprocessing.from_dict(payload["preprocessing"])
        encoder = create_encoder(name, embedding_dim=int(payload["embedding_dim"]), **kwargs)
        encoder.load_state_dict(payload["state_dict"], strict=True)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise _fail(path, f"cannot rebuild encoder {name!r} ({exc})") from None
    encoder.to(map_location).eval()
    return LoadedEncoder(
        encoder=encoder,
        preprocessing=preprocessing,
        classes=list(payload["classes"]),
        embedding_dim=int(payload["embedding_dim"]),
        encoder_name=name,
        encoder_kwargs=kwargs,
        metrics=dict(payload.get("metrics") or {}),
        config=dict(payload.get("config") or {}),
        format_version=int(payload["format_version"]),
        created_at=payload.get("created_at"),
    )


# --------------------------------------------------------------------------------------------
# Resume format: ``last.pt``, the whole training state after the last finished epoch
# --------------------------------------------------------------------------------------------

#: The stateful parts of a run ``last.pt`` holds, by key: their ``state_dict()``s.
RESUMED_PARTS = ("encoder", "loss", "optimizer", "scheduler")


@dataclass
class TrainingProgress:
    """Where a run stands: what ``last.pt`` holds besides the parts' state and the RNGs."""

    epoch: int = 0  # epochs finished
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -1.0
    best_epoch: int = 0
    stale: int = 0  # epochs since the best one
    best_val: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step draws from (Python, NumPy's global one, torch, CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    path: Path | str,
    *,
    progress: TrainingProgress,
    parts: Mapping[str, Any],
    rng_ranks: Sequence[Mapping[str, Any]],
    sampler_labels: list[Any] | None,
    config: Mapping[str, Any],
) -> Path:
    """Write ``last.pt`` atomically: ``parts`` (:data:`RESUMED_PARTS`), every rank's RNG state
    (``rng_ranks``, rank 0's also as ``rng``), the sampler's label order and ``progress``.

    A plain pickle (``weights_only=False`` to read): it holds optimiser and RNG states, and it
    is only ever read back by the run that wrote it.
    """
    return atomic_torch_save(
        {
            "epoch": progress.epoch,
            **{name: part.state_dict() for name, part in parts.items()},
            "rng": rng_ranks[0],
            "rng_ranks": list(rng_ranks),
            "history": progress.history,
            "best_score": progress.best_score,
            "best_epoch": progress.best_epoch,
            "stale": progress.stale,
            "best_val": progress.best_val,
            "best_state": progress.best_state,
            "sampler_labels": sampler_labels,
            "config": dict(config),
        },
        path,
    )


def read_training_state(path: Path | str) -> dict[str, Any]:
    """The raw ``last.pt`` dict (on the CPU)."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def restore_training_state(
    state: Mapping[str, Any], *, parts: Mapping[str, Any], rank: int, world_size: int
) -> tuple[TrainingProgress, list[Any] | None]:
    """Load ``state`` (from :func:`read_training_state`) into ``parts`` and the RNGs; returns
    the progress and the sampler's saved label order (None when not saved).

    Each rank gets its own RNG state back when the run had the same number of ranks, else
    every rank gets rank 0's.
    """
    for name, part in parts.items():
        part.load_state_dict(state[name])
    ranks_rng = state.get("rng_ranks") or []
    _restore_rng(ranks_rng[rank] if len(ranks_rng) == world_size else state["rng"])
    progress = TrainingProgress(
        epoch=state["epoch"],
        history=state["history"],
        best_score=state["best_score"],
        best_epoch=state["best_epoch"],
        stale=state["stale"],
        best_val=state["best_val"],
        best_state=state["best_state"],
    )
    labels = state.get("sampler_labels")
    return progress, (list(labels) if labels is not None else None)
