"""Soak: many clients mixing predict, enroll, delete and activate against the real service.

What it checks, and why each one: **no 5xx** (every answer is a documented one, whatever the
interleaving), **no orphans** after the run (no reference row without its image file and no file
without its row: the lost-images defect of issue 11), and **bounded RSS growth** of the API
process (no leak per request: the growth between the end of the warm-up and the end of the run
must stay under `--rss-bound-mb`).

The mix (per client, drawn with a seeded RNG): 70 % `POST /predict` (a third with Grad-CAM),
15 % `POST /references` (one image from a pool of 48 synthetic images, each always under the same
label, so images are re-enrolled after they were deleted), 12 % `DELETE /references/{id}` of a
reference some client enrolled, 3 % `POST /admin/models/{v}/activate` alternating between two
registered checkpoints (each activation re-embeds every reference in the server).

Usage (the figures in docs/BENCHMARKS.md)::

    uv run python bench/soak.py --clients 16 --seconds 300 --checkpoint CKPT [--checkpoint CKPT2]
        [--database-url postgresql+psycopg://...] [--out soak.json]

Without checkpoints, two small freshly initialised ones are made (timings then are not the
shipped model's). A smoke version (4 clients, a few seconds) runs in the default test suite:
tests/app/test_soak_smoke.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.bench import (  # noqa: E402
    BENCH_CLASSES,
    _fresh_checkpoint,
    _synthetic_image,
    running_service,
    service_env,
)

logger = logging.getLogger("bench.soak")

POOL = 48
READY_TIMEOUT_S = 300.0
#: Deletes stop while the clients know this few references (16 clients deleting the last ones at
#: once emptied the index in one 5-minute run: 17 x 503 "no references enrolled").
MIN_KEPT = 4
MIX = (("predict", 0.70), ("enroll", 0.15), ("delete", 0.12), ("activate", 0.03))


@dataclass
class SoakReport:
    clients: int
    seconds: float
    requests: int
    by_kind: dict[str, int]
    statuses: dict[str, int]
    status_5xx: int
    transport_errors: int
    rows_without_file: int
    files_without_row: int
    rss_start_mb: float
    rss_end_mb: float
    rss_max_mb: float
    rss_growth_mb: float
    rss_bound_mb: float
    database: str
    samples: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return (
            self.status_5xx == 0
            and self.transport_errors == 0
            and self.rows_without_file == 0
            and self.files_without_row == 0
            and self.rss_growth_mb <= self.rss_bound_mb
        )

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "samples"}
        # The RSS curve (one sample a second, every 30th kept) and the growth over the second
        # half: a leak keeps climbing there, allocator warm-up (arenas, caches) levels off.
        data["rss_every_30s_mb"] = [round(v, 1) for v in self.samples[::30]]
        half = self.samples[len(self.samples) // 2 :] or [0.0]
        data["rss_growth_second_half_mb"] = round(half[-1] - half[0], 1)
        data["ok"] = self.ok
        return data


def rss_mb(pid: int) -> float:
    """Resident set size of the service process in MB; fails loudly when it is gone."""
    from app.bench import rss_mb as read_rss_mb

    value = read_rss_mb(pid)
    if value is None:
        raise RuntimeError(f"cannot read the RSS of process {pid}: has the service exited?")
    return value


def orphans(settings: Any) -> tuple[int, int]:
    """(rows without their file, files without their row) in the data dir and database."""
    import sqlalchemy as sa

    from app.db import Reference
    from app.db.session import create_db_engine

    engine = create_db_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            rows = {p for (p,) in conn.execute(sa.select(Reference.image_path))}
    finally:
        engine.dispose()
    root = settings.data_dir / "references"
    files = {
        p.relative_to(settings.data_dir).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    return len(rows - files), len(files - rows)


def _prepare(settings: Any, checkpoints: list[Path]) -> tuple[dict[str, str], list[str]]:
    from app.db.migrate import prepare_database
    from app.services.keys import create_api_key
    from app.services.models import register_model
    from app.services.references import enroll_references

    factory = prepare_database(settings)
    try:
        with factory() as session:
            versions = [
                register_model(
                    session=session,
                    checkpoint=ckpt,
                    settings=settings,
                    activate=i == 0,
                    source="bench",
                ).version
                for i, ckpt in enumerate(checkpoints)
            ]
            for i in range(0, POOL, 2):  # half the pool enrolled up front
                enroll_references(
                    session=session,
                    files=[("x.png", pool_image(i))],
                    label=pool_label(i),
                    enrolled_by=None,
                    settings=settings,
                )
            keys = {
                role: create_api_key(session=session, role=role, name="soak", settings=settings)[1]
                for role in ("reader", "clinician", "admin")
            }
    finally:
        factory.kw["bind"].dispose()
    return keys, versions


def pool_label(i: int) -> str:
    return BENCH_CLASSES[i % len(BENCH_CLASSES)]


_POOL_CACHE: dict[int, bytes] = {}


def pool_image(i: int) -> bytes:
    if i not in _POOL_CACHE:
        _POOL_CACHE[i] = _synthetic_image(pool_label(i), 5000 + i, (256, 256))
    return _POOL_CACHE[i]


async def _client_loop(
    client: httpx.AsyncClient,
    keys: dict[str, str],
    versions: list[str],
    ids: set[str],
    stats: Counter[str],
    deadline: float,
    seed: int,
) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    query = _synthetic_image("stripes", 777, (256, 256))
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        if kind == "delete" and len(ids) <= MIN_KEPT:
            kind = "enroll"
        if kind == "activate" and len(versions) < 2:
            kind = "predict"
        try:
            if kind == "predict":
                explain = rng.random() < 1 / 3
                response = await client.post(
                    "/predict",
                    headers={"X-API-Key": keys["reader"]},
                    params={"explain": str(explain).lower()},
                    files={"file": ("q.png", query, "image/png")},
                )
            elif kind == "enroll":
                i = rng.randrange(POOL)
                response = await client.post(
                    "/references",
                    headers={"X-API-Key": keys["clinician"]},
                    data={"label": pool_label(i)},
                    files={"file": ("r.png", pool_image(i), "image/png")},
                )
                if response.status_code == 201:
                    ids.update(r["id"] for r in response.json()["references"])
            elif kind == "delete":
                # Claimed before the request, so concurrent deletes never take the index below
                # MIN_KEPT (an empty index answers a documented 503 "no references enrolled",
                # which is not what the soak is after).
                ref_id = rng.choice(sorted(ids))
                ids.discard(ref_id)
                response = await client.delete(
                    f"/references/{ref_id}", headers={"X-API-Key": keys["admin"]}
                )
                if response.status_code not in (204, 404):
                    ids.add(ref_id)
            else:
                version = rng.choice(versions)
                response = await client.post(
                    f"/admin/models/{version}/activate", headers={"X-API-Key": keys["admin"]}
                )
        except httpx.HTTPError as exc:
            stats["transport_error"] += 1
            logger.warning("transport error on %s: %s", kind, exc)
            continue
        stats[f"{kind}:{response.status_code}"] += 1
        stats[kind] += 1
        if response.status_code >= 500:
            logger.warning("%s answered %s: %s", kind, response.status_code, response.text[:300])


async def _drive(
    base_url: str,
    keys: dict[str, str],
    versions: list[str],
    *,
    clients: int,
    seconds: float,
    pid: int,
    warmup: float,
) -> tuple[Counter[str], list[float], float]:
    stats: Counter[str] = Counter()
    ids: set[str] = set()
    samples: list[float] = []
    start_rss: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def sample() -> None:
        started = time.monotonic()
        while True:
            samples.append(rss_mb(pid))
            if not start_rss and time.monotonic() - started >= warmup:
                start_rss.append(samples[-1])
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        listed = await client.get(
            "/references", headers={"X-API-Key": keys["reader"]}, params={"limit": 1000}
        )
        ids.update(r["id"] for r in listed.json()["data"])
        deadline = time.monotonic() + seconds
        sampler = asyncio.create_task(sample())
        await asyncio.gather(
            *(
                _client_loop(client, keys, versions, ids, stats, deadline, seed)
                for seed in range(clients)
            )
        )
        sampler.cancel()
    samples.append(rss_mb(pid))
    return stats, samples, start_rss[0] if start_rss else samples[0]


def run_soak(
    *,
    clients: int = 16,
    seconds: float = 300.0,
    checkpoints: list[Path] | None = None,
    database_url: str | None = None,
    rss_bound_mb: float = 150.0,
    work_dir: Path | None = None,
) -> SoakReport:
    """Run the soak end to end against a `uvicorn app.main:create_app` subprocess."""
    from app.config import Settings

    with tempfile.TemporaryDirectory(prefix="cxr-soak-", dir=work_dir) as tmp:
        tmp_path = Path(tmp)
        secret = secrets.token_urlsafe(32)
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "secret_key": secret,
            "device": "cpu",
            "log_level": "WARNING",
        }
        if database_url:
            values["database_url"] = database_url
        settings = Settings(**values)
        if not checkpoints:
            checkpoints = [
                _fresh_checkpoint(tmp_path / "a.pt"),
                _fresh_checkpoint(tmp_path / "b.pt", image_size=96),
            ]
        keys, versions = _prepare(settings, checkpoints)
        env = service_env(
            settings.data_dir,
            secret,
            **({"CXR_DATABASE_URL": database_url} if database_url else {}),
        )
        log_path = tmp_path / "server.log"
        with running_service(
            env, log_path, ready_timeout_s=READY_TIMEOUT_S, stop_timeout_s=60.0
        ) as server:
            stats, samples, rss_start = asyncio.run(
                _drive(
                    server.url,
                    keys,
                    versions,
                    clients=clients,
                    seconds=seconds,
                    pid=server.proc.pid,
                    warmup=min(30.0, seconds / 10),
                )
            )
        if any(k.split(":")[-1].startswith("5") for k in stats):
            logger.warning("server log tail:\n%s", log_path.read_text()[-6000:])
        without_file, without_row = orphans(settings)
        statuses = {k: v for k, v in sorted(stats.items()) if ":" in k}
        return SoakReport(
            clients=clients,
            seconds=seconds,
            requests=sum(statuses.values()),
            by_kind={k: v for k, v in sorted(stats.items()) if ":" not in k},
            statuses=statuses,
            status_5xx=sum(v for k, v in statuses.items() if k.split(":")[1].startswith("5")),
            transport_errors=stats.get("transport_error", 0),
            rows_without_file=without_file,
            files_without_row=without_row,
            rss_start_mb=round(rss_start, 1),
            rss_end_mb=round(samples[-1], 1),
            rss_max_mb=round(max(samples), 1),
            rss_growth_mb=round(samples[-1] - rss_start, 1),
            rss_bound_mb=rss_bound_mb,
            database=settings.database_url.split(":", 1)[0],
            samples=samples,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--checkpoint", type=Path, action="append", default=None)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--rss-bound-mb", type=float, default=150.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    report = run_soak(
        clients=args.clients,
        seconds=args.seconds,
        checkpoints=args.checkpoint,
        database_url=args.database_url,
        rss_bound_mb=args.rss_bound_mb,
    )
    text = json.dumps(report.as_dict(), indent=2)
    sys.stdout.write(text + "\n")
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
