"""What routes depend on: the serving context, the current snapshot, the API key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.messages import Limits
from service.serve.api.errors import ApiError
from service.serve.batching import Batcher
from service.serve.holder import ModelHolder
from service.serve.snapshot import LabelCache, Snapshot
from service.serve.telemetry import ServeMetrics
from service.settings import Settings


@dataclass
class ServeContext:
    settings: Settings
    holder: ModelHolder
    batcher: Batcher
    labels: LabelCache
    metrics: ServeMetrics
    limits: Limits  # ingest message limits
    sink: object | None = None  # service.serve.api.routes.ingest.KafkaSink, made on first use


def get_context(request: Request) -> ServeContext:
    return request.app.state.ctx


Context = Annotated[ServeContext, Depends(get_context)]


def current_snapshot(ctx: Context) -> Snapshot:
    """The snapshot this request will finish on (read once); 503 before the first model loads."""
    snap = ctx.holder.snapshot
    if snap is None:
        raise ApiError(503, "not_ready", "no model loaded yet", retry_after=5)
    return snap


CurrentSnapshot = Annotated[Snapshot, Depends(current_snapshot)]


def require_api_key(ctx: Context, x_api_key: Annotated[str | None, Header()] = None) -> None:
    """With ``CTP_API_KEY`` set: 401 without an ``X-API-Key`` header, 403 with a wrong one."""
    expected = ctx.settings.api_key
    if expected is None:
        return
    if not x_api_key:
        raise ApiError(401, "missing_api_key", "send the API key in the X-API-Key header")
    if not hmac.compare_digest(x_api_key.encode(), expected.get_secret_value().encode()):
        raise ApiError(403, "wrong_api_key", "the API key is not valid")


ApiKey = Depends(require_api_key)
