"""``ctp produce``: post image-text pairs to the topic, from shards, a JSONL file or the synthetic stream.

    ctp produce (--shards DIR [DIR ...] | --jsonl FILE | --synthetic NAME) [--rate PAIRS_PER_S]
                [--bootstrap HOST:PORT] [--topic ctp.pairs] [--limit N]

Messages follow the ingest contract (service.messages); the pair id is also the Kafka key, so a
resent pair lands in the partition (and the ingest worker) that saw it first.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path


def pairs_from_shards(dirs: list[Path]) -> Iterator[tuple[str, bytes]]:
    from ctp.data import iter_chunk, pair_id
    from service.messages import encode_message

    for d in dirs:
        for s in iter_chunk(d):
            pid = pair_id(s.meta, Path(d).name, s.key)
            meta = {k: v for k, v in s.meta.items() if k != "id"}
            yield pid, encode_message(id=pid, text=s.text, image=s.image, label=s.label, meta=meta or None)


def pairs_from_jsonl(path: Path) -> Iterator[tuple[str | None, bytes]]:
    """Lines are ingest messages already; sent as they are (bad ones too: ingest judges them)."""
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if not line:
                continue
            try:
                key = json.loads(line).get("id")
            except (ValueError, AttributeError):
                key = None
            yield key, line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctp produce", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", type=Path, metavar="DIR", help="WebDataset chunk directories")
    src.add_argument("--jsonl", type=Path, help="a file of ingest messages, one JSON a line")
    src.add_argument(
        "--synthetic", metavar="NAME", help="a synthetic stream preset (all its chunks in order)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="where the synthetic stream is generated")
    p.add_argument("--bootstrap", help="default CTP_KAFKA_BOOTSTRAP")
    p.add_argument("--topic", help="default CTP_TOPIC")
    p.add_argument("--rate", type=float, default=0.0, help="pairs per second (0: as fast as possible)")
    p.add_argument("--limit", type=int, default=0, help="stop after N messages (0: all)")
    args = p.parse_args(argv)
    from kafka import KafkaProducer
    from tqdm.auto import tqdm

    from service.settings import load_settings

    if args.bootstrap is None or args.topic is None:  # after parsing: --help works whatever the env holds
        settings = load_settings()
        args.bootstrap = args.bootstrap or settings.kafka_bootstrap
        args.topic = args.topic or settings.topic
    if args.synthetic:
        from ctp.experiment import default_data_dir
        from ctp.synthetic import make_stream

        stream = make_stream((args.data_dir or default_data_dir()) / args.synthetic, args.synthetic)
        source = pairs_from_shards(stream.chunks)
    elif args.shards:
        source = pairs_from_shards(args.shards)
    else:
        source = pairs_from_jsonl(args.jsonl)
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=10)
    sent, t0 = 0, time.monotonic()
    with tqdm(desc=f"produce -> {args.topic}", unit="msg") as bar:
        for key, value in source:
            if args.limit and sent >= args.limit:
                break
            if args.rate > 0:  # pace against the start time, so slow sends do not lower the rate
                time.sleep(max(0.0, t0 + sent / args.rate - time.monotonic()))
            producer.send(args.topic, value=value, key=key.encode() if key else None)
            sent += 1
            bar.update(1)
    producer.flush()
    producer.close()
    print(f"sent {sent} messages to {args.topic} at {args.bootstrap} in {time.monotonic() - t0:.1f} s")
    return 0
