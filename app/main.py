"""The FastAPI application factory: `create_app(settings=None) -> FastAPI`.

Everything an app needs hangs off `app.state` (settings, metrics, engine, sessionmaker, the
prediction `service`), never off module globals, so several apps can live in one process (tests
run two against one database to check they see each other's writes).

`cxr serve` runs `uvicorn app.main:create_app --factory`; each worker process builds its own app.

Startup (lifespan): configure logging, bring the schema to head (idempotent, locked against
concurrent starters), open the engine, then build the inference side's `ServiceState` when that
module is present and load the active model and index into it. Every error leaves as JSON
`{"detail": "..."}`; bad input is never a 500.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings, get_settings
from app.db.migrate import upgrade_to_head
from app.db.session import create_db_engine, create_sessionmaker
from app.logging import RequestIdMiddleware, configure_logging, get_request_id
from app.metrics import Metrics
from app.routes import classes, health, references
from app.services.references import InvalidLabelError, reconcile_at_startup
from training.imaging import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)

logger = logging.getLogger(__name__)

#: Routers of other parts of the service, included when their module exists in this build.
OPTIONAL_ROUTERS = ("app.routes.predict", "app.routes.models", "app.routes.jobs")


class RequestTooLargeError(StarletteHTTPException):
    """Raised from `receive` when the body passes the limit (an HTTPException, so FastAPI
    re-raises it from body parsing instead of turning it into a generic 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"Request body over the limit of {limit} bytes; send fewer or smaller files "
            "(limits: CXR_MAX_UPLOAD_MB per file, CXR_MAX_REQUEST_MB per request).",
        )


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes while streaming, before they are spooled.

    A declared Content-Length over the limit is answered 413 at once; a chunked or lying body is
    cut off the moment the running total passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await _send_json(send, 413, RequestTooLargeError(self.limit).detail)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise RequestTooLargeError(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLargeError as exc:
            if started:
                raise
            await _send_json(send, 413, str(exc.detail))


async def _send_json(send: Send, status: int, detail: str) -> None:
    response = JSONResponse(status_code=status, content={"detail": detail})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def image_error_status(exc: ImageError) -> int:
    """HTTP status for an image error: 413 too large, 415 unsupported, 400 otherwise."""
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, UnsupportedImageError):
        return 415
    if isinstance(exc, CorruptImageError):
        return 400
    return 400


def _validation_detail(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_exception_handlers(app: FastAPI) -> None:
    """Every error as JSON `{"detail": str}`; 422s also carry the structured `errors`."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code,
            content={"detail": exc.detail},
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return JSONResponse(
            status_code=422,
            content={
                "detail": _validation_detail(list(errors)),
                "errors": jsonable_encoder(
                    [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]
                ),
            },
        )

    @app.exception_handler(ImageError)
    async def image_error(_request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse(status_code=image_error_status(exc), content={"detail": str(exc)})

    @app.exception_handler(InvalidLabelError)
    async def label_error(_request: Request, exc: InvalidLabelError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(DataError)
    async def invalid_data(_request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value from the request (PostgreSQL: a NUL byte in a path or
        # query parameter, a number out of range). That is bad input, not a server fault. The
        # value itself is not logged: it may be a label or an identifier a user typed.
        logger.warning("database refused a request value", extra={"error": type(exc.orig).__name__})
        return JSONResponse(
            status_code=422,
            content={
                "detail": "A value in the request cannot be used (for example it contains a NUL "
                "byte or is out of range); fix the request and send it again."
            },
        )

    @app.exception_handler(OperationalError)
    async def database_unavailable(_request: Request, exc: OperationalError) -> JSONResponse:
        logger.warning("database unavailable", extra={"error": str(exc.orig)[:200]})
        return JSONResponse(
            status_code=503,
            content={"detail": "The database is unavailable or busy; retry shortly."},
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(
            status_code=500,
            content={
                "detail": "Internal server error; the operators can find it in the logs under "
                f"request id {get_request_id()}."
            },
        )


def _build_service(app: FastAPI) -> Any | None:
    """The inference side's ServiceState, or None when app/state.py is not in this build."""
    try:
        from app.state import ServiceState  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name != "app.state":
            raise
        logger.warning("app.state is missing: predictions are disabled in this build")
        return None
    # `metrics`: the index-size and active-model gauges follow every bundle swap from the start.
    return ServiceState(
        settings=app.state.settings,
        sessionmaker=app.state.sessionmaker,
        metrics=app.state.metrics,
    )


def _warm_up(service: Any) -> None:
    """Load the active model and index now, so /ready and the gauges are right from startup
    and the first prediction does not pay for the load. Failures are logged, never fatal: the
    service retries on the next request and /ready explains what is wrong."""
    refresh = getattr(service, "refresh", None)
    if not callable(refresh):
        return
    try:
        refresh(wait=True)
    except Exception:
        logger.exception("could not load the model and index at startup; will retry")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_logging(settings.log_level, json_logs=settings.log_json)
    if settings.auto_migrate:
        upgrade_to_head(settings.database_url)
    engine = create_db_engine(settings.database_url)
    app.state.engine = engine
    app.state.sessionmaker = create_sessionmaker(engine)
    reconcile_at_startup(sessionmaker=app.state.sessionmaker, settings=settings)
    app.state.service = _build_service(app)
    _warm_up(app.state.service)
    logger.info(
        "service started",
        extra={"environment": settings.environment, "database": engine.dialect.name},
    )
    try:
        yield
    finally:
        service = app.state.service
        close = getattr(service, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                logger.exception("service close failed")
        engine.dispose()
        logger.info("service stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. `settings` defaults to the environment (`CXR_*`).

    Raises `InsecureSettingsError` for production settings with a default or empty secret.
    """
    settings = settings or get_settings()
    if settings.environment == "production":
        settings.check_production()
    app = FastAPI(
        title="cxr: few-shot chest X-ray diagnosis",
        version="0.1.0",
        description="Predict chest X-ray classes against enrolled reference images. "
        "Authenticate with `X-API-Key: KEY` or `Authorization: Bearer KEY`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.service = None
    install_exception_handlers(app)
    # Outermost first: request id + metrics see everything, including 413s from the limiter.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware, observer=app.state.metrics.observe_request)
    app.include_router(health.router)
    app.include_router(references.router)
    app.include_router(classes.router)
    for module_name in OPTIONAL_ROUTERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            logger.debug("optional router %s not present", module_name)
            continue
        app.include_router(module.router)
    return app
