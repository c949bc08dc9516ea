"""All service settings in one pydantic-settings class; environment variables prefixed ``CTP_``.

``load_settings()`` turns a validation error into ``SettingsError`` whose message names the
environment variable, so a bad deployment fails at start with something an operator can fix.

It also finds a running ``ctp up``: the stack records where its servers are in
``DATA_DIR/up.json`` (``STACK_FILE``), and while that ``ctp up`` lives, ``CTP_KAFKA_BOOTSTRAP`` and
``CTP_REDIS_URL`` default to what it recorded (a variable that is set still wins). So ``ctp
status``, ``ctp produce`` or ``ctp wait`` in another terminal need no variables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctp.presets import DEFAULT_MODEL
from ctp.strategies import STRATEGIES
from service.local.logs import LOG_BACKUPS, LOG_MAX_BYTES
from service.messages import Limits

ENV_PREFIX = "CTP_"


class SettingsError(ValueError):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # Kafka
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        description="Kafka bootstrap servers, `host:port[,host:port]`",
        json_schema_extra={"read_by": "ingest, produce, api, status"},
    )
    topic: str = Field(
        "ctp.pairs",
        description="topic of image-text pairs",
        json_schema_extra={"read_by": "ingest, produce, api"},
    )
    dlq_topic: str = Field(
        "ctp.pairs.dlq",
        description=(
            "dead-letter topic: rejected messages with headers `ctp-error`, `ctp-reason`, `ctp-source`"
        ),
        json_schema_extra={"read_by": "ingest"},
    )
    dlq_max_message_bytes: int = Field(
        10_485_760,
        gt=4096,
        description=(
            "largest dead letter sent whole (the DLQ producer's `max_request_size`; match the broker's "
            "`message.max.bytes`); larger ones are sent truncated to 64 KiB"
        ),
        json_schema_extra={"read_by": "ingest"},
    )
    consumer_group: str = Field(
        "ctp-ingest",
        description="Kafka consumer group of the ingest workers (more members split the partitions)",
        json_schema_extra={"read_by": "ingest"},
    )
    kafka_session_timeout_ms: int = Field(
        10_000,
        ge=6_000,
        description="a dead ingest member's partitions go to the others after this (>= 6000)",
        json_schema_extra={"read_by": "ingest"},
    )
    kafka_max_poll_interval_ms: int = Field(
        300_000,
        gt=0,
        description="longest pause between polls before the member is dropped (a slow disk)",
        json_schema_extra={"read_by": "ingest"},
    )
    # Redis
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "Redis: chunk queue, offsets, replay memory, checkpoint registry (`redis://`, `rediss://`, "
            "`unix://`)"
        ),
        json_schema_extra={"read_by": "ingest, train, api, status"},
    )
    # storage
    data_dir: Path = Field(
        Path("ctp-data"),
        description="chunks (`chunks/`) and checkpoints (`checkpoints/`) live below; shared by the roles",
        json_schema_extra={"read_by": "ingest, train, api"},
    )
    min_free_bytes: int = Field(
        1_073_741_824,
        ge=0,
        description=(
            "free bytes the data dir's disk must keep: below it ingest and the trainer pause (with a "
            "status) instead of writing a chunk or a checkpoint; 0: no check"
        ),
        json_schema_extra={"read_by": "ingest, train, status"},
    )
    # chunking
    chunk_size: int = Field(
        256,
        gt=0,
        description="pairs per chunk (the trainer scales a smaller chunk's epochs by its size)",
        json_schema_extra={"read_by": "ingest, train"},
    )
    chunk_max_wait_s: float = Field(
        60.0,
        gt=0,
        description="a partial chunk is cut this long after its first pair",
        json_schema_extra={"read_by": "ingest"},
    )
    dedup_window_s: float = Field(
        604_800.0,
        gt=0,
        description=(
            "a resent pair id is dropped within this window (Redis keeps the ids in 8 expiring "
            "buckets); a resend older than the window plus 1/8 of it is taken as a new pair and trained"
        ),
        json_schema_extra={"read_by": "ingest"},
    )
    # message limits
    max_message_bytes: int = Field(
        8_000_000,
        gt=0,
        description="largest Kafka message accepted; larger ones go to the DLQ",
        json_schema_extra={"read_by": "ingest, api"},
    )
    max_image_bytes: int = Field(
        5_000_000,
        gt=0,
        description="largest decoded image payload",
        json_schema_extra={"read_by": "ingest, api"},
    )
    max_image_pixels: int = Field(
        16_000_000,
        gt=0,
        description="largest image (width x height); guards against decompression bombs",
        json_schema_extra={"read_by": "ingest, api"},
    )
    max_text_chars: int = Field(
        1000, gt=0, description="longest caption / query text", json_schema_extra={"read_by": "ingest, api"}
    )
    max_label_chars: int = Field(
        200, gt=0, description="longest class label", json_schema_extra={"read_by": "ingest, api"}
    )
    # model and training
    model: str = Field(
        DEFAULT_MODEL,
        description="open_clip model name or a ctp preset (`ctp-vit-micro-32`, `ctp-vit-tiny-32`, ...)",
        json_schema_extra={"read_by": "train"},
    )
    pretrained: str | None = Field(
        None,
        description=(
            "open_clip pretrained tag, a weights file or a ctp checkpoint dir to start from; unset: random "
            "init"
        ),
        json_schema_extra={"read_by": "train"},
    )
    strategy: str = Field(
        "incclip",
        description=(
            "continual strategy: `incclip`, `finetune`, `er`, `lwf`, `joint` or an ablation (docs/method.md)"
        ),
        json_schema_extra={"read_by": "train"},
    )
    memory_size: int = Field(
        2000,
        ge=0,
        description="replay memory capacity in pairs (0: no replay)",
        json_schema_extra={"read_by": "train"},
    )
    memory_max_bytes: int | None = Field(
        None,
        gt=0,
        description="replay memory capacity in bytes (images, captions, pseudo texts); unset: no byte limit",
        json_schema_extra={"read_by": "train"},
    )
    memory_policy: Literal["reservoir", "class_balanced"] = Field(
        "class_balanced",
        description="what the memory keeps: `class_balanced` or `reservoir` (docs/method.md)",
        json_schema_extra={"read_by": "train"},
    )
    epochs: int = Field(
        20, gt=0, description="epochs over each chunk", json_schema_extra={"read_by": "train"}
    )
    epochs_follow_chunk_size: bool = Field(
        True,
        description=(
            "a chunk of fewer than `CTP_CHUNK_SIZE` pairs (a partial chunk) trains for `CTP_EPOCHS` x "
            "pairs / `CTP_CHUNK_SIZE` epochs, at least 1: the steps per pair of a full chunk; false: "
            "every chunk gets `CTP_EPOCHS`"
        ),
        json_schema_extra={"read_by": "train"},
    )
    batch_size: int = Field(
        64,
        gt=1,
        description="training batch size (new + replayed pairs)",
        json_schema_extra={"read_by": "train"},
    )
    lr: float = Field(2e-3, gt=0, description="learning rate", json_schema_extra={"read_by": "train"})
    device: str = Field(
        "cpu", description="`cpu`, `cuda` or `cuda:N`", json_schema_extra={"read_by": "train, api"}
    )
    keep_checkpoints: int = Field(
        5,
        gt=0,
        description="retention: the newest N versions are kept on disk and in the registry",
        json_schema_extra={"read_by": "train, api"},
    )
    eval_history_max: int = Field(
        100_000,
        ge=0,
        description=(
            "retention: rows kept in the eval history `ctp:registry:eval`, one per version, the oldest "
            "trimmed (0: all)"
        ),
        json_schema_extra={"read_by": "train"},
    )
    chunk_retention: int = Field(
        0,
        ge=0,
        description=(
            "retention: the trainer keeps the newest N trained chunk dirs (0: all); untrained and dead "
            "chunks are never deleted, and every chunk is kept while the strategy is `joint`"
        ),
        json_schema_extra={"read_by": "train"},
    )
    trainer_name: str | None = Field(
        None,
        description=(
            "consumer name in the chunk queue; default `trainer-<hostname>` (keep it stable across restarts)"
        ),
        json_schema_extra={"read_by": "train"},
    )
    trainer_lease_s: float = Field(
        30.0,
        ge=1,
        description=(
            "one active trainer per registry: a standby (or a restart) takes over this long after the "
            "holder stops renewing"
        ),
        json_schema_extra={"read_by": "train"},
    )
    chunk_max_tries: int = Field(
        3,
        gt=0,
        description=(
            "a chunk whose training fails this often for a reason of its own (corrupt shards, decode "
            "errors) is set aside in `ctp:chunks:dead`; disk full, Redis or Kafka away, CUDA OOM and "
            "restarts spend no try"
        ),
        json_schema_extra={"read_by": "train"},
    )
    claim_idle_s: float = Field(
        600.0,
        gt=0,
        description="a chunk pending this long at another (dead) trainer is taken over",
        json_schema_extra={"read_by": "train"},
    )
    # eval sets measured after every chunk, stored with the version: "name=dir[,name=dir...]"
    eval_classification: str = Field(
        "",
        description=(
            "classification eval sets measured after every chunk, `name=dir[,name=dir]` (CLIP_benchmark wds "
            "layout)"
        ),
        json_schema_extra={"read_by": "train"},
    )
    eval_retrieval: str = Field(
        "",
        description="retrieval eval sets measured after every chunk, `name=dir[,name=dir]`",
        json_schema_extra={"read_by": "train"},
    )
    # API
    api_key: SecretStr | None = Field(
        None,
        description="when set, write endpoints (`POST /ingest`) need it in `X-API-Key`",
        json_schema_extra={"read_by": "api"},
    )
    # serving (ctp serve)
    api_host: str = Field(
        "127.0.0.1",
        description="address `ctp serve` binds (`0.0.0.0` in containers)",
        json_schema_extra={"read_by": "api"},
    )
    api_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="port `ctp serve` listens on (0: a free port)",
        json_schema_extra={"read_by": "api"},
    )
    serve_checkpoint_dir: Path | None = Field(
        None,
        description="serve checkpoints from this dir instead of the Redis registry",
        json_schema_extra={"read_by": "api"},
    )
    watch_interval_s: float = Field(
        2.0,
        gt=0,
        description="poll for new versions and new chunks this often",
        json_schema_extra={"read_by": "api"},
    )
    max_batch_size: int = Field(
        32, gt=0, description="requests batched into one forward", json_schema_extra={"read_by": "api"}
    )
    max_wait_ms: float = Field(
        5.0, ge=0, description="a batch waits at most this long to fill", json_schema_extra={"read_by": "api"}
    )
    queue_size: int = Field(
        256,
        gt=0,
        description="requests waiting for a forward; more get 503 `overloaded`",
        json_schema_extra={"read_by": "api"},
    )
    max_body_bytes: int = Field(
        10_000_000, gt=0, description="request bodies over this get 413", json_schema_extra={"read_by": "api"}
    )
    max_labels: int = Field(
        256, gt=0, description="labels per `/classify` request", json_schema_extra={"read_by": "api"}
    )
    max_templates: int = Field(
        16, gt=0, description="prompt templates per `/classify` request", json_schema_extra={"read_by": "api"}
    )
    max_k: int = Field(
        100, gt=0, description="results per `/retrieve` request", json_schema_extra={"read_by": "api"}
    )
    label_cache_size: int = Field(
        65_536, gt=0, description="cached label text embeddings (LRU)", json_schema_extra={"read_by": "api"}
    )
    ann_threshold: int = Field(
        200_000,
        gt=0,
        description=(
            "gallery size from which retrieval uses faiss HNSW (exact search below, or without faiss)"
        ),
        json_schema_extra={"read_by": "api"},
    )
    gallery_shards: list[Path] = Field(
        [],
        description='extra WebDataset shard dirs in the retrieval gallery, JSON list: `["/data/g1"]`',
        json_schema_extra={"read_by": "api"},
    )
    gallery_max_pairs: int = Field(
        1_000_000,
        gt=0,
        description=(
            "the retrieval gallery holds the newest N pairs of the chunk dirs (after the "
            "`CTP_GALLERY_SHARDS`); older ones leave it as new chunks arrive"
        ),
        json_schema_extra={"read_by": "api"},
    )
    cors_origins: list[str] = Field(
        [],
        description="allowed CORS origins, JSON list; empty: CORS off",
        json_schema_extra={"read_by": "api"},
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection whose request headers are not complete this long after it opened "
        "(or after a later request's first byte) gets 408 and is closed",
        json_schema_extra={"read_by": "api"},
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request whose body is not complete this long after its headers gets 408 "
        "and its connection is closed",
        json_schema_extra={"read_by": "api"},
    )
    # ctp up
    log_max_bytes: int = Field(
        LOG_MAX_BYTES,
        ge=0,
        description="`ctp up`: a log in `DATA_DIR/logs` (and Kafka's and Redis's) is rotated when it "
        "passes this size (0: never)",
        json_schema_extra={"read_by": "up"},
    )
    log_backups: int = Field(
        LOG_BACKUPS,
        ge=1,
        description="`ctp up`: rotated logs kept per log (`api.log.1` newest ... `.N` oldest)",
        json_schema_extra={"read_by": "up"},
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose from {sorted(STRATEGIES)}")
        return v

    @field_validator("eval_classification", "eval_retrieval")
    @classmethod
    def _named_dirs(cls, v: str) -> str:
        parse_named_dirs(v)
        return v

    def message_limits(self) -> Limits:
        """The ingest message limits (``service.messages.Limits``) these settings set."""
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            max_text_chars=self.max_text_chars,
            max_label_chars=self.max_label_chars,
        )

    def eval_classification_sets(self) -> dict[str, Path]:
        return parse_named_dirs(self.eval_classification)

    def eval_retrieval_sets(self) -> dict[str, Path]:
        return parse_named_dirs(self.eval_retrieval)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "cpu" and not (v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        for server in v.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {v!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis:// URL, got {v!r}")
        return v


def parse_named_dirs(value: str) -> dict[str, Path]:
    """``"a=/x,b=/y"`` -> {"a": Path("/x"), "b": Path("/y")}; each dir must exist."""
    out: dict[str, Path] = {}
    for part in filter(None, (x.strip() for x in value.split(","))):
        name, sep, directory = part.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise ValueError(f"expected name=dir[,name=dir...], got {part!r}")
        if not Path(directory.strip()).is_dir():
            raise ValueError(f"eval set directory not found: {directory.strip()}")
        out[name.strip()] = Path(directory.strip())
    return out


STACK_FILE = "up.json"
# settings a running `ctp up` records in its data dir: field -> key in STACK_FILE
STACK_FIELDS = {"kafka_bootstrap": "kafka_bootstrap", "redis_url": "redis_url"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def stack_record(data_dir: str | Path) -> dict | None:
    """What a running ``ctp up`` recorded in ``data_dir/up.json`` (its servers, its API); None when
    there is no record or the ``ctp up`` that wrote it is gone."""
    try:
        record = json.loads((Path(data_dir) / STACK_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = record.get("pid") if isinstance(record, dict) else None
    return record if isinstance(pid, int) and pid > 0 and _alive(pid) else None


def load_settings(**overrides) -> Settings:
    """Settings from the environment (and ``overrides``); errors name the CTP_ variable. Kafka and
    Redis not set: those of the ``ctp up`` running on the data dir, if one is (``stack_record``)."""
    try:
        settings = Settings(**overrides)
        record = stack_record(settings.data_dir)
        found = {
            f: record[k]
            for f, k in STACK_FIELDS.items()
            if record and f not in settings.model_fields_set and isinstance(record.get(k), str)
        }
        return Settings(**found, **overrides) if found else settings
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
