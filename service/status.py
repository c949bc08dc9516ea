"""``ctp status``: where the pipeline stands: topic lag, chunks pending, memory, model versions,
the data dir's free space and the roles' pauses.

``collect_status(settings)`` returns one JSON-able dict (also served by the API for the
dashboard). Each part is gathered on its own: Kafka down still shows Redis figures and says
what failed, so the command is useful exactly when something is wrong. ``errors`` names the
store that failed (``store_of``): a Redis error met while asking for the lag is ``errors.redis``.
``disk`` is the data dir's free space against ``CTP_MIN_FREE_BYTES`` (``low``: ingest and the
trainer pause rather than write); ``health`` is each paused role's record (``service.health``).

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


def topic_lag(
    settings: Settings, r: redis.Redis, *, timeout_ms: int = 5000, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Lag per partition and in all, ``produced`` (the topic's end offsets) and ``dead_letters``
    (``previous``: the last answer's, whose reasons are kept while their count has not moved)."""
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
            "dead_letters": dead_letters(
                settings, r, consumer, previous=(previous or {}).get("dead_letters"), timeout_ms=timeout_ms
            ),
        }
    finally:
        consumer.close()


def dead_letters(
    settings: Settings,
    r: redis.Redis,
    consumer,
    *,
    last: int = 5,
    previous: dict[str, Any] | None = None,
    timeout_ms: int = 5000,
) -> dict[str, Any]:
    """What ingest refused: ``count`` (messages on the DLQ topic, its retention allowing),
    ``written`` (every dead letter the topic ever took: its end offsets, retention not counting),
    ``fallback`` (dead letters kept in Redis because the DLQ took none) and ``last``: the newest
    ``last`` reasons (``source`` topic/partition/offset, ``error`` code, ``reason``, ``time``), read
    from the DLQ's headers; ``previous``'s when the count has not moved (no re-read)."""
    from kafka import TopicPartition

    from service.ingest import dlq_fallback_key

    tps = [
        TopicPartition(settings.dlq_topic, p)
        for p in sorted(consumer.partitions_for_topic(settings.dlq_topic) or ())
    ]
    ends = consumer.end_offsets(tps) if tps else {}
    begins = consumer.beginning_offsets(tps) if tps else {}
    count = sum(ends[tp] - begins[tp] for tp in tps)
    fallback = int(r.xlen(dlq_fallback_key(settings.topic)))
    written = sum(ends.values())
    out = {"topic": settings.dlq_topic, "count": count, "written": written, "fallback": fallback, "last": []}
    if previous and previous.get("written") == written and previous.get("topic") == settings.dlq_topic:
        return {**out, "last": previous.get("last", [])}
    want = {tp: max(begins[tp], ends[tp] - last) for tp in tps if ends[tp] > begins[tp]}
    if want:
        consumer.assign(list(want))
        for tp, offset in want.items():
            consumer.seek(tp, offset)
        found: list[dict[str, Any]] = []
        expected = sum(ends[tp] - o for tp, o in want.items())
        deadline = time.monotonic() + timeout_ms / 1000
        while len(found) < expected and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                for rec in records:
                    if rec.offset >= ends[tp]:
                        continue
                    h = {k: v.decode("utf-8", "replace") for k, v in rec.headers or []}
                    found.append(
                        {
                            "source": h.get("ctp-source"),
                            "error": h.get("ctp-error"),
                            "reason": h.get("ctp-reason"),
                            "time": rec.timestamp / 1000 if rec.timestamp and rec.timestamp > 0 else None,
                        }
                    )
        found.sort(key=lambda d: d["time"] or 0, reverse=True)
        out["last"] = found[:last]
    return out


def store_of(exc: BaseException) -> str:
    """The store an error came from: ``redis`` for a Redis error, else ``kafka`` (the lag's other
    source)."""
    import redis

    return "redis" if isinstance(exc, redis.RedisError) else "kafka"


def collect_status(settings: Settings, *, kafka: bool = True) -> dict[str, Any]:
    import redis

    from service.chunks import DEAD_CHUNKS, ChunkQueue
    from service.effective import recorded
    from service.health import disk_status, read_health
    from service.redis_memory import RedisMemory
    from service.registry import Registry

    r = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    out: dict[str, Any] = {"time": time.time(), "errors": {}}
    try:
        out["disk"] = disk_status(settings.data_dir, settings.min_free_bytes)
    except OSError as e:
        out["errors"]["disk"] = f"{type(e).__name__}: {e}"
    try:
        out["health"] = read_health(r)
        q = ChunkQueue(r)
        out["chunks"] = {
            "pending": q.pending(),
            "enqueued": q.enqueued(),
            "dead": int(r.hlen(DEAD_CHUNKS)),
        }
        # the running roles' own settings, not this process's defaults (service.effective)
        out["settings"] = recorded(r)
        trainer = out["settings"].get("trainer", {})
        capacity = trainer.get("memory_size", settings.memory_size)
        mem = RedisMemory(client=r, max_items=capacity)
        out["memory"] = {
            "items": len(mem),
            "bytes": mem.nbytes(),
            "capacity": capacity,
            "max_bytes": trainer.get("memory_max_bytes", settings.memory_max_bytes),
            "policy": trainer.get("memory_policy", settings.memory_policy),
            "capacity_from": "trainer"
            if "memory_size" in trainer
            else "these settings (no trainer recorded)",
        }
        reg = Registry(r, root=settings.data_dir / "checkpoints", keep=settings.keep_checkpoints)
        out["versions"] = [v.summary() for v in reg.history()]
        out["latest"] = reg.latest_version()
    except redis.RedisError as e:
        out["errors"]["redis"] = f"{type(e).__name__}: {e}"
    if kafka:
        try:
            out["ingest"] = topic_lag(settings, r)
        except Exception as e:  # broker (or Redis) down or unreachable: report it, show the rest
            out["errors"].setdefault(store_of(e), f"{type(e).__name__}: {e}")
    return out


def format_status(s: dict[str, Any]) -> str:
    lines = []
    if "ingest" in s:
        ing = s["ingest"]
        parts = ", ".join(f"p{p}: {v['lag']}" for p, v in ing["partitions"].items())
        lines.append(
            f"topic {ing['topic']}: {ing['produced']} produced, lag {ing['lag']} ({parts or 'no partitions'})"
        )
        if dl := ing.get("dead_letters"):
            lines.append(f"dead letters: {_dead_letter_count(dl)} on {dl['topic']}")
            lines += [f"  {d['source']}: {d['error']}: {d['reason']}" for d in dl["last"]]
    if "chunks" in s:
        c = s["chunks"]
        lines.append(f"chunks: {c['enqueued']} enqueued, {c['pending']} pending, {c['dead']} set aside")
    if "memory" in s:
        m = s["memory"]
        lines.append(
            f"memory: {m['items']} of {m['capacity']} pairs ({m['policy']}), {m['bytes'] / 1e6:.1f} MB"
        )
    if d := s.get("disk"):
        low = (
            f" LOW: below the minimum {d['min_free_bytes'] / 2**30:.1f} GiB, writes pause" if d["low"] else ""
        )
        lines.append(f"disk: {d['free_bytes'] / 2**30:.1f} GiB free on {d['path']}{low}")
    for role, h in (s.get("health") or {}).items():
        lines.append(f"{role}: {_paused(h)}")
    for role, rs in (s.get("settings") or {}).items():
        keys = ("chunk_size", "chunk_max_wait_s") if role == "ingest" else TRAINER_SHOWN
        shown = ", ".join(f"{k}={rs[k]}" for k in keys if k in rs)
        lines.append(f"{role} (pid {rs.get('pid')} on {rs.get('host')}): {shown}")
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


TRAINER_SHOWN = ("model", "strategy", "epochs", "epochs_follow_chunk_size", "batch_size", "lr", "memory_size")


def status_line(s: dict[str, Any]) -> str:
    """The status on one line (``ctp up`` prints it when it changes)."""
    parts = []
    if "ingest" in s:
        parts.append(f"{s['ingest']['produced']} produced, lag {s['ingest']['lag']}")
        if (dl := s["ingest"].get("dead_letters")) and (dl["count"] or dl["fallback"]):
            why = f" (last: {dl['last'][0]['error']})" if dl["last"] else ""
            parts.append(f"{_dead_letter_count(dl)} dead letters{why}")
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
    if (d := s.get("disk")) and d["low"]:
        parts.append(f"disk LOW ({d['free_bytes'] / 2**30:.1f} GiB free)")
    parts += [f"{role} {_paused(h, detail=False)}" for role, h in (s.get("health") or {}).items()]
    parts += [f"{part} UNAVAILABLE" for part in s["errors"]]
    return " | ".join(parts)


def _paused(h: dict[str, Any], *, detail: bool = True) -> str:
    """A role's health record in words; without ``detail`` no durations (``ctp up`` prints the
    status line each time it changes)."""
    state, reason = str(h.get("state", "?")).upper(), h.get("reason")
    if not detail:
        return f"{state}: {reason}"
    since = f" for {time.time() - h['since']:.0f} s" if isinstance(h.get("since"), int | float) else ""
    return f"{state}{since}: {reason} (retry in {h.get('retry_in')} s)"


def _dead_letter_count(dl: dict[str, Any]) -> str:
    return f"{dl['count']}" + (f" + {dl['fallback']} kept in Redis" if dl["fallback"] else "")


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
