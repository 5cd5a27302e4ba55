"""Typer commands of the training package: ``cxr train``, ``cxr evaluate``, ``cxr bench train``.

``app/cli.py`` registers these functions; they live here because ``training/`` never imports
``app/``. User errors (missing data, unknown encoder, bad checkpoint) end with one clear message
on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from training.bench import DEFAULT_COMBOS
from training.train import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "bench_adapt_command",
    "bench_throughput_command",
    "bench_train_command",
    "evaluate_command",
    "train_command",
]

_DEFAULTS = TrainConfig()
_console = Console()
_err = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    """INFO logs of the training package on stderr; keeps any logging the host set up."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    level = logging.DEBUG if verbose else logging.INFO
    for name in ("training", "__main__"):
        logging.getLogger(name).setLevel(level)


def _start_process(threads: int | None) -> None:
    """This process's thread policy (training/threads.py), applied once when the command's
    arguments are checked and before it works: ``--threads`` when given, else the idle cores (a
    DDP rank: its node's share). Here and not in `train()`, so a library caller (the API's
    in-process retrain) keeps its own."""
    from training.threads import ThreadPolicy, apply_thread_policy

    apply_thread_policy(ThreadPolicy.training(threads))


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one message and exit status 2."""
    try:
        yield
    except KeyboardInterrupt:
        _err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        _err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (ValueError, OSError) as exc:  # DataSourceError, ImageError, CheckpointError, ...
        _err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _report_tables(report: dict[str, Any], title: str) -> list[Table]:
    summary = Table(title=title)
    for col in ("method", "accuracy", "balanced acc.", "macro F1", "AUC (OvR)"):
        summary.add_column(col, justify="right" if col != "method" else "left")
    for method in ("knn", "mean_distance"):
        r = report[method]
        summary.add_row(
            method, _fmt(r["accuracy"]), _fmt(r["balanced_accuracy"]), _fmt(r["macro_f1"]),
            _fmt(r["auc_ovr"]),
        )  # fmt: skip
    nw = report.get("n_way") or {}
    if report.get("source_balanced_accuracy") is not None:
        summary.caption = (
            f"mean over sources of the k-NN balanced accuracy: "
            f"{_fmt(report['source_balanced_accuracy'])}"
        )
    if nw:
        summary.caption = (
            (summary.caption + "; " if summary.caption else "")
            + f"{nw.get('n')}-way {nw.get('k_shot')}-shot accuracy over {nw.get('episodes')} "
            f"episodes: {_fmt(nw.get('accuracy'))}"
        )
    per_class = Table(title="per class (k-NN / mean distance)")
    for col in ("class", "support", "k-NN precision", "k-NN recall", "mean-dist. recall"):
        per_class.add_column(col, justify="right" if col != "class" else "left")
    for name, pc in report["knn"]["per_class"].items():
        if not pc["support"] and "n_queries" in report:
            continue  # a per-source table lists the classes that source has
        md = report["mean_distance"]["per_class"][name]
        per_class.add_row(
            name, str(pc["support"]), _fmt(pc["precision"]), _fmt(pc["recall"]), _fmt(md["recall"])
        )
    return [summary, per_class]


_DATA_HELP = (
    "Image folder, CSV manifest, CoronaHack or COVID-19 collection; repeat for several sources "
    "(each image keeps its source)."
)


def _check_sources(data: list[Path]) -> None:
    for src in data:
        if not src.exists():
            raise FileNotFoundError(f"--data {src} does not exist")


def train_command(
    ctx: typer.Context,
    data: list[Path] = typer.Option(..., "--data", help=_DATA_HELP),
    out: Path = typer.Option(
        ..., "--out", help="Run directory (encoder.pt, metrics.json, config.json, plots)."
    ),
    encoder: str = typer.Option(
        _DEFAULTS.encoder,
        help="resnet9, resnet9_half, covidnet, sepconv, resnet18, resnet50 or densenet121.",
    ),
    loss: str = typer.Option(
        _DEFAULTS.loss,
        help="contrastive, triplet, supcon, pair, classifier or hybrid (contrastive + CE).",
    ),
    epochs: int = typer.Option(
        _DEFAULTS.epochs, min=1, help="Maximum epochs (fewer only with --patience)."
    ),
    image_size: int = typer.Option(_DEFAULTS.image_size, min=8, help="Resize to SIZE x SIZE."),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, min=2, help="Class-balanced batch size."),
    device: str = typer.Option(
        _DEFAULTS.device, help="auto, cpu or cuda (bf16 autocast + channels_last on CUDA)."
    ),
    seed: int = typer.Option(_DEFAULTS.seed, help="Seed for splits, sampling and init."),
    weights: Path | None = typer.Option(
        None, "--weights", help="Start from this state dict file (never downloaded)."
    ),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Fine-tune this cxr checkpoint (its architecture and pixels)."
    ),
    crop: float = typer.Option(
        _DEFAULTS.crop, min=0.0, max=0.39, help="Fraction cut from each border (markers, text)."
    ),
    equalize: bool = typer.Option(
        _DEFAULTS.equalize, "--equalize/--no-equalize", help="Histogram-equalise every image."
    ),
    erase_p: float = typer.Option(
        _DEFAULTS.erase_p, min=0.0, max=1.0, help="Probability of erasing a random patch."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue --out from its last.pt."),
    lr: float = typer.Option(_DEFAULTS.lr, help="Peak learning rate (AdamW)."),
    patience: int = typer.Option(
        _DEFAULTS.patience or 0, help="Early-stopping patience in epochs (0: never stop early)."
    ),
    workers: int | None = typer.Option(
        None, help="DataLoader workers (default: 0 on CPU, up to 8 on CUDA)."
    ),
    threads: int | None = typer.Option(
        None, help="CPU threads of each process (default: idle cores shared by them)."
    ),
    progress_bar: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: when on a terminal)."
    ),
    nproc: int = typer.Option(
        1, min=1, help="Processes (DistributedDataParallel via torchrun; one per GPU on CUDA)."
    ),
    compile_step: bool = typer.Option(
        False, "--compile", help="torch.compile the training step (CPU: needs a C++ compiler)."
    ),
    cache_dir: Path | None = typer.Option(
        None, help="Decode once into a memory-mapped uint8 cache here; augment on the device."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Train a siamese (metric-learning) encoder and write RUN_DIR/encoder.pt, metrics and plots."""
    _setup_logging(verbose)
    if nproc > 1:  # the same command in N processes, started by torch's own launcher
        with _user_errors():
            try:
                _launch_torchrun(ctx, nproc)
            except RuntimeError as exc:
                raise ValueError(str(exc)) from None
        return  # rank 0 printed the results
    with _user_errors():
        from training.train import train

        config = TrainConfig(
            data=[str(d) for d in data], out=str(out), encoder=encoder, loss=loss, epochs=epochs,
            image_size=image_size, batch_size=batch_size, device=device, seed=seed,
            weights=str(weights) if weights else None, resume=resume, lr=lr,
            init_from=str(init_from) if init_from else None, crop=crop, equalize=equalize,
            erase_p=erase_p,
            patience=patience or None, workers=workers, threads=threads, progress_bar=progress_bar,
            compile=compile_step, cache_dir=str(cache_dir) if cache_dir else None,
        )  # fmt: skip
        config.validate()
        _check_sources(data)
        if weights is not None and not weights.is_file():
            raise FileNotFoundError(f"--weights {weights} does not exist")
        from training.distributed import shutdown

        _start_process(threads)
        try:
            result = train(config)
        finally:
            shutdown()  # leaves the torchrun process group, if any
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for the whole job
    test = result.metrics.get("test")
    if test is not None:
        split = result.metrics.get("evaluated_split")
        for table in _report_tables(test, f"{encoder} + {loss}: {split} split"):
            _console.print(table)
    _console.print(
        f"wrote {result.checkpoint} (best epoch {result.metrics['best_epoch']}, "
        f"{result.metrics['minutes']:.1f} min) and metrics, config, plots in {result.run_dir}",
        highlight=False,
    )


def _launch_torchrun(ctx: typer.Context, nproc: int) -> None:
    """Re-run this very `train` command (every option as given, but --nproc) under torchrun."""
    from training.distributed import launch

    argv: list[str] = ["train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not param.opts[0].startswith("-") or param.name == "nproc" or value is None:
            continue
        if getattr(param, "is_flag", False):
            flags = param.opts if value else param.secondary_opts
            argv += flags[:1]
            continue
        for item in value if param.multiple else [value]:
            argv += [param.opts[0], str(item)]
    launch(nproc, argv)


def evaluate_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="encoder.pt written by `cxr train`."),
    data: list[Path] = typer.Option(..., "--data", help=_DATA_HELP),
    split: str = typer.Option("test", help="Query split: train, val or test (references: train)."),
    out: Path | None = typer.Option(
        None, "--out", help="Report JSON (default: next to the checkpoint)."
    ),
    k: int = typer.Option(5, min=1, help="Neighbours for the k-NN vote."),
    n_way: int | None = typer.Option(None, help="Classes per few-shot episode (default: all)."),
    k_shot: int = typer.Option(1, min=1, help="Support images per class per episode."),
    episodes: int = typer.Option(1000, min=0, help="Few-shot episodes."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(64, min=1, help="Embedding batch size."),
    predictions: bool = typer.Option(
        False, "--predictions", help="Add each query's path, label and predicted labels."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:  # fmt: skip
    """Evaluate a checkpoint as a deployment would answer: one index of the train splits of
    every --data source; queries = --split of each; reports pooled, per source and per class."""
    _setup_logging(verbose)
    with _user_errors():
        from training.checkpoint import load_checkpoint
        from training.evaluate import evaluate_checkpoint

        if split not in ("train", "val", "test"):
            raise ValueError(f"--split must be train, val or test, got {split!r}")
        _check_sources(data)
        loaded = load_checkpoint(checkpoint, map_location="cpu")
        _start_process(None)
        report = evaluate_checkpoint(
            loaded, data, split=split, k=k, n_way=n_way, k_shot=k_shot, episodes=episodes,
            device=device, batch_size=batch_size, predictions=predictions,
        )  # fmt: skip
        report = {"checkpoint": str(checkpoint), "encoder": loaded.encoder_name, **report}
        target = out or checkpoint.with_name(f"evaluate_{split}.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2))
    for table in _report_tables(
        report, f"{loaded.encoder_name}: {split} split vs train references (all sources)"
    ):
        _console.print(table)
    for name, part in (report.get("per_source") or {}).items():
        for table in _report_tables(part, f"source {name}: {part['n_queries']} {split} images"):
            _console.print(table)
    _console.print(f"wrote {target}", highlight=False)


def bench_train_command(
    data: list[Path] = typer.Option(..., "--data", help=_DATA_HELP),
    combos: str = typer.Option(
        DEFAULT_COMBOS, help="Comma-separated ENCODER:LOSS[:key=value...] combinations."
    ),
    epochs: int | None = typer.Option(
        None, min=1, help="Epochs for every combo (default: TrainConfig's)."
    ),
    image_size: int = typer.Option(_DEFAULTS.image_size, min=8, help="Image size for every combo."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed shared by every combo."),
    threads: int | None = typer.Option(
        None, min=1, help="torch CPU threads for every combo (default: idle cores at the start)."
    ),
    out: Path = typer.Option(Path("runs/bench/train.json"), "--out", help="JSON rows."),
    runs_dir: Path | None = typer.Option(None, help="Run directories (default: next to --out)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:  # fmt: skip
    """Train each ENCODER:LOSS combination on one split and compare them on the test split."""
    _setup_logging(verbose)
    with _user_errors():
        from training.bench import parse_combos, run_train_bench

        parsed = parse_combos(combos)
        _check_sources(data)
        base = TrainConfig(
            data=[str(d) for d in data], image_size=image_size, device=device, seed=seed,
            epochs=epochs or _DEFAULTS.epochs, threads=threads, progress_bar=False,
        )  # fmt: skip
        base.validate()
        show: Callable[[dict[str, Any]], None] = lambda row: _console.print(  # noqa: E731
            f"{row['encoder']}:{row['loss']}: balanced acc. {_fmt(row['balanced_accuracy'])}, "
            f"COVID-19 recall {_fmt(row['covid_recall'])}, {row['minutes']:.1f} min",
            highlight=False,
        )
        _start_process(threads)  # once: every combo runs with the same count
        rows = run_train_bench(
            base, parsed, runs_dir=runs_dir or out.with_suffix(""), out=out, on_row=show
        )
    table = Table(title=f"cxr bench train ({', '.join(map(str, data))})")
    for col in ("encoder", "loss", "minutes", "balanced acc.", "COVID-19 recall", "accuracy",
                "mean-dist. bal. acc.", "img/s"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("encoder", "loss") else "right")
    for r in rows:
        table.add_row(
            r["encoder"] + "".join(f" {k}={v}" for k, v in r["overrides"].items()), r["loss"],
            _fmt(r["minutes"]), _fmt(r["balanced_accuracy"]), _fmt(r["covid_recall"]),
            _fmt(r["accuracy"]), _fmt(r["mean_distance_balanced_accuracy"]),
            _fmt(r["images_per_second"]),
        )  # fmt: skip
    _console.print(table)
    _console.print(f"wrote {out}", highlight=False)


def bench_adapt_command(
    data: list[Path] = typer.Option(..., "--data", help=_DATA_HELP + " The vendor's sources."),
    site: Path = typer.Option(
        ..., "--site", help="A source held out of training and references: the new hospital."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Take this encoder instead of training one on --data."
    ),
    ks: str = typer.Option("1,5,10", "--k", help="Images per class the site enrolls."),
    repeats: int = typer.Option(5, min=1, help="Random draws of the enrolled images per k."),
    adapt_repeats: int = typer.Option(
        2, min=0, help="How many of those draws are also adapted (about a minute each)."
    ),
    seed: int = typer.Option(0, help="Seed of the draws (and of training)."),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads for training."),
    out: Path = typer.Option(Path("runs/bench/adapt.json"), "--out", help="JSON rows."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:  # fmt: skip
    """Replay a new hospital: zero-shot, after enrolling K per class, after the site adapter."""
    _setup_logging(verbose)
    with _user_errors():
        from training.bench_adapt import run_adapt_bench

        _check_sources([*data, site])
        k_values = [int(v) for v in ks.split(",") if v.strip()]
        if not k_values or min(k_values) < 1:
            raise ValueError(f"--k must list positive integers, got {ks!r}")
        _start_process(threads)
        train_minutes = None
        if checkpoint is None:
            from training.train import train

            config = TrainConfig(
                data=[str(d) for d in data], out=str(out.with_suffix("") / "model"),
                seed=seed, threads=threads, progress_bar=False,
            )  # fmt: skip
            result = train(config)
            checkpoint, train_minutes = result.checkpoint, result.metrics["minutes"]
        elif not checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
        rows = run_adapt_bench(
            checkpoint=checkpoint, data=data, site=site, ks=k_values, repeats=repeats,
            adapt_repeats=adapt_repeats, seed=seed, threads=threads, train_minutes=train_minutes,
            out=out, work_dir=out.with_suffix("") / "runs",
        )  # fmt: skip
    table = Table(title=f"cxr bench adapt: site {rows[0]['site']}")
    for col in ("k", "stage", "balanced acc.", "recall", "COVID-19 calls", "vendor bal. acc.",
                "minutes"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("stage", "recall") else "right")
    for r in rows:
        table.add_row(
            str(r["k"]), r["stage"], _fmt(r["balanced_accuracy"]),
            ", ".join(f"{k} {_fmt(v)}" for k, v in r["recall"].items()),
            _fmt(r["covid_false_positive_rate"]), _fmt(r["vendor_balanced_accuracy"]),
            _fmt(r["minutes"]),
        )  # fmt: skip
    _console.print(table)
    _console.print(f"wrote {out}", highlight=False)


def bench_throughput_command(
    data: Path = typer.Option(..., "--data", help="Data source whose images feed the pipeline."),
    models: str = typer.Option(
        "resnet18:224,covidnet:160,densenet121:224", help="Comma-separated ENCODER:IMAGE_SIZE."
    ),
    batch_size: int = typer.Option(256, min=2, help="Class-balanced batch size."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    steps: int = typer.Option(20, min=1, help="Timed training steps per measurement."),
    warmup: int = typer.Option(3, min=0, help="Untimed steps first (cudnn autotune, compile)."),
    limit: int | None = typer.Option(None, min=1, help="Use this many images (random subset)."),
    cache_dir: Path | None = typer.Option(None, help="Tensor cache (default: a temporary one)."),
    compile_step: bool = typer.Option(False, "--compile", help="torch.compile the step."),
    uncached: bool = typer.Option(
        True, "--uncached/--no-uncached", help="Also time decoding every epoch (no cache)."
    ),
    rounds: int = typer.Option(3, min=1, help="Rounds of every mode in turn (median kept)."),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: idle)."),
    out: Path = typer.Option(Path("runs/bench/throughput.json"), "--out", help="JSON rows."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:  # fmt: skip
    """Training images/s: real pipeline vs tensors already on the device (and vs no cache)."""
    _setup_logging(verbose)
    with _user_errors():
        from training.devices import resolve_device
        from training.throughput import parse_models, run_throughput_bench

        parsed = parse_models(models)
        if not data.exists():
            raise FileNotFoundError(f"--data {data} does not exist")
        dev = resolve_device(device)
        _start_process(threads)
        rows = run_throughput_bench(
            data=data, models=parsed, batch_size=batch_size, device=dev, steps=steps,
            warmup=warmup, limit=limit, cache_dir=cache_dir, compile_step=compile_step,
            uncached=uncached, rounds=rounds,
        )  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
    table = Table(title=f"cxr bench throughput ({data})")
    cols = ("encoder", "image_size", "batch", "device", "images_per_s", "synthetic_images_per_s",
            "efficiency", "peak_memory_mb", "ram_images_per_s", "uncached_images_per_s",
            "cache_speedup",
            "pipeline_images_per_s", "ram_pipeline_images_per_s",
            "uncached_pipeline_images_per_s")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("encoder", "device") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in cols))
    _console.print(table)
    _console.print(f"wrote {out}", highlight=False)


def main() -> None:
    """``python -m training.cli train ...``: the entry point torchrun starts on every rank."""
    app = typer.Typer(add_completion=False, help="cxr training commands (as in `cxr`).")
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app()


if __name__ == "__main__":
    main()
