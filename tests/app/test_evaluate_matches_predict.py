"""`cxr evaluate` measures the rule `/predict` serves: on the same references and queries, the
labels it reports are exactly the labels the service answers.

A synthetic source with given train/val/test splits (so evaluation's references are exactly the
train images); a small untrained checkpoint; the train images enrolled over HTTP; every test
image asked of `/predict` and compared with `cxr evaluate --predictions`. The images are blends
of two classes' patterns, so the decisions are close enough that another k or another vote
weighting answers differently: the test would catch evaluation drifting from the service.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from app.main import create_app
from tests.app.conftest_predict import post_predict, register_in
from tests.app.jobs_helpers import LABELS, class_png, make_checkpoint

#: Images per split and class (given splits: evaluation's references are the train folder).
COUNTS = {"train": 12, "val": 1, "test": 10}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)


def blended_png(label: str, seed: int) -> bytes:
    """`label`'s pattern mixed with another class's (weight 0.45-0.8): hard to tell apart."""
    rng = np.random.default_rng(seed)
    other = LABELS[(LABELS.index(label) + 1 + int(rng.integers(2))) % len(LABELS)]
    weight = rng.uniform(0.45, 0.8)
    mixed = weight * _pixels(class_png(label, seed)) + (1 - weight) * _pixels(
        class_png(other, seed + 7)
    )
    buf = io.BytesIO()
    Image.fromarray(mixed.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_source(root: Path) -> Path:
    for s, (split, n) in enumerate(COUNTS.items()):
        for c, label in enumerate(LABELS):
            folder = root / split / label
            folder.mkdir(parents=True)
            for j in range(n):
                (folder / f"{j}.png").write_bytes(blended_png(label, 10_000 * s + 100 * c + j))
    return root


def evaluate_predictions(checkpoint: Path, source: Path, out: Path, *, k: int) -> dict[str, str]:
    """`cxr evaluate --predictions`: the k-NN label of every test image, by path."""
    from app.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "evaluate", "--checkpoint", str(checkpoint), "--data", str(source),
            "--split", "test", "--k", str(k), "--episodes", "0", "--device", "cpu",
            "--predictions", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n_references"] == COUNTS["train"] * len(LABELS)
    return {p["id"]: p["knn"] for p in report["predictions"]}


def inverse_distance_vote(refs: np.ndarray, labels: list[str], queries: np.ndarray) -> list[str]:
    """The retired evaluation rule: the 5 nearest vote with weights 1 / (distance + 1e-6)."""
    dists = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * queries @ refs.T))
    answers = []
    for row in dists:
        votes: dict[str, float] = {}
        for j in np.argsort(row, kind="stable")[:5]:
            votes[labels[j]] = votes.get(labels[j], 0.0) + 1.0 / (float(row[j]) + 1e-6)
        answers.append(max(sorted(votes), key=lambda label: votes[label]))
    return answers


@pytest.mark.slow
def test_evaluate_reports_the_labels_predict_answers(
    app: FastAPI, client: TestClient, headers: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    source = write_source(tmp_path / "source")
    checkpoint = make_checkpoint(tmp_path / "encoder.pt")
    k = app.state.settings.default_k
    evaluated = evaluate_predictions(checkpoint, source, tmp_path / "k.json", k=k)
    queries = sorted((source / "test").rglob("*.png"))
    assert sorted(evaluated) == [str(q) for q in queries]

    register_in(app, checkpoint)
    for label in LABELS:
        files = [
            ("file", (p.name, p.read_bytes(), "image/png"))
            for p in sorted((source / "train" / label).glob("*.png"))
        ]
        response = client.post(
            "/references", headers=headers["clinician"], data={"label": label}, files=files
        )
        assert response.status_code == 201, response.text

    # A process started now builds its index from the database (calibrated on every
    # reference, as evaluation's index is), and answers each query.
    with TestClient(create_app(app.state.settings)) as fresh:
        predicted = {}
        for path in queries:
            response = post_predict(fresh, headers["reader"], path.read_bytes(), explain=False)
            assert response.status_code == 200, response.text
            predicted[str(path)] = response.json()["label"]

    assert predicted == evaluated
    # Not a tautology: half of the answers are wrong, and another k or the retired
    # 1/(d + eps) weighting answers some queries differently on these images.
    truth = {str(q): q.parent.name for q in queries}
    accuracy = np.mean([predicted[q] == truth[q] for q in predicted])
    assert 0.4 < accuracy < 0.9
    with_k1 = evaluate_predictions(checkpoint, source, tmp_path / "k1.json", k=1)
    assert sum(with_k1[q] != predicted[q] for q in predicted) >= 2

    from training.checkpoint import load_checkpoint
    from training.embedding import embed_files

    loaded = load_checkpoint(checkpoint)
    refs = sorted((source / "train").rglob("*.png"))
    ref_emb = embed_files(loaded.encoder, refs, loaded.preprocessing).vectors
    query_emb = embed_files(loaded.encoder, queries, loaded.preprocessing).vectors
    retired = inverse_distance_vote(ref_emb, [p.parent.name for p in refs], query_emb)
    assert any(old != predicted[str(q)] for q, old in zip(queries, retired, strict=True))
