"""`cxr dicom listen` and `cxr bench dicom` (registered by `app/cli.py`)."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Annotated, Any

import typer

from app.commands import cli_settings
from app.dicom.bench import bench_dicom_command

logger = logging.getLogger(__name__)

__all__ = ["bench_dicom_command", "dicom_app", "listen_command"]

dicom_app = typer.Typer(help="DICOM integration: receive from a PACS, send SRs back.")


@dicom_app.command("listen")
def listen_command(
    ae_title: Annotated[
        str | None, typer.Option(help="Our AE title (default CXR_DICOM_AE_TITLE, CXR).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port (default CXR_DICOM_PORT, 11112).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "0.0.0.0",
) -> None:
    """C-STORE SCP: predict every frontal chest radiograph received; SR + overlay go to
    CXR_DICOM_DESTINATION (C-STORE) or CXR_DICOMWEB_URL (STOW-RS) through the outbox."""
    from app.db.migrate import prepare_database
    from app.dicom.listener import DicomListener
    from app.dicom.outbox import OutboxWorker, configured_destination
    from app.serving.state import ServiceState

    settings = cli_settings()
    from app.logging import configure_logging

    configure_logging(settings.log_level, json_logs=settings.log_json, stream=sys.stderr)
    sessions = prepare_database(settings)
    service = ServiceState(settings=settings, sessionmaker=sessions)
    try:
        service.refresh(wait=True)
    except Exception:
        logger.exception("could not load the model and index at startup; will retry")
    destination = configured_destination(settings)
    if destination is None:
        logger.warning(
            "no CXR_DICOM_DESTINATION or CXR_DICOMWEB_URL: results are not sent anywhere "
            "(GET /predictions/{id}/sr still returns each SR)"
        )
    outbox = OutboxWorker(sessionmaker=sessions, settings=settings).start() if destination else None
    listener = DicomListener(
        settings=settings,
        service=service,
        sessions=sessions,
        outbox=outbox,
        host=host,
        port=port,
        ae_title=ae_title,
    )

    def _terminate(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    typer.echo(
        f"listening as {listener.ae_title} on {host}:{listener.port}; results to "
        f"{destination or 'nowhere (no destination set)'}",
        err=True,
    )
    try:
        listener.serve_forever()
    finally:
        if outbox is not None:
            outbox.stop()
        close = getattr(service, "close", None)
        if callable(close):
            close()
        sessions.kw["bind"].dispose()
