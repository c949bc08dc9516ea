"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.serve.api.deps import Context
from service.serve.api.errors import ApiError
from service.serve.api.schemas import ErrorBody

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (the event loop is not stuck)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(ctx: Context) -> dict[str, str]:
    """200 once a model is loaded; 503 with Retry-After before."""
    snap = ctx.holder.snapshot
    if snap is None:
        raise ApiError(503, "not_ready", "no model loaded yet", retry_after=5)
    return {"status": "ready", "model_version": snap.version}


@router.get("/metrics", response_class=Response)
async def metrics(ctx: Context) -> Response:
    ctx.metrics.queue_depth.set(ctx.batcher.depth)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
