"""``GET /model``: the version served, what it was trained on, and the registry's history."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from service.serve.api.deps import Context, CurrentSnapshot
from service.serve.api.schemas import ErrorBody, ModelInfo

router = APIRouter(tags=["model"])
logger = logging.getLogger(__name__)


@router.get("/model", response_model=ModelInfo, responses={503: {"model": ErrorBody}})
async def model_info(ctx: Context, snap: CurrentSnapshot) -> ModelInfo:
    try:
        versions = await run_in_threadpool(ctx.holder.source.history)
    except Exception as e:  # Redis away: the served model is still known
        logger.warning("registry history unavailable: %s", e)
        versions = []
    meta = snap.meta
    return ModelInfo(
        model_version=snap.version,
        model=meta.get("model"),
        strategy=meta.get("strategy"),
        chunks=meta.get("chunks"),
        loaded_at=snap.loaded_at,
        gallery_size=len(snap.index),
        index=snap.index.kind,
        swaps=ctx.holder.stats.swaps,
        failed_versions=list(ctx.holder.stats.failed_versions),
        versions=versions,
    )
