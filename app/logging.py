"""Structured JSON logs with a per-request id.

`RequestIdMiddleware` (pure ASGI, so it adds no per-request task switching) takes the caller's
`X-Request-ID` when it is sane or makes one, stores it in a contextvar, echoes it in the
response, and writes one access line per request. `JsonFormatter` adds the id to every record
logged while the request runs, including records from `training/` and `index/`, so one grep
follows a request through every layer. Fields passed with `extra={...}` become JSON keys.

PHI: nothing here logs bodies, file names or query strings; only method, route template,
status and latency.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cxr_request_id", default=None
)

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
_HANDLER_MARK = "_cxr_handler"

# Attributes every LogRecord has; everything else came from `extra=` and is emitted as a field.
_STANDARD_ATTRS = set(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

access_logger = logging.getLogger("app.access")


def get_request_id() -> str | None:
    """The id of the request being served in this context (None outside requests)."""
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Attach `request_id` to every record (so plain formatters can use it too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id and request_id != "-":
            payload["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in payload and key != "request_id":
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def configure_logging(
    level: str = "INFO", *, json_logs: bool = True, stream: IO[str] | None = None
) -> None:
    """Install (or replace) the service's handler on the root logger; idempotent.

    Logs go to stderr by default, so CLI commands keep stdout for their result (`cxr keys
    create` prints the key alone). Handlers installed by others (pytest's caplog) are kept.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RequestIdFilter())
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries stay at WARNING unless we debug.
    for name in ("multipart", "PIL", "httpx", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/references/{reference_id}`), for low-cardinality
    metrics and logs; `<unmatched>` for 404s so scanners cannot blow up label sets."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "<unmatched>"


RequestObserver = Callable[[str, str, int, float], None]


class RequestIdMiddleware:
    """Sets the request id, echoes it as `X-Request-ID`, logs an access line, and reports
    (method, route template, status, seconds) to `observer` (the app's metrics)."""

    def __init__(self, app: ASGIApp, observer: RequestObserver | None = None) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = (
            incoming if incoming and _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        )
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Unhandled errors end here (inside the request id context) as a JSON 500 that
            # names the request id; the traceback goes to the log, never to the client.
            logging.getLogger("app.errors").exception("unhandled error")
            if started:
                raise
            body = json.dumps(
                {
                    "detail": "Internal server error; the operators can find it in the logs "
                    f"under request id {request_id}."
                }
            ).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - start
            method = scope.get("method", "")
            route = route_template(scope)
            if self.observer is not None:
                self.observer(method, route, status, elapsed)
            access_logger.info(
                "%s %s %d %.1fms",
                method,
                route,
                status,
                elapsed * 1000,
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            request_id_var.reset(token)
