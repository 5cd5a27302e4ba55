"""Training plots (PNG): loss curve, confusion matrix, 2-D embedding map.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``) instead of
``pyplot``: no global backend switch, no GUI, safe in worker threads of the service.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = ["plot_confusion_matrix", "plot_embedding_map", "plot_history", "project_2d"]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Training loss per epoch (left axis) and validation k-NN balanced accuracy (right)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    val = [(h["epoch"], h.get("val_balanced_accuracy")) for h in history]
    val = [(e, v) for e, v in val if v is not None]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "s--", color="tab:orange", label="val k-NN bal. acc.")
        ax2.set_ylabel("val k-NN balanced accuracy", color="tab:orange")
        ax2.set_ylim(0, 1.02)
    ax.set_title("Training")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, *, title: str
) -> Path:
    """Confusion matrix (rows true, columns predicted), counts annotated, row-normalised colour."""
    m = np.asarray(matrix, dtype=float)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    size = 1.2 + 0.9 * len(labels)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="row fraction")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j, i, int(m[i, j]), ha="center", va="center",
                color="white" if norm[i, j] > 0.5 else "black",
            )  # fmt: skip
    ax.set_title(title)
    return _save(fig, path)


def project_2d(embeddings: np.ndarray) -> np.ndarray:
    """PCA to two dimensions (SVD of the centred data); deterministic up to sign."""
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, 2))
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def plot_embedding_map(
    embeddings: np.ndarray, labels: Sequence[str], classes: Sequence[str], path: Path, *, title: str
) -> Path:
    """2-D PCA map of embeddings coloured by class: separated clusters = a usable metric space."""
    xy = project_2d(embeddings)
    fig = Figure(figsize=(6.0, 5.0))
    ax = fig.add_subplot()
    labels_arr = np.asarray(labels)
    for name in classes:
        sel = labels_arr == name
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.7, label=f"{name} ({int(sel.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize="small", markerscale=1.5)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
