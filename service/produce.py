"""``ctp produce``: post image-text pairs to the topic, from shards, a JSONL file or the synthetic stream.

    ctp produce (--shards DIR [DIR ...] | --jsonl FILE | --synthetic NAME) [--rate PAIRS_PER_S]
                [--bootstrap HOST:PORT] [--topic ctp.pairs] [--limit N] [--no-validate]

Messages follow the ingest contract (service.messages); the pair id is also the Kafka key, so a
resent pair lands in the partition (and the ingest worker) that saw it first. Each message is
checked with ingest's own rules and limits (``validate_message``, the CTP_ limits) before it is
sent: a bad one is not sent but reported with its code and reason, and the command exits 1.
``--no-validate`` sends them anyway (to exercise the dead-letter topic).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.messages import Limits


def pairs_from_shards(dirs: list[Path]) -> Iterator[tuple[str, bytes]]:
    from ctp.data import iter_chunk, pair_id
    from service.messages import encode_message

    for d in dirs:
        for s in iter_chunk(d):
            pid = pair_id(s.meta, Path(d).name, s.key)
            meta = {k: v for k, v in s.meta.items() if k != "id"}
            yield pid, encode_message(id=pid, text=s.text, image=s.image, label=s.label, meta=meta or None)


def pairs_from_jsonl(path: Path) -> Iterator[tuple[str | None, bytes]]:
    """Lines are ingest messages already (``main`` checks them, unless ``--no-validate``)."""
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if not line:
                continue
            try:
                key = json.loads(line).get("id")
            except (ValueError, AttributeError):
                key = None
            yield key if isinstance(key, str) else None, line


def kafka_producer(bootstrap: str, limits: Limits):
    """The producer every ctp sender uses: ``acks=all``, a short linger, and room for the largest
    message ingest accepts (``limits.max_message_bytes``) with its key and headers."""
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=10,
        max_request_size=limits.max_message_bytes + 64 * 1024,
    )


SHOW_REFUSED = 20  # reasons printed; the rest are counted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctp produce", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", type=Path, metavar="DIR", help="WebDataset chunk directories")
    src.add_argument("--jsonl", type=Path, help="a file of ingest messages, one JSON a line")
    src.add_argument(
        "--synthetic", metavar="NAME", help="a synthetic stream preset (all its chunks in order)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="where the synthetic stream is generated")
    p.add_argument("--bootstrap", help="default CTP_KAFKA_BOOTSTRAP (or the running ctp up's)")
    p.add_argument("--topic", help="default CTP_TOPIC")
    p.add_argument("--rate", type=float, default=0.0, help="pairs per second (0: as fast as possible)")
    p.add_argument("--limit", type=int, default=0, help="stop after N messages (0: all)")
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="send every message as it is (ingest dead-letters the bad ones) instead of refusing them here",
    )
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    from service.messages import InvalidMessage, validate_message
    from service.settings import load_settings

    settings = load_settings()  # after parsing: --help works whatever the env holds
    args.bootstrap = args.bootstrap or settings.kafka_bootstrap
    args.topic = args.topic or settings.topic
    limits = settings.message_limits()
    if args.synthetic:
        from ctp.experiment import default_data_dir
        from ctp.synthetic import make_stream

        stream = make_stream((args.data_dir or default_data_dir()) / args.synthetic, args.synthetic)
        source = pairs_from_shards(stream.chunks)
    elif args.shards:
        source = pairs_from_shards(args.shards)
    else:
        source = pairs_from_jsonl(args.jsonl)
    producer = kafka_producer(args.bootstrap, limits)
    sent, n, t0 = 0, 0, time.monotonic()
    refused: list[str] = []  # "message N: code: reason", as ingest would put it in the DLQ
    failed: list[str] = []  # sends the broker refused
    with tqdm(desc=f"produce -> {args.topic}", unit="msg") as bar:
        for key, value in source:
            if args.limit and n >= args.limit:
                break
            n += 1
            where = f"line {n}" if args.jsonl else f"message {n}"
            if not args.no_validate:
                try:
                    validate_message(value, default_id=key or where, limits=limits)
                except InvalidMessage as e:
                    refused.append(f"{where}{f' (id {key})' if key else ''}: {e.code}: {e.reason}")
                    continue
            if args.rate > 0:  # pace against the start time, so slow sends do not lower the rate
                time.sleep(max(0.0, t0 + sent / args.rate - time.monotonic()))
            try:
                producer.send(args.topic, value=value, key=key.encode() if key else None)
            except Exception as e:  # too large for the producer, broker gone: say so, go on
                failed.append(f"{where}: {type(e).__name__}: {e}")
                continue
            sent += 1
            bar.update(1)
    producer.flush()
    producer.close()
    print(
        f"sent {sent} of {n} messages to {args.topic} at {args.bootstrap} in {time.monotonic() - t0:.1f} s"
        + (f"; refused {len(refused)} that ingest would dead-letter" if refused else "")
        + (f"; {len(failed)} not sent" if failed else "")
    )
    for line in (refused + failed)[:SHOW_REFUSED]:
        print(f"  {line}")
    if len(refused) + len(failed) > SHOW_REFUSED:
        print(f"  ... and {len(refused) + len(failed) - SHOW_REFUSED} more")
    return 1 if refused or failed else 0
