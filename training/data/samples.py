"""The record every loader produces (:class:`Sample`) and counts over lists of them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SPLITS",
    "DataSourceError",
    "Sample",
    "class_counts",
    "class_names",
    "name_some",
    "summarise",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_NAMED = 10


class DataSourceError(ValueError):
    """A data source cannot be understood; the message lists what is accepted."""


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk. ``split`` is None until :func:`split_samples` assigns it.

    ``source`` names the data source (hospital, collection) the image came from. It is kept
    because sources differ in ways a model can latch onto (age, scanner, burned-in text): the
    sampler balances label x source, splits are made per source, and metrics are reported
    per source.
    """

    path: Path
    label: str
    split: str | None = None
    patient_id: str | None = None
    source: str | None = None


# --------------------------------------------------------------------------------------------
# Small helpers


def name_some(items: Sequence[Any], limit: int = MAX_NAMED) -> str:
    names = ", ".join(str(x) for x in items[:limit])
    if len(items) > limit:
        names += f", ... ({len(items) - limit} more)"
    return names


def class_counts(samples: Iterable[Sample]) -> dict[str, int]:
    """Number of samples per label, labels sorted."""
    counts = Counter(s.label for s in samples)
    return {label: counts[label] for label in sorted(counts)}


def class_names(samples: Iterable[Sample]) -> list[str]:
    """Sorted distinct labels: the canonical class order (index = class id)."""
    return sorted({s.label for s in samples})


def summarise(splits: Mapping[str, Sequence[Sample]]) -> dict[str, dict[str, int]]:
    """Per split, per class counts (plus ``total``), for logs and ``metrics.json``."""
    return {name: {**class_counts(items), "total": len(items)} for name, items in splits.items()}
