"""`cxr models ...` commands and `cxr bench predict` (registered by `app/commands.py`).

Output discipline: `cxr models add` prints the new version alone on stdout, so
`VERSION=$(cxr models add run/encoder.pt --activate)` works; logs and errors go to stderr.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from app.bench import bench_predict_command
from app.commands import cli_settings

logger = logging.getLogger(__name__)

__all__ = [
    "bench_predict_command",
    "models_activate_command",
    "models_add_command",
    "models_list_command",
]


def models_add_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint written by `cxr train` (RUN_DIR/encoder.pt).")
    ],
    activate: Annotated[
        bool, typer.Option("--activate", help="Serve it from the next request on.")
    ] = False,
) -> None:
    """Register a checkpoint trained elsewhere as a model version; prints the version."""
    from app.db.migrate import prepare_database
    from app.services.models import InvalidCheckpointError, ModelFileMissingError, register_model

    settings = cli_settings()
    factory = prepare_database(settings)
    try:
        with factory() as session:
            row = register_model(
                session=session,
                checkpoint=checkpoint,
                settings=settings,
                activate=activate,
                source="cli",
            )
            version = row.version
    except (FileNotFoundError, InvalidCheckpointError, ModelFileMissingError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        factory.kw["bind"].dispose()
    typer.echo(version)


def models_list_command() -> None:
    """List model versions (newest first): version, active, encoder, created_at, source."""
    from app.db.migrate import prepare_database
    from app.services.models import list_models

    settings = cli_settings()
    factory = prepare_database(settings)
    try:
        with factory() as session:
            rows = list_models(session=session)
            lines = [
                f"{r.version}\t{'active' if r.active else '-'}\t{r.encoder_name}\t"
                f"{r.created_at:%Y-%m-%d %H:%M:%S}\t{r.source}"
                for r in rows
            ]
    finally:
        factory.kw["bind"].dispose()
    typer.echo("version\tactive\tencoder\tcreated_at\tsource")
    for line in lines:
        typer.echo(line)


def models_activate_command(
    version: Annotated[str, typer.Argument(help="A version from `cxr models list`.")],
) -> None:
    """Activate a model version (promotion or rollback); every API process follows."""
    from app.db.migrate import prepare_database
    from app.services.models import ModelFileMissingError, ModelNotFoundError, activate_model

    settings = cli_settings()
    factory = prepare_database(settings)
    try:
        with factory() as session:
            activate_model(session=session, version=version, settings=settings)
    except (ModelNotFoundError, ModelFileMissingError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        factory.kw["bind"].dispose()
    typer.echo(version)
