"""The `cxr` command line: one Typer app that assembles the commands of every package.

Commands of `training/` and `index/` live in those packages (they never import `app/`);
this module only registers them, so `cxr --help` lists everything in one place.
"""

from __future__ import annotations

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


def main() -> None:
    """Console-script entry point (`cxr`)."""
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
