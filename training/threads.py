"""The process's thread policy: how many CPU threads torch, FAISS and ONNX Runtime use.

Why one policy, set once when a process starts: the three runtimes share the same cores, and on
a small shared machine every wrong count was measured to hurt. Torch's default (every core)
made training steps about 5x slower than the idle-core count on this project's loaded 2-core
box (OpenMP threads spin at every barrier); with torch imported first, a one-query FAISS search
with 2 OpenMP threads took 24 ms instead of 0.3 ms (docs/BENCHMARKS.md). Set in several places
(the service's state, `train()`, the retrain, the benches), the counts also depended on which of
them ran last in a process. So each process applies one `ThreadPolicy` at its start, and the
code that runs later (`train()`, `ServiceState`, ONNX Runtime sessions) reads it, never sets it.

The two kinds (docs/ARCHITECTURE.md lists where each is applied):

- `ThreadPolicy.serving(inference_workers)`: a process answering concurrent requests (the API,
  the DICOM listener, `cxr bench predict`'s in-process timer). Up to `inference_workers`
  forwards and searches run at once, so each gets ``cores // inference_workers`` threads.
- `ThreadPolicy.training(threads)`: a process running one job at a time (`cxr train`, a DDP
  rank, the Celery worker's pool processes, evaluation, imports, benches). The job gets the
  idle cores (1-minute load average) shared among the processes that start together (torchrun's
  local ranks, the worker's concurrency), or the explicit ``threads`` (`--threads`).

How far `apply_thread_policy` reaches (measured with the torch 2 and faiss-cpu wheels): torch
keeps one process-wide count that every thread adopts at its first parallel operation, so the
policy reaches the applying thread and every thread started after it; a thread that already ran
torch operations keeps its count (hence: apply before starting request or job threads). FAISS's
OpenMP count is per thread in GNU OpenMP: it is set here for the applying thread. Other threads
get it only where FAISS shares torch's OpenMP runtime (torch imported before faiss, as by
`import app.main`), through torch's per-thread initialisation; where faiss is imported first
(`import app.cli`), FAISS in other threads keeps OpenMP's default, all cores (a one-query search
of a 32-reference index took 0.17 ms either way on the 2-core box). ONNX Runtime sessions own
their thread pools: they are built with `current_thread_policy().threads`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

__all__ = ["ThreadPolicy", "apply_thread_policy", "current_thread_policy", "idle_cores"]


def idle_cores() -> int:
    """The cores not already busy now (1-minute load average), at least 1.

    Oversubscribing a shared machine is far worse than using fewer threads: on this project's
    loaded 2-core box two training threads ran a step ~5x *slower* than one.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on every platform
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


@dataclass(frozen=True)
class ThreadPolicy:
    """One process's CPU threads: `threads` for torch's intra-op pool, FAISS's OpenMP searches
    and each ONNX Runtime session alike (one unit of work runs on one of them at a time, so
    they get the same share of the cores).

    `kind` (``serving``, ``training``, or what a caller names it) and `reason` (how `threads`
    was chosen) are for the log line and the reader of a run's records.
    """

    kind: str
    threads: int
    reason: str = ""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"a thread policy needs at least 1 thread, got {self.threads}")

    @classmethod
    def serving(cls, inference_workers: int, *, cores: int | None = None) -> ThreadPolicy:
        """Each of the `inference_workers` concurrent inferences gets its share of the cores
        (one intra-op pool per concurrent forward would oversubscribe them)."""
        cores = cores or os.cpu_count() or 1
        workers = max(1, int(inference_workers))
        return cls(
            kind="serving",
            threads=max(1, cores // workers),
            reason=f"{cores} cores / {workers} concurrent inferences",
        )

    @classmethod
    def training(cls, threads: int | None = None, *, concurrent: int | None = None) -> ThreadPolicy:
        """`threads` when given (`--threads`), else the idle cores shared by the `concurrent`
        processes that start together on this machine (default: torchrun's local ranks, 1
        outside torchrun)."""
        if threads:
            return cls(kind="training", threads=int(threads), reason="explicit --threads")
        if concurrent is None:
            from training.distributed import local_world_size

            concurrent = local_world_size()
        concurrent = max(1, int(concurrent))
        idle = idle_cores()
        reason = f"{idle} idle cores" + (f" / {concurrent} processes" if concurrent > 1 else "")
        return cls(kind="training", threads=max(1, idle // concurrent), reason=reason)


_lock = threading.Lock()
_applied: ThreadPolicy | None = None


def _faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def apply_thread_policy(policy: ThreadPolicy) -> ThreadPolicy:
    """Make `policy` this process's: torch's intra-op count and FAISS's OpenMP count (see the
    module docstring for which threads that reaches), and what `current_thread_policy()` tells
    ONNX Runtime sessions. Idempotent: applying the policy the process already runs changes and
    logs nothing, so a process start reached twice (the CLI, then the app factory in the same
    process) logs one line. Returns `policy`."""
    global _applied
    import faiss

    with _lock:
        if (
            _applied == policy
            and torch.get_num_threads() == policy.threads
            and _faiss_threads() == policy.threads
        ):
            return policy
        torch.set_num_threads(policy.threads)
        faiss.omp_set_num_threads(policy.threads)
        _applied = policy
    log.info(
        "thread policy %s: %d thread(s) for torch, FAISS and ONNX Runtime (%s)",
        policy.kind, policy.threads, policy.reason or "no reason given",
    )  # fmt: skip
    return policy


def current_thread_policy() -> ThreadPolicy:
    """The policy this process applied; before any was applied (a library caller, a test), the
    process as it is: torch's current count, kind ``unset``."""
    applied = _applied
    if applied is not None:
        return applied
    return ThreadPolicy(
        kind="unset", threads=torch.get_num_threads(), reason="no policy applied: torch's count"
    )
