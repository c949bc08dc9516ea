"""Ingest throughput against the raw limit, and freshness, on a real Kafka broker and Redis.

    python benchmarks/ingest.py [--pairs 8192] [--image-size 128] [--partitions 2] [--rounds 2]
                                [--freshness-seconds 40] [--rate 40] [--out runs/bench-ingest]

Throughput: the same topic of N pairs is read, alternately, by
- the raw limit: a kafka-python consumer in a fresh group plus base64 + Pillow decode of every
  image (``ctp.images.decode_image``), nothing else;
- ``IngestWorker`` in a fresh group with fresh Redis state: validation, dead-letter checks,
  duplicate ids, chunk shards written with fsync, the Redis record and the Kafka commit.
Both clocks start at consumer creation (both join a group) and stop when the last pair is
decoded (raw) or the last chunk is recorded (ingest: its Redis stream entry time). Reported:
pairs/s, best of ``--rounds``; target: ingest >= 70 % of the raw limit.

Freshness: ``ctp ingest`` and ``ctp train`` run as processes (tiny model, settings printed);
pairs are produced at ``--rate`` with their send time in ``meta``; a pair's freshness is the
time from its send to the registry time of the first checkpoint version that trained on it.
Writes ``results.md``, ``results.json`` and ``freshness.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctp.data import read_chunk  # noqa: E402
from ctp.images import decode_image  # noqa: E402
from service.chunks import ChunkQueue, ChunkStore  # noqa: E402
from service.ingest import IngestWorker  # noqa: E402
from service.local.infra import KafkaServer, RedisServer, ensure_topics  # noqa: E402
from service.messages import encode_message  # noqa: E402
from service.registry import Registry  # noqa: E402


def make_image(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG with smooth structure and noise: decodes like a photo of that size, not a flat fill."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(x * rng.uniform(2, 9)), np.cos(y * rng.uniform(2, 9)), np.sin((x + y) * 5)], -1)
    pixels = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def produce(bootstrap: str, topic: str, n: int, *, image_size: int, partitions: int, seed: int = 0) -> int:
    """n pairs spread evenly over the partitions (so every chunk is full: no max-wait cut in the clock)."""
    rng = np.random.default_rng(seed)
    images = [make_image(rng, image_size) for _ in range(64)]  # reused: decode cost is per message
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    nbytes = 0
    for i in tqdm(range(n), desc=f"produce {n} pairs", unit="msg"):
        value = encode_message(
            id=f"p{i}", text=f"a photo of thing {i % 10}", image=images[i % 64], label=f"thing {i % 10}"
        )
        nbytes += len(value)
        producer.send(topic, value, key=f"p{i}".encode(), partition=i % partitions)
    producer.flush()
    producer.close()
    return nbytes


def raw_limit(bootstrap: str, topic: str, n: int) -> float:
    """Seconds for a fresh consumer group to read n messages and decode every image."""
    t0 = time.perf_counter()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=500,
    )
    seen = 0
    while seen < n:
        for records in consumer.poll(timeout_ms=500).values():
            for rec in records:
                obj = json.loads(rec.value)
                decode_image(base64.b64decode(obj["image"]), key=obj["id"])
                seen += 1
    elapsed = time.perf_counter() - t0
    consumer.close()
    return elapsed


def ingest_run(
    bootstrap: str, topic: str, n: int, redis_server: RedisServer, tmp: Path, chunk_size: int
) -> float:
    """Seconds for IngestWorker (fresh group, fresh Redis) from start to its last chunk recorded."""
    client = redis_server.client()
    client.flushall()
    store = ChunkStore(tmp / f"chunks-{uuid.uuid4().hex[:6]}")
    queue = ChunkQueue(client)
    t0_wall = time.time()
    worker = IngestWorker(
        bootstrap=bootstrap,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        group=f"ingest-{uuid.uuid4().hex[:8]}",
        redis_client=client,
        store=store,
        queue=queue,
        chunk_size=chunk_size,
        chunk_max_wait_s=1.0,
    )
    stats = worker.run(burst=True, idle_s=2.0)
    if stats["valid"] != n:
        raise RuntimeError(f"ingest saw {stats['valid']} valid pairs of {n}: {dict(stats)}")
    last_entry_ms = int(client.xrevrange(queue.stream, count=1)[0][0].decode().split("-")[0])
    return last_entry_ms / 1000 - t0_wall


def freshness(
    kafka: KafkaServer,
    redis_server: RedisServer,
    tmp: Path,
    *,
    seconds: float,
    rate: float,
    image_size: int,
    chunk_size: int,
    max_wait: float,
    epochs: int,
    model: str,
) -> dict:
    topic = f"fresh-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 1})
    redis_server.client().flushall()
    settings = {
        "CTP_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "CTP_TOPIC": topic,
        "CTP_DLQ_TOPIC": f"{topic}.dlq",
        "CTP_REDIS_URL": redis_server.url,
        "CTP_DATA_DIR": str(tmp / "fresh"),
        "CTP_MODEL": model,
        "CTP_EPOCHS": str(epochs),
        "CTP_CHUNK_SIZE": str(chunk_size),
        "CTP_CHUNK_MAX_WAIT_S": str(max_wait),
        "CTP_BATCH_SIZE": "32",
        "CTP_MEMORY_SIZE": "200",
        "CTP_KEEP_CHECKPOINTS": "1000",
    }
    env = {**os.environ, **settings, "PYTHONPATH": str(ROOT)}
    logs = tmp / "fresh-logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for role in ("ingest", "train"):
        with open(logs / f"{role}.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.cli", role], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
    rng = np.random.default_rng(1)
    images = [make_image(rng, image_size) for _ in range(16)]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
    sent: dict[str, float] = {}
    n = int(seconds * rate)
    t0 = time.time()
    for i in tqdm(range(n), desc=f"freshness: produce at {rate:.0f}/s", unit="msg"):
        time.sleep(max(0.0, t0 + i / rate - time.time()))
        pid = f"f{i}"
        sent[pid] = time.time()
        producer.send(
            topic, encode_message(id=pid, text=f"thing {i % 4}", image=images[i % 16], label=f"thing {i % 4}")
        )
    producer.flush()
    client = redis_server.client()
    reg = Registry(client, root=tmp / "fresh" / "checkpoints", keep=10_000)
    queue = ChunkQueue(client)
    deadline = time.time() + 600
    trained_at: dict[str, float] = {}
    while time.time() < deadline:
        entries = client.xrange(queue.stream)
        versions = reg.history()
        chunk_version_time = {}
        for v in versions:
            for cid in v.meta.get("chunk_ids", []):
                chunk_version_time.setdefault(cid, v.created)
        for _, f in entries:
            cid = f[b"chunk_id"].decode()
            if cid in chunk_version_time:
                for s in read_chunk(f[b"path"].decode()):
                    trained_at.setdefault(s.meta["id"], chunk_version_time[cid])
        if len(trained_at) >= n:
            break
        time.sleep(1.0)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    lat = sorted(trained_at[k] - sent[k] for k in sent if k in trained_at)
    if not lat:
        raise RuntimeError(f"no pair reached a checkpoint; see {logs}")
    train_s = [v.meta.get("seconds", 0.0) for v in reg.history()]
    return {
        "settings": settings,
        "pairs": n,
        "trained": len(lat),
        "seconds": lat,
        "p50": float(np.percentile(lat, 50)),
        "p90": float(np.percentile(lat, 90)),
        "max": lat[-1],
        "versions": len(train_s),
        "train_seconds_per_chunk": statistics.mean(train_s) if train_s else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8192, help="a multiple of partitions x chunk size")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--freshness-seconds", type=float, default=40.0, help="0: skip the freshness run")
    p.add_argument("--rate", type=float, default=40.0, help="freshness: pairs per second")
    p.add_argument("--fresh-chunk-size", type=int, default=256)
    p.add_argument("--fresh-max-wait", type=float, default=5.0)
    p.add_argument("--fresh-epochs", type=int, default=2)
    p.add_argument("--model", default="ctp-vit-micro-32")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-ingest")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "work"
    with KafkaServer(num_partitions=args.partitions) as kafka, RedisServer() as redis_server:
        topic = f"bench-{uuid.uuid4().hex[:6]}"
        ensure_topics(kafka.bootstrap, {topic: args.partitions})
        ensure_topics(kafka.bootstrap, {f"{topic}.dlq": 1})
        nbytes = produce(
            kafka.bootstrap, topic, args.pairs, image_size=args.image_size, partitions=args.partitions
        )
        raw, ing = [], []
        for r in range(args.rounds):  # alternate, so drift on the machine hits both
            raw.append(raw_limit(kafka.bootstrap, topic, args.pairs))
            ing.append(ingest_run(kafka.bootstrap, topic, args.pairs, redis_server, tmp, args.chunk_size))
            print(
                f"round {r}: raw {args.pairs / raw[-1]:.0f} pairs/s, "
                f"ingest {args.pairs / ing[-1]:.0f} pairs/s",
                flush=True,
            )
        raw_rate, ing_rate = args.pairs / min(raw), args.pairs / min(ing)
        fresh = None
        if args.freshness_seconds > 0:
            fresh = freshness(
                kafka,
                redis_server,
                tmp,
                seconds=args.freshness_seconds,
                rate=args.rate,
                image_size=args.image_size,
                chunk_size=args.fresh_chunk_size,
                max_wait=args.fresh_max_wait,
                epochs=args.fresh_epochs,
                model=args.model,
            )
    result = {
        "pairs": args.pairs,
        "image_size": args.image_size,
        "partitions": args.partitions,
        "message_kb": nbytes / args.pairs / 1024,
        "chunk_size": args.chunk_size,
        "raw_seconds": raw,
        "ingest_seconds": ing,
        "raw_pairs_per_s": raw_rate,
        "ingest_pairs_per_s": ing_rate,
        "ratio": ing_rate / raw_rate,
        "cpus": os.cpu_count(),
        "freshness": fresh,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Ingest benchmark",
        "",
        f"`python benchmarks/ingest.py --pairs {args.pairs} --image-size {args.image_size} "
        f"--partitions {args.partitions} --rounds {args.rounds}`; {os.cpu_count()} CPUs, "
        f"{result['message_kb']:.1f} KiB a message (JPEG {args.image_size} px, base64 in JSON).",
        "",
        "| reader | pairs/s (best of rounds) | rounds, s |",
        "|---|---|---|",
        f"| raw limit: consume + decode | {raw_rate:.0f} | {', '.join(f'{x:.2f}' for x in raw)} |",
        f"| ctp ingest: validate, chunk, fsync, record, commit | {ing_rate:.0f} | "
        f"{', '.join(f'{x:.2f}' for x in ing)} |",
        "",
        f"Ingest reaches **{100 * result['ratio']:.0f} %** of the raw limit (target >= 70 %).",
        "",
    ]
    if fresh:
        s = fresh["settings"]
        lines += [
            "## Freshness: produced -> in a checkpoint",
            "",
            f"{fresh['pairs']} pairs at {args.rate:.0f}/s; chunk size {s['CTP_CHUNK_SIZE']}, chunk max wait "
            f"{s['CTP_CHUNK_MAX_WAIT_S']} s, model {s['CTP_MODEL']}, {s['CTP_EPOCHS']} epochs a chunk "
            f"({fresh['train_seconds_per_chunk']:.1f} s of training and eval a chunk, {fresh['versions']} "
            "versions).",
            "",
            f"p50 **{fresh['p50']:.1f} s**, p90 {fresh['p90']:.1f} s, max {fresh['max']:.1f} s "
            f"({fresh['trained']} of {fresh['pairs']} pairs reached a checkpoint).",
            "",
            "![freshness](freshness.png)",
            "",
        ]
        _plot(fresh, args.out / "freshness.png")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _plot(fresh: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = fresh["seconds"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat))
    ax.set_xlabel("seconds from produce to a checkpoint trained on the pair")
    ax.set_ylabel("fraction of pairs")
    ax.set_title(f"freshness (p50 {fresh['p50']:.1f} s, p90 {fresh['p90']:.1f} s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
