"""Unknown-class detection on real data: leave each class out of the references.

For every class ``c``: the references are the training-split embeddings of all *other* classes;
the queries are all test-split embeddings. Test images of ``c`` are "unknown" (positives), test
images of enrolled classes "known" (negatives). Reported per held-out class:

- ``auroc``: AUROC of the index's ``outlier_score`` (mean distance to the predicted class)
  separating unknown from known -- threshold-free quality of the score;
- ``auroc_nearest``: the same for the distance to the nearest reference of the predicted class
  (the outlier score before it became the class mean: the comparison in the same run);
- ``auroc_nearest_any``: the same for the distance to the nearest reference of any class;
- ``flagged_unknown`` / ``flagged_known``: fraction of each flagged ``unknown`` by the
  calibrated threshold (quantile ``--quantile`` of leave-one-out nearest same-class distances),
  i.e. the operating point the service actually uses (ideal: 1 and ``1 - quantile``).

Usage::

    uv run python bench/unknown_classes.py --checkpoint runs/x/encoder.pt \\
        --data ../shared/data/cxr4 --data ../shared/data/adult --out runs/unknown_classes.json

This script may import both ``training`` and ``index`` (it lives outside the packages);
:func:`unknown_class_report` needs only embeddings, so it is testable without a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/unknown_classes.py` from anywhere
    sys.path.insert(0, str(ROOT))

from index.reference_index import ReferenceIndex  # noqa: E402

log = logging.getLogger("bench.unknown_classes")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if undefined."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def unknown_class_report(
    ref_emb: np.ndarray,
    ref_labels: Sequence[str],
    query_emb: np.ndarray,
    query_labels: Sequence[str],
    *,
    quantile: float = 0.95,
    k: int = 5,
) -> list[dict[str, Any]]:
    """One row per held-out class (see the module docstring); classes need >= 1 reference left."""
    ref_labels = np.asarray(ref_labels, dtype=object)
    query_labels = np.asarray(query_labels, dtype=object)
    rows = []
    for held_out in sorted(set(ref_labels.tolist()) | set(query_labels.tolist())):
        keep = ref_labels != held_out
        if not keep.any():
            log.warning("class %r is the only class; nothing to enroll without it", held_out)
            continue
        index = ReferenceIndex.build(
            ref_emb[keep],
            [str(i) for i in np.flatnonzero(keep)],
            ref_labels[keep].tolist(),
            device="cpu",
            unknown_quantile=quantile,
            k=k,
        )
        results = index.search(query_emb)
        positive = query_labels == held_out
        score = np.array([r.outlier_score for r in results])
        nearest_any = np.array([min(r.nearest.values()) for r in results])
        nearest_pred = np.array([r.nearest[r.label] for r in results])
        flagged = np.array([r.unknown for r in results])
        rows.append(
            {
                "held_out": held_out,
                "enrolled": sorted(index.classes()),
                "n_unknown": int(positive.sum()),
                "n_known": int((~positive).sum()),
                "auroc": auroc(score, positive),
                "auroc_nearest": auroc(nearest_pred, positive),
                "auroc_nearest_any": auroc(nearest_any, positive),
                "flagged_unknown": float(flagged[positive].mean()) if positive.any() else None,
                "flagged_known": float(flagged[~positive].mean()) if (~positive).any() else None,
                "quantile": quantile,
            }
        )
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A text table of the report."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = [
        "held_out",
        "n_unknown",
        "n_known",
        "auroc",
        "auroc_nearest",
        "auroc_nearest_any",
        "flagged_unknown",
        "flagged_known",
    ]
    table = [cols] + [[f(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table
    )


def embed_split(
    checkpoint: Path, data: Sequence[Path], *, device: str, batch_size: int, limit: int | None
):
    """Train and test embeddings of the ``data`` sources under ``checkpoint`` (one index of all
    their train splits, as a deployment of the shipped recipe enrolls them)."""
    from training.checkpoint import load_checkpoint
    from training.data import load_sources, split_samples
    from training.evaluate import embed_samples

    loaded = load_checkpoint(checkpoint, map_location=device)
    splits = split_samples(load_sources(list(data)))
    out = {}
    for split in ("train", "test"):
        samples = splits[split]
        if limit is not None:
            rng = np.random.default_rng(0)
            samples = [samples[i] for i in sorted(rng.permutation(len(samples))[:limit])]
        log.info("embedding %d %s images", len(samples), split)
        out[split] = embed_samples(
            loaded.encoder, samples, loaded.preprocessing, batch_size=batch_size, device=device
        )[:2]
    return out["train"], out["test"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="encoder.pt to embed with")
    parser.add_argument(
        "--data", type=Path, action="append", required=True, help="labeled source (repeatable)"
    )
    parser.add_argument("--quantile", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="at most N images per split")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    (ref_emb, ref_labels), (test_emb, test_labels) = embed_split(
        args.checkpoint,
        args.data,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    rows = unknown_class_report(
        ref_emb, ref_labels, test_emb, test_labels, quantile=args.quantile, k=args.k
    )
    for row in rows:
        row["checkpoint"] = str(args.checkpoint)
    print(format_rows(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
