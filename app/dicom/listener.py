"""`cxr dicom listen`: a DICOM C-STORE SCP (and C-ECHO) that predicts what a PACS sends it.

Every storage SOP class is accepted in every transfer syntax pynetdicom knows, so an instance we
cannot use still gets an answer: a success status when it is acknowledged and skipped (not a
frontal chest radiograph), a failure status (and a log line) when it cannot be used (malformed,
over the limits, compressed in a syntax without a decoder here). Each C-STORE runs
`app.dicom.receive.receive_instance`, the function behind STOW-RS too, with at most
`inference_workers` predictions at once. pynetdicom hands the handler a complete data set only,
so an association that drops mid-transfer never reaches it: nothing is predicted or stored.

pynetdicom's own protocol logging is kept at WARNING: at INFO and DEBUG it logs UIDs and data
set dumps, which identify patients.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.dicom.outbox import OutboxWorker
from app.dicom.receive import STATUS_CANNOT_UNDERSTAND, receive_instance
from app.serving.state import ServiceState

logger = logging.getLogger(__name__)

__all__ = ["DicomListener"]


class DicomListener:
    """The C-STORE SCP. `start()` serves in background threads; `serve_forever()` blocks."""

    def __init__(
        self,
        *,
        settings: Settings,
        service: ServiceState,
        sessions: sessionmaker[Session],
        outbox: OutboxWorker | None = None,
        host: str = "0.0.0.0",
        port: int | None = None,
        ae_title: str | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.sessions = sessions
        self.outbox = outbox
        self.host = host
        self.port = settings.dicom_port if port is None else port
        self.ae_title = ae_title or settings.dicom_ae_title
        self._slots = threading.BoundedSemaphore(settings.effective_inference_workers)
        self._server: Any = None

    def _ae(self) -> Any:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.dicom_timeout_s
        return ae

    def handle_echo(self, _event: Any) -> int:
        return 0x0000

    def handle_store(self, event: Any) -> int:
        """Answer one C-STORE with a DICOM status; never raises into pynetdicom."""
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            logger.warning("C-STORE data set could not be read from the association")
            return STATUS_CANNOT_UNDERSTAND
        with self._slots, self.sessions() as session:
            result = receive_instance(
                service=self.service,
                session=session,
                settings=self.settings,
                data=data,
                via="c-store",
            )
        if result.queued and self.outbox is not None:
            self.outbox.wake()
        return result.status

    def start(self) -> DicomListener:
        """Listen in background threads; `port` becomes the bound one (0 picks a free port)."""
        from pynetdicom import evt

        handlers = [(evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_C_STORE, self.handle_store)]
        self._server = self._ae().start_server(
            (self.host, self.port), block=False, evt_handlers=handlers
        )
        self.port = int(self._server.server_address[1])
        logger.info("DICOM listener started", extra={"ae_title": self.ae_title, "port": self.port})
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            logger.info("DICOM listener stopped")

    def serve_forever(self) -> None:
        """Start and block until interrupted (Ctrl-C, SIGTERM via KeyboardInterrupt)."""
        self.start()
        stop = threading.Event()
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
