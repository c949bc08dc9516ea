"""The README's configuration table, generated from ``Settings.model_fields``.

    python -m service.local.settings_doc        # print the Markdown table (README.md "Configuration")

Every field needs an entry in ``MEANINGS`` (a test checks both ways), so a new setting cannot
ship undocumented; defaults are read from the class, never written by hand.
"""

from __future__ import annotations

from pathlib import Path

from pydantic.fields import FieldInfo

from service.settings import ENV_PREFIX, Settings

# field -> (roles that read it, meaning)
MEANINGS: dict[str, tuple[str, str]] = {
    "kafka_bootstrap": ("ingest, produce, api, status", "Kafka bootstrap servers, `host:port[,host:port]`"),
    "topic": ("ingest, produce, api", "topic of image-text pairs"),
    "dlq_topic": ("ingest", "dead-letter topic: rejected messages with headers `ctp-error`, `ctp-reason`, `ctp-source`"),
    "consumer_group": ("ingest", "Kafka consumer group of the ingest workers (more members split the partitions)"),
    "kafka_session_timeout_ms": ("ingest", "a dead ingest member's partitions go to the others after this (>= 6000)"),
    "kafka_max_poll_interval_ms": ("ingest", "longest pause between polls before the member is dropped (a slow disk)"),
    "redis_url": ("ingest, train, api, status", "Redis: chunk queue, offsets, replay memory, checkpoint registry (`redis://`, `rediss://`, `unix://`)"),
    "data_dir": ("ingest, train, api", "chunks (`chunks/`) and checkpoints (`checkpoints/`) live below; shared by the roles"),
    "chunk_size": ("ingest", "pairs per chunk"),
    "chunk_max_wait_s": ("ingest", "a partial chunk is cut this long after its first pair"),
    "max_message_bytes": ("ingest, api", "largest Kafka message accepted; larger ones go to the DLQ"),
    "max_image_bytes": ("ingest, api", "largest decoded image payload"),
    "max_image_pixels": ("ingest, api", "largest image (width x height); guards against decompression bombs"),
    "max_text_chars": ("ingest, api", "longest caption / query text"),
    "max_label_chars": ("ingest, api", "longest class label"),
    "model": ("train", "open_clip model name or a ctp preset (`ctp-vit-micro-32`, `ctp-vit-tiny-32`, ...)"),
    "pretrained": ("train", "open_clip pretrained tag, a weights file or a ctp checkpoint dir to start from; unset: random init"),
    "strategy": ("train", "continual strategy: `incclip`, `finetune`, `er`, `lwf`, `joint` or an ablation (docs/method.md)"),
    "memory_size": ("train", "replay memory capacity in pairs (0: no replay)"),
    "memory_max_bytes": ("train", "replay memory capacity in bytes (images, captions, pseudo texts); unset: no byte limit"),
    "memory_policy": ("train", "what the memory keeps: `class_balanced` or `reservoir` (docs/method.md)"),
    "epochs": ("train", "epochs over each chunk"),
    "batch_size": ("train", "training batch size (new + replayed pairs)"),
    "lr": ("train", "learning rate"),
    "device": ("train, api", "`cpu`, `cuda` or `cuda:N`"),
    "keep_checkpoints": ("train, api", "retention: the newest N versions are kept on disk and in the registry"),
    "trainer_name": ("train", "consumer name in the chunk queue; default `trainer-<hostname>` (keep it stable across restarts)"),
    "trainer_lease_s": ("train", "one active trainer per registry: a standby (or a restart) takes over this long after the holder stops renewing"),
    "claim_idle_s": ("train", "a chunk pending this long at another (dead) trainer is taken over"),
    "eval_classification": ("train", "classification eval sets measured after every chunk, `name=dir[,name=dir]` (CLIP_benchmark wds layout)"),
    "eval_retrieval": ("train", "retrieval eval sets measured after every chunk, `name=dir[,name=dir]`"),
    "api_key": ("api", "when set, write endpoints (`POST /ingest`) need it in `X-API-Key`"),
    "api_host": ("api", "address `ctp serve` binds (`0.0.0.0` in containers)"),
    "api_port": ("api", "port `ctp serve` listens on (0: a free port)"),
    "serve_checkpoint_dir": ("api", "serve checkpoints from this dir instead of the Redis registry"),
    "watch_interval_s": ("api", "poll for new versions and new chunks this often"),
    "max_batch_size": ("api", "requests batched into one forward"),
    "max_wait_ms": ("api", "a batch waits at most this long to fill"),
    "queue_size": ("api", "requests waiting for a forward; more get 503 `overloaded`"),
    "max_body_bytes": ("api", "request bodies over this get 413"),
    "max_labels": ("api", "labels per `/classify` request"),
    "max_templates": ("api", "prompt templates per `/classify` request"),
    "max_k": ("api", "results per `/retrieve` request"),
    "label_cache_size": ("api", "cached label text embeddings (LRU)"),
    "ann_threshold": ("api", "gallery size from which retrieval uses faiss HNSW (exact search below, or without faiss)"),
    "gallery_shards": ("api", "extra WebDataset shard dirs in the retrieval gallery, JSON list: `[\"/data/g1\"]`"),
    "gallery_max_items": ("api", "the retrieval gallery stops growing past this"),
    "cors_origins": ("api", "allowed CORS origins, JSON list; empty: CORS off"),
}


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def default_text(info: FieldInfo) -> str:
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    if value == "":
        return '`""`'
    if isinstance(value, list):
        return "`[]`" if not value else f"`{value}`"
    return f"`{value}`"


def markdown_table() -> str:
    rows = ["| Variable | Default | Read by | Meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        roles, meaning = MEANINGS[name]
        rows.append(f"| `{env_name(name)}` | {default_text(info)} | {roles} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
