"""The training data set (decoded once through the shared decode + preprocess) and the
class-balanced batch sampler."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.samples import Sample, name_some
from training.imaging import decode_image
from training.preprocess import Preprocessing, preprocess, train_augmentation

logger = logging.getLogger(__name__)

__all__ = ["XrayDataset", "balanced_sampler", "group_ids"]


class XrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """``(tensor (1, S, S), class index)`` pairs through the shared decode + preprocess.

    Every image is decoded once up front: unreadable or corrupt files are found before
    training starts (rather than crashing epoch 3), counted in :attr:`skipped`, named in one
    warning, and left out. With ``cache=True`` (default) the preprocessed, un-augmented
    tensor is kept in memory (``S*S*4`` bytes per image, 64 KiB at 128 px), so later epochs
    cost only the augmentation, which is applied to the cached tensor.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        spec: Preprocessing,
        *,
        augment: bool,
        cache: bool = True,
        max_pixels: int | None = None,
    ) -> None:
        self.classes = list(classes)
        self.spec = spec
        self.augment = augment
        self.max_pixels = max_pixels
        self.class_to_index = {name: i for i, name in enumerate(self.classes)}
        if len(self.class_to_index) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")
        unknown = sorted({s.label for s in samples} - set(self.class_to_index))
        if unknown:
            raise ValueError(
                f"labels {unknown} are not among the classes {self.classes}; pass every "
                "class name (e.g. class_names(all_samples))"
            )
        self.augmentation = train_augmentation(spec) if augment else None
        self.skipped: list[Path] = []
        self._cache: list[torch.Tensor] | None = [] if cache else None
        self.samples: list[Sample] = self._scan(samples)
        self.labels: np.ndarray = np.array(
            [self.class_to_index[s.label] for s in self.samples], dtype=np.int64
        )
        self.groups: np.ndarray = group_ids(self.samples)

    def _load(self, path: Path) -> torch.Tensor:
        return preprocess(decode_image(path, max_pixels=self.max_pixels), self.spec)

    def _scan(self, samples: Sequence[Sample]) -> list[Sample]:
        kept: list[Sample] = []
        reasons: list[str] = []
        for sample in samples:
            try:
                tensor = self._load(sample.path)
            except (ValueError, OSError) as exc:  # ImageError is a ValueError
                self.skipped.append(sample.path)
                reasons.append(f"{sample.path.name} ({exc.__class__.__name__})")
                continue
            kept.append(sample)
            if self._cache is not None:
                self._cache.append(tensor)
        if self.skipped:
            logger.warning(
                "skipped %d of %d images that cannot be read: %s",
                len(self.skipped),
                len(samples),
                name_some(reasons),
            )
        if samples and not kept:
            raise ValueError(
                f"none of the {len(samples)} images could be read (first: {self.skipped[0]}); "
                "check the data source"
            )
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._cache is not None:
            tensor = self._cache[index]
        else:
            tensor = self._load(self.samples[index].path)
        if self.augmentation is not None:
            tensor = self.augmentation(tensor)
        return tensor, int(self.labels[index])


def group_ids(samples: Sequence[Sample]) -> np.ndarray:
    """One integer per sample for its (label, source) pair, numbered in sorted order.

    Passed to :func:`balanced_sampler` instead of class indices, it makes every batch hold
    the same number of images of each label *from each source*: Normal from a children's
    hospital and Normal from an adult one come in equal numbers, so "Normal" cannot be learned
    from one source's look (age, scanner) when another source has it too, and no source
    dominates a batch. With a single source it is the class index order.
    """
    keys = sorted({(s.label, s.source or "") for s in samples})
    index = {key: i for i, key in enumerate(keys)}
    return np.array([index[(s.label, s.source or "")] for s in samples], dtype=np.int64)


def balanced_sampler(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    m_per_class: int = 4,
    length: int | None = None,
    batch_size: int | None = None,
) -> Any:
    """A ``MPerClassSampler`` whose batches hold ``m_per_class`` images of every class.

    ``labels`` may be class indices or :func:`group_ids` (label x source groups: then each
    batch holds ``m_per_class`` images of every group). The rare COVID-19 class (about 2% of
    images) would otherwise be absent from most batches, leaving metric losses without
    positive pairs for it. ``batch_size`` defaults to ``m_per_class * n_classes`` (every
    class in each batch); use the sampler's ``.batch_size`` for the DataLoader and do not
    shuffle there. ``length`` (indices per epoch) defaults to the number of labels, rounded
    down to whole batches (at least one). Classes with fewer than ``m_per_class`` images are
    sampled with replacement. The order comes from NumPy's global RNG (``np.random.seed``
    makes it reproducible).
    """
    from pytorch_metric_learning.samplers import MPerClassSampler

    array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("balanced_sampler needs a non-empty 1-D sequence of class indices")
    n_classes = len(np.unique(array))
    if m_per_class < 1:
        raise ValueError(f"m_per_class must be >= 1, got {m_per_class}")
    if batch_size is None:
        batch_size = m_per_class * n_classes
    if batch_size % m_per_class or batch_size > m_per_class * n_classes:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of m_per_class {m_per_class} and at "
            f"most m_per_class * n_classes = {m_per_class * n_classes}"
        )
    length = max(int(length if length is not None else array.size), batch_size)
    return MPerClassSampler(
        array, m_per_class, batch_size=batch_size, length_before_new_iter=length
    )
