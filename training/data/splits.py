"""Train / val / test splits: given splits kept, otherwise stratified by label and grouped by
patient so that no patient leaks across splits; every source split on its own."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from training.data.samples import SPLITS, DataSourceError, Sample, name_some, summarise

logger = logging.getLogger(__name__)

__all__ = ["split_samples"]


def _group_key(sample: Sample, index: int) -> str:
    return f"patient:{sample.patient_id}" if sample.patient_id else f"sample:{index}"


def _grouped_stratified(
    samples: Sequence[Sample], fractions: Mapping[str, float], seed: int
) -> dict[str, list[Sample]]:
    """Assign whole patient groups to splits, greedily matching per-class targets.

    Groups are visited largest first (random order among equals, from ``seed``); each goes
    to the split whose per-class quotas it fills best. This is exact enough for data sets of
    any size, including the tiny ones the service retrains on, where sklearn's group K-fold
    splitters refuse to run.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[_group_key(s, i)].append(i)
    totals = Counter(s.label for s in samples)
    names = [name for name in fractions if fractions[name] > 0]
    target = {n: {lab: fractions[n] * c for lab, c in totals.items()} for n in names}
    current = {n: Counter() for n in names}

    rng = np.random.default_rng(seed)
    keys = sorted(groups)
    order = rng.permutation(len(keys))
    rank = {keys[j]: r for r, j in enumerate(order)}
    keys.sort(key=lambda k: (-len(groups[k]), rank[k]))

    assigned: dict[str, list[Sample]] = {n: [] for n in fractions}
    for key in keys:
        members = groups[key]
        counts = Counter(samples[i].label for i in members)

        def need(name: str, counts: Counter[str] = counts) -> float:
            return sum(
                n * (target[name][lab] - current[name][lab]) / totals[lab]
                for lab, n in counts.items()
            )

        best = max(names, key=lambda n: (need(n), fractions[n]))
        current[best].update(counts)
        assigned[best].extend(dataclasses.replace(samples[i], split=best) for i in members)
    return assigned


def split_samples(
    samples: Sequence[Sample],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Split into ``{"train", "val", "test"}`` lists (always all three keys).

    Splits given by the source are kept: with train and test only, val is carved out of
    train (``val_fraction`` of it), likewise a missing test. Without given splits the samples
    are split stratified by label and grouped by ``patient_id`` when present, so no patient
    appears in two splits. Each source is split on its own (one source may give splits while
    another does not), so every source is represented in every split. Deterministic for a
    given ``seed``.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must leave some data for training")
    samples = list(samples)
    by_source: dict[str | None, list[Sample]] = defaultdict(list)
    for s in samples:
        by_source[s.source].append(s)
    if len(by_source) > 1:
        merged: dict[str, list[Sample]] = {name: [] for name in SPLITS}
        for name in sorted(by_source, key=str):
            part = split_samples(
                by_source[name], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
            )
            for split in SPLITS:
                merged[split].extend(part[split])
        return merged
    given = {s.split for s in samples}
    if given == {None} or not samples:
        out = _grouped_stratified(
            samples,
            {
                "train": 1.0 - val_fraction - test_fraction,
                "val": val_fraction,
                "test": test_fraction,
            },
            seed,
        )
    else:
        if None in given:
            missing = sum(1 for s in samples if s.split is None)
            raise DataSourceError(
                f"{missing} of {len(samples)} samples have no split while the others do; give "
                "a split for every row or for none (then splits are computed)"
            )
        unknown = given - set(SPLITS)
        if unknown:
            raise DataSourceError(f"unknown splits {sorted(unknown)}; use train, val, test")
        out = {name: [s for s in samples if s.split == name] for name in SPLITS}
        if not out["train"]:
            raise DataSourceError("the source gives splits but no train split; add train rows")
        for missing_split, fraction in (("val", val_fraction), ("test", test_fraction)):
            if not out[missing_split] and fraction > 0:
                carved = _grouped_stratified(
                    out["train"], {"train": 1.0 - fraction, missing_split: fraction}, seed
                )
                out["train"], out[missing_split] = carved["train"], carved[missing_split]
                logger.info(
                    "no %s split given: carved %d images out of train",
                    missing_split,
                    len(out[missing_split]),
                )
        _warn_patient_leaks(out)
    logger.info("splits: %s", summarise(out))
    return {name: out.get(name, []) for name in SPLITS}


def _warn_patient_leaks(splits: Mapping[str, Sequence[Sample]]) -> None:
    where: dict[str, set[str]] = defaultdict(set)
    for name, items in splits.items():
        for s in items:
            if s.patient_id:
                where[s.patient_id].add(name)
    leaked = sorted(p for p, names in where.items() if len(names) > 1)
    if leaked:
        logger.warning(
            "%d patients appear in more than one of the given splits (metrics will be "
            "optimistic): %s",
            len(leaked),
            name_some(leaked),
        )
