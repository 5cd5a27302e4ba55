"""Where does the model look? Share of Grad-CAM mass inside the central lung region.

DeGrave et al. (2021) showed COVID-19 X-ray models reading text, laterality markers and film
borders instead of lungs. This measures it: for test images of every ``--data`` source, the
Grad-CAM map that the service would draw (similarity to the predicted class's mean, with the
train splits as references) is placed on the full film exactly as the overlay is (the border
crop of the preprocessing is honoured), and the share of its mass inside the central lung box
(``x`` 15-85 %, ``y`` 10-90 % of the film) is reported, with the share on the outer 8 % band
(where markers and text sit). Run it on two checkpoints to compare (before / after).

Usage::

    uv run python bench/gradcam_mass.py --checkpoint runs/recipe/encoder.pt \\
        --data ../shared/data/cxr4 --data ../shared/data/adult --per-source 100 \\
        --out runs/gradcam_mass.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/gradcam_mass.py` from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.gradcam_mass")

LUNG_BOX = (0.10, 0.90, 0.15, 0.85)  # top, bottom, left, right (fractions of the film)
BORDER = 0.08


def mass_shares(heat_on_film: np.ndarray) -> tuple[float, float]:
    """(share inside the lung box, share on the outer border band) of a non-negative map."""
    h, w = heat_on_film.shape
    total = float(heat_on_film.sum())
    if total <= 0:
        return 0.0, 0.0
    top, bottom, left, right = LUNG_BOX
    inside = heat_on_film[round(top * h) : round(bottom * h), round(left * w) : round(right * w)]
    by, bx = round(BORDER * h), round(BORDER * w)
    core = heat_on_film[by : h - by, bx : w - bx]
    border = max(0.0, float(total - core.sum()) / total)  # float sums may dip below zero
    return float(inside.sum()) / total, border


def run(checkpoint: Path, data: Sequence[Path], *, per_source: int, seed: int) -> dict[str, Any]:
    import torch

    from app.gradcam import gradcam_heatmap
    from app.overlay import heat_on_film
    from training.checkpoint import load_checkpoint
    from training.data import load_sources, split_samples
    from training.evaluate import embed_samples
    from training.imaging import decode_image
    from training.preprocess import preprocess

    loaded = load_checkpoint(checkpoint)
    encoder, spec = loaded.encoder, loaded.preprocessing
    splits = split_samples(load_sources(list(data)))
    ref_emb, ref_labels, _ = embed_samples(encoder, splits["train"], spec)
    labels = sorted(set(ref_labels))
    means = np.stack([ref_emb[np.asarray(ref_labels) == c].mean(0) for c in labels])
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[tuple[float, float]]] = {}
    for src in sorted({s.source for s in splits["test"]}):
        items = [s for s in splits["test"] if s.source == src]
        items = [items[i] for i in sorted(rng.permutation(len(items))[:per_source])]
        for sample in items:
            image = decode_image(sample.path)
            x = preprocess(image, spec)[None]
            with torch.no_grad():
                emb = encoder(x)[0].numpy()
            target = means[int(np.argmin(((means - emb) ** 2).sum(1)))]
            heat = gradcam_heatmap(encoder, x, target)
            by_source.setdefault(str(src), []).append(
                mass_shares(heat_on_film(heat, image.shape, spec.crop))
            )
    report = {
        "checkpoint": str(checkpoint),
        "preprocessing": spec.to_dict(),
        "lung_box": LUNG_BOX,
        "border": BORDER,
        "per_source": {
            src: {
                "images": len(v),
                "lung_share": float(np.mean([a for a, _ in v])),
                "border_share": float(np.mean([b for _, b in v])),
            }
            for src, v in by_source.items()
        },
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from bench.report import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--per-source", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = run(args.checkpoint, args.data, per_source=args.per_source, seed=args.seed)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
