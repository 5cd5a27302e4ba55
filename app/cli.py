"""The `cxr` command line: one Typer app that assembles the commands of every package.

Commands of `training/` and `index/` live in those packages (they never import `app/`);
this module only registers them, so `cxr --help` lists everything in one place.
"""

from __future__ import annotations

import sys

import typer

from app.commands import register as register_service_commands
from app.dicom.cli import bench_dicom_command, dicom_app
from index.bench import bench_index_command
from training.cli import (
    bench_adapt_command,
    bench_throughput_command,
    bench_train_command,
    evaluate_command,
    train_command,
)

cli = typer.Typer(
    name="cxr",
    help="Few-shot chest X-ray diagnosis: train encoders, serve predictions, run benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench = typer.Typer(help="Benchmarks behind docs/BENCHMARKS.md (each prints a table, writes JSON).")
cli.add_typer(bench, name="bench")

cli.command("train")(train_command)
cli.command("evaluate")(evaluate_command)
bench.command("train")(bench_train_command)
bench.command("adapt")(bench_adapt_command)
bench.command("index")(bench_index_command)
cli.add_typer(dicom_app, name="dicom")
bench.command("dicom")(bench_dicom_command)
bench.command("throughput")(bench_throughput_command)

# Service commands (serve, worker, keys, models, references, bench predict).
register_service_commands(cli, bench)

#: Commands whose process answers concurrent predictions: the serving thread policy
#: (training/threads.py). `serve` is not here: its uvicorn processes apply it in the app
#: factory's lifespan, which logs it in the service's JSON format.
SERVING_COMMANDS = frozenset({"dicom", "bench predict", "bench enroll", "bench dicom"})
#: Commands that apply their policy themselves, because their options change it (`--threads`,
#: the worker's `--concurrency`, `train --nproc`'s launcher that trains nothing).
OWN_POLICY_COMMANDS = frozenset(
    {"serve", "train", "evaluate", "worker", "bench train", "bench adapt", "bench throughput"}
)


def _start_process(command: str) -> None:
    """Apply this process's thread policy once, before the command runs: serving commands get
    cores // inference workers, every other command runs one job on the idle cores (training
    policy); `OWN_POLICY_COMMANDS` apply theirs."""
    if command in OWN_POLICY_COMMANDS:
        return
    from app.config import InsecureSettingsError, get_settings
    from app.logging import configure_logging
    from training.threads import ThreadPolicy, apply_thread_policy

    try:
        settings = get_settings()
    except InsecureSettingsError:
        return  # the command refuses to run with these settings itself (its --help still works)
    # As the command's own `cli_settings()` does: human-readable lines on stderr, from here on,
    # so the policy's line is shown.
    configure_logging(settings.log_level, json_logs=False, stream=sys.stderr)
    if command in SERVING_COMMANDS:
        apply_thread_policy(ThreadPolicy.serving(settings.effective_inference_workers))
    else:
        apply_thread_policy(ThreadPolicy.training())


@cli.callback()
def _cxr(ctx: typer.Context) -> None:
    """Runs before every `cxr` command: the process's start."""
    if ctx.invoked_subcommand and ctx.invoked_subcommand != "bench":  # bench: its own callback
        _start_process(ctx.invoked_subcommand)


@bench.callback()
def _cxr_bench(ctx: typer.Context) -> None:
    """Runs before every `cxr bench` command: the process's start."""
    if ctx.invoked_subcommand:
        _start_process(f"bench {ctx.invoked_subcommand}")


def main() -> None:
    """Console-script entry point (`cxr`)."""
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
