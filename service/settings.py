"""All service settings in one pydantic-settings class; environment variables prefixed ``CTP_``.

``load_settings()`` turns a validation error into ``SettingsError`` whose message names the
environment variable, so a bad deployment fails at start with something an operator can fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctp.models import DEFAULT_MODEL
from ctp.strategies import STRATEGIES

ENV_PREFIX = "CTP_"


class SettingsError(ValueError):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"  # host:port[,host:port]
    topic: str = "ctp.pairs"  # ingest topic
    dlq_topic: str = "ctp.pairs.dlq"  # dead letters: bad messages with the reason
    consumer_group: str = "ctp-ingest"
    kafka_session_timeout_ms: int = Field(10_000, ge=6_000)  # a dead ingest member is replaced after this
    kafka_max_poll_interval_ms: int = Field(300_000, gt=0)  # longest pause between polls (a slow disk)
    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    # storage
    data_dir: Path = Path("ctp-data")  # chunks and checkpoints live below
    # chunking
    chunk_size: int = Field(256, gt=0)  # pairs per chunk
    chunk_max_wait_s: float = Field(60.0, gt=0)  # a partial chunk is cut after this long
    # message limits
    max_message_bytes: int = Field(8_000_000, gt=0)
    max_image_bytes: int = Field(5_000_000, gt=0)
    max_image_pixels: int = Field(16_000_000, gt=0)
    max_text_chars: int = Field(1000, gt=0)
    max_label_chars: int = Field(200, gt=0)
    # model and training
    model: str = DEFAULT_MODEL  # open_clip model name or ctp preset
    pretrained: str | None = None  # open_clip tag, weights file or ctp checkpoint dir
    strategy: str = "incclip"
    memory_size: int = Field(2000, ge=0)  # replay memory capacity, pairs
    memory_max_bytes: int | None = Field(None, gt=0)
    memory_policy: Literal["reservoir", "class_balanced"] = "class_balanced"
    epochs: int = Field(20, gt=0)  # per chunk
    batch_size: int = Field(64, gt=1)
    lr: float = Field(2e-3, gt=0)
    device: str = "cpu"  # cpu, cuda or cuda:N
    keep_checkpoints: int = Field(5, gt=0)  # retention: last N versions on disk
    trainer_name: str | None = None  # chunk-queue consumer name; default: the host name (stable across restarts)
    trainer_lease_s: float = Field(30.0, ge=1)  # one active trainer: a standby takes over this long after it dies
    claim_idle_s: float = Field(600.0, gt=0)  # a chunk idle this long at another trainer is taken over
    # eval sets measured after every chunk, stored with the version: "name=dir[,name=dir...]"
    eval_classification: str = ""  # CLIP_benchmark wds layout (design.md)
    eval_retrieval: str = ""
    # API
    api_key: SecretStr | None = None  # required by write endpoints when set
    # serving (ctp serve)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)  # 0: a free port (tests)
    serve_checkpoint_dir: Path | None = None  # serve checkpoints from this dir instead of the registry
    watch_interval_s: float = Field(2.0, gt=0)  # poll for new versions / chunks this often
    max_batch_size: int = Field(32, gt=0)  # requests per forward
    max_wait_ms: float = Field(5.0, ge=0)  # a batch waits at most this long to fill
    queue_size: int = Field(256, gt=0)  # requests waiting for a forward; more get 503
    max_body_bytes: int = Field(10_000_000, gt=0)  # request bodies over this get 413
    max_labels: int = Field(256, gt=0)  # labels per /classify request
    max_templates: int = Field(16, gt=0)  # templates per /classify request
    max_k: int = Field(100, gt=0)  # results per /retrieve request
    label_cache_size: int = Field(65_536, gt=0)  # cached label text embeddings (LRU)
    ann_threshold: int = Field(200_000, gt=0)  # gallery size from which retrieval uses faiss HNSW
    gallery_shards: list[Path] = []  # extra WebDataset shard dirs in the retrieval gallery
    gallery_max_items: int = Field(1_000_000, gt=0)  # the gallery stops growing past this
    cors_origins: list[str] = []  # CORS is off unless origins are given

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


def load_settings(**overrides) -> Settings:
    """Settings from the environment (and ``overrides``); errors name the CTP_ variable."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
