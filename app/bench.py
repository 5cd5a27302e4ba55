"""`cxr bench predict`: latency and throughput of the real HTTP service under concurrent clients.

What it does, so the numbers mean something:

1. A temp data dir with a fresh SQLite database; a model (`--checkpoint`, by default the shipped
   recipe's `runs/default/encoder.pt`; `--fresh-model` for a small freshly initialised
   `resnet9_half` at 128 px in smoke tests) registered and activated; a few synthetic
   references per class enrolled through the service functions (same path as the API).
2. The real service: `uvicorn app.main:create_app --factory` in a subprocess on a free loopback
   port, waited for until `/ready` answers 200; with `--api-workers N` (N > 1) uvicorn's
   multi-process mode, N API processes behind one socket, as `cxr serve --workers N` and the
   compose file (`CXR_API_WORKERS`, default 2) deploy it. CPU and memory are then read over the
   whole process tree; `server_rss_mb` is the largest single process. `--no-keepalive` makes
   every request open its own connection: with kept-alive connections the process that wakes
   first on the shared socket may accept all of them and the other process idles.
3. The *bare* cost in this process, measured on the same state right before each client count
   (so it sees the same machine load): decode + preprocess + forward + search of the same query
   image (`app.services.predict.prepare_query` + `answer_query`, the functions the route runs),
   with the server's torch thread settings; also with the one-pass Grad-CAM (`explain_query`).
4. For each client count and explain flag: that many concurrent httpx clients post the query
   image for `--seconds`; rows with `clients`, `explain`, `p50_ms`, `p99_ms`, `rps`, `errors`
   (non-200 answers or transport errors), `status_5xx`, `bare_p50_ms`.
5. The two numbers that explain the limits of those rows:

   * the *floor* (`floor_p50_ms`, `floor_rps`): the same clients post the same multipart upload
     to :func:`create_floor_app`, a minimal FastAPI app started by the same uvicorn command line,
     whose endpoint reads the upload and returns a constant JSON. That is the framework + HTTP +
     client cost no service logic can go under; `p50_ms - floor_p50_ms` is what the service's
     own work (auth, version check, inference, audit) adds over it.
   * CPU per request (`server_cpu_ms_per_request`, `client_cpu_ms_per_request`, and the floor
     app's `floor_server_cpu_ms_per_request`): the server process's utime + stime (from
     /proc/PID/stat) and this process's own CPU time over the phase, divided by its requests;
     `machine_cores_busy`, from /proc/stat, counts every process (on a shared machine, other
     users too). `rps x (server + client CPU per request)` close to the machine's core count
     means the throughput is CPU-bound: more clients cannot scale it. Well below it while the
     machine has idle cores, the server is serialised (the GIL, a lock), not short of CPU.

The clients run in this process and share the machine's cores with the server: on a small
machine the numbers include that contention (as would a sidecar load generator).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from fastapi import FastAPI, File, UploadFile

logger = logging.getLogger(__name__)

__all__ = ["BenchRow", "bench_predict_command", "run_predict_bench"]

READY_TIMEOUT_S = 120.0
#: Where the README's quick start writes the shipped recipe's model.
DEFAULT_CHECKPOINT = Path("runs/default/encoder.pt")
REQUEST_TIMEOUT_S = 120.0
BENCH_CLASSES = ("disc", "stripes", "grid")


@dataclass
class BenchRow:
    clients: int
    explain: bool
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    bare_p50_ms: float
    requests: int
    status_5xx: int
    bare_explain_p50_ms: float
    #: The server process's resident memory right after the phase (Linux; None elsewhere).
    server_rss_mb: float | None = None
    #: `CXR_ONNX` of both the server and the bare timer (ONNX Runtime or eager torch forward).
    onnx: str = "auto"
    #: The same clients against :func:`create_floor_app` (framework + HTTP + client floor).
    floor_p50_ms: float | None = None
    floor_rps: float | None = None
    #: The floor app's server CPU per request: the part of `server_cpu_ms_per_request` that
    #: uvicorn, FastAPI and the multipart parser spend whatever the service does.
    floor_server_cpu_ms_per_request: float | None = None
    #: Server process CPU (utime + stime) over the phase per request (Linux; None elsewhere).
    server_cpu_ms_per_request: float | None = None
    #: This (client) process's CPU over the phase per request.
    client_cpu_ms_per_request: float | None = None
    #: Cores busy on the whole machine during the phase, every process included (a shared
    #: machine's other users too): near the core count, the phase was CPU-bound.
    machine_cores_busy: float | None = None
    #: API processes serving (uvicorn `--workers`; 1: the single-process server).
    api_workers: int = 1
    #: Clients reuse their connection (True) or open one per request (False).
    keepalive: bool = True
    #: The query film's width x height in pixels (8-bit grey PNG).
    query_size: str = "512x512"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _synthetic_image(kind: str, seed: int, size: tuple[int, int] = (512, 512)) -> bytes:
    """A PIL-drawn grayscale PNG of a synthetic class (no patient data anywhere)."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("L", size, int(rng.integers(20, 60)))
    draw = ImageDraw.Draw(img)
    if kind == "disc":
        r = min(w, h) * rng.uniform(0.22, 0.32)
        cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(rng.integers(200, 256)))
    elif kind == "stripes":
        period = max(4, int(h / rng.uniform(7, 9)))
        for y in range(int(rng.integers(0, period)) - period, h, period):
            draw.rectangle((0, y, w, y + period // 2), fill=int(rng.integers(200, 250)))
    else:
        step = max(4, int(w / rng.uniform(5, 7)))
        for x in range(0, w, step):
            draw.line((x, 0, x, h), fill=230, width=3)
        for y in range(0, h, step):
            draw.line((0, y, w, y), fill=230, width=3)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(h, w))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _fresh_checkpoint(path: Path, *, image_size: int = 128) -> Path:
    """A small, freshly initialised checkpoint (timings do not depend on training)."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.encoders import create_encoder
    from training.preprocess import Preprocessing

    torch.manual_seed(0)
    encoder = create_encoder("resnet9_half", embedding_dim=128).eval()
    return save_checkpoint(
        path,
        encoder=encoder,
        encoder_name="resnet9_half",
        encoder_kwargs={},
        preprocessing=Preprocessing(image_size=image_size),
        classes=list(BENCH_CLASSES),
        config={"note": "bench: freshly initialised"},
        metrics={},
    )


def _prepare_state(settings: Any, checkpoint: Path, references_per_class: int) -> dict[str, str]:
    """Database, model, references and a reader key; returns {"reader": key}."""
    from app.db.migrate import prepare_database
    from app.services.keys import create_api_key
    from app.services.models import register_model
    from app.services.references import enroll_references

    factory = prepare_database(settings)
    try:
        with factory() as session:
            register_model(
                session=session,
                checkpoint=checkpoint,
                settings=settings,
                activate=True,
                source="bench",
            )
            for c, kind in enumerate(BENCH_CLASSES):
                files = [
                    (f"{kind}-{i}.png", _synthetic_image(kind, 1000 * c + i))
                    for i in range(references_per_class)
                ]
                enroll_references(
                    session=session, files=files, label=kind, enrolled_by=None, settings=settings
                )
            _row, reader = create_api_key(
                session=session, role="reader", name="bench", settings=settings
            )
    finally:
        factory.kw["bind"].dispose()
    return {"reader": reader}


class _BareTimer:
    """The bare in-process work on the same state as the server: decode + preprocess +
    forward + search (and the one-pass Grad-CAM variant), with the server's thread settings.
    Measured right before each phase, so both sides of the ratio see the same machine load."""

    def __init__(self, settings: Any, query: bytes, *, inference_workers: int | None) -> None:
        from app.db.session import create_db_engine, create_sessionmaker
        from app.serving.state import ServiceState

        self.settings = settings
        self.query = query
        self.engine = create_db_engine(settings.database_url)
        state = ServiceState(
            settings=settings,
            sessionmaker=create_sessionmaker(self.engine),
            inference_workers=inference_workers,
        )
        bundle = state.refresh()
        if bundle is None or bundle.index is None:
            raise RuntimeError(f"bench state did not load: {state.reasons()}")
        self.bundle = bundle
        for _ in range(3):
            self.once(False)
            self.once(True)

    def once(self, explain: bool) -> float:
        from app.services.predict import answer_query, explain_query, prepare_query

        t0 = time.perf_counter()
        prepared = prepare_query(self.query, self.bundle, max_pixels=self.settings.max_pixels)
        if explain:
            explain_query(prepared, self.bundle, k=self.settings.default_k, method="knn")
        else:
            answer_query(prepared, self.bundle, k=self.settings.default_k, method="knn")
        return (time.perf_counter() - t0) * 1000.0

    def p50(self, explain: bool, iterations: int) -> float:
        return statistics.median(self.once(explain) for _ in range(iterations))

    def close(self) -> None:
        self.engine.dispose()


async def _drive(
    base_url: str,
    key: str,
    query: bytes,
    *,
    clients: int,
    seconds: float,
    explain: bool,
    keepalive: bool = True,
) -> tuple[list[float], int, int, float]:
    """`clients` concurrent loops for `seconds`; returns (latencies ms, errors, 5xx, elapsed).

    `keepalive=False` opens a new connection for every request: with several API processes
    sharing one listening socket, a process that wakes first accepts every connection queued
    at that moment, so long-lived connections can all land on one process; per-request
    connections are spread by the kernel as the processes become free."""
    latencies: list[float] = []
    errors = 0
    status_5xx = 0
    limits = httpx.Limits(
        max_connections=clients, max_keepalive_connections=clients if keepalive else 0
    )
    params = {"explain": "true" if explain else "false"}
    headers = {"X-API-Key": key}
    async with httpx.AsyncClient(
        base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as http:
        start = time.perf_counter()
        deadline = start + seconds

        async def client_loop() -> None:
            nonlocal errors, status_5xx
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    response = await http.post(
                        "/predict",
                        params=params,
                        headers=headers,
                        files={"file": ("query.png", query, "image/png")},
                    )
                except httpx.HTTPError as exc:
                    errors += 1
                    logger.warning("request failed: %s", exc)
                    continue
                latencies.append((time.perf_counter() - t0) * 1000.0)
                if response.status_code != 200:
                    errors += 1
                    if response.status_code >= 500:
                        status_5xx += 1
                        logger.warning("server error %s: %s", response.status_code, response.text)

        await asyncio.gather(*(client_loop() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return latencies, errors, status_5xx, elapsed


def _process_tree(pid: int) -> list[int]:
    """`pid` and every descendant (uvicorn's worker processes), from /proc; `[pid]` where
    there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _tree_cpu_ms(pids: Sequence[int]) -> float | None:
    """CPU time of the processes `pids` together (`_cpu_ms` summed; None if one is unreadable)."""
    values = [_cpu_ms(pid) for pid in pids]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _largest_rss_mb(pids: Sequence[int]) -> float | None:
    """The largest resident set among `pids` (one API process's footprint)."""
    values = [v for v in (rss_mb(pid) for pid in pids) if v is not None]
    return max(values) if values else None


def proc_status_kb(pid: int, field: str) -> int | None:
    """A kB field of /proc/PID/status (``VmRSS``, ``VmHWM``), None where it cannot be read (no
    /proc, the process gone): the one /proc memory reader of the benches."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_mb(pid: int) -> float | None:
    """Resident set size of process `pid` in MB (None where it cannot be read)."""
    kb = proc_status_kb(pid, "VmRSS")
    return None if kb is None else round(kb / 1024.0, 1)


def _cpu_ms(pid: int) -> float | None:
    """CPU time (user + system, all threads) process `pid` has used, in ms, from
    /proc/PID/stat (None where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) * 1000.0 / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat (None where
    there is none). Busy excludes idle and iowait."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return sum(ticks) - idle, sum(ticks)


def _cores_busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """How many of the machine's cores were busy between two `_machine_ticks` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return round(share * (os.cpu_count() or 1), 2)


@dataclass(frozen=True)
class PhaseResult:
    """One timed phase of concurrent clients against one server."""

    latencies: list[float]
    errors: int
    status_5xx: int
    elapsed: float
    server_cpu_ms_per_request: float | None
    client_cpu_ms_per_request: float | None
    #: Cores busy on the whole machine during the phase (every process, other users' too).
    machine_cores_busy: float | None = None
    #: Server errors during the untimed warm-up (not in the row; they show the server log).
    warmup_5xx: int = 0

    @property
    def p50_ms(self) -> float:
        return round(_percentile(self.latencies, 50), 2)

    @property
    def rps(self) -> float:
        return round(len(self.latencies) / self.elapsed, 2) if self.elapsed > 0 else 0.0


def _phase(
    url: str,
    pid: int,
    key: str,
    query: bytes,
    *,
    clients: int,
    seconds: float,
    explain: bool,
    keepalive: bool = True,
) -> PhaseResult:
    """A short warm-up, then `clients` concurrent clients for `seconds`, with the server's and
    this process's CPU time read around the timed part."""
    drive = {"clients": clients, "explain": explain, "keepalive": keepalive}
    warmup = asyncio.run(_drive(url, key, query, seconds=min(1.0, seconds), **drive))
    pids = _process_tree(pid)  # after the warm-up: every worker process has started
    machine_before = _machine_ticks()
    server_before, client_before = _tree_cpu_ms(pids), time.process_time()
    latencies, errors, status_5xx, elapsed = asyncio.run(
        _drive(url, key, query, seconds=seconds, **drive)
    )
    server_after, client_after = _tree_cpu_ms(pids), time.process_time()
    machine_after = _machine_ticks()
    done = max(1, len(latencies))
    server_cpu = (
        round((server_after - server_before) / done, 2)
        if server_before is not None and server_after is not None
        else None
    )
    return PhaseResult(
        latencies=latencies,
        errors=errors,
        status_5xx=status_5xx,
        elapsed=elapsed,
        server_cpu_ms_per_request=server_cpu,
        client_cpu_ms_per_request=round((client_after - client_before) * 1000.0 / done, 2),
        machine_cores_busy=_cores_busy(machine_before, machine_after),
        warmup_5xx=warmup[2],
    )


def create_floor_app() -> FastAPI:
    """The floor of `POST /predict`: a minimal FastAPI app whose `/predict` reads the multipart
    upload and answers a small constant JSON, and whose `/ready` answers 200.

    Served by :func:`running_service` with the service's own uvicorn command line, so the
    difference between the service's latency and this app's is exactly what the service's
    logic adds (auth, version check, decode, inference, audit, its middleware): no change to
    the service can take it below this floor. Used by `uvicorn app.bench:create_floor_app
    --factory` (its FastAPI imports are module-level so the endpoint's annotations resolve).
    """
    floor = FastAPI(title="cxr bench floor", openapi_url=None, docs_url=None, redoc_url=None)

    @floor.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @floor.post("/predict")
    async def predict(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        data = await file.read()
        return {"label": "floor", "bytes": len(data), "unknown": False}

    return floor


def service_env(data_dir: Path, secret: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked service process: its own data directory and embedded
    database, in-process jobs, CPU, quiet logs; ``extra`` (e.g. ``CXR_DATABASE_URL``) on top."""
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(data_dir),
        "CXR_SECRET_KEY": secret,
        "CXR_DEVICE": "cpu",
        "CXR_LOG_LEVEL": "WARNING",
        "CXR_ENVIRONMENT": "development",
    }
    env.pop("CXR_DATABASE_URL", None)
    env.pop("CXR_BROKER_URL", None)
    env.update(extra)
    return env


@dataclass(frozen=True)
class ServiceProcess:
    """A running `uvicorn app.main:create_app` subprocess (see :func:`running_service`)."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _wait_ready(service: ServiceProcess, ready_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(
                f"the service exited with {service.proc.returncode} before it was ready; its "
                "log:\n" + service.log_tail(4000)
            )
        try:
            response = httpx.get(f"{service.url}{ready_path}", timeout=10.0)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise RuntimeError(f"the service was not ready after {timeout_s:.0f} s: {last}")


@contextmanager
def running_service(
    env: dict[str, str],
    log_path: Path,
    *,
    ready_path: str = "/ready",
    ready_timeout_s: float = READY_TIMEOUT_S,
    stop_timeout_s: float = 30.0,
    app_factory: str = "app.main:create_app",
    workers: int = 1,
) -> Iterator[ServiceProcess]:
    """`uvicorn app.main:create_app` (or another ``app_factory``, e.g. the bench's floor app)
    in a subprocess on a free loopback port, its output in ``log_path``; yields once
    ``ready_path`` answers 200 and stops the process on exit (the one server start every
    service benchmark shares). ``workers`` > 1 runs uvicorn's multi-process mode."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", app_factory, "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    if workers > 1:
        command += ["--workers", str(workers)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        service = ServiceProcess(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
        try:
            _wait_ready(service, ready_path, ready_timeout_s)
            yield service
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_predict_bench(
    *,
    clients: Sequence[int] = (1, 8, 32),
    seconds: float = 10.0,
    checkpoint: Path | None = None,
    references_per_class: int = 8,
    explain_modes: Sequence[bool] = (False, True),
    bare_iterations: int = 30,
    inference_workers: int | None = None,
    work_dir: Path | None = None,
    onnx: str = "auto",
    api_workers: int = 1,
    keepalive: bool = True,
    query_size: tuple[int, int] = (512, 512),
) -> list[BenchRow]:
    """Run the benchmark end to end (see the module docstring); returns one row per phase."""
    from app.config import Settings

    with tempfile.TemporaryDirectory(prefix="cxr-bench-", dir=work_dir) as tmp:
        tmp_path = Path(tmp)
        data_dir = tmp_path / "var"
        secret = secrets.token_urlsafe(32)
        settings = Settings(
            data_dir=data_dir, secret_key=secret, device="cpu", log_level="WARNING", onnx=onnx
        )
        if checkpoint is None:
            checkpoint = _fresh_checkpoint(tmp_path / "fresh.pt")
        keys = _prepare_state(settings, checkpoint, references_per_class)
        query = _synthetic_image("disc", seed=424242, size=query_size)
        bare = _BareTimer(settings, query, inference_workers=inference_workers)

        extra = {"CXR_ONNX": onnx}
        if inference_workers:
            extra["CXR_INFERENCE_WORKERS"] = str(inference_workers)
        env = service_env(data_dir, secret, **extra)
        rows: list[BenchRow] = []
        warmup_5xx = 0
        with (
            running_service(
                env, tmp_path / "floor.log", app_factory="app.bench:create_floor_app"
            ) as floor,
            running_service(env, tmp_path / "server.log", workers=api_workers) as server,
        ):
            base_url, proc = server.url, server.proc
            try:
                for n in clients:
                    bare_ms = bare.p50(False, bare_iterations)
                    bare_explain_ms = bare.p50(True, max(5, bare_iterations // 2))
                    logger.info("bare: %.2f ms, with Grad-CAM %.2f ms", bare_ms, bare_explain_ms)
                    floor_phase = _phase(
                        floor.url,
                        floor.proc.pid,
                        keys["reader"],
                        query,
                        clients=n,
                        seconds=seconds,
                        explain=False,
                        keepalive=keepalive,
                    )
                    if floor_phase.errors:
                        raise RuntimeError(
                            f"the floor app answered {floor_phase.errors} requests with an "
                            "error: its latency would not be a floor; its log:\n"
                            + floor.log_tail(2000)
                        )
                    logger.info("floor: p50 %.2f ms, %.1f rps", floor_phase.p50_ms, floor_phase.rps)
                    for explain in explain_modes:
                        phase = _phase(
                            base_url,
                            proc.pid,
                            keys["reader"],
                            query,
                            clients=n,
                            seconds=seconds,
                            explain=explain,
                            keepalive=keepalive,
                        )
                        warmup_5xx += phase.warmup_5xx
                        row = BenchRow(
                            clients=n,
                            explain=explain,
                            p50_ms=phase.p50_ms,
                            p99_ms=round(_percentile(phase.latencies, 99), 2),
                            rps=phase.rps,
                            errors=phase.errors,
                            bare_p50_ms=round(bare_ms, 2),
                            requests=len(phase.latencies),
                            status_5xx=phase.status_5xx,
                            bare_explain_p50_ms=round(bare_explain_ms, 2),
                            server_rss_mb=_largest_rss_mb(_process_tree(proc.pid)),
                            onnx=settings.onnx,
                            floor_p50_ms=floor_phase.p50_ms,
                            floor_rps=floor_phase.rps,
                            floor_server_cpu_ms_per_request=floor_phase.server_cpu_ms_per_request,
                            server_cpu_ms_per_request=phase.server_cpu_ms_per_request,
                            client_cpu_ms_per_request=phase.client_cpu_ms_per_request,
                            machine_cores_busy=phase.machine_cores_busy,
                            api_workers=api_workers,
                            keepalive=keepalive,
                            query_size=f"{query_size[0]}x{query_size[1]}",
                        )
                        logger.info("bench row: %s", row.as_dict())
                        rows.append(row)
            finally:
                bare.close()
                if warmup_5xx or any(r.status_5xx for r in rows) or proc.poll() is not None:
                    logger.warning("server log tail:\n%s", server.log_tail())
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of the rows (what docs/BENCHMARKS.md shows)."""
    lines = [
        "| api_workers | onnx | clients | explain | p50_ms | p99_ms | rps | errors | 5xx | "
        "bare_p50_ms | p50/bare | server_rss_mb | floor_p50_ms | floor_rps | server_cpu_ms/req | "
        "floor_server_cpu_ms/req | client_cpu_ms/req | machine_cores_busy |",
        "|---:|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.p50_ms / r.bare_p50_ms if r.bare_p50_ms else float("nan")
        lines.append(
            f"| {r.api_workers} | {r.onnx} | {r.clients} | {str(r.explain).lower()} | "
            f"{r.p50_ms:.1f} | "
            f"{r.p99_ms:.1f} | {r.rps:.1f} | {r.errors} | {r.status_5xx} | "
            f"{r.bare_p50_ms:.1f} | {ratio:.2f} | {r.server_rss_mb} | {_fmt(r.floor_p50_ms)} | "
            f"{_fmt(r.floor_rps)} | {_fmt(r.server_cpu_ms_per_request, 2)} | "
            f"{_fmt(r.floor_server_cpu_ms_per_request, 2)} | "
            f"{_fmt(r.client_cpu_ms_per_request, 2)} | {_fmt(r.machine_cores_busy, 2)} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cpu_cores_busy(row: BenchRow) -> float | None:
    """Cores the server and the clients kept busy together during the phase
    (`rps x CPU per request`): near the machine's core count, the phase was CPU-bound."""
    if row.server_cpu_ms_per_request is None or row.client_cpu_ms_per_request is None:
        return None
    return row.rps * (row.server_cpu_ms_per_request + row.client_cpu_ms_per_request) / 1000.0


def _parse_counts(value: str, *, option: str = "--clients") -> list[int]:
    """Positive integers separated by commas (`--clients`, `--api-workers`)."""
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} takes integers separated by commas, e.g. 1,8") from None
    if not counts or any(c < 1 for c in counts):
        raise typer.BadParameter(f"{option} takes positive integers, e.g. 1,8")
    return counts


def _parse_size(value: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` in pixels, each 16-10000."""
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise typer.BadParameter("--query-size takes WIDTHxHEIGHT, e.g. 2500x2048") from None
    if not (16 <= width <= 10000 and 16 <= height <= 10000):
        raise typer.BadParameter("--query-size: each side between 16 and 10000 pixels")
    return width, height


def bench_predict_command(
    clients: Annotated[
        str, typer.Option(help="Concurrent client counts, comma-separated.")
    ] = "1,8,32",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per phase.")] = 10.0,
    out: Annotated[Path | None, typer.Option(help="Write the rows as JSON here.")] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint to serve: the shipped recipe's model (`cxr train ... --out "
            "runs/default`). --fresh-model serves a freshly initialised resnet9_half instead."
        ),
    ] = DEFAULT_CHECKPOINT,
    fresh_model: Annotated[
        bool,
        typer.Option(
            "--fresh-model",
            help="Serve a small freshly initialised model (smoke tests; not the shipped model).",
        ),
    ] = False,
    references_per_class: Annotated[
        int, typer.Option(min=1, help="Synthetic references enrolled per class (3 classes).")
    ] = 8,
    explain: Annotated[
        str, typer.Option(help="Explain modes to run: false,true | false | true.")
    ] = "false,true",
    onnx: Annotated[
        str,
        typer.Option(
            help="CXR_ONNX of the served encoder, one full run each: auto (ONNX Runtime), "
            "off (eager torch), or auto,off to compare them in one command."
        ),
    ] = "auto",
    api_workers: Annotated[
        str,
        typer.Option(
            help="API processes (uvicorn --workers), one full run each: 1, 2, or 1,2 to "
            "compare them in one command (the compose file deploys 2)."
        ),
    ] = "1",
    keepalive: Annotated[
        bool,
        typer.Option(
            "--keepalive/--no-keepalive",
            help="Clients reuse their connection (default) or open one per request (spreads "
            "connections over several --api-workers processes).",
        ),
    ] = True,
    query_size: Annotated[
        str,
        typer.Option(
            help="The query film's WIDTHxHEIGHT (a clinical CR/DX is about 2500x2048; the "
            "default keeps the bench comparable with earlier runs)."
        ),
    ] = "512x512",
) -> None:
    """Benchmark POST /predict on the real service; prints a table and writes JSON rows."""
    client_counts = _parse_counts(clients)
    modes = [part.strip().lower() in ("1", "true", "yes") for part in explain.split(",")]
    if fresh_model:
        checkpoint = None
    elif checkpoint is None or not checkpoint.is_file():
        typer.echo(
            f"error: checkpoint {checkpoint} does not exist; train the shipped recipe "
            "(`cxr train --data ... --out runs/default`), pass --checkpoint CKPT, or "
            "--fresh-model for a freshly initialised one",
            err=True,
        )
        raise typer.Exit(code=2)
    from app.logging import configure_logging

    configure_logging("INFO", json_logs=False, stream=sys.stderr)
    onnx_modes = [part.strip().lower() for part in onnx.split(",") if part.strip()]
    if not onnx_modes or any(mode not in ("auto", "off") for mode in onnx_modes):
        raise typer.BadParameter("--onnx takes auto, off or auto,off")
    worker_counts = _parse_counts(api_workers, option="--api-workers")
    film = _parse_size(query_size)
    rows = []
    for workers in worker_counts:
        for mode in onnx_modes:
            rows += run_predict_bench(
                clients=client_counts,
                seconds=seconds,
                checkpoint=checkpoint,
                references_per_class=references_per_class,
                explain_modes=modes,
                onnx=mode,
                api_workers=workers,
                keepalive=keepalive,
                query_size=film,
            )
    typer.echo(format_table(rows))
    by_mode = {(r.api_workers, r.onnx, r.clients, r.explain): r for r in rows}
    for workers, mode in ((w, m) for w in worker_counts for m in onnx_modes):
        one = by_mode.get((workers, mode, client_counts[0], False))
        for n in client_counts:
            plain = by_mode.get((workers, mode, n, False))
            expl = by_mode.get((workers, mode, n, True))
            if plain and plain.p50_ms:
                line = f"api_workers={workers} onnx={mode} clients={n}: p50 no-explain / bare = "
                line += f"{plain.p50_ms / plain.bare_p50_ms:.2f}"
                if expl:
                    line += f", explain / no-explain = {expl.p50_ms / plain.p50_ms:.2f}"
                if one and one.rps:
                    line += f", rps / one-client rps = {plain.rps / one.rps:.2f}"
                if plain.floor_p50_ms:
                    line += (
                        f", p50 - floor = {plain.p50_ms - plain.floor_p50_ms:.1f} ms"
                        f" (floor / bare = {plain.floor_p50_ms / plain.bare_p50_ms:.2f})"
                    )
                busy = cpu_cores_busy(plain)
                if busy is not None:
                    line += f", cores busy: bench {busy:.2f}"
                    if plain.machine_cores_busy is not None:
                        line += f", machine {plain.machine_cores_busy:.2f}"
                    line += f" of {os.cpu_count()}"
                typer.echo(line)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        typer.echo(f"wrote {out}", err=True)
