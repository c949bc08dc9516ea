"""The serving app: ``create_app(settings)`` and ``ctp serve`` (``main(argv)``).

Lifespan: the model watcher thread and the batcher start with the app and stop with it; the
app answers ``/healthz`` at once and ``/readyz`` (and the model endpoints) with 503 until the
first version is loaded. Every error is JSON ``{"error": code, "reason": ...}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.registry import Registry
from service.serve.api.deps import ServeContext
from service.serve.api.errors import BodyLimit, error_response, install_error_handlers
from service.serve.api.routes import classify, dashboard, ingest, model, ops, retrieve
from service.serve.batching import Batcher, Overloaded
from service.serve.holder import ModelHolder
from service.serve.snapshot import LabelCache
from service.serve.sources import DirectorySource, RegistrySource, VersionSource
from service.serve.telemetry import ServeMetrics
from service.settings import Settings, load_settings

logger = logging.getLogger(__name__)

ENDPOINTS = frozenset(
    {"/classify", "/retrieve", "/model", "/ingest", "/healthz", "/readyz", "/metrics", "/", "/status"}
)


def version_source(settings: Settings) -> VersionSource:
    """A checkpoint directory when ``serve_checkpoint_dir`` is set, else the Redis registry."""
    if settings.serve_checkpoint_dir is not None:
        return DirectorySource(settings.serve_checkpoint_dir)
    # timeouts: a Redis that hangs (not only one that is down) cannot stall the watcher or /model
    client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30
    )
    return RegistrySource(
        Registry(client, root=settings.data_dir / "checkpoints", keep=settings.keep_checkpoints)
    )


class Instrument:
    """ASGI middleware: request count by endpoint and status, and latency, for every request."""

    def __init__(self, app: ASGIApp, *, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        t0 = time.perf_counter()

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def create_app(
    settings: Settings | None = None,
    *,
    source: VersionSource | None = None,
    holder: ModelHolder | None = None,
) -> FastAPI:
    """The API over ``holder`` (default: a ``ModelHolder`` on ``source``, default from settings)."""
    s = settings if settings is not None else load_settings()
    metrics = ServeMetrics()
    if holder is None:
        holder = ModelHolder(
            source=source if source is not None else version_source(s),
            device=s.device,
            chunks_root=s.data_dir / "chunks",
            gallery_dirs=s.gallery_shards,
            gallery_max_pairs=s.gallery_max_pairs,
            ann_threshold=s.ann_threshold,
            interval_s=s.watch_interval_s,
            max_image_pixels=s.max_image_pixels,
            max_image_bytes=s.max_image_bytes,
            listener=metrics,
        )
    batcher = Batcher(
        max_batch_size=s.max_batch_size,
        max_wait_ms=s.max_wait_ms,
        queue_size=s.queue_size,
        on_batch=metrics.batch,
    )
    ctx = ServeContext(
        settings=s,
        holder=holder,
        batcher=batcher,
        labels=LabelCache(s.label_cache_size),
        metrics=metrics,
        limits=s.message_limits(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder.start()
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            holder.stop()
            if ctx.sink is not None:
                ctx.sink.close()

    app = FastAPI(
        title="ctp serving API",
        version="1",
        lifespan=lifespan,
        description="Zero-shot classification and retrieval with the newest continually-trained model.",
    )
    app.state.ctx = ctx
    install_error_handlers(app)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        metrics.overloaded.inc()
        return error_response(503, "overloaded", str(exc), {"Retry-After": "1"})

    for r in (classify.router, retrieve.router, model.router, ingest.router, ops.router, dashboard.router):
        app.include_router(r)
    if s.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=s.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key"],
        )
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes)
    app.add_middleware(Instrument, metrics=metrics)  # outermost: sees the 413s too
    return app
