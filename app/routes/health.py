"""Liveness (`/health`), readiness (`/ready`) and Prometheus (`/metrics`); no key needed.

`/ready` is what a load balancer should poll: it is 503 until the database answers and the
inference side reports a loaded model and index (`ServiceState.readiness()`), with every
missing piece listed and how to fix it.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db import get_index_version
from app.deps import MaybeServiceDep, MetricsDep, SessionFactoryDep
from app.schemas import ErrorPublic, HealthPublic, ReadyPublic

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

NO_SERVICE_REASON = (
    "the prediction service is not started, so no model is loaded (register one with "
    "`cxr models add CKPT --activate`); check the server log"
)


@router.get("/health", response_model=HealthPublic, summary="Liveness: the process answers")
def health() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get(
    "/ready",
    response_model=ReadyPublic,
    responses={503: {"model": ErrorPublic, "description": "Not ready; the reasons are listed"}},
    summary="Readiness: database reachable, model and index loaded",
)
def ready(sessions: SessionFactoryDep, service: MaybeServiceDep) -> Response:
    reasons: list[str] = []
    index_version: int | None = None
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
            index_version = get_index_version(session)
    except Exception as exc:
        logger.warning("readiness: database unreachable", extra={"error": str(exc)[:200]})
        reasons.append(f"database unreachable ({exc.__class__.__name__}); check CXR_DATABASE_URL")
    model_version = None
    if service is None:
        reasons.append(NO_SERVICE_REASON)
    else:
        try:
            ok, service_reasons = service.readiness()
        except Exception as exc:
            logger.exception("readiness check failed")
            ok, service_reasons = False, [f"readiness check failed ({exc.__class__.__name__})"]
        if not ok:
            reasons.extend(service_reasons or ["model or index not loaded"])
        model_version = getattr(service, "model_version", None)
        if callable(model_version):
            model_version = model_version()
    if reasons:
        return JSONResponse(status_code=503, content={"detail": "not ready: " + "; ".join(reasons)})
    return JSONResponse(
        content=ReadyPublic(
            status="ready",
            index_version=index_version,
            model_version=model_version if isinstance(model_version, str) else None,
        ).model_dump()
    )


# HEAD for load balancers and uptime probes (it was 405); not in the schema (one operation
# per path is enough for clients), same status as GET, no body.
@router.head("/health", include_in_schema=False)
def health_head() -> Response:
    return Response(status_code=200)


@router.head("/ready", include_in_schema=False)
def ready_head(sessions: SessionFactoryDep, service: MaybeServiceDep) -> Response:
    return Response(status_code=ready(sessions, service).status_code)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(m: MetricsDep) -> Response:
    return Response(content=m.render(), media_type=m.content_type)
