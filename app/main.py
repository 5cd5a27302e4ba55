"""The FastAPI application factory: `create_app(settings=None) -> FastAPI`.

Everything an app needs hangs off `app.state` (settings, metrics, engine, sessionmaker, the
prediction `service`), never off module globals, so several apps can live in one process (tests
run two against one database to check they see each other's writes).

`cxr serve` runs `uvicorn app.main:create_app --factory`; each worker process builds its own app.

Startup (lifespan): configure logging, apply the process's serving thread policy
(`training/threads.py`: cores // `CXR_INFERENCE_WORKERS` threads for torch, FAISS and ONNX
Runtime), bring the schema to head (idempotent, locked against concurrent starters), open the
engine, then build the inference side's `ServiceState` and load the active model and index
into it. The routes are the static list in `app/api.py`; they reach
what hangs off `app.state` through the typed dependencies of `app/deps.py`. Every error leaves
as JSON `{"detail": "..."}`; bad input is never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import ONE_FILE_ROUTERS, ROUTERS, api_router
from app.auth import check_role, key_from_headers, resolve_key
from app.config import Settings, get_settings
from app.db.migrate import upgrade_to_head
from app.db.session import create_db_engine, create_sessionmaker
from app.logging import RequestIdMiddleware, configure_logging, get_request_id
from app.metrics import Metrics
from app.services.references import InvalidLabelError, reconcile_at_startup
from app.services.thumbnails import ThumbnailCache
from app.serving.state import ServiceState
from training.imaging.errors import (
    CorruptImageError,
    DegenerateImageError,
    DeidentificationError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from training.threads import ThreadPolicy, apply_thread_policy

logger = logging.getLogger(__name__)


#: Room for the multipart envelope (boundaries, part headers) around a single file.
MULTIPART_OVERHEAD = 64 * 1024


class RequestTooLargeError(StarletteHTTPException):
    """Raised from `receive` when the body passes the limit (an HTTPException, so FastAPI
    re-raises it from body parsing instead of turning it into a generic 400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)

    @classmethod
    def for_request(cls, limit: int) -> RequestTooLargeError:
        return cls(
            f"Request body over the limit of {limit} bytes; send fewer or smaller files "
            "(limits: CXR_MAX_UPLOAD_MB per file, CXR_MAX_REQUEST_MB per request)."
        )

    @classmethod
    def for_file(cls, limit: int) -> RequestTooLargeError:
        return cls(
            f"The upload is over the limit of {limit} bytes (CXR_MAX_UPLOAD_MB); "
            "compress or downscale the image and send it again."
        )


class RequestTimeoutError(StarletteHTTPException):
    """Raised from `receive` when the body has not arrived in time (an HTTPException for the
    same reason as `RequestTooLargeError`)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            status_code=408,
            detail=f"The request body did not arrive within {timeout_s:g} seconds "
            "(CXR_BODY_TIMEOUT_S); check the connection and send the request again.",
        )


class BodyLimitMiddleware:
    """The one request-size limit: refuse request bodies over the limit while streaming, before
    they are spooled, and bodies that do not arrive within `timeout_s` seconds (a stalled upload
    held its connection and its worker forever).

    The limit is `request_limit` (sized for multi-file enrollment), except for `one_file_routes`
    (a prediction carries one image), which get `file_limit` plus the multipart envelope. A
    declared Content-Length over the limit is answered 413 at once; a chunked or lying body is
    cut off the moment the running total passes the limit. The deadline covers the whole body
    from its first read (408), so a client trickling one byte at a time cannot hold a
    connection either. (Each file of a multi-file request is held to `file_limit` as it is
    read; the services check it again for callers that are not HTTP.)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        request_limit: int,
        file_limit: int,
        one_file_routes: Sequence[BaseRoute] = (),
        timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.request_limit = request_limit
        self.file_limit = file_limit
        self.one_file_routes = tuple(one_file_routes)
        self.timeout_s = timeout_s

    def _limit(self, scope: Scope) -> tuple[int, RequestTooLargeError]:
        for route in self.one_file_routes:
            if route.matches(scope)[0] is Match.FULL:
                limit = self.file_limit + MULTIPART_OVERHEAD
                return limit, RequestTooLargeError.for_file(self.file_limit)
        return self.request_limit, RequestTooLargeError.for_request(self.request_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, too_large = self._limit(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _send_json(send, 413, too_large.detail)
                    return
        received = 0
        started = False
        body_done = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if body_done or self.timeout_s is None:
                # After the body, `receive` only waits for a disconnect: no deadline there.
                message = await receive()
            else:
                if deadline is None:
                    deadline = anyio.current_time() + self.timeout_s
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as waited:
                    message = await receive()
                if waited.cancelled_caught:
                    logger.warning("request body timed out", extra={"received": received})
                    raise RequestTimeoutError(self.timeout_s)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_done = True
                if received > limit:
                    raise too_large
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (RequestTooLargeError, RequestTimeoutError) as exc:
            if started:
                raise
            await _send_json(send, exc.status_code, str(exc.detail))


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _required_role(route: Any) -> str | None:
    """The role a route's dependencies require (`app.auth.require_role`), or None."""
    stack = [getattr(route, "dependant", None)]
    while stack:
        dependant = stack.pop()
        if dependant is None:
            continue
        role = getattr(dependant.call, "required_role", None)
        if role is not None:
            return str(role)
        stack.extend(dependant.dependencies)
    return None


class AuthBeforeBodyMiddleware:
    """Authenticate (401) and authorise (403) a request with a body *before* reading it.

    FastAPI parses the body (and spools a multipart upload to disk) before it resolves
    dependencies, so without this a request with no key made the server read and spool 150 MB
    before answering 401. For POST/PUT/PATCH to a route that needs a role, the key is checked
    here from the headers alone (in a worker thread: it queries the database) and the row is
    handed to `get_current_key` through `request.state`, so a request is looked up once.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._roles: dict[int, str | None] = {}

    def _role_for(self, scope: Scope) -> str | None:
        state = getattr(scope.get("app"), "state", None)
        for route in getattr(state, "guarded_routes", ()):
            match, _child = route.matches(scope)
            if match is Match.FULL:
                key = id(route)
                if key not in self._roles:
                    self._roles[key] = _required_role(route)
                return self._roles[key]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        role = self._role_for(scope)
        if role is None:
            await self.app(scope, receive, send)
            return
        fastapi_app = scope["app"]
        key = key_from_headers(scope.get("headers", []))

        def check() -> Any:
            with fastapi_app.state.sessionmaker() as session:
                row = resolve_key(session=session, key=key, settings=fastapi_app.state.settings)
            check_role(row, role)
            return row

        try:
            row = check() if not key else await anyio.to_thread.run_sync(check)
        except StarletteHTTPException as exc:
            response = JSONResponse(
                status_code=exc.status_code,
                content={"detail": exc.detail},
                headers=getattr(exc, "headers", None),
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["preauthenticated_key"] = row
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, detail: str) -> None:
    response = JSONResponse(status_code=status, content={"detail": detail})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def image_error_status(exc: ImageError) -> int:
    """HTTP status for an image error: 413 too large, 415 unsupported, 422 readable but not
    acceptable (degenerate, or cannot be de-identified), 400 otherwise."""
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, DegenerateImageError | DeidentificationError):
        return 422
    if isinstance(exc, UnsupportedImageError):
        return 415
    if isinstance(exc, CorruptImageError):
        return 400
    return 400


#: Longest error detail sent back: a detail may quote the request (an unknown name), and a
#: 5 MB field must not come back as a 5 MB error body.
MAX_DETAIL_CHARS = 1000


def bounded(detail: Any, limit: int = MAX_DETAIL_CHARS) -> Any:
    """`detail` cut to `limit` characters (non-strings unchanged), saying how much was cut."""
    if not isinstance(detail, str) or len(detail) <= limit:
        return detail
    return f"{detail[:limit]}... ({len(detail) - limit} more characters omitted)"


def _validation_detail(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        loc = [
            bounded(str(p), 64)
            for p in err.get("loc", ())
            if p not in ("body", "query", "path", "header")
        ]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {bounded(str(err.get('msg', 'invalid')), 200)}")
    return bounded("; ".join(parts[:20]) or "invalid request")


def install_exception_handlers(app: FastAPI) -> None:
    """Every error as JSON `{"detail": str}`; 422s also carry the structured `errors`."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code,
            content={"detail": bounded(exc.detail)},
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
                    [
                        {
                            "loc": [bounded(str(p), 64) for p in e.get("loc", ())],
                            "msg": bounded(str(e.get("msg", "")), 200),
                            "type": e.get("type"),
                        }
                        for e in list(errors)[:20]
                    ]
                ),
            },
        )

    @app.exception_handler(ImageError)
    async def image_error(_request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse(
            status_code=image_error_status(exc), content={"detail": bounded(str(exc))}
        )

    @app.exception_handler(InvalidLabelError)
    async def label_error(_request: Request, exc: InvalidLabelError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": bounded(str(exc))})

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


def _warm_up(service: ServiceState) -> None:
    """Load the active model and index now, so /ready and the gauges are right from startup
    and the first prediction does not pay for the load. Failures are logged, never fatal: the
    service retries on the next request and /ready explains what is wrong."""
    try:
        service.refresh(wait=True)
    except Exception:
        logger.exception("could not load the model and index at startup; will retry")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_logging(settings.log_level, json_logs=settings.log_json)
    # The API process's start under uvicorn: its thread policy, before any request or job
    # thread exists (they adopt it) and before the model's ONNX Runtime session is built.
    apply_thread_policy(ThreadPolicy.serving(settings.effective_inference_workers))
    if settings.auto_migrate:
        upgrade_to_head(settings.database_url)
    engine = create_db_engine(settings.database_url)
    app.state.engine = engine
    app.state.sessionmaker = create_sessionmaker(engine)
    reconcile_at_startup(sessionmaker=app.state.sessionmaker, settings=settings)
    # `metrics`: the index-size and active-model gauges follow every bundle swap from the start.
    service = ServiceState(
        settings=settings, sessionmaker=app.state.sessionmaker, metrics=app.state.metrics
    )
    app.state.service = service
    _warm_up(service)
    logger.info(
        "service started",
        extra={"environment": settings.environment, "database": engine.dialect.name},
    )
    try:
        yield
    finally:
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
    # Everything `app.state` holds, set here or by a lifespan (read through app/deps.py).
    app.state.service = None  # ServiceState, built by the lifespan
    app.state.thumbnail_cache = ThumbnailCache()
    app.state.job_runner = None  # app/routes/jobs.py's lifespan
    app.state.job_reaper = None
    app.state.dicom_outbox = None  # app/routes/dicom.py's lifespan
    install_exception_handlers(app)
    # Added innermost first: request id + metrics see everything (413/408 from the body
    # limiter, 401/403 answered before the body is read).
    app.add_middleware(AuthBeforeBodyMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        request_limit=settings.max_request_bytes,
        file_limit=settings.max_upload_bytes,
        one_file_routes=[route for router in ONE_FILE_ROUTERS for route in router.routes],
        timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(RequestIdMiddleware, observer=app.state.metrics.observe_request)
    app.include_router(api_router)
    # The routes as declared (FastAPI may wrap included routers): the body guard matches them.
    app.state.guarded_routes = [route for router in ROUTERS for route in router.routes]
    return app
