"""The dashboard: ``GET /`` (page), ``GET /status`` (its JSON), ``GET /gallery/{id}/image`` (thumbnails).

The page is static HTML + vanilla JS + CSS from ``service/serve/api/static`` (no build step, no CDN);
it polls ``/status`` and calls ``/classify`` and ``/retrieve`` for its try-it panel.
``/status`` gathers in a worker thread and is cached for ``STATUS_TTL_S``: many open pages cost
one gather (concurrent requests wait for the same one). It answers 200 whatever is down: what
failed is in ``errors``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from service.serve.api.deps import Context, ServeContext
from service.serve.api.errors import ApiError
from service.serve.api.schemas import ErrorBody
from service.serve.dashboard import DashboardStatus
from service.serve.gallery import GalleryImages

router = APIRouter(tags=["dashboard"])

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
STATUS_TTL_S = 1.5
# the page loads only its own files; uploads are previewed from blob: URLs
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class DashboardState:
    """Per app: the status gatherer, its cache, and the gallery image locations."""

    def __init__(self, ctx: ServeContext):
        s = ctx.settings
        self.status = DashboardStatus(s, ctx.holder)
        self.images = GalleryImages(max_items=s.gallery_max_pairs, max_image_bytes=s.max_image_bytes)
        self.lock = asyncio.Lock()
        self.cached: bytes | None = None  # the JSON body
        self.cached_at = -float("inf")
        self.dirs = ctx.holder.gallery_dirs

    def gather_json(self) -> bytes:
        return json.dumps(self.status.gather(), default=str, allow_nan=False).encode()

    def image(self, item_id: str) -> tuple[bytes, str] | None:
        return self.images.read(item_id, self.dirs())


def _state(request: Request, ctx: ServeContext) -> DashboardState:
    state = getattr(request.app.state, "dashboard", None)
    if state is None:
        state = request.app.state.dashboard = DashboardState(ctx)
    return state


class StatusBody(BaseModel):
    """``ctp status --json`` plus what the dashboard draws (service/serve/dashboard.py); more keys may
    appear."""

    model_config = ConfigDict(extra="allow")

    time: float
    errors: dict[str, str] = Field(
        description="store -> what failed (redis, kafka, ...); empty when all answered"
    )
    chunks: dict[str, int] | None = Field(None, description="pending, enqueued, dead")
    memory: dict[str, int] | None = Field(None, description="items, bytes, capacity")
    ingest: dict[str, Any] | None = Field(None, description="topic, partitions, lag, produced, rate_per_s")
    disk: dict[str, Any] | None = Field(
        None, description="the data dir's disk: path, free_bytes, min_free_bytes, low (writes pause)"
    )
    health: dict[str, dict[str, Any]] = Field(
        {}, description="role -> its pause (state, reason, since, retry_in); empty when all work"
    )
    ingest_pending: bool = Field(description="true until Kafka has answered once")
    versions: list[dict[str, Any]] = Field(
        [], description="registry history: version, created, chunks, metrics"
    )
    latest: int | str | None = None
    serving: dict[str, Any] | None = Field(
        description="the version this process serves; null before one loads"
    )
    curves: dict[str, Any] = Field(
        description="newest version's eval state: per set, score/avg/forgetting per chunk"
    )
    version_metrics: dict[str, list[dict[str, Any]]] = Field(description="per set, one point per version")


@router.get("/", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
async def dashboard_page() -> HTMLResponse:
    """The dashboard page (HTML; its script and style are under ``/static``)."""
    html = await run_in_threadpool((STATIC / "index.html").read_text, "utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no asset {name!r}")
    body = await run_in_threadpool((STATIC / name).read_bytes)
    return Response(body, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.get("/status", response_model=StatusBody)
async def status(request: Request, ctx: Context) -> Response:
    """Pipeline status (ingest lag and rate, chunks pending, memory, versions with metrics) and
    the newest version's curves; 200 even when Redis or Kafka are down (see ``errors``)."""
    state = _state(request, ctx)
    async with state.lock:
        if state.cached is None or time.monotonic() - state.cached_at >= STATUS_TTL_S:
            state.cached = await run_in_threadpool(state.gather_json)
            state.cached_at = time.monotonic()
        return Response(state.cached, media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get(
    "/gallery/{item_id:path}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "the stored image bytes"},
        404: {"model": ErrorBody},
    },
)
async def gallery_image(item_id: str, request: Request, ctx: Context) -> Response:
    """The image of the retrieval gallery item ``item_id`` (the ``id`` ``/retrieve`` returns), as stored."""
    found = await run_in_threadpool(_state(request, ctx).image, item_id)
    if found is None:
        raise ApiError(404, "not_found", "no gallery image with this id")
    data, media_type = found
    return Response(
        data,
        media_type=media_type,
        headers={
            "Cache-Control": "max-age=300",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'",
        },
    )
