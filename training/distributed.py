"""DistributedDataParallel support for :func:`training.train.train`, on torch's own launcher.

Run with ``torchrun --nproc-per-node N -m training.cli train ...`` (several nodes: add
``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint``) or ``cxr train --nproc N``, which calls
``torch.distributed.run`` with the same arguments. ``train`` reads the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...) through :func:`setup`; without it nothing here
changes a single-process run.

The design keeps one global view of training, so the result does not depend on how many
processes share the work:

- **Batches.** ``--batch-size B`` is per process (torch's convention); every rank builds the
  *same* seeded global sampler for ``N x B`` images per step and :class:`ShardedBatchSampler`
  hands rank ``r`` its share of each global batch. The split is chunk-wise: each run of
  same-group images (the ``m_per_class`` images of one class, or of one label x source cell) is
  dealt out across ranks, so every rank's batch keeps the global batch's balance and its
  positive pairs. Two ranks of ``B`` therefore see exactly the images one rank of ``2B`` sees,
  step for step.
- **Gradients.** The encoder *and* the loss (some losses have parameters: the hybrid loss's
  classifier head) are wrapped together in one DDP module (:class:`TrainStep`), so their
  gradients are averaged across ranks before the optimiser step.
- **Validation.** Each rank embeds a strided shard of the references and queries;
  :func:`gather_rows` reassembles them in order on every rank, rank 0 scores them and
  broadcasts the report, so every rank takes the same early-stopping and best-epoch decisions.
- **Writes.** Only rank 0 writes ``config.json``, checkpoints, ``metrics.json`` and plots; the
  checkpoint holds the plain encoder's state dict, identical in format to a one-process run.
- **Random numbers.** NumPy's global RNG (the balanced sampler's) is seeded identically on
  every rank and must stay so; torch's RNG (augmentation, dropout) is offset by the rank after
  the model is built, so ranks augment differently. ``last.pt`` keeps every rank's RNG state.
- **Threads.** Each rank's process applies its thread policy when it starts (``cxr train``'s
  command, what torchrun runs on every rank): ``--threads`` per rank, else the node's idle
  cores shared among its :func:`local_world_size` ranks (``training/threads.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "DistContext",
    "ShardedBatchSampler",
    "TrainStep",
    "broadcast_object",
    "gather_objects",
    "gather_rows",
    "launch",
    "local_world_size",
    "setup",
    "shard_indices",
    "shutdown",
    "sum_across",
    "sync_buffers",
    "wrap",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; a single-process run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device | None = None  # the device DDP pins this rank to (None: not DDP)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def local_world_size() -> int:
    """This node's processes in the job torchrun describes in the environment (1 outside it).

    Readable before `setup()`: a rank's thread policy (`training.threads.ThreadPolicy.training`)
    shares the idle cores among the ranks of its node, and is applied when the rank's process
    starts (`training/cli.py`'s `train` command), before `train()` joins the process group.
    """
    return max(1, _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1)))


def setup(device: str, *, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes in the environment; else a 1-process context.

    NCCL on CUDA (one GPU per local rank), gloo on CPU. ``device`` is the user's choice
    (``auto``, ``cpu``, ``cuda``), resolved the same way as a one-process run.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistContext()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = local_world_size()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda was requested but no CUDA GPU is available; use auto or cpu"
            )
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    if rank != 0:  # one log of the run, not one per process (warnings still from every rank)
        logging.getLogger("training").setLevel(logging.WARNING)
    log.info(
        "distributed: rank %d of %d (local %d of %d) on %s, backend %s",
        rank, world_size, local_rank, local_world, dev, dist.get_backend(),
    )  # fmt: skip
    return DistContext(rank, world_size, local_rank, local_world, dev)


def shutdown() -> None:
    """Leave the process group, if this process is in one (end of a torchrun worker)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


class ShardedBatchSampler:
    """This rank's share of every global batch drawn from ``sampler``.

    ``sampler`` is whatever global sampler the single-process run uses: a sampler of indices
    whose consecutive ``global_batch`` items form one balanced batch (pytorch-metric-learning's
    ``MPerClassSampler``), or a batch sampler that yields index lists. Every rank must build it
    identically (same seed), so every rank sees the same global batches.

    Each global batch is cut into runs of consecutive indices of the same group (``groups[i]``,
    e.g. the class index, or a label x source cell id), and each run is split into
    ``world_size`` contiguous parts, one per rank. A run that does not divide evenly gives its
    extra images to the ranks that got fewest so far in this batch, so per-rank batch sizes
    differ by at most one. With ``world_size == 1`` the global batches pass through unchanged.
    """

    def __init__(
        self,
        sampler: Iterable[Any],
        *,
        groups: Sequence[int] | np.ndarray,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        steps: int | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        if global_batch < world_size:
            raise ValueError(
                f"a global batch of {global_batch} cannot be shared by {world_size} processes; "
                "raise --batch-size"
            )
        self.sampler = sampler
        self.groups = np.asarray(groups)
        self.global_batch = int(global_batch)
        self.rank = rank
        self.world_size = world_size
        self.steps = steps

    def global_batches(self) -> Iterator[list[int]]:
        """The global batches, identical on every rank (whole batches only)."""
        pending: list[int] = []
        for item in self.sampler:
            if isinstance(item, list | tuple | np.ndarray | torch.Tensor) and np.ndim(item) == 1:
                yield [int(i) for i in item]
                continue
            pending.append(int(item))
            if len(pending) == self.global_batch:
                yield pending
                pending = []

    def shard(self, batch: Sequence[int]) -> list[int]:
        """This rank's part of one global batch (see the class docstring)."""
        if self.world_size == 1:
            return list(batch)
        runs: list[list[int]] = []
        for index in batch:
            if runs and self.groups[runs[-1][-1]] == self.groups[index]:
                runs[-1].append(index)
            else:
                runs.append([index])
        taken = np.zeros(self.world_size, dtype=np.int64)
        mine: list[int] = []
        for run in runs:
            base, extra = divmod(len(run), self.world_size)
            sizes = np.full(self.world_size, base)
            if extra:  # the ranks with fewest images so far get one more (ties: lowest rank)
                sizes[np.argsort(taken, kind="stable")[:extra]] += 1
            start = int(sizes[: self.rank].sum())
            mine.extend(run[start : start + int(sizes[self.rank])])
            taken += sizes
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        for step, batch in enumerate(self.global_batches()):
            if self.steps is not None and step >= self.steps:
                return
            yield self.shard(batch)

    def __len__(self) -> int:
        if self.steps is not None:
            return self.steps
        return len(self.sampler) // self.global_batch  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The wrapped training step and collectives
# --------------------------------------------------------------------------------------------


class TrainStep(nn.Module):
    """Encoder forward (under autocast on CUDA) and loss in one module, so one DDP wrapper
    averages the gradients of both (the hybrid and classifier losses have parameters)."""

    def __init__(
        self, encoder: nn.Module, criterion: nn.Module, amp_dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.criterion = criterion
        self.amp_dtype = amp_dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            x.device.type,
            dtype=self.amp_dtype or torch.bfloat16,
            enabled=self.amp_dtype is not None,
        ):
            embeddings = self.encoder(x)
        return self.criterion(embeddings.float(), y)


def wrap(step: TrainStep, ctx: DistContext) -> nn.Module:
    """DDP around ``step`` when distributed; the step itself otherwise."""
    if not ctx.enabled:
        return step
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device is not None and ctx.device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=ids)


def sync_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward, but the forward then updates them from
    the local batch, so after the last step each rank holds slightly different statistics.
    Validation must score the model rank 0 checkpoints.
    """
    if not ctx.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def sum_across(ctx: DistContext, *values: float) -> tuple[float, ...]:
    """Sums of per-rank numbers (loss totals, image counts) over all ranks."""
    if not ctx.enabled:
        return tuple(values)
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(float(v) for v in t.cpu())


def shard_indices(n: int, ctx: DistContext) -> range:
    """The strided share of ``range(n)`` this rank embeds (all of it when not distributed)."""
    return range(ctx.rank, n, ctx.world_size)


def gather_rows(local: np.ndarray, n: int, ctx: DistContext) -> np.ndarray:
    """Reassemble the rows each rank computed for :func:`shard_indices` into ``n`` rows in order.

    Shards differ in length by at most one, so each is padded to the longest before
    ``all_gather`` (which needs equal shapes).
    """
    if not ctx.enabled:
        return local
    longest = -(-n // ctx.world_size)
    width = local.shape[1] if local.ndim == 2 else 0
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((longest, width), dtype=torch.float32, device=device)
    padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32))
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    out = np.empty((n, width), dtype=np.float32)
    for r, part in enumerate(parts):
        rows = len(range(r, n, ctx.world_size))
        out[r :: ctx.world_size] = part[:rows].cpu().numpy()
    return out


def broadcast_object(obj: Any, ctx: DistContext, *, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# `cxr train --nproc N`
# --------------------------------------------------------------------------------------------


def launch(nproc: int, module_args: Sequence[str], *, module: str = "training.cli") -> None:
    """Run ``python -m module module_args...`` in ``nproc`` local processes via torchrun.

    The same as ``torchrun --standalone --nproc-per-node nproc -m module ...``: torch's
    elastic agent starts, watches and (on any failure) stops the workers; ``--standalone``
    picks a free rendezvous port so several jobs can share a machine. A failed worker
    (whose error the worker itself prints) becomes a ``RuntimeError`` naming its rank.
    """
    from torch.distributed.run import get_args_parser, run

    if "WORLD_SIZE" in os.environ:
        raise ValueError(
            "--nproc was given inside a torchrun job; use either torchrun or --nproc, not both"
        )
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", module, *module_args]
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    log.info("launching %d processes: torchrun -m %s %s", nproc, module, " ".join(module_args))
    try:
        run(args)
    except ChildFailedError as exc:
        ranks = sorted(exc.failures)
        raise RuntimeError(
            f"training failed in process(es) of rank {ranks}; their error is printed above"
        ) from None
