"""``cxr bench throughput``: how close training comes to what the hardware can do.

For each ``encoder:image_size`` it times full training steps (forward, the default hybrid loss,
backward, AdamW) three ways, on the same model and batch size:

- ``images_per_s``: the real pipeline of ``cxr train --cache-dir``: rows gathered from the
  decode-once ``uint8`` cache (training/cache.py), copied to the device, augmented there
  (training/gpu_augment.py), normalised; class-balanced batches;
- ``synthetic_images_per_s``: random tensors already on the device (the ceiling: no input
  pipeline at all); ``efficiency`` is the ratio of the two;
- ``ram_images_per_s``: ``cxr train`` without ``--cache-dir`` (float tensors decoded once into
  RAM, per-image augmentation on the CPU in the loader);
- ``uncached_images_per_s``: the pipeline without any cache, decoding and resizing every image
  every epoch and augmenting per image on the CPU (torchvision ``v2``), which is what epochs
  after the first cost without it; ``cache_speedup`` is ``images_per_s`` over it, and
  ``cache_build_s`` the one-off decode that the first epoch pays instead (``cache_open_s``: what
  a later run pays to reopen it, hashing every file).

The same three feeds are also timed without any model (``pipeline_images_per_s``,
``uncached_pipeline_images_per_s``, and ``ram_pipeline_images_per_s`` for the in-memory float
tensors plus per-image augmentation that ``cxr train`` uses without ``--cache-dir``): how fast
each input pipeline alone can go. Every rate is the median of ``rounds`` rounds that run the
modes in turn, so load that drifts on a shared machine does not favour one mode.

On CUDA the step runs under bf16 autocast with channels_last tensors (``--compile`` adds
``torch.compile``); ``peak_memory_mb`` is the peak GPU memory allocated. On CPU it is the
process's peak resident memory, and the step runs in float32.
"""

from __future__ import annotations

import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.cache import CachedDataset, DeviceBatches, open_cache
from training.data import XrayDataset, balanced_sampler, class_names, load_source
from training.distributed import TrainStep
from training.encoders import create_encoder
from training.gpu_augment import BatchAugmentation
from training.losses import create_loss
from training.preprocess import Preprocessing

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODELS", "parse_models", "run_throughput_bench"]

DEFAULT_MODELS = "resnet18:224,covidnet:160,densenet121:224"


def parse_models(text: str) -> list[tuple[str, int]]:
    """``"resnet18:224,covidnet:160"`` -> ``[("resnet18", 224), ("covidnet", 160)]``."""
    from training.encoders import list_encoders

    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = item.partition(":")
        if name not in list_encoders():
            raise ValueError(
                f"unknown encoder {name!r}; choose one of: {', '.join(list_encoders())}"
            )
        if not sep or not size.isdigit() or int(size) < 8:
            raise ValueError(f"{item!r} must look like ENCODER:IMAGE_SIZE, e.g. resnet18:224")
        out.append((name, int(size)))
    if not out:
        raise ValueError("no models given; e.g. --models resnet18:224")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _timed_steps(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    warmup: int,
    steps: int,
    device: torch.device,
) -> float:
    """Images per second over ``steps`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    if steps == 0:
        return 0.0
    seen, t0 = 0, time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        step(x, y)
        seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - t0)


def _loader_batches(dataset: Dataset[Any], batches: Iterable[list[int]]) -> Iterator[Any]:
    """Per-image decode/augment through a DataLoader (the path without the tensor cache)."""
    for x, y in DataLoader(dataset, batch_sampler=list(batches)):
        yield x.contiguous(memory_format=torch.channels_last), y


def _interleaved(
    modes: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], None], Iterator[Any]]],
    rounds: int,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """Median images/s per mode over ``rounds`` rounds that each run every mode in turn."""
    for step, feed in modes.values():
        _timed_steps(step, feed, warmup=warmup, steps=0, device=device)
    per_round = max(1, steps // rounds)
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(rounds):
        for k, (step, feed) in modes.items():
            rates[k].append(_timed_steps(step, feed, warmup=0, steps=per_round, device=device))
    return {k: float(np.median(v)) for k, v in rates.items()}


def _forever(make: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    while True:
        yield from make()


def run_throughput_bench(
    *,
    data: Path,
    models: list[tuple[str, int]],
    batch_size: int,
    device: torch.device,
    steps: int = 20,
    warmup: int = 3,
    limit: int | None = None,
    cache_dir: Path | None = None,
    compile_step: bool = False,
    uncached: bool = True,
    rounds: int = 3,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per model (see the module docstring for the columns)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    samples = load_source(data)
    if limit is not None:
        samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]
        samples = samples[:limit]
    classes = class_names(samples)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    amp = torch.bfloat16 if on_cuda else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxr-throughput-") as tmp:
        for name, size in models:
            spec = Preprocessing(image_size=size)
            t0 = time.perf_counter()
            cache = open_cache(samples, spec, cache_dir or Path(tmp))
            build_s = time.perf_counter() - t0 if cache.built else None
            t0 = time.perf_counter()
            cache = open_cache(samples, spec, cache_dir or Path(tmp))  # what a later run pays
            open_s = time.perf_counter() - t0
            ds = CachedDataset(cache, classes)
            n_classes = len(np.unique(ds.labels))
            m = max(2, batch_size // n_classes)
            batch = min(batch_size, m * n_classes) // m * m
            sampler = balanced_sampler(ds.labels, m_per_class=m, length=len(ds), batch_size=batch)

            def batches_of(s: Any = sampler, b: int = batch) -> Iterator[list[int]]:
                idx = list(s)
                return iter([idx[i : i + b] for i in range(0, len(idx) - b + 1, b)])

            encoder = create_encoder(name, embedding_dim=128).to(device)
            encoder = encoder.to(memory_format=torch.channels_last)
            criterion = create_loss("hybrid", embedding_dim=128, num_classes=len(classes))
            module: Any = TrainStep(encoder, criterion.to(device), amp)
            if compile_step:
                module = torch.compile(module)
            params = [p for p in module.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-3)

            def step(x: torch.Tensor, y: torch.Tensor, mod: Any = module, opt: Any = optimizer):
                loss = mod(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def cached(ds: CachedDataset = ds, spec: Preprocessing = spec) -> Iterator[Any]:
                return iter(
                    DeviceBatches(
                        ds, batches_of(), device=device, augment=BatchAugmentation(spec),
                        channels_last=True,
                    )
                )  # fmt: skip

            x0, y0 = next(iter(DeviceBatches(ds, batches_of(), device=device, augment=None)))
            fixed = (x0.contiguous(memory_format=torch.channels_last), y0)
            feeds: dict[str, Iterator[Any]] = {
                "real": _forever(cached),
                "synthetic": _forever(lambda f=fixed: [f]),
            }
            # `cxr train` without --cache-dir: float tensors in RAM, per-image CPU augmentation.
            ram = XrayDataset(cache.samples, classes, spec, augment=True, cache=True)
            feeds["ram"] = _forever(lambda r=ram: _loader_batches(r, batches_of()))
            if uncached:  # decode + resize + per-image CPU augmentation (v2), every epoch
                plain = XrayDataset(cache.samples, classes, spec, augment=True, cache=False)
                feeds["uncached"] = _forever(lambda p=plain: _loader_batches(p, batches_of()))
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            # Modes interleaved round by round, the median kept: on a shared machine the load
            # drifts during a run, and it must not favour whichever mode ran first.
            train_rate = _interleaved(
                {k: (step, v) for k, v in feeds.items()}, rounds, steps, warmup, device
            )
            noop: Callable[[torch.Tensor, torch.Tensor], None] = lambda x, y: None  # noqa: E731
            pipes = {"real": feeds["real"], "ram": feeds["ram"]}
            if uncached:
                pipes["uncached"] = feeds["uncached"]
            pipe_rate = _interleaved(
                {k: (noop, v) for k, v in pipes.items()}, rounds, steps, 1, device
            )
            real, synthetic = train_rate["real"], train_rate["synthetic"]
            row: dict[str, Any] = {
                "encoder": name, "image_size": size, "batch": batch, "device": str(device),
                "images_per_s": round(real, 1), "synthetic_images_per_s": round(synthetic, 1),
                "efficiency": round(real / synthetic, 3),
                "peak_memory_mb": round(_peak_memory_mb(device), 1),
                "autocast": str(amp) if amp else None, "channels_last": True,
                "compile": compile_step, "images": len(ds),
                "cache_build_s": round(build_s, 2) if build_s is not None else None,
                "cache_open_s": round(open_s, 2), "threads": torch.get_num_threads(),
                "pipeline_images_per_s": round(pipe_rate["real"], 1),
                "ram_pipeline_images_per_s": round(pipe_rate["ram"], 1),
                "ram_images_per_s": round(train_rate["ram"], 1),
            }  # fmt: skip
            if uncached:
                row.update(
                    uncached_images_per_s=round(train_rate["uncached"], 1),
                    cache_speedup=round(real / train_rate["uncached"], 2),
                    uncached_pipeline_images_per_s=round(pipe_rate["uncached"], 1),
                )
            rows.append(row)
            if on_row is not None:
                on_row(row)
            log.info("throughput %s", row)
    return rows
