"""`cxr train`, `cxr evaluate` and `cxr bench train` through Typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import pytest
import torch
from typer.testing import CliRunner

from app.cli import cli
from tests.training.synthetic import make_folder
from training.threads import ThreadPolicy, apply_thread_policy

runner = CliRunner()
FAST = ["--image-size", "32", "--batch-size", "16", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(
        tmp_path_factory.mktemp("cli_data"), {"train": 12, "val": 4, "test": 4}, size=32
    )


@pytest.mark.usefixtures("restore_thread_policy")
def test_train_then_evaluate_then_resume(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--encoder", "sepconv", *FAST]
    apply_thread_policy(ThreadPolicy(kind="test", threads=2))  # not what --threads 1 asks
    result = runner.invoke(cli, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    # `cxr train --threads 1` is this process's start: torch and FAISS run one thread, and
    # the run's saved config records the count it trained with.
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    config = json.loads((run / "config.json").read_text())
    assert config["threads"] == 1 and config["resolved"]["threads"] == 1
    for name in ("encoder.pt", "metrics.json", "config.json", "loss_curve.png",
                 "confusion_matrix.png", "embedding_map.png"):  # fmt: skip
        assert (run / name).is_file(), name
    assert "balanced acc." in result.output

    report_path = tmp_path / "report.json"
    result = runner.invoke(
        cli,
        ["evaluate", "--checkpoint", str(run / "encoder.pt"), "--data", str(data),
         "--out", str(report_path), "--episodes", "50", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    for method in ("knn", "mean_distance"):
        assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix",
                "auc_ovr"} <= set(report[method])  # fmt: skip
        assert report[method]["confusion_matrix"]["labels"] == ["bars", "checker", "disc", "ring"]
    assert set(report["n_way"]) == {"n", "k_shot", "episodes", "accuracy"}
    assert report["split"] == "test"

    result = runner.invoke(cli, [*args, "--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "{missing}", "--out", "{tmp}"], "does not exist"),
        (["train", "--data", "{data}", "--out", "{tmp}", "--encoder", "vgg"], "unknown encoder"),
        (["train", "--data", "{data}", "--out", "{tmp}", "--resume"], "--resume"),
        (["train", "--data", "{data}", "--out", "{tmp}", "--weights", "{missing}"],
         "does not exist"),
        (["evaluate", "--checkpoint", "{missing}", "--data", "{data}"], "does not exist"),
        (["evaluate", "--checkpoint", "{junk}", "--data", "{data}"], "not a usable"),
        (["bench", "train", "--data", "{data}", "--combos", "resnet9:nope"], "unknown loss"),
    ],
)  # fmt: skip
def test_user_errors_are_one_clear_message(
    argv: list[str], message: str, data: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 10)
    fill = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path / "out"),
            "data": str(data), "junk": str(junk)}  # fmt: skip
    result = runner.invoke(
        cli, [a.format(**fill) for a in argv] + (FAST if argv[0] == "train" else [])
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bench_train_writes_rows(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = runner.invoke(
        cli,
        ["bench", "train", "--data", str(data), "--combos",
         "sepconv:contrastive:batch_size=16,sepconv:classifier:batch_size=16",
         "--epochs", "1", "--image-size", "32", "--threads", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["encoder"], r["loss"]) for r in rows] == [
        ("sepconv", "contrastive"),
        ("sepconv", "classifier"),
    ]
    for row in rows:
        assert {"encoder", "loss", "minutes", "balanced_accuracy", "covid_recall"} <= set(row)
        assert row["covid_recall"] is None  # no COVID-19 class in the synthetic data
    assert "cxr bench train" in result.output
