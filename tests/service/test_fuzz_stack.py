"""The long-running stack fed a fuzzed mix, trial after trial: ``ctp ingest``, ``ctp train`` and
``ctp serve`` (real Kafka and Redis) keep running while a producer sends, between valid pairs,
random bytes, truncated and deeply nested JSON, huge integers, messages over 1 MB, over
``CTP_MAX_MESSAGE_BYTES`` and over the broker's limit, decompression bombs, exact resends and
other content under ids already used, each at a random place (``random.Random`` per trial).

After each trial: every valid pair is in exactly one chunk (the first content under its id),
every chunk is trained once in the lineage, every bad message that reached the topic is in the
DLQ exactly once with its code and a reason (the one over the broker's limit is refused to the
producer and never reaches it), no chunk is dead, and the API answered every request.
``CTP_FAULT_TRIALS`` trials (5 in CI, 20 in a soak run)."""

from __future__ import annotations

import json
import os
import random
import signal
import uuid
from collections import Counter

import pytest
from kafka import KafkaProducer
from kafka import errors as Errors

from ctp.data import read_chunk
from service.chunks import DEAD_CHUNKS, ChunkQueue
from service.local.infra import ensure_topics, free_port
from service.messages import encode_message
from service.registry import Registry
from tests.service.test_messages import bomb_png, png
from tests.service.test_pipeline import _ctp, _dead_letters, _env, _queued_ids, _wait
from tests.service.test_up_supervision import Prober

TRIALS = int(os.environ.get("CTP_FAULT_TRIALS", "5"))
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240 + 90 * TRIALS)]
ANY = "any"  # random bytes: whatever code fits them, as long as it is not `internal`


def _valid(pair_id: str, i: int, *, text: str | None = None) -> bytes:
    return encode_message(
        id=pair_id,
        text=text or f"a photo of thing {i % 5}",
        label=f"thing {i % 5}",
        image=png(16, 16, (i % 256, (3 * i) % 256, 40)),
    )


def _hostile(rng: random.Random, earlier: dict[str, bytes]) -> list[tuple[str, bytes, str | None]]:
    """(kind, value, expected DLQ code; None: not a dead letter) for one trial, in random order."""
    base = _valid("cut", 0)
    depth = rng.randint(33, 100_000)
    conflict_id = rng.choice(sorted(earlier))
    mix = [
        ("random bytes", rng.randbytes(rng.randint(1, 4096)), ANY),
        ("truncated json", base[: rng.randint(1, len(base) - 1)], "not_json"),
        (
            "deep nesting",
            b'{"text": "a", "image": "", "meta": ' + b"[" * depth + b"]" * depth + b"}",
            "too_deep",
        ),
        (
            "huge integer",
            b'{"text": "a", "image": "", "meta": {"n": ' + b"9" * rng.randint(101, 100_000) + b"}}",
            "number_too_large",
        ),
        (
            "text over 1 MB",
            encode_message(text="a" * rng.randint(1_000_001, 2_000_000), image=png()),
            "text_too_long",
        ),
        ("over the message limit", b" " * rng.randint(8_000_001, 9_500_000) + base, "too_large"),
        ("over the broker's limit", b" " * rng.randint(10_500_000, 12_000_000) + base, None),
        (
            "decompression bomb",
            encode_message(
                text="bomb", image=bomb_png(rng.randint(20_000, 100_000), rng.randint(20_000, 100_000))
            ),
            "bad_image",
        ),
        ("id conflict", _valid(conflict_id, 1, text=f"other content {rng.random()}"), "id_conflict"),
        ("resend", earlier[rng.choice(sorted(earlier))], None),
    ]
    rng.shuffle(mix)
    return mix


def test_the_stack_survives_a_fuzzed_mix_and_trains_every_valid_pair_once(kafka, redis_server, tmp_path):
    topic = f"fuzz-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 2, f"{topic}.dlq": 1})
    port = free_port()
    env = _env(
        kafka,
        redis_server,
        tmp_path,
        topic,
        CTP_MAX_MESSAGE_BYTES="8000000",  # the default: the 8-9.5 MB messages are over it
        CTP_CHUNK_SIZE="40",
        CTP_CHUNK_MAX_WAIT_S="1",
        CTP_API_PORT=str(port),
        CTP_WATCH_INTERVAL_S="0.5",
    )
    r = redis_server.client()
    reg = Registry(r, root=tmp_path / "data" / "checkpoints")
    procs = {role: _ctp(env, role, log=tmp_path / f"{role}.log") for role in ("ingest", "train", "serve")}
    producer = KafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=16_000_000, retries=0
    )
    prober = Prober(f"http://127.0.0.1:{port}", version=None)
    first: dict[str, bytes] = {}  # id -> the first (kept) message under it
    expected_dlq: dict[str, str] = {}  # "topic/partition/offset" -> code
    refused = 0
    try:
        for trial in range(TRIALS):
            rng = random.Random(f"fuzz-{trial}")
            n = rng.randint(30, 80)
            valid = [(f"t{trial}-{i}", _valid(f"t{trial}-{i}", i)) for i in range(n)]
            seed_pairs = {k: v for k, v in valid[:5]}  # trial 0's conflicts and resends reuse these
            hostile = _hostile(rng, {**first, **seed_pairs})
            slots = sorted(rng.sample(range(5, n + 1), len(hostile)))  # after the first 5 valid ones
            order: list[tuple[str, bytes, str | None, bytes | None]] = []
            for i, (pair_id, value) in enumerate(valid):
                while slots and slots[0] == i:
                    slots.pop(0)
                    kind, bad, code = hostile.pop()
                    key = json.loads(bad)["id"].encode() if kind in ("id conflict", "resend") else None
                    order.append((kind, bad, code, key))
                order.append(("valid", value, None, pair_id.encode()))
            for kind, bad, code in hostile:
                order.append((kind, bad, code, None))
            for kind, value, code, key in order:
                future = producer.send(topic, value, key=key)
                if kind == "over the broker's limit":
                    with pytest.raises(Errors.KafkaError):  # the broker refuses it: nothing to ingest
                        future.get(timeout=60)
                    refused += 1
                    continue
                meta = future.get(timeout=60)
                if kind == "valid":
                    first.setdefault(key.decode(), value)
                elif code is not None:
                    expected_dlq[f"{topic}/{meta.partition}/{meta.offset}"] = code

            def settled() -> bool:
                entries = [f[b"chunk_id"].decode() for f in _queued(r)]
                latest = reg.latest()
                return (
                    sum(_queued_ids(r).values()) == len(first)
                    and ChunkQueue(r).pending() == 0
                    and latest is not None
                    and latest.meta["chunks"] == len(entries)
                )

            _wait(settled, 180, f"trial {trial} chunked and trained", list(procs.values()))
            if trial == 0:
                _wait(lambda: _ready(port), 60, "the API serving", list(procs.values()))
                prober.start()

            # every valid pair in exactly one chunk, with the first content sent under its id
            assert _queued_ids(r) == Counter(first.keys())
            queued = _queued(r)
            texts = {s.meta["id"]: s.text for f in queued for s in read_chunk(f[b"path"].decode())}
            assert texts == {i: json.loads(v)["text"] for i, v in first.items()}
            # every chunk trained once, in order of the versions
            latest = reg.latest()
            entries = [f[b"chunk_id"].decode() for f in queued]
            lineage = latest.meta["chunk_ids"]  # the newest 32, in the order they were trained
            assert latest.meta["chunks"] == len(entries), "a chunk trained twice or never"
            assert lineage == entries[-len(lineage) :] and len(lineage) == min(len(entries), 32)
            counts = [v.meta["chunks"] for v in reg.history()]
            assert counts == list(range(counts[0], counts[0] + len(counts)))  # one chunk a version
            assert r.hlen(DEAD_CHUNKS) == 0
            # every bad message that reached the topic: in the DLQ once, with its code and a reason
            got: dict[str, str] = {}
            for d in _dead_letters(kafka, topic):
                h = dict(d.headers)
                source = h["ctp-source"].decode()
                assert source not in got, f"{source} dead-lettered twice"
                assert h["ctp-reason"], source
                got[source] = h["ctp-error"].decode()
            assert set(got) == set(expected_dlq)
            for source, code in expected_dlq.items():
                assert got[source] == code if code != ANY else got[source] != "internal", (
                    source,
                    got[source],
                )
            for role, p in procs.items():
                assert p.poll() is None, f"{role} exited: {(tmp_path / f'{role}.log').read_text()[-2000:]}"
            print(f"trial {trial}: {n} valid, {len(first)} pairs, {len(entries)} chunks, {len(got)} dead")
        prober.stop.set()
        prober.join(15)
        assert prober.failures == [], prober.failures[:5]
        assert prober.ok >= 10 * TRIALS and refused == TRIALS
    finally:
        prober.stop.set()
        producer.close()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        codes = {role: p.wait(60) for role, p in procs.items()}
    # uvicorn re-raises SIGTERM once its graceful shutdown is done, so serve ends "by" it
    assert codes["ingest"] == codes["train"] == 0 and codes["serve"] in (0, -signal.SIGTERM), codes


def _queued(r) -> list[dict]:
    """The fields of every chunk entry on the queue's stream, oldest first."""
    return [f for _, f in r.xrange(ChunkQueue(r).stream)]


def _ready(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
