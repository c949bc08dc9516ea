"""``ctp status``: where the pipeline stands: topic lag, chunks pending, memory, model versions.

``collect_status(settings)`` returns one JSON-able dict (also served by the API for the
dashboard). Each part is gathered on its own: Kafka down still shows Redis figures and says
what failed, so the command is useful exactly when something is wrong.

Lag is the number of messages on the topic that are not yet in a chunk: the partition's end
offset minus the next offset ingest recorded in Redis with its last chunk (the source of truth;
the Kafka group commit follows it), per partition and summed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

# redis, kafka and the settings are imported where used: `ctp status --help` answers at once
if TYPE_CHECKING:
    import redis

    from service.settings import Settings


def topic_lag(settings: Settings, r: redis.Redis, *, timeout_ms: int = 5000) -> dict[str, Any]:
    from kafka import KafkaConsumer, TopicPartition

    from service.chunks import offsets_key

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,  # no group: without this kafka-python warns on every call
        request_timeout_ms=timeout_ms + 1000,
        bootstrap_timeout_ms=timeout_ms,
        consumer_timeout_ms=timeout_ms,
    )
    try:
        partitions = consumer.partitions_for_topic(settings.topic) or set()
        tps = [TopicPartition(settings.topic, p) for p in sorted(partitions)]
        ends = consumer.end_offsets(tps) if tps else {}
        stored = r.hgetall(offsets_key(settings.topic))
        per = {}
        for tp in tps:
            done = int(stored.get(str(tp.partition).encode(), 0))
            per[tp.partition] = {"end": ends[tp], "chunked": done, "lag": max(0, ends[tp] - done)}
        return {
            "topic": settings.topic,
            "partitions": per,
            "lag": sum(p["lag"] for p in per.values()),
            "produced": sum(p["end"] for p in per.values()),
        }
    finally:
        consumer.close()


def collect_status(settings: Settings, *, kafka: bool = True) -> dict[str, Any]:
    import redis

    from service.chunks import DEAD_CHUNKS, ChunkQueue
    from service.redis_memory import RedisMemory
    from service.registry import Registry

    r = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    out: dict[str, Any] = {"time": time.time(), "errors": {}}
    try:
        q = ChunkQueue(r)
        out["chunks"] = {
            "pending": q.pending(),
            "enqueued": int(r.xlen(q.stream)),
            "dead": int(r.hlen(DEAD_CHUNKS)),
        }
        mem = RedisMemory(client=r, max_items=settings.memory_size)
        out["memory"] = {"items": len(mem), "bytes": mem.nbytes(), "capacity": settings.memory_size}
        reg = Registry(r, root=settings.data_dir / "checkpoints", keep=settings.keep_checkpoints)
        out["versions"] = [v.summary() for v in reg.history()]
        out["latest"] = reg.latest_version()
    except redis.RedisError as e:
        out["errors"]["redis"] = f"{type(e).__name__}: {e}"
    if kafka:
        try:
            out["ingest"] = topic_lag(settings, r)
        except Exception as e:  # broker down or unreachable: report it, show the rest
            out["errors"]["kafka"] = f"{type(e).__name__}: {e}"
    return out


def format_status(s: dict[str, Any]) -> str:
    lines = []
    if "ingest" in s:
        ing = s["ingest"]
        parts = ", ".join(f"p{p}: {v['lag']}" for p, v in ing["partitions"].items())
        lines.append(
            f"topic {ing['topic']}: {ing['produced']} produced, lag {ing['lag']} ({parts or 'no partitions'})"
        )
    if "chunks" in s:
        c = s["chunks"]
        lines.append(f"chunks: {c['enqueued']} enqueued, {c['pending']} pending, {c['dead']} set aside")
    if "memory" in s:
        lines.append(f"memory: {s['memory']['items']} pairs, {s['memory']['bytes'] / 1e6:.1f} MB")
    if "versions" in s:
        lines.append(f"model versions: latest {s['latest']}, {len(s['versions'])} kept")
        for v in s["versions"][-5:]:
            metrics = "; ".join(_headline(n, m) for n, m in (v["metrics"] or {}).items() if m)
            lines.append(
                f"  v{v['version']}: {v['chunks']} chunks, {v['strategy']}{', ' + metrics if metrics else ''}"
            )
    for part, err in s["errors"].items():
        lines.append(f"{part}: UNAVAILABLE ({err})")
    return "\n".join(lines)


def status_line(s: dict[str, Any]) -> str:
    """The status on one line (``ctp up`` prints it when it changes)."""
    parts = []
    if "ingest" in s:
        parts.append(f"{s['ingest']['produced']} produced, lag {s['ingest']['lag']}")
    if "chunks" in s:
        c = s["chunks"]
        parts.append(f"chunks {c['enqueued']} ({c['pending']} pending, {c['dead']} set aside)")
    if "memory" in s:
        parts.append(f"memory {s['memory']['items']}/{s['memory']['capacity']}")
    if s.get("versions"):
        v = s["versions"][-1]
        metrics = "; ".join(_headline(n, m) for n, m in (v["metrics"] or {}).items() if m)
        parts.append(f"v{v['version']} after {v['chunks']} chunks{': ' + metrics if metrics else ''}")
    elif "versions" in s:
        parts.append("no model version yet")
    parts += [f"{part} UNAVAILABLE" for part in s["errors"]]
    return " | ".join(parts)


def _headline(name: str, m: dict[str, Any]) -> str:
    key = "acc1" if "acc1" in m else "mean_recall@1"
    extra = f" forgetting={m['forgetting']:.3f}" if m.get("forgetting") else ""
    return f"{name} {key}={m.get(key, float('nan')):.3f}{extra}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ctp status", description="topic lag, chunks pending, memory, model versions"
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    args = p.parse_args(argv)
    from service.settings import load_settings, stack_record

    settings = load_settings()
    s = collect_status(settings)
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    if s["errors"] and stack_record(settings.data_dir) is None:
        print(
            f"(no running `ctp up` recorded in {settings.data_dir.resolve()}/up.json: set CTP_DATA_DIR "
            "to its data dir, or CTP_REDIS_URL / CTP_KAFKA_BOOTSTRAP)",
            file=sys.stderr,
        )
    return 1 if s["errors"] else 0
