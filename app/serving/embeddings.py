"""The embeddings store: one vector per (reference, model version), in the `embeddings` table.

Serving and retraining share it. An API process that needs a reference's vector for the model
it serves fetches it, or computes it (through `training.embedding`, the one image-to-vector
path) and stores it for every other process; enrollment stores the vectors it computed from
the upload; the retrain reads the active model's vectors instead of re-embedding every
reference with it, and stores the new model's vectors before activating it, so activation is
instant everywhere. Writers may race (two processes embedding the same reference): duplicates
are skipped, and a reference deleted meanwhile only loses its own row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.db import Embedding, insert_embeddings_ignoring_duplicates
from training.embedding import embed_files
from training.preprocess import Preprocessing

logger = logging.getLogger(__name__)

__all__ = [
    "Embedder",
    "EmbeddingModel",
    "compute_embeddings",
    "ensure_embeddings",
    "fetch_embeddings",
    "store_embeddings",
]

#: Ids per `IN (...)` query when fetching stored embeddings.
FETCH_CHUNK = 500
#: References embedded (and stored) per step when computing missing embeddings.
COMPUTE_CHUNK = 256
#: Images per forward pass.
EMBED_BATCH = 32


class EmbeddingModel(Protocol):
    """What embedding references needs of a model (`LoadedModel` of the service, `Embedder`)."""

    @property
    def version(self) -> str: ...
    @property
    def encoder(self) -> torch.nn.Module: ...
    @property
    def preprocessing(self) -> Preprocessing: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def embedding_dim(self) -> int: ...


@dataclass(frozen=True)
class Embedder:
    """A checkpoint loaded outside the service (the retrain's candidate and active models)."""

    version: str
    encoder: torch.nn.Module
    preprocessing: Preprocessing
    device: torch.device
    embedding_dim: int

    @classmethod
    def from_checkpoint(cls, loaded: Any, *, version: str, device: torch.device) -> Embedder:
        """`loaded` is a `training.checkpoint.load_checkpoint` result; moved to `device`."""
        return cls(
            version=version,
            encoder=loaded.encoder.to(device).eval(),
            preprocessing=loaded.preprocessing,
            device=device,
            embedding_dim=int(loaded.embedding_dim),
        )


def fetch_embeddings(
    session: Session, model_version: str, ids: Sequence[str], *, dim: int
) -> dict[str, np.ndarray]:
    """Stored vectors of `ids` for `model_version` (a vector of the wrong size is ignored)."""
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), FETCH_CHUNK):
        rows = session.execute(
            select(Embedding.reference_id, Embedding.vector).where(
                Embedding.model_version == model_version,
                Embedding.reference_id.in_(ids[start : start + FETCH_CHUNK]),
            )
        ).all()
        for ref_id, blob in rows:
            vec = np.frombuffer(blob, dtype=np.float32)
            if vec.shape == (dim,):
                vectors[ref_id] = vec
    return vectors


def store_embeddings(
    session: Session, model_version: str, vectors: Mapping[str, np.ndarray]
) -> None:
    """Persist vectors and commit; rows already stored (by another process) are skipped, and
    a reference deleted meanwhile costs only its own row. A database failure is logged, not
    raised: the vectors are recomputed by whoever needs them next."""
    if not vectors:
        return
    rows = [
        {
            "reference_id": ref_id,
            "model_version": model_version,
            "vector": np.ascontiguousarray(vec, dtype=np.float32).tobytes(),
        }
        for ref_id, vec in vectors.items()
    ]
    try:
        session.execute(insert_embeddings_ignoring_duplicates(session), rows)
        session.commit()
    except IntegrityError:
        # A reference deleted meanwhile (foreign key): store what still exists, one by one.
        session.rollback()
        for row in rows:
            try:
                session.execute(insert_embeddings_ignoring_duplicates(session), [row])
                session.commit()
            except IntegrityError:
                session.rollback()
    except SQLAlchemyError:
        session.rollback()
        logger.exception("could not store computed embeddings; they will be recomputed")


def compute_embeddings(
    model: EmbeddingModel, ids: Sequence[str], paths: Sequence[Path]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Vectors of reference files (``ids[i]`` is stored at ``paths[i]``), and the reason each
    unreadable one was left out."""
    done = embed_files(
        model.encoder, paths, model.preprocessing, batch_size=EMBED_BATCH, device=model.device
    )
    vectors = {ids[row]: vec for row, vec in zip(done.rows, done.vectors, strict=True)}
    return vectors, {ids[row]: why for row, why in done.unreadable.items()}


def ensure_embeddings(
    session: Session,
    model: EmbeddingModel,
    ids: Sequence[str],
    path_of: Callable[[str], Path],
    *,
    known: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[str, np.ndarray]:
    """A vector for every reference of `ids` under `model`, stored for every process.

    Taken from `known` (computed by the caller, stored now), else fetched from the store, else
    computed from the reference's file (`path_of(id)`) and stored. References whose file is
    missing or unreadable are left out (counted in one warning). `progress` gets the fraction
    of the references to compute that are done.
    """
    known = known or {}
    vectors = {ref_id: known[ref_id] for ref_id in ids if ref_id in known}
    store_embeddings(session, model.version, vectors)
    wanted = [ref_id for ref_id in ids if ref_id not in vectors]
    vectors.update(fetch_embeddings(session, model.version, wanted, dim=model.embedding_dim))
    missing = [ref_id for ref_id in ids if ref_id not in vectors]
    unreadable = 0
    for start in range(0, len(missing), COMPUTE_CHUNK):
        chunk = missing[start : start + COMPUTE_CHUNK]
        computed, failed = compute_embeddings(model, chunk, [path_of(i) for i in chunk])
        unreadable += len(failed)
        store_embeddings(session, model.version, computed)
        vectors.update(computed)
        if progress is not None:
            progress((start + len(chunk)) / len(missing))
    if missing:
        logger.info(
            "computed reference embeddings",
            extra={"count": len(missing) - unreadable, "model_version": model.version},
        )
    if unreadable:
        logger.warning(
            "some reference images are missing or unreadable and were left out",
            extra={"count": unreadable, "model_version": model.version},
        )
    return vectors
