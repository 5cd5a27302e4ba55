"""``cxr bench adapt``: replay a new hospital joining a deployment.

A model is trained on the ``--data`` sources (or ``--checkpoint`` is taken); their train splits
are the references, as ``cxr references import`` of each would enroll them. The ``--site``
source is a hospital the model and the references have never seen. Its test split is queried:

1. ``zero_shot``: against the vendor references alone;
2. ``enrolled``: after enrolling ``k`` images per class of the site's train split (plain k-NN,
   the site's images among thousands of vendor references);
3. ``adapted``: after the site adaptation the service's retrain job performs: the model
   fine-tuned (:func:`training.train.finetune_config`) on the vendor references plus the
   site's enrolled images as a source of their own, which the label x source sampler draws as
   often as any vendor group; then the same references, re-embedded, answer by k-NN.

Each ``k`` is repeated over several random draws of the enrolled images (``--repeats``) and
the figures are averaged, because with five images per class a single draw is mostly luck.
Rows also carry the vendor sources' own test balanced accuracy under the same references, so
an adaptation that helps the site by hurting everyone else is visible.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["run_adapt_bench", "site_metrics"]

COVID = "COVID-19"


def site_metrics(true: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Balanced accuracy and recall over ``labels`` (the site's classes), and the share of
    non-COVID-19 images called COVID-19 (the age shortcut's signature)."""
    t, p = np.asarray(true), np.asarray(pred)
    recall = {lab: float(np.mean(p[t == lab] == lab)) for lab in labels if (t == lab).any()}
    non_covid = t != COVID
    return {
        "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else None,
        "recall": recall,
        "covid_false_positive_rate": (
            float(np.mean(p[non_covid] == COVID)) if non_covid.any() else None
        ),
    }


def _predict(refs: np.ndarray, ref_labels: list[str], queries: np.ndarray, *, k: int) -> list[str]:
    from training.evaluate import index_predictions

    classes = sorted(set(ref_labels))
    pred, _ = index_predictions(refs, ref_labels, queries, classes=classes, k=k)
    return [classes[i] for i in pred]


def run_adapt_bench(
    *,
    checkpoint: Path,
    data: Sequence[Path],
    site: Path,
    ks: Sequence[int] = (1, 5, 10),
    repeats: int = 5,
    adapt_repeats: int = 2,
    seed: int = 0,
    k: int = 5,
    batch_size: int = 64,
    threads: int | None = None,
    work_dir: Path | None = None,
    train_minutes: float | None = None,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """Rows ``site, k, stage, balanced_accuracy, recall, covid_false_positive_rate, minutes``
    (plus ``vendor_balanced_accuracy``); see the module docstring. ``adapt_repeats`` of the
    ``repeats`` draws are also adapted (each adaptation trains for about a minute)."""
    import dataclasses
    import tempfile

    from training.checkpoint import load_checkpoint
    from training.data import load_source, load_sources, source_name, split_samples
    from training.evaluate import embed_samples
    from training.train import finetune_config, train

    site_name = source_name(site)
    vendor = split_samples(load_sources(list(data)))
    site_splits = split_samples(load_source(site, name=site_name))

    def embed(ckpt: Path, samples: list[Any]) -> tuple[np.ndarray, list[str], list[str]]:
        loaded = load_checkpoint(ckpt)
        emb, labels, kept = embed_samples(
            loaded.encoder, samples, loaded.preprocessing, batch_size=batch_size
        )
        return emb, labels, [s.source or "" for s in kept]

    def embed_all(ckpt: Path) -> dict[str, tuple[np.ndarray, list[str], list[str]]]:
        return {
            "vendor": embed(ckpt, vendor["train"]),
            "vendor_test": embed(ckpt, vendor["test"]),
            "site": embed(ckpt, site_splits["train"]),
            "query": embed(ckpt, site_splits["test"]),
        }

    base = embed_all(checkpoint)
    site_labels = sorted(set(base["query"][1]))
    rows: list[dict[str, Any]] = []

    def score(emb: dict[str, Any], picks: np.ndarray) -> tuple[dict[str, Any], float]:
        """Site metrics and vendor source-balanced accuracy with vendor + picked site refs."""
        v_emb, v_lab, _ = emb["vendor"]
        s_emb, s_lab, _ = emb["site"]
        refs = np.concatenate([v_emb, s_emb[picks]]) if len(picks) else v_emb
        labels = v_lab + [s_lab[i] for i in picks]
        q_emb, q_lab, _ = emb["query"]
        site = site_metrics(q_lab, _predict(refs, labels, q_emb, k=k), site_labels)
        vt_emb, vt_lab, vt_src = emb["vendor_test"]
        pred = np.asarray(_predict(refs, labels, vt_emb, k=k))
        truth, src = np.asarray(vt_lab), np.asarray(vt_src)
        per_source = [
            site_metrics(truth[src == s], pred[src == s], sorted(set(truth[src == s])))
            for s in sorted(set(vt_src))
        ]
        return site, float(np.mean([m["balanced_accuracy"] for m in per_source]))

    def emit(kk: int, stage: str, results: list[tuple[dict[str, Any], float]],
             minutes: float) -> None:  # fmt: skip
        metrics = [m for m, _ in results]
        row = {
            "site": site_name,
            "k": kk,
            "stage": stage,
            "balanced_accuracy": float(np.mean([m["balanced_accuracy"] for m in metrics])),
            "recall": {
                lab: float(np.mean([m["recall"].get(lab, np.nan) for m in metrics]))
                for lab in site_labels
            },
            "covid_false_positive_rate": float(
                np.mean([m["covid_false_positive_rate"] for m in metrics])
            ),
            "vendor_balanced_accuracy": float(np.mean([v for _, v in results])),
            "minutes": round(minutes, 3),
            "repeats": len(metrics),
        }
        if stage == "zero_shot" and train_minutes is not None:
            row["minutes"] = round(train_minutes, 3)
        rows.append(row)
        log.info("bench adapt: %s", row)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2))

    emit(0, "zero_shot", [score(base, np.zeros(0, dtype=np.int64))], 0.0)
    rng = np.random.default_rng(seed)
    s_lab_arr = np.asarray(base["site"][1])
    scratch = Path(work_dir or tempfile.mkdtemp(prefix="cxr-bench-adapt-"))
    for kk in ks:
        draws = [
            np.concatenate(
                [
                    rng.choice(np.flatnonzero(s_lab_arr == lab), size=kk, replace=False)
                    for lab in site_labels
                    if (s_lab_arr == lab).sum() >= kk
                ]
            )
            for _ in range(repeats)
        ]
        emit(kk, "enrolled", [score(base, picks) for picks in draws], 0.0)
        adapted, seconds = [], 0.0
        for r, picks in enumerate(draws[:adapt_repeats]):
            site_train = [site_splits["train"][i] for i in picks]
            site_train = [dataclasses.replace(s, source=site_name) for s in site_train]
            config = finetune_config(
                checkpoint, out=str(scratch / f"k{kk}_r{r}"), seed=seed + r, threads=threads,
                progress_bar=False,
            )  # fmt: skip
            t0 = time.perf_counter()
            # No validation split: the site has no images to spare, so the last epoch is kept
            # and the vendor column of the row shows whether the vendor sources paid for it.
            result = train(config, samples={"train": vendor["train"] + site_train, "val": []})
            seconds += time.perf_counter() - t0
            adapted.append(score(embed_all(result.checkpoint), picks))
        if adapted:
            emit(kk, "adapted", adapted, seconds / 60.0 / len(adapted))
    return rows
