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
    # API
    api_key: SecretStr | None = None  # required by write endpoints when set

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose from {sorted(STRATEGIES)}")
        return v

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
