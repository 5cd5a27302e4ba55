"""``cxr bench train``: train encoder/loss combinations on one split and compare them on test.

Every combination uses the same data, split, seed and defaults (only encoder and loss change,
plus per-combination overrides written as ``encoder:loss:key=value``), so the table compares
like with like. Each row records wall-clock minutes, which on a shared machine include
contention: read them as an upper bound.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.train import TrainConfig, train

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_COMBOS", "Combo", "parse_combos", "run_train_bench"]

# The comparison of docs/BENCHMARKS.md: the default (covidnet + hybrid), the same encoder with
# every other loss (the classifier baseline included), ResNet-9 with both pairwise losses, and a
# torchvision backbone. The heavier encoders run at smaller inputs and resnet9/triplet and
# resnet18 for 10 epochs, so the whole table takes about 75 minutes on a 2-core CPU.
DEFAULT_COMBOS = ",".join(
    [
        "covidnet:hybrid",
        "covidnet:contrastive",
        "covidnet:classifier",
        "covidnet:supcon",
        "covidnet:triplet",
        "resnet9:contrastive:image_size=112",
        "resnet9:triplet:image_size=112:epochs=10",
        "resnet18:contrastive:image_size=128:epochs=10",
    ]
)


@dataclasses.dataclass(frozen=True)
class Combo:
    """One benchmark row: encoder, loss and optional config overrides (``key=value``)."""

    encoder: str
    loss: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        extra = "".join(f":{k}={v}" for k, v in self.overrides)
        return f"{self.encoder}:{self.loss}{extra}"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_combos(text: str) -> list[Combo]:
    """``"resnet9:contrastive,resnet18:triplet:epochs=4"`` -> combos (validated names)."""
    from training.encoders import list_encoders
    from training.losses import list_losses

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    combos = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        if len(parts) < 2:
            raise ValueError(f"combo {item!r} must look like ENCODER:LOSS[:key=value...]")
        encoder, loss, *rest = parts
        if encoder not in list_encoders():
            known = ", ".join(list_encoders())
            raise ValueError(f"unknown encoder {encoder!r} in {item!r}; choose one of: {known}")
        if loss not in list_losses():
            raise ValueError(
                f"unknown loss {loss!r} in {item!r}; choose one of: {', '.join(list_losses())}"
            )
        overrides = []
        for kv in rest:
            key, sep, value = kv.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"bad override {kv!r} in {item!r}; use a TrainConfig field=value")
            if key == "threads":  # one count per process (training/threads.py), set at start
                raise ValueError(
                    f"threads cannot change per combo ({item!r}): every combo runs with the "
                    "bench process's count; give --threads to cxr bench train"
                )
            overrides.append((key, _parse_value(value)))
        combos.append(Combo(encoder, loss, tuple(overrides)))
    if not combos:
        raise ValueError(
            "no combinations given; e.g. --combos resnet9:contrastive,resnet18:triplet"
        )
    return combos


def _row(combo: Combo, metrics: dict[str, Any], minutes: float) -> dict[str, Any]:
    test = metrics.get("test") or {}
    knn = test.get("knn") or {}
    per_class = knn.get("per_class") or {}
    covid = next((v for k, v in per_class.items() if k.lower().startswith("covid")), None)
    return {
        "encoder": combo.encoder,
        "loss": combo.loss,
        "overrides": dict(combo.overrides),
        "minutes": round(minutes, 2),
        "balanced_accuracy": knn.get("balanced_accuracy"),
        "covid_recall": covid["recall"] if covid else None,
        "accuracy": knn.get("accuracy"),
        "macro_f1": knn.get("macro_f1"),
        "auc_ovr": knn.get("auc_ovr"),
        "recall": {k: v["recall"] for k, v in per_class.items()},
        "mean_distance_balanced_accuracy": (test.get("mean_distance") or {}).get(
            "balanced_accuracy"
        ),
        "n_way_accuracy": (test.get("n_way") or {}).get("accuracy"),
        "epochs_run": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
        "images_per_second": metrics.get("images_per_second"),
        "device": metrics.get("device"),
        "evaluated_split": metrics.get("evaluated_split"),
    }


def run_train_bench(
    base: TrainConfig,
    combos: Sequence[Combo],
    *,
    runs_dir: Path,
    out: Path | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every combo (run dirs under ``runs_dir``) and return one row per combo.

    Rows are written to ``out`` after each combo, so a long benchmark that is interrupted
    keeps what it finished.
    """
    # Every combo runs with the thread count the process applied at its start (cxr bench train
    # --threads, else the idle cores then): measured per combo, the load average would include
    # the previous combo's own training and hand every later combo fewer threads than the first.
    rows: list[dict[str, Any]] = []
    for combo in combos:
        config = dataclasses.replace(
            base,
            encoder=combo.encoder,
            loss=combo.loss,
            out=str(runs_dir / combo.name.replace(":", "_").replace("=", "-")),
            resume=False,
            **dict(combo.overrides),
        )
        log.info("bench: training %s", combo.name)
        t0 = time.perf_counter()
        result = train(config)
        row = _row(combo, result.metrics, (time.perf_counter() - t0) / 60.0)
        row["run_dir"] = str(result.run_dir)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2))
    return rows
