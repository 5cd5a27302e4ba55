"""Service commands of `cxr`: serve, keys, references, models, bench predict / enroll and
worker. `app/cli.py` calls `register(cli, bench)`.

Output discipline: a command's *result* goes to stdout (the key of `keys create`, alone, so
`KEY=$(cxr keys create --role reader)` works); logs and progress go to stderr.
"""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from app.config import InsecureSettingsError, Settings, get_settings
from app.logging import configure_logging

logger = logging.getLogger(__name__)


class RoleChoice(enum.StrEnum):
    reader = "reader"
    clinician = "clinician"
    admin = "admin"


def cli_settings(*, json_logs: bool = False) -> Settings:
    """Settings from the environment, with insecure production settings as a clean exit.
    Interactive commands log human-readable lines to stderr; `serve` logs JSON (per settings)."""
    try:
        settings = get_settings()
    except InsecureSettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    configure_logging(settings.log_level, json_logs=json_logs, stream=sys.stderr)
    return settings


def _with_session(settings: Settings, fn: Callable[[Any], Any]) -> Any:
    from app.db.migrate import prepare_database

    factory = prepare_database(settings)
    try:
        with factory() as session:
            return fn(session)
    finally:
        factory.kw["bind"].dispose()


# -- serve ----------------------------------------------------------------------------------


def serve_command(
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 in containers).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes (>1: uvicorn multi-process mode).")
    ] = 1,
) -> None:
    """Run the HTTP service (SQLite and files under ./var unless configured otherwise)."""
    import uvicorn

    from app.db.migrate import upgrade_to_head

    settings = cli_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json, stream=sys.stderr)
    # Migrate once here so N workers do not all queue on the migration lock at startup.
    if settings.auto_migrate:
        upgrade_to_head(settings.database_url)
    logger.info("serving on http://%s:%d with %d worker(s)", host, port, workers)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,  # our JSON logging (configured in the app's lifespan) handles it
        access_log=False,  # the request-id middleware writes one access line per request
        timeout_graceful_shutdown=30,
    )


# -- quickstart -----------------------------------------------------------------------------


def quickstart_command(
    data: Annotated[
        list[Path],
        typer.Option(
            "--data", help="A source (image folder, CSV manifest, CoronaHack, COVID collection)."
        ),
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Use this checkpoint instead of training the recipe.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to serve on.")] = 8000,
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve when ready (default) or stop there.")
    ] = True,
    encoder: Annotated[str | None, typer.Option(help="Recipe override: encoder.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Recipe override: epochs.")] = None,
    image_size: Annotated[
        int | None, typer.Option(min=16, help="Recipe override: image size.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=2, help="Recipe override: batch size.")
    ] = None,
) -> None:
    """From nothing to a serving deployment: train the recipe (or take --checkpoint), register
    and activate it, enroll the train split, print an admin key once, serve and print the page's
    URL. Rerun the same command to resume after an interruption."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeElapsedColumn

    from app.quickstart import STAGES, QuickstartError, run_quickstart

    settings = cli_settings()
    overrides = {
        name: value
        for name, value in (
            ("encoder", encoder),
            ("epochs", epochs),
            ("image_size", image_size),
            ("batch_size", batch_size),
        )
        if value is not None
    }
    titles = {
        "train": "1/4 train" if checkpoint is None else "1/4 checkpoint",
        "register": "2/4 register + activate",
        "enroll": "3/4 enroll train split",
        "admin_key": "4/4 admin key",
    }
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bars:
        tasks = {stage: bars.add_task(titles[stage], total=None, start=False) for stage in STAGES}

        def report(stage: str, done: float, total: float | None) -> None:
            bars.start_task(tasks[stage])
            bars.update(tasks[stage], completed=done, total=total)

        try:
            result = run_quickstart(
                settings=settings,
                sources=data,
                checkpoint=checkpoint,
                train_overrides=overrides,
                progress=report,
            )
        except (QuickstartError, ValueError, FileNotFoundError) as exc:
            bars.stop()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from exc
    if result.skipped_stages:
        typer.echo(f"resumed: already done: {', '.join(result.skipped_stages)}", err=True)
    refs = result.references
    typer.echo(
        f"model {result.model_version} active; references: {refs.get('enrolled', 0)} enrolled, "
        f"{refs.get('duplicates', 0)} duplicates, {refs.get('skipped', 0)} skipped",
        err=True,
    )
    if result.admin_key is not None:
        typer.echo(f"admin key (printed once, keep it): {result.admin_key}")
    else:
        typer.echo(
            f"admin key: created by an earlier run (id {result.admin_key_id}, printed then); "
            "make another with `cxr keys create --role admin`"
        )
    typer.echo(f"page: http://{host}:{port}/")
    if serve:
        serve_command(host=host, port=port, workers=1)


# -- keys -----------------------------------------------------------------------------------

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)


@keys_app.command("create")
def keys_create_command(
    role: Annotated[RoleChoice, typer.Option(help="reader < clinician < admin.")],
    name: Annotated[str | None, typer.Option(help="Who or what uses the key.")] = None,
) -> None:
    """Create an API key and print it once, alone on stdout (only its hash is stored)."""
    from app.services.keys import create_api_key

    settings = cli_settings()
    _row, plaintext = _with_session(
        settings,
        lambda s: create_api_key(session=s, role=role.value, name=name, settings=settings),
    )
    typer.echo(plaintext)


@keys_app.command("list")
def keys_list_command() -> None:
    """List keys (id, role, prefix, dates); never the keys themselves."""
    from app.services.keys import list_api_keys

    settings = cli_settings()

    def rows(session: Any) -> list[str]:
        lines = ["id\trole\tprefix\tname\tcreated_at\tlast_used_at\trevoked_at"]
        for k in list_api_keys(session=session):
            lines.append(
                f"{k.id}\t{k.role}\t{k.prefix}\t{k.name}\t{k.created_at:%Y-%m-%d %H:%M}\t"
                f"{k.last_used_at or '-'}\t{k.revoked_at or '-'}"
            )
        return lines

    for line in _with_session(settings, rows):
        typer.echo(line)


@keys_app.command("revoke")
def keys_revoke_command(
    key_id: Annotated[int, typer.Argument(help="Id from `keys list`.")],
) -> None:
    """Revoke a key: it gets 401 from its next request on."""
    from app.services.keys import revoke_api_key

    settings = cli_settings()
    try:
        _with_session(settings, lambda s: revoke_api_key(session=s, key_id=key_id))
    except LookupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(f"revoked key {key_id}", err=True)


# -- references -----------------------------------------------------------------------------

references_app = typer.Typer(help="Reference images.", no_args_is_help=True)


@references_app.command("import")
def references_import_command(
    src: Annotated[
        Path, typer.Argument(help="Image folder, CSV manifest, CoronaHack or COVID collection.")
    ],
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Name of the hospital or collection (default: SRC's folder name, the one "
            "above a train/val/test folder). Retraining balances label x source.",
        ),
    ] = None,
) -> None:
    """Enroll every labeled image of SRC; unreadable files are skipped and counted."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from app.services.references import import_references

    settings = cli_settings()
    if not src.exists():
        typer.echo(f"error: {src} does not exist", err=True)
        raise typer.Exit(code=2)
    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("enrolling", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            result = _with_session(
                settings,
                lambda s: import_references(
                    session=s, source=src, settings=settings, progress=report, source_name=source
                ),
            )
        except (FileNotFoundError, ValueError) as exc:  # DataSourceError is a ValueError
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from exc
    typer.echo(
        f"enrolled {result.enrolled}, duplicates {result.duplicates}, "
        f"skipped {result.skipped} unreadable or invalid, of {result.total} files"
    )


# -- registration ---------------------------------------------------------------------------


def register(cli: typer.Typer, bench: typer.Typer) -> None:
    """Attach the service commands to the `cxr` app and its `bench` group."""
    cli.command("serve")(serve_command)
    cli.command("quickstart")(quickstart_command)
    cli.add_typer(keys_app, name="keys")
    cli.add_typer(references_app, name="references")
    from app.bench_enroll import bench_enroll_command
    from app.jobs.worker import worker_command
    from app.model_commands import (
        bench_predict_command,
        models_activate_command,
        models_add_command,
        models_list_command,
    )

    models_app = typer.Typer(help="Model versions.", no_args_is_help=True)
    models_app.command("add")(models_add_command)
    models_app.command("list")(models_list_command)
    models_app.command("activate")(models_activate_command)
    cli.add_typer(models_app, name="models")
    bench.command("predict")(bench_predict_command)
    bench.command("enroll")(bench_enroll_command)
    cli.command("worker")(worker_command)
