"""``POST /ingest``: one pair onto the ingest topic, validated exactly as ingest will validate it."""

from __future__ import annotations

import logging
import threading
import uuid

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from service.messages import IngestMessage, InvalidMessage, validate_message
from service.serve.api.deps import ApiKey, Context
from service.serve.api.errors import ApiError
from service.serve.api.schemas import ErrorBody, IngestAccepted

router = APIRouter(tags=["ingest"])
logger = logging.getLogger(__name__)


class KafkaSink:
    """A kafka-python producer made on first use (the API starts without Kafka); thread-safe."""

    def __init__(self, *, bootstrap: str, topic: str, max_request_size: int, timeout_s: float = 5.0):
        self.bootstrap = bootstrap
        self.topic = topic
        self.max_request_size = max_request_size
        self.timeout_s = timeout_s
        self._producer = None
        self._lock = threading.Lock()

    def send(self, value: bytes, key: bytes | None) -> tuple[int, int]:
        from kafka import KafkaProducer

        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap.split(","),
                    acks="all",
                    max_request_size=self.max_request_size,
                    bootstrap_timeout_ms=int(self.timeout_s * 1000),
                    request_timeout_ms=int(self.timeout_s * 1000),
                    delivery_timeout_ms=int(self.timeout_s * 1000) + 1000,
                    max_block_ms=int(self.timeout_s * 1000),
                )
        meta = self._producer.send(self.topic, value=value, key=key).get(timeout=self.timeout_s)
        return meta.partition, meta.offset

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


@router.post(
    "/ingest",
    status_code=202,
    response_model=IngestAccepted,
    dependencies=[ApiKey],
    responses={code: {"model": ErrorBody} for code in (401, 403, 413, 422, 503)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": IngestMessage.model_json_schema()}},
        }
    },
)
async def ingest(request: Request, ctx: Context) -> IngestAccepted:
    """The body is the ingest message itself (design.md contract); the bytes go to Kafka as sent."""
    body = await request.body()
    no_id = f"api-{uuid.uuid4().hex}"  # stands for a missing id; ingest derives one from the offset
    try:
        pair = await run_in_threadpool(validate_message, body, default_id=no_id, limits=ctx.limits)
    except InvalidMessage as e:
        raise ApiError(422, e.code, e.reason) from None
    pair_id = None if pair.id == no_id else pair.id
    s = ctx.settings
    if ctx.sink is None:
        ctx.sink = KafkaSink(
            bootstrap=s.kafka_bootstrap, topic=s.topic, max_request_size=s.max_message_bytes + 4096
        )
    try:
        partition, offset = await run_in_threadpool(
            ctx.sink.send, body, pair_id.encode() if pair_id else None
        )
    except Exception as e:  # no broker, timeouts: the client may retry
        logger.warning("ingest produce failed: %s", e)
        raise ApiError(
            503, "kafka_unavailable", f"cannot write to {s.topic}: {type(e).__name__}", retry_after=5
        ) from None
    return IngestAccepted(id=pair_id, topic=s.topic, partition=partition, offset=offset)
