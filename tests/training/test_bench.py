"""``training.bench``: combo parsing and the thread count every combo trains with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.bench as bench
from training.bench import parse_combos, run_train_bench
from training.threads import ThreadPolicy, apply_thread_policy
from training.train import TrainConfig, TrainResult


def test_parse_combos_reads_overrides_and_rejects_unknown_names() -> None:
    combos = parse_combos("covidnet:hybrid:epochs=20:patience=null, resnet9:triplet")
    assert [c.name for c in combos] == [
        "covidnet:hybrid:epochs=20:patience=None",
        "resnet9:triplet",
    ]
    assert dict(combos[0].overrides) == {"epochs": 20, "patience": None}
    with pytest.raises(ValueError, match="unknown loss 'arcface'"):
        parse_combos("covidnet:arcface")
    with pytest.raises(ValueError, match="bad override 'colour=red'"):
        parse_combos("covidnet:hybrid:colour=red")


@pytest.mark.usefixtures("restore_thread_policy")
def test_every_combo_trains_with_the_thread_count_of_the_bench_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The count is the process's, applied once at the bench's start (`cxr bench train
    --threads`, else the idle cores then): the load average rising with the bench's own
    training must not hand later combos fewer threads, and no combo can change it."""
    apply_thread_policy(ThreadPolicy.training(2))
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))  # the bench's own load
    seen: list[tuple[int | None, int]] = []

    def fake_train(config: TrainConfig) -> TrainResult:
        seen.append((config.threads, torch.get_num_threads()))
        return TrainResult(run_dir=Path(config.out), checkpoint=Path(config.out), metrics={})

    monkeypatch.setattr(bench, "train", fake_train)
    combos = parse_combos("sepconv:contrastive,sepconv:classifier")
    rows = run_train_bench(TrainConfig(data="x", threads=2), combos, runs_dir=tmp_path)
    assert seen == [(2, 2), (2, 2)]
    assert len(rows) == 2
    with pytest.raises(ValueError, match="threads cannot change per combo"):
        parse_combos("sepconv:triplet:threads=1")
