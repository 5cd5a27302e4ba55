"""The siamese (metric-learning) training loop.

Read :func:`train` top to bottom, one named stage per call: runtime (seed, device), encoder,
data, model (loss, optimiser and schedule), resume, then ``_fit``: epochs of class-balanced
batches each followed by a k-NN validation that picks the best checkpoint (and, with
``patience``, stops early); then a final test evaluation, ``metrics.json`` and plots. The
stages follow ``train`` in this file, in the order it calls them.

Run directory (``config.out``)::

    config.json     resolved TrainConfig (what was actually run)
    encoder.pt      best encoder (self-describing checkpoint, see training/checkpoint.py)
    last.pt         full training state after the last finished epoch (for --resume; its
                    format is in training/checkpoint.py)
    metrics.json    per-epoch history, best validation and final test metrics
    loss_curve.png  confusion_matrix.png  embedding_map.png

Validation is *how the model is used*: embed the train split as references, classify each
validation image by distance-weighted k-NN, and take the balanced accuracy (COVID-19 is ~2% of
the images, plain accuracy would ignore it).

On CUDA the forward/backward run under bf16 autocast with channels_last tensors; on CPU in
float32. Only the CPU path was exercised in this project's development (no GPU was available).

Under torchrun (``cxr train --nproc N``) the same function runs in every process with
DistributedDataParallel: ``batch_size`` is per process, each rank takes its share of the same
global balanced batches, only rank 0 writes the run directory (training/distributed.py).
With ``cache_dir`` the images come from a decode-once memory-mapped cache and each batch is
augmented on the device (training/cache.py, training/gpu_augment.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from training import distributed as ddp
from training.cache import DeviceBatches, cached_splits
from training.checkpoint import (
    RESUMED_PARTS,
    TrainingProgress,
    capture_rng,
    read_checkpoint,
    read_training_state,
    restore_training_state,
    save_checkpoint,
    save_training_state,
)
from training.data import (
    Sample,
    XrayDataset,
    balanced_sampler,
    class_names,
    load_sources,
    split_samples,
    summarise,
)
from training.devices import resolve_device
from training.encoders import create_encoder, list_encoders, load_weights
from training.evaluate import embed_tensors, evaluate_embeddings
from training.gpu_augment import BatchAugmentation
from training.losses import create_loss, list_losses
from training.preprocess import Preprocessing, train_augmentation
from training.threads import current_thread_policy

log = logging.getLogger(__name__)

__all__ = [
    "FINETUNE",
    "TrainConfig",
    "TrainResult",
    "finetune_config",
    "resolve_device",
    "train",
]


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run; the defaults are the best measured on cxr4 (see
    docs/BENCHMARKS.md, "Training")."""

    # Data sources (repeatable --data); each sample keeps its source. A single string is
    # accepted for configs written before multi-source training.
    data: list[str] | str | None = None
    out: str = "runs/train"
    encoder: str = "covidnet"
    loss: str = "hybrid"
    epochs: int = 20
    image_size: int = 160
    batch_size: int = 64
    embedding_dim: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # 'cosine' | 'onecycle'
    min_lr_ratio: float = 0.02
    grad_clip: float | None = 2.0
    m_per_class: int | None = None  # None: batch_size // number of classes
    # Epochs without validation improvement before stopping; None = never. Off by default: with
    # 10 COVID-19 validation images the metric is noisy, and a patience of 4 stopped 4 of the 5
    # benchmarked losses before their best epoch (docs/BENCHMARKS.md).
    patience: int | None = None
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    seed: int = 0
    workers: int | None = None  # DataLoader workers; None: 0 on CPU, up to 8 on CUDA
    # torch CPU threads, applied by whoever starts the process (`cxr train --threads`, through
    # training/threads.py), not by train(), which runs with the process's thread policy and
    # records the count it ran with in config.json's "resolved". None: the idle cores.
    threads: int | None = None
    weights: str | None = None  # state dict to start from (never downloaded)
    # A cxr checkpoint to fine-tune: its architecture, embedding size and preprocessing replace
    # the fields above, its weights initialise the encoder (how a site is adapted: the active
    # model fine-tuned on the references, each source balanced by the sampler).
    init_from: str | None = None
    # Images drawn per epoch (None: the size of the train split). Fine-tuning uses a fixed
    # budget so its cost does not grow with the number of vendor references.
    epoch_images: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    augment: bool = True
    channels_last: bool = True
    knn_k: int = 5
    eval_batch_size: int = 128
    n_way_episodes: int = 1000
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: float = 0.5
    std: float = 0.25
    # Against shortcuts (see training/preprocess.py): cut 8 % of each border (markers, text).
    # Histogram equalisation and random erasing are available but off: on the shipped recipe
    # (cxr4 + adult, one seed) equalisation cost 0.07-0.12 balanced accuracy on adult test and
    # neither helped any test split (docs/BENCHMARKS.md, "Where the model looks").
    crop: float = 0.08
    equalize: bool = False
    erase_p: float = 0.0
    resume: bool = False
    progress_bar: bool | None = None  # None: only when stderr is a terminal
    compile: bool = False  # torch.compile the training step (needs a C++ compiler on CPU)
    # Decode once into a memory-mapped uint8 cache there; batches augmented on the device.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, str | Path):
            self.data = [str(self.data)]
        elif self.data is not None:
            self.data = [str(d) for d in self.data]

    def preprocessing(self) -> Preprocessing:
        """The input pipeline this configuration trains (and the service will serve) with."""
        return Preprocessing(
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            crop=self.crop,
            equalize=self.equalize,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output, ignoring unknown keys (older/newer configs)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> None:
        """Fail fast, before loading data, with messages that say what to change."""
        if self.encoder not in list_encoders():
            raise ValueError(
                f"unknown encoder {self.encoder!r}; choose one of: {', '.join(list_encoders())}"
            )
        if self.loss not in list_losses():
            raise ValueError(
                f"unknown loss {self.loss!r}; choose one of: {', '.join(list_losses())}"
            )
        if self.schedule not in ("cosine", "onecycle"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose cosine or onecycle")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        for name in ("epochs", "batch_size", "embedding_dim", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (metric losses need pairs)")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.epoch_images is not None and self.epoch_images < 1:
            raise ValueError(f"epoch_images must be at least 1, got {self.epoch_images}")
        if self.init_from and self.weights:
            raise ValueError("give either init_from (a cxr checkpoint) or weights, not both")
        self.preprocessing()  # crop / equalize / size checked where they are defined


@dataclass
class TrainResult:
    """What :func:`train` produced: the run directory, the best checkpoint and the metrics."""

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # the balanced sampler draws from NumPy's global RNG
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class _Augmented(Dataset[tuple[torch.Tensor, int]]):
    """Training view of a cached, un-augmented dataset: same tensors, random augmentation.

    Keeping the base dataset un-augmented lets the same cached tensors serve as the k-NN
    references for validation without decoding the images twice.
    """

    def __init__(self, base: XrayDataset, augment: Callable[[torch.Tensor], torch.Tensor] | None):
        self.base = base
        self.augment = augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[index]
        return (self.augment(x) if self.augment is not None else x), y


def _lr_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up then cosine decay, or PyTorch's one-cycle."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=total,
            pct_start=max(warmup, 1) / total,
            anneal_strategy="cos",
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices and conv kernels only; biases and norm scales are not decayed."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _load_splits(
    config: TrainConfig, samples: Mapping[str, list[Sample]] | None
) -> dict[str, list[Sample]]:
    if samples is not None:
        splits = {name: list(samples.get(name) or []) for name in ("train", "val", "test")}
        if not splits["train"]:
            raise ValueError("samples must contain a non-empty 'train' list")
        return splits
    if not config.data:
        raise ValueError("no training data: pass --data SRC (an image folder or a CSV manifest)")
    return split_samples(
        load_sources(list(config.data)),
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )


# Site adaptation: a few short epochs at a low learning rate from the active model. Measured in
# docs/BENCHMARKS.md ("Site adaptation"); about a minute on a 2-core CPU.
FINETUNE = {"epochs": 4, "lr": 5e-4, "warmup_epochs": 0.25, "epoch_images": 1200}


def finetune_config(init_from: str | Path, **overrides: Any) -> TrainConfig:
    """The configuration that adapts the model ``init_from`` to the references it is given.

    The label x source sampler does the up-weighting: five images a site enrolled form a
    group drawn as often as a vendor's thousand, so the encoder learns the site without
    forgetting the vendor sources, whose references stay in every batch.
    """
    return TrainConfig(**{**FINETUNE, **overrides, "init_from": str(init_from)})


def _adopt_checkpoint(config: TrainConfig) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """``config`` with the architecture and preprocessing of the checkpoint it fine-tunes, and
    that checkpoint's weights (read once).

    A fine-tuned model must see pixels exactly as its starting point did, and its weights only
    fit the same architecture: these fields are taken from the checkpoint, not the config.
    """
    assert config.init_from is not None
    meta = read_checkpoint(config.init_from)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    adopted = dataclasses.replace(
        config,
        encoder=str(meta["encoder_name"]),
        embedding_dim=int(meta["embedding_dim"]),
        encoder_kwargs=dict(meta.get("encoder_kwargs") or {}),
        image_size=pre.image_size,
        mean=pre.mean,
        std=pre.std,
        crop=pre.crop,
        equalize=pre.equalize,
        weights=None,
    )
    log.info(
        "fine-tuning %s (%s, %d px) from %s",
        adopted.encoder, adopted.loss, adopted.image_size, config.init_from,
    )  # fmt: skip
    return adopted, meta["state_dict"]


def _make_progress(enabled: bool) -> Any:
    """A rich progress bar (epoch, loss, images/s, ETA) on stderr, or None."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers worth a log line / the checkpoint header."""
    knn = report["knn"]
    out = {
        "balanced_accuracy": knn["balanced_accuracy"],
        "accuracy": knn["accuracy"],
        "macro_f1": knn["macro_f1"],
        "mean_distance_balanced_accuracy": report["mean_distance"]["balanced_accuracy"],
        "recall": {name: pc["recall"] for name, pc in knn["per_class"].items()},
        "source_balanced_accuracy": report.get(
            "source_balanced_accuracy", knn["balanced_accuracy"]
        ),
        "per_source": {
            name: {
                "balanced_accuracy": r["knn"]["balanced_accuracy"],
                "recall": {
                    c: pc["recall"] for c, pc in r["knn"]["per_class"].items() if pc["support"]
                },
            }
            for name, r in (report.get("per_source") or {}).items()
        },
    }
    if report.get("n_way", {}).get("accuracy") is not None:
        out["n_way_accuracy"] = report["n_way"]["accuracy"]
    return out


@dataclass
class _Runtime:
    """Where and how the steps run (resolved once from the config and the machine)."""

    dctx: ddp.DistContext
    device: torch.device
    workers: int
    channels_last: bool
    amp_dtype: torch.dtype | None

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class _Data:
    """The splits, their data sets and the class-balanced loader of the train split."""

    splits: dict[str, list[Sample]]
    classes: list[str]
    spec: Preprocessing
    datasets: dict[str, Any]
    sampler: Any
    loader: Any
    steps_per_epoch: int
    m_per_class: int
    batch_size: int  # per rank
    global_batch: int

    @property
    def train_set(self) -> Any:
        return self.datasets["train"]


@dataclass
class _Model:
    """The stateful parts of a run (what ``last.pt`` saves, see :data:`RESUMED_PARTS`)."""

    encoder: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def parts(self) -> dict[str, Any]:
        parts = {
            "encoder": self.encoder,
            "loss": self.criterion,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }
        assert tuple(parts) == RESUMED_PARTS
        return parts


def train(
    config: TrainConfig,
    *,
    samples: Mapping[str, list[Sample]] | None = None,
    progress: Callable[[float], None] | None = None,
) -> TrainResult:
    """Train an encoder as configured; see the module docstring for what lands in ``config.out``.

    ``samples`` (``{"train": [...], "val": [...], "test": [...]}``) replaces ``config.data`` (the
    service retrains on enrolled references this way). ``progress(fraction)`` is called with a
    number in ``[0, 1]`` as training goes.
    """
    config.validate()
    started = time.perf_counter()
    # Under torchrun: join the process group (training/distributed.py); else rank 0 of 1.
    dctx = ddp.setup(config.device)
    run_dir = Path(config.out).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "encoder.pt"
    if config.resume and dctx.is_main and not last_path.is_file():
        raise FileNotFoundError(
            f"--resume: {last_path} does not exist; train without --resume first"
        )

    _seed_everything(config.seed)
    rt = _runtime(config, dctx)
    config, encoder = _build_encoder(config)  # first: pretrained weights may fix the scale
    data = _build_data(config, samples, rt)
    model = _build_model(config, encoder, data, rt)
    state = _resume(last_path, model, data, rt) if config.resume else TrainingProgress()
    step_module = ddp.wrap(ddp.TrainStep(model.encoder, model.criterion, rt.amp_dtype), dctx)
    if config.compile:
        step_module = torch.compile(step_module)
    config_dict = _resolved_config(config, data, rt)
    if dctx.is_main:
        (run_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    log.info(
        "training %s + %s on %s: %d train images, %d steps/epoch of %d (%d per class), %d epochs",
        config.encoder, config.loss, rt.device, len(data.train_set), data.steps_per_epoch,
        data.batch_size, data.m_per_class, config.epochs,
    )  # fmt: skip

    def save_best(metrics: Mapping[str, Any]) -> None:
        if dctx.is_main:
            _save_best(best_path, state, model, data, config, config_dict, metrics)

    _fit(config, data, model, rt, step_module, state, last_path, save_best, progress)

    # ---- final evaluation with the best weights, metrics.json and plots ----------------------
    if state.best_state is None:  # resumed a finished run with nothing new to do
        state.best_state = _cpu_state(model.encoder)
    model.encoder.load_state_dict(state.best_state)
    final_split = "test" if "test" in data.datasets else "val"
    test_report = _validate(final_split, config, data, model, rt)
    minutes = (time.perf_counter() - started) / 60.0
    throughput = [h["images_per_second"] for h in state.history]
    metrics: dict[str, Any] = {
        "encoder": config.encoder,
        "loss": config.loss,
        "device": str(rt.device),
        "classes": data.classes,
        "splits": summarise(data.splits),
        "best_epoch": state.best_epoch,
        "epochs_run": len(state.history),
        "minutes": minutes,
        "images_per_second": float(np.mean(throughput)) if throughput else None,
        "history": state.history,
        "val": state.best_val,
        "evaluated_split": final_split if test_report is not None else None,
        "test": test_report,
        "world_size": dctx.world_size,
    }
    save_best({
        "best_epoch": state.best_epoch, "val": state.best_val, "minutes": minutes,
        "test": _summary(test_report) if test_report is not None else None,
    })  # fmt: skip
    if dctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _write_plots(run_dir, state.history, test_report, final_split, model.encoder,
                     data.datasets, data.classes, config, rt.device, rt.channels_last,
                     rt.amp_dtype)  # fmt: skip
    if progress is not None and dctx.is_main:
        progress(1.0)
    if test_report is not None:
        s = _summary(test_report)
        log.info(
            "%s k-NN balanced accuracy %.4f, recall %s (%.1f min)",
            final_split, s["balanced_accuracy"],
            {k: round(v, 3) for k, v in s["recall"].items()}, minutes,
        )  # fmt: skip
    return TrainResult(run_dir=run_dir, checkpoint=best_path, metrics=metrics)


# --------------------------------------------------------------------------------------------
# The stages of train(), in the order it calls them
# --------------------------------------------------------------------------------------------


def _runtime(config: TrainConfig, dctx: ddp.DistContext) -> _Runtime:
    """Device, loader workers, CUDA math modes, memory format and autocast.

    CPU threads are the process's (training/threads.py, applied when the process started): a
    retrain inside the API must not change the request threads' counts, so train() never sets
    them; it only says when ``config.threads`` asked for another count than it runs with."""
    device = dctx.device or resolve_device(config.device)
    on_cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if config.threads and config.threads != threads:
        log.warning(
            "config.threads is %d but this process runs %d thread(s) (its thread policy, %s): "
            "the thread count is applied at process start (cxr train --threads), not by train()",
            config.threads, threads, current_thread_policy().reason or "unset",
        )  # fmt: skip
    workers = (
        config.workers
        if config.workers is not None
        else (min(8, os.cpu_count() or 1) if on_cuda else 0)
    )
    if on_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return _Runtime(
        dctx=dctx,
        device=device,
        workers=workers,
        channels_last=config.channels_last or on_cuda,
        amp_dtype=torch.bfloat16 if on_cuda else None,
    )


def _build_encoder(config: TrainConfig) -> tuple[TrainConfig, nn.Module]:
    """The encoder (from ``init_from``, ``weights`` or scratch) and the config it implies:
    fine-tuning adopts the checkpoint's architecture and preprocessing, and pretrained weights
    may dictate the input scale (recorded in the checkpoint's preprocessing)."""
    start_state = None
    if config.init_from:
        config, start_state = _adopt_checkpoint(config)
    encoder = create_encoder(
        config.encoder, embedding_dim=config.embedding_dim, **config.encoder_kwargs
    )
    if start_state is not None:
        encoder.load_state_dict(start_state)
    if config.weights:
        report = load_weights(encoder, config.weights)
        if report.input_scale is not None and report.input_scale != (config.mean, config.std):
            log.info(
                "%s weights expect inputs scaled with mean %.4g, std %.4g: using that scale "
                "(recorded in the checkpoint's preprocessing)",
                report.layout, *report.input_scale,
            )  # fmt: skip
            config = dataclasses.replace(
                config, mean=report.input_scale[0], std=report.input_scale[1]
            )
    return config, encoder


def _build_data(
    config: TrainConfig, samples: Mapping[str, list[Sample]] | None, rt: _Runtime
) -> _Data:
    """Splits, decoded data sets, and the label x source balanced loader of the train split."""
    dctx = rt.dctx
    splits = _load_splits(config, samples)
    classes = class_names([s for split in splits.values() for s in split])
    spec = config.preprocessing()
    log.info("decoding and caching %s", summarise(splits))
    if config.cache_dir:  # training/cache.py: one decoder per node, every rank maps the file
        datasets: dict[str, Any] = cached_splits(
            splits, classes, spec, config.cache_dir, build=dctx.local_rank == 0,
            barrier=dctx.barrier,
        )  # fmt: skip
    else:
        datasets = {
            name: XrayDataset(items, classes, spec, augment=False)
            for name, items in splits.items()
            if items
        }
    train_set = datasets["train"]
    # Balance label x source: with one source these are the classes.
    n_groups = len(np.unique(train_set.groups))
    m_per_class = config.m_per_class or max(2, config.batch_size // n_groups)
    batch_size = min(config.batch_size, m_per_class * n_groups)
    batch_size -= batch_size % m_per_class
    # One global sampler of world x batch images per step, identical on every rank; each rank
    # takes its share of each global batch (training/distributed.py, ShardedBatchSampler).
    world, global_batch = dctx.world_size, batch_size * dctx.world_size
    sampler = balanced_sampler(
        train_set.groups, m_per_class=m_per_class * world,
        length=config.epoch_images or len(train_set), batch_size=global_batch,
    )  # fmt: skip
    steps_per_epoch = max(1, len(sampler) // global_batch)
    batches = ddp.ShardedBatchSampler(
        sampler, groups=train_set.groups, global_batch=global_batch, rank=dctx.rank,
        world_size=world, steps=steps_per_epoch,
    )  # fmt: skip
    loader: Any
    if config.cache_dir:  # gather from the map, augment the whole batch on the device
        loader = DeviceBatches(
            train_set, batches, device=rt.device, channels_last=rt.channels_last,
            augment=BatchAugmentation(spec) if config.augment else None,
        )  # fmt: skip
    else:
        augment = train_augmentation(spec, erase_p=config.erase_p) if config.augment else None
        loader = DataLoader(
            _Augmented(train_set, augment),
            batch_sampler=batches,
            num_workers=rt.workers,
            pin_memory=rt.on_cuda,
            persistent_workers=rt.workers > 0,
        )
    return _Data(
        splits=splits, classes=classes, spec=spec, datasets=datasets, sampler=sampler,
        loader=loader, steps_per_epoch=steps_per_epoch, m_per_class=m_per_class,
        batch_size=batch_size, global_batch=global_batch,
    )  # fmt: skip


def _build_model(config: TrainConfig, encoder: nn.Module, data: _Data, rt: _Runtime) -> _Model:
    """Encoder on the device, loss, AdamW and the per-step learning-rate schedule."""
    encoder = encoder.to(rt.device)
    if rt.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    criterion = create_loss(
        config.loss,
        embedding_dim=config.embedding_dim,
        num_classes=len(data.classes),
        **config.loss_kwargs,
    ).to(rt.device)
    optimizer = torch.optim.AdamW(
        _param_groups([encoder, criterion], config.weight_decay), lr=config.lr
    )
    scheduler = _lr_schedule(optimizer, config, data.steps_per_epoch)
    if rt.dctx.enabled:  # same init everywhere (seeded), different augmentation per rank
        torch.manual_seed(config.seed + 7919 * rt.dctx.rank)
    return _Model(encoder, criterion, optimizer, scheduler)


def _resume(last_path: Path, model: _Model, data: _Data, rt: _Runtime) -> TrainingProgress:
    """Restore ``last.pt`` (training/checkpoint.py) into the model, the RNGs and the sampler."""
    dctx = rt.dctx
    # Rank 0 reads last.pt and hands it to the others (only rank 0's disk need hold it).
    saved = ddp.broadcast_object(read_training_state(last_path) if dctx.is_main else None, dctx)
    state, sampler_labels = restore_training_state(
        saved, parts=model.parts(), rank=dctx.rank, world_size=dctx.world_size
    )
    if sampler_labels is not None and hasattr(data.sampler, "labels"):
        # pml's MPerClassSampler shuffles its label list in place every epoch: part of the
        # sampling state, restored so a resumed run draws the same batches.
        data.sampler.labels = sampler_labels
    log.info("resumed from %s after epoch %d", last_path, state.epoch)
    return state


def _resolved_config(config: TrainConfig, data: _Data, rt: _Runtime) -> dict[str, Any]:
    """``config.json`` and the checkpoint's ``config``: the config plus what was resolved."""
    return {**config.to_dict(), "resolved": {
        "device": str(rt.device), "m_per_class": data.m_per_class,
        "batch_size": data.batch_size, "steps_per_epoch": data.steps_per_epoch,
        "workers": rt.workers, "classes": data.classes, "threads": torch.get_num_threads(),
        "channels_last": rt.channels_last,
        "autocast": str(rt.amp_dtype) if rt.amp_dtype else None,
        "world_size": rt.dctx.world_size, "global_batch_size": data.global_batch,
    }}  # fmt: skip


def _fit(
    config: TrainConfig,
    data: _Data,
    model: _Model,
    rt: _Runtime,
    step_module: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    state: TrainingProgress,
    last_path: Path,
    save_best: Callable[[Mapping[str, Any]], None],
    progress: Callable[[float], None] | None,
) -> None:
    """The epochs from ``state.epoch`` on: train, validate, keep the best, write ``last.pt``;
    stop early after ``patience`` epochs without improvement. Updates ``state``."""
    main = rt.dctx.is_main
    show_bar = config.progress_bar if config.progress_bar is not None else sys.stderr.isatty()
    bar = _make_progress(show_bar and main)
    if bar is not None:
        bar.start()
    try:
        for epoch in range(state.epoch, config.epochs):
            row = _train_epoch(epoch, config, data, model, rt, step_module, bar, progress)
            report = _validate("val", config, data, model, rt)
            if report is not None:
                s = _summary(report)
                row.update(
                    val_source_balanced_accuracy=s["source_balanced_accuracy"],
                    val_balanced_accuracy=s["balanced_accuracy"],
                    val_accuracy=s["accuracy"],
                    val_mean_distance_balanced_accuracy=s["mean_distance_balanced_accuracy"],
                    val_recall=s["recall"],
                )
            state.history.append(row)
            state.epoch = epoch + 1
            # The mean over sources of their balanced accuracy: a small source (a second
            # hospital) counts as much as a large one. No validation split: the last epoch.
            score = row.get("val_source_balanced_accuracy", float(epoch))
            improved = score > state.best_score
            if improved:
                state.best_score, state.best_epoch, state.stale = score, epoch + 1, 0
                state.best_val = _summary(report) if report is not None else None
                state.best_state = _cpu_state(model.encoder)
                save_best({"best_epoch": state.best_epoch, "val": state.best_val})
            else:
                state.stale += 1
            log.info(
                "epoch %d/%d: loss %.4f, %.1f img/s, val source-balanced k-NN acc %s%s",
                epoch + 1, config.epochs, row["train_loss"], row["images_per_second"],
                f"{score:.4f}" if report is not None else "n/a", " (best)" if improved else "",
            )  # fmt: skip
            ranks_rng = ddp.gather_objects(capture_rng(), rt.dctx)
            if main:
                save_training_state(
                    last_path,
                    progress=state,
                    parts=model.parts(),
                    rng_ranks=ranks_rng,
                    sampler_labels=list(getattr(data.sampler, "labels", []) or []) or None,
                    config=config.to_dict(),
                )
            if config.patience is not None and state.stale >= config.patience:
                log.info("early stopping: no validation improvement for %d epochs", state.stale)
                break
    finally:
        if bar is not None:
            bar.stop()


def _train_epoch(
    epoch: int,
    config: TrainConfig,
    data: _Data,
    model: _Model,
    rt: _Runtime,
    step_module: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    bar: Any,
    progress: Callable[[float], None] | None,
) -> dict[str, Any]:
    """One epoch of optimiser steps; returns its history row (loss over every rank)."""
    model.encoder.train()
    model.criterion.train()
    steps = data.steps_per_epoch
    task = (
        bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps, loss=0.0, ips=0.0)
        if bar is not None
        else None
    )
    total_steps = config.epochs * steps
    optimizer = model.optimizer
    loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
    for step, (x, y) in enumerate(data.loader):
        if step >= steps:
            break
        x = x.to(rt.device, non_blocking=True)
        y = y.to(rt.device, non_blocking=True)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = step_module(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip
            )
        optimizer.step()
        model.scheduler.step()
        loss_sum += float(loss.detach()) * len(y)
        seen += len(y)
        if progress is not None and rt.dctx.is_main:
            progress(0.98 * (epoch * steps + step + 1) / total_steps)
        if task is not None:
            ips = seen / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, loss=loss_sum / seen, ips=ips)
    train_seconds = time.perf_counter() - t0
    loss_sum, seen = ddp.sum_across(rt.dctx, loss_sum, seen)  # the global batch's mean
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_second": seen / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "epoch_seconds": time.perf_counter() - t0,
    }


def _validate(
    split: str, config: TrainConfig, data: _Data, model: _Model, rt: _Runtime
) -> dict[str, Any] | None:
    """k-NN evaluation of ``split`` against the train split as references (None: no split)."""
    if split not in data.datasets:
        return None
    dctx, encoder = rt.dctx, model.encoder
    kw = {"batch_size": config.eval_batch_size, "device": rt.device,
          "channels_last": rt.channels_last, "autocast_dtype": rt.amp_dtype}  # fmt: skip
    ddp.sync_buffers(encoder, dctx)  # BatchNorm statistics of rank 0, as checkpointed

    def embed(ds: XrayDataset) -> np.ndarray:  # each rank embeds a share, all get all
        mine = [ds[i][0] for i in ddp.shard_indices(len(ds), dctx)]
        return ddp.gather_rows(embed_tensors(encoder, mine, **kw), len(ds), dctx)

    train_set, queries_set = data.train_set, data.datasets[split]
    refs = embed(train_set)
    queries = embed(queries_set)
    if not dctx.is_main:  # rank 0 scores; every rank gets its report (same decisions everywhere)
        return ddp.broadcast_object(None, dctx)
    classes = data.classes
    return ddp.broadcast_object(
        evaluate_embeddings(
            refs,
            [classes[i] for i in train_set.labels],
            queries,
            [classes[i] for i in queries_set.labels],
            classes=classes,
            k=config.knn_k,
            episodes=config.n_way_episodes if split == "test" else 200,
            seed=config.seed,
            query_sources=[s.source for s in queries_set.samples],
        ),
        dctx,
    )


def _cpu_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


def _save_best(
    path: Path,
    state: TrainingProgress,
    model: _Model,
    data: _Data,
    config: TrainConfig,
    config_dict: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> None:
    """``encoder.pt``: the best weights so far as a self-describing checkpoint."""
    assert state.best_state is not None
    snapshot = copy.deepcopy(model.encoder).cpu()
    snapshot.load_state_dict(state.best_state)
    save_checkpoint(
        path,
        encoder=snapshot,
        encoder_name=config.encoder,
        encoder_kwargs=config.encoder_kwargs,
        preprocessing=data.spec,
        classes=data.classes,
        config=config_dict,
        metrics=metrics,
    )


def _write_plots(
    run_dir: Path,
    history: list[dict[str, Any]],
    report: Mapping[str, Any] | None,
    split: str,
    encoder: nn.Module,
    datasets: Mapping[str, XrayDataset],
    classes: list[str],
    config: TrainConfig,
    device: torch.device,
    channels_last: bool,
    amp_dtype: torch.dtype | None,
) -> None:
    """Loss curve, confusion matrix and PCA embedding map; a plotting failure is only logged."""
    from training.plots import plot_confusion_matrix, plot_embedding_map, plot_history

    try:
        if history:
            plot_history(history, run_dir / "loss_curve.png")
        if report is not None:
            cm = report["knn"]["confusion_matrix"]
            plot_confusion_matrix(
                cm["matrix"], cm["labels"], run_dir / "confusion_matrix.png",
                title=f"k-NN on {split} (balanced acc. {report['knn']['balanced_accuracy']:.3f})",
            )  # fmt: skip
        shown = datasets.get(split) or datasets["train"]
        emb = embed_tensors(
            encoder, [shown[i][0] for i in range(len(shown))], batch_size=config.eval_batch_size,
            device=device, channels_last=channels_last, autocast_dtype=amp_dtype,
        )  # fmt: skip
        plot_embedding_map(
            emb, [classes[i] for i in shown.labels], classes, run_dir / "embedding_map.png",
            title=f"{config.encoder} + {config.loss}: {split} embeddings (PCA)",
        )  # fmt: skip
    except Exception:  # plots are a convenience; never lose a trained model over one
        log.exception("could not write plots to %s", run_dir)
