"""`cxr bench enroll`: what an enrollment costs, and what it costs the prediction after it.

For each reference count N (`--references 2000,100000`):

1. A temp data dir with a fresh SQLite database; the checkpoint registered and activated.
2. N references seeded straight into the database, as an enrolled deployment would have them:
   one row each (four classes), its stored embedding for the active model (clustered unit
   vectors), and its image file (hard links of a small PNG, one copy per 5,000 links, under
   the content-addressed name, so start-up reconciliation sees every row with its file).
   Seeding through the API would spend hours decoding and embedding; what is measured below
   does not depend on how the earlier references got there.
3. The real service (`uvicorn app.main:create_app`, the same process model as `cxr serve`),
   waited for until `/ready`.
4. `--rounds` times: `POST /references` with one new synthetic image (timed: `enroll`), then
   `POST /predict?explain=false` (timed: `first_predict_after_enroll`), then `--predicts` more
   predictions (timed: `predict`, the normal cost).

Rows: `references`, `enroll_p50_ms`, `first_predict_after_enroll_p50_ms`, `predict_p50_ms`,
`ratio` (first after enroll / normal, measured in the same rounds), `rounds`, `errors`,
`start_s` (server start to ready: the full index build). The client runs in this process.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer

from app.bench import (
    BENCH_CLASSES,
    DEFAULT_CHECKPOINT,
    _synthetic_image,
    running_service,
    service_env,
)

logger = logging.getLogger(__name__)

__all__ = ["EnrollRow", "bench_enroll_command", "run_enroll_bench"]

READY_TIMEOUT_S = 900.0
SEED_BATCH = 5000


@dataclass
class EnrollRow:
    references: int
    enroll_p50_ms: float
    first_predict_after_enroll_p50_ms: float
    predict_p50_ms: float
    ratio: float
    rounds: int
    errors: int
    start_s: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def seed_references(settings: Any, count: int, *, seed: int = 0) -> str:
    """Register nothing; add `count` reference rows, embeddings and files for the active
    model. Returns the model version."""
    from sqlalchemy import insert

    from app.db import Embedding, Reference, bump_index_version, get_active_model, utcnow
    from app.db.session import create_db_engine, create_sessionmaker

    engine = create_db_engine(settings.database_url)
    try:
        with create_sessionmaker(engine)() as session:
            model = get_active_model(session)
            if model is None:
                raise RuntimeError("register and activate a model before seeding references")
            rng = np.random.default_rng(seed)
            centres = rng.standard_normal((len(BENCH_CLASSES) + 1, model.embedding_dim))
            image = _synthetic_image("disc", 0, (64, 64))
            labels = [*BENCH_CLASSES, "other"]
            now = utcnow()
            for start in range(0, count, SEED_BATCH):
                n = min(SEED_BATCH, count - start)
                # One template file per batch: ext4 allows 65,000 links to one inode.
                template = settings.data_dir / f"bench-template-{start // SEED_BATCH}.png"
                template.parent.mkdir(parents=True, exist_ok=True)
                template.write_bytes(image)
                cls = (np.arange(start, start + n) % len(labels)).astype(int)
                vec = centres[cls] + 1.5 * rng.standard_normal((n, model.embedding_dim))
                vec = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
                refs, embs = [], []
                for j in range(n):
                    sha = f"{start + j:064x}"
                    rel = f"references/{sha[:2]}/{sha}.png"
                    path = settings.data_dir / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.link(template, path)
                    ref_id = f"seed{start + j:028d}"
                    refs.append(
                        {
                            "id": ref_id,
                            "label": labels[cls[j]],
                            "sha256": sha,
                            "image_path": rel,
                            "width": 64,
                            "height": 64,
                            "source_format": "png",
                            "enrolled_by": None,
                            "created_at": now,
                        }
                    )
                    embs.append(
                        {
                            "reference_id": ref_id,
                            "model_version": model.version,
                            "vector": vec[j].tobytes(),
                        }
                    )
                session.execute(insert(Reference), refs)
                session.execute(insert(Embedding), embs)
                session.commit()
            bump_index_version(session)
            session.commit()
            return model.version
    finally:
        engine.dispose()


def _timed(call: Any) -> tuple[float, int]:
    t0 = time.perf_counter()
    response = call()
    return (time.perf_counter() - t0) * 1000.0, response.status_code


def _measure(
    client: httpx.Client, headers: dict[str, str], *, rounds: int, predicts: int
) -> tuple[list[float], list[float], list[float], int]:
    """(enroll ms, first predict after it ms, normal predict ms, errors) over `rounds`."""
    query = _synthetic_image("stripes", 99)
    enroll_ms: list[float] = []
    first_ms: list[float] = []
    normal_ms: list[float] = []
    errors = 0

    def predict() -> httpx.Response:
        return client.post(
            "/predict",
            headers=headers,
            params={"explain": "false"},
            files={"file": ("q.png", query, "image/png")},
        )

    def enroll(i: int, image: bytes) -> httpx.Response:
        return client.post(
            "/references",
            headers=headers,
            data={"label": BENCH_CLASSES[i % len(BENCH_CLASSES)]},
            files={"file": ("r.png", image, "image/png")},
        )

    for _ in range(2):  # warm-up
        predict()
    for i in range(rounds):
        image = _synthetic_image("grid", 10_000 + i)
        ms, status = _timed(lambda i=i, image=image: enroll(i, image))
        enroll_ms.append(ms)
        errors += status != 201
        ms, status = _timed(predict)
        first_ms.append(ms)
        errors += status != 200
        for _ in range(predicts):
            ms, status = _timed(predict)
            normal_ms.append(ms)
            errors += status != 200
    return enroll_ms, first_ms, normal_ms, errors


def run_enroll_bench(
    *,
    checkpoint: Path,
    references: Sequence[int] = (2000, 100000),
    rounds: int = 20,
    predicts: int = 3,
    work_dir: Path | None = None,
) -> list[EnrollRow]:
    """One row per reference count (see the module docstring)."""
    from app.config import Settings
    from app.db.migrate import prepare_database
    from app.services.keys import create_api_key
    from app.services.models import register_model

    rows = []
    for count in references:
        with tempfile.TemporaryDirectory(prefix="cxr-bench-enroll-", dir=work_dir) as tmp:
            tmp_path = Path(tmp)
            secret = secrets.token_urlsafe(32)
            settings = Settings(
                data_dir=tmp_path / "var", secret_key=secret, device="cpu", log_level="WARNING"
            )
            factory = prepare_database(settings)
            with factory() as session:
                register_model(
                    session=session,
                    checkpoint=checkpoint,
                    settings=settings,
                    activate=True,
                    source="bench",
                )
                _r, clinician = create_api_key(
                    session=session, role="clinician", name="bench", settings=settings
                )
            factory.kw["bind"].dispose()
            seed_references(settings, count)
            env = service_env(settings.data_dir, secret)
            headers = {"X-API-Key": clinician}
            started = time.monotonic()
            with running_service(
                env, tmp_path / "server.log", ready_timeout_s=READY_TIMEOUT_S
            ) as server:
                start_s = time.monotonic() - started
                with httpx.Client(base_url=server.url, timeout=600) as client:
                    enroll_ms, first_ms, normal_ms, errors = _measure(
                        client, headers, rounds=rounds, predicts=predicts
                    )
            first, normal = statistics.median(first_ms), statistics.median(normal_ms)
            row = EnrollRow(
                references=count,
                enroll_p50_ms=round(statistics.median(enroll_ms), 2),
                first_predict_after_enroll_p50_ms=round(first, 2),
                predict_p50_ms=round(normal, 2),
                ratio=round(first / normal, 2),
                rounds=rounds,
                errors=errors,
                start_s=round(start_s, 1),
            )
            logger.info("bench enroll row: %s", row.as_dict())
            rows.append(row)
    return rows


def format_table(rows: Sequence[EnrollRow]) -> str:
    lines = [
        "| references | enroll_p50_ms | first_predict_after_enroll_p50_ms | predict_p50_ms "
        "| first/normal | rounds | errors | start_s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.references} | {r.enroll_p50_ms:.1f} | "
            f"{r.first_predict_after_enroll_p50_ms:.1f} | {r.predict_p50_ms:.1f} | "
            f"{r.ratio:.2f} | {r.rounds} | {r.errors} | {r.start_s:.1f} |"
        )
    return "\n".join(lines)


def bench_enroll_command(
    checkpoint: Annotated[
        Path, typer.Option(help="Checkpoint to serve (the shipped recipe's model).")
    ] = DEFAULT_CHECKPOINT,
    references: Annotated[
        str, typer.Option(help="Reference counts, comma-separated.")
    ] = "2000,100000",
    rounds: Annotated[int, typer.Option(min=1, help="Enrollments per reference count.")] = 20,
    out: Annotated[Path | None, typer.Option(help="Write the rows as JSON here.")] = None,
) -> None:
    """Benchmark enrollment and the first prediction after it; prints a table, writes JSON."""
    if not checkpoint.is_file():
        typer.echo(
            f"error: checkpoint {checkpoint} does not exist; train the shipped recipe "
            "(`cxr train ... --out runs/default`) or pass --checkpoint",
            err=True,
        )
        raise typer.Exit(code=2)
    try:
        counts = [int(part) for part in references.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter("--references takes integers, e.g. 2000,100000") from None
    from app.logging import configure_logging

    configure_logging("INFO", json_logs=False, stream=sys.stderr)
    rows = run_enroll_bench(checkpoint=checkpoint, references=counts, rounds=rounds)
    typer.echo(format_table(rows))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        typer.echo(f"wrote {out}", err=True)
