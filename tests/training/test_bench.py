"""``training.bench``: combo parsing and the thread count every combo trains with."""

from __future__ import annotations

from pathlib import Path

import pytest

import training.bench as bench
from training.bench import parse_combos, run_train_bench
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


def test_threads_are_resolved_once_for_every_combo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The load average rises with the bench's own training; later combos must not get fewer
    threads than the first because of it."""
    idle = iter([2, 1, 1])  # what the load average would say before each combo
    monkeypatch.setattr(bench, "default_threads", lambda: next(idle))
    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig) -> TrainResult:
        seen.append(config)
        return TrainResult(run_dir=Path(config.out), checkpoint=Path(config.out), metrics={})

    monkeypatch.setattr(bench, "train", fake_train)
    combos = parse_combos("sepconv:contrastive,sepconv:classifier,sepconv:triplet:threads=1")
    rows = run_train_bench(TrainConfig(data="x"), combos, runs_dir=tmp_path)
    assert [c.threads for c in seen] == [2, 2, 1]  # an explicit per-combo override still wins
    assert len(rows) == 3
    seen.clear()
    run_train_bench(TrainConfig(data="x", threads=3), combos[:1], runs_dir=tmp_path)
    assert seen[0].threads == 3
