"""Ingest against a real Kafka broker and a real Redis: chunks, dead letters, duplicates, replays."""

import io
import json
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image

from ctp.data import read_chunk
from service.chunks import ChunkQueue, ChunkStore
from service.ingest import IngestWorker
from service.local.infra import ensure_topics
from service.messages import encode_message
from tests.service.test_messages import bomb_png

pytestmark = pytest.mark.timeout(300)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, 90)).save(buf, "PNG")
    return buf.getvalue()


BAD = [
    b"not json",
    b"[1,2]",
    b'{"text": 3, "image": "x"}',
    b'{"text": "a", "image": "%%%"}',
    encode_message(text="a", image=b"definitely not an image"),
    encode_message(text="", image=_png(1)),
    None,
]


def _worker(kafka, redis_server, tmp_path, topic, group, *, queue=None, **kw):
    client = redis_server.client()
    return IngestWorker(
        bootstrap=kafka.bootstrap,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        group=group,
        redis_client=client,
        store=ChunkStore(tmp_path / "chunks"),
        queue=queue or ChunkQueue(client),
        **kw,
    )


def _dlq(kafka, topic, n):
    c = KafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=kafka.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        group_id=None,
    )
    out = [r for r in c]
    c.close()
    return out


def test_end_to_end_chunks_dead_letters_and_duplicates(kafka, redis_server, tmp_path):
    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 2})
    ensure_topics(kafka.bootstrap, {f"{topic}.dlq": 1})
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    n_valid = 520
    for i in range(n_valid):
        producer.send(
            topic,
            encode_message(id=f"pair-{i}", text=f"pair number {i}", image=_png(i), label=f"c{i % 4}"),
            partition=i % 2,
        )
        if i % 100 == 0:
            producer.send(topic, BAD[(i // 100) % len(BAD)], partition=i % 2)
    for i in range(0, 30):  # resent pairs: same ids, dropped
        producer.send(
            topic, encode_message(id=f"pair-{i}", text=f"pair number {i}", image=_png(i)), partition=1
        )
    producer.flush()

    w = _worker(kafka, redis_server, tmp_path, topic, "ingest-a", chunk_size=100, chunk_max_wait_s=2)
    stats = w.run(burst=True, idle_s=4)
    assert stats["valid"] == n_valid and stats["duplicates"] == 30 and stats["dead_letters"] == 6

    store = ChunkStore(tmp_path / "chunks")
    queue = ChunkQueue(redis_server.client())
    ids = []
    while (task := queue.take("t", block_ms=50)) is not None:
        ids += [s.meta["id"] for s in read_chunk(task.path)]
        queue.ack(task)
    assert sorted(ids) == sorted(f"pair-{i}" for i in range(n_valid))  # each valid pair exactly once
    assert len(list(store.root.iterdir())) == stats["chunks"]

    dead = _dlq(kafka, topic, 6)
    assert len(dead) == 6
    for rec in dead:
        headers = dict(rec.headers)
        assert (
            headers["ctp-error"]
            and headers["ctp-reason"]
            and headers["ctp-source"].startswith(topic.encode())
        )

    # the same group again: everything is recorded, nothing new
    w2 = _worker(kafka, redis_server, tmp_path, topic, "ingest-a", chunk_size=100)
    assert w2.run(burst=True, idle_s=3)["chunks"] == 0


def test_other_content_under_a_used_id_is_dead_lettered_the_first_pair_kept(kafka, redis_server, tmp_path):
    """A resend (same id, same text and image; label and meta may differ) is dropped; a different
    pair under an id already taken is dead-lettered as ``id_conflict``, whether the first one is
    still in this worker's buffer or already recorded in Redis; the first pair is the one chunked."""
    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 1, f"{topic}.dlq": 1})
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")

    def send(pair_id, text, image, **kw):
        producer.send(topic, encode_message(id=pair_id, text=text, image=image, **kw))

    for i in range(5):
        send(f"c-{i}", f"first {i}", _png(i), label="a")
    send("c-0", "first 0", _png(0), label="b", meta={"retry": 1})  # a resend: dropped
    send("c-1", "other text", _png(1))  # conflicts with a pair in the open buffer
    send("c-2", "first 2", _png(200))  # same text, other image
    producer.flush()
    run = lambda: _worker(  # noqa: E731
        kafka, redis_server, tmp_path, topic, "ingest-c", chunk_size=100, chunk_max_wait_s=1
    ).run(burst=True, idle_s=3)
    first = run()
    assert (first["valid"], first["duplicates"], first["dead_letters"]) == (5, 1, 2)
    assert first["dlq:id_conflict"] == 2
    send("c-3", "first 3", _png(3))  # recorded in Redis by now: a resend
    send("c-4", "a new pair, reusing an id", _png(4))  # recorded in Redis: a conflict
    send("c-5", "new", _png(5))
    producer.flush()
    second = run()
    assert (second["valid"], second["duplicates"], second["dead_letters"]) == (1, 1, 1)

    chunks = [read_chunk(p) for p in sorted((tmp_path / "chunks").iterdir())]
    texts = {s.meta["id"]: s.text for c in chunks for s in c}
    assert sum(len(c) for c in chunks) == len(texts) == 6
    assert texts == {**{f"c-{i}": f"first {i}" for i in range(5)}, "c-5": "new"}  # the first ones kept
    dead = _dlq(kafka, topic, 3)
    assert [dict(r.headers)["ctp-error"] for r in dead] == [b"id_conflict"] * 3
    assert all(b"dedup window" in dict(r.headers)["ctp-reason"] for r in dead)
    assert [json.loads(r.value)["id"] for r in dead] == ["c-1", "c-2", "c-4"]


def test_a_resend_older_than_the_dedup_window_is_a_new_pair(kafka, redis_server, tmp_path):
    """Window 2 s: a pair resent after it is chunked again (documented: trained again)."""
    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 1, f"{topic}.dlq": 1})
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")

    def send():
        for i in range(5):
            producer.send(topic, encode_message(id=f"r-{i}", text=f"resent {i}", image=_png(i)))
        producer.flush()

    def run():
        queue = ChunkQueue(redis_server.client(), dedup_window_s=2.0)
        w = _worker(kafka, redis_server, tmp_path, topic, "ingest-w", queue=queue, chunk_size=100)
        return w.run(burst=True, idle_s=2)

    send()
    send()  # within the window (the same poll even): dropped
    first = run()
    assert (first["valid"], first["duplicates"], first["chunks"]) == (5, 5, 1)
    time.sleep(2.0 + 0.25 + 0.3)  # window + one bucket
    send()
    second = run()
    assert (second["valid"], second["duplicates"], second["chunks"]) == (5, 0, 1)
    chunks = [read_chunk(p) for p in sorted((tmp_path / "chunks").iterdir())]
    assert [sorted(s.meta["id"] for s in c) for c in chunks] == [[f"r-{i}" for i in range(5)]] * 2


def test_offsets_in_redis_win_over_kafka_commits(kafka, redis_server, tmp_path):
    """A crash between recording a chunk and committing to Kafka must not give a second chunk."""
    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 1})
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    for i in range(50):
        producer.send(topic, encode_message(id=f"p{i}", text=f"t {i}", image=_png(i)))
    producer.flush()
    w = _worker(kafka, redis_server, tmp_path, topic, "g1", chunk_size=20)
    w.consumer.commit = lambda *a, **k: None  # the commit never reaches Kafka (crash)
    assert w.run(burst=True, idle_s=3)["chunks"] == 3
    # a new worker in a new group starts from offset 0 in Kafka's view, but Redis says 50
    w2 = _worker(kafka, redis_server, tmp_path, topic, "g1", chunk_size=7)
    stats = w2.run(burst=True, idle_s=3)
    assert stats["chunks"] == 0 and stats["valid"] == 0


def test_produce_command_feeds_ingest(kafka, redis_server, tmp_path, monkeypatch, capsys):
    """`ctp produce --synthetic tiny` then `ctp ingest --burst`, both through the CLI and CTP_ env;
    bad lines refused by produce, then sent anyway and shown by `ctp status` as dead letters."""
    from service.cli import main

    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 2})
    monkeypatch.setenv("CTP_KAFKA_BOOTSTRAP", kafka.bootstrap)
    monkeypatch.setenv("CTP_TOPIC", topic)
    monkeypatch.setenv("CTP_DLQ_TOPIC", f"{topic}.dlq")
    monkeypatch.setenv("CTP_REDIS_URL", redis_server.url)
    monkeypatch.setenv("CTP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CTP_CHUNK_SIZE", "50")
    assert main(["produce", "--synthetic", "tiny", "--data-dir", str(tmp_path / "syn")]) == 0
    bad = tmp_path / "bad.jsonl"
    good = encode_message(id="good-1", text="a good pair", image=_png(3))
    bad.write_bytes(b'{"text": "no image"}\nnot json\n' + good + b"\n")
    capsys.readouterr()
    # checked with ingest's rules before sending: the two bad lines are refused and named
    assert main(["produce", "--jsonl", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "sent 1 of 3 messages" in out and "refused 2 that ingest would dead-letter" in out
    assert "line 1: schema: image: Field required" in out and "line 2: not_json:" in out
    assert main(["produce", "--jsonl", str(bad), "--no-validate", "--limit", "2"]) == 0  # sent as they are
    assert main(["ingest", "--burst"]) == 0
    queue = ChunkQueue(redis_server.client())
    ids = []
    while (task := queue.take("t", block_ms=50)) is not None:
        ids += [s.meta["id"] for s in read_chunk(task.path)]
        queue.ack(task)
    assert len(ids) == len(set(ids)) == 161  # the tiny stream (2 chunks of 80 pairs) and good-1
    assert len(_dlq(kafka, topic, 2)) == 2
    # ctp status shows what ingest refused: the count and the newest reasons
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    dl = json.loads(capsys.readouterr().out)["ingest"]["dead_letters"]
    assert dl["count"] == 2 and dl["fallback"] == 0 and dl["topic"] == f"{topic}.dlq"
    assert sorted(d["error"] for d in dl["last"]) == ["not_json", "schema"]
    assert all(d["source"].startswith(f"{topic}/") and d["reason"] for d in dl["last"])
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert f"dead letters: 2 on {topic}.dlq" in text and "not_json: value is not JSON" in text


def _hostile() -> dict[str, tuple[bytes, str]]:
    """name -> (value, code): what a producer can send that must not stop ingest."""
    import os

    return {
        "1.1 MB text": (encode_message(text="a" * 1_100_000, image=_png(1)), "text_too_long"),
        "2 MB meta": (
            encode_message(text="t", image=_png(2), meta={"pad": "x" * 2_000_000}),
            "meta_too_large",
        ),
        "deep nesting": (b"[" * 200_000 + b"]" * 200_000, "too_deep"),
        "huge integer": (
            b'{"text": "a", "image": "", "meta": {"n": ' + b"9" * 50_000 + b"}}",
            "number_too_large",
        ),
        "random bytes": (os.urandom(4096), "not_utf8"),
        "decompression bomb": (encode_message(text="bomb", image=bomb_png(30_000, 30_000)), "bad_image"),
        "truncated json": (encode_message(text="cut short", image=_png(3))[:40], "not_json"),
    }


@pytest.mark.parametrize(
    "mode",
    [
        "setting",  # CTP_DLQ_MAX_MESSAGE_BYTES lowered to 1 MB: the producer refuses the big ones at once
        "topic",  # the setting at 10 MB, the DLQ topic takes 1 MB: the broker refuses the big ones
        "fallback",  # the DLQ topic takes 20 kB: even the truncated sends fail, Redis keeps them
    ],
)
def test_poison_messages_never_stop_ingest(kafka, redis_server, tmp_path, mode):
    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 1})
    dlq_config = {"topic": "1048576", "fallback": "20000"}.get(mode)
    if dlq_config:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
        admin.create_topics(
            {
                f"{topic}.dlq": {
                    "num_partitions": 1,
                    "replication_factor": 1,
                    "configs": {"max.message.bytes": dlq_config},
                }
            },
            wait_for_metadata=True,
        )
        admin.close()
    else:
        ensure_topics(kafka.bootstrap, {f"{topic}.dlq": 1})
    hostile = _hostile()
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=5_000_000)
    bad_offsets: dict[int, tuple[str, int]] = {}  # offset -> (code, size)
    offset, n_valid = 0, 0
    for value, code in hostile.values():
        for _ in range(2):  # a valid pair on either side
            producer.send(
                topic, encode_message(id=f"v{n_valid}", text=f"pair {n_valid}", image=_png(n_valid))
            )
            n_valid, offset = n_valid + 1, offset + 1
        producer.send(topic, value)
        bad_offsets[offset] = (code, len(value))
        offset += 1
    producer.send(topic, encode_message(id=f"v{n_valid}", text="last", image=_png(99)))
    n_valid += 1
    producer.flush()

    kw = {"dlq_max_bytes": 1_000_000} if mode == "setting" else {}
    w = _worker(kafka, redis_server, tmp_path, topic, "g-poison", chunk_size=5, chunk_max_wait_s=2, **kw)
    stats = w.run(burst=True, idle_s=4)
    assert stats["valid"] == n_valid and stats["dead_letters"] == len(hostile)
    assert stats["dlq:internal"] == 0

    queue = ChunkQueue(redis_server.client())
    ids = []
    while (task := queue.take("t", block_ms=50)) is not None:
        ids += [s.meta["id"] for s in read_chunk(task.path)]
        queue.ack(task)
    assert sorted(ids) == sorted(f"v{i}" for i in range(n_valid))  # each valid pair in one chunk

    # every bad message once, in the DLQ or (only where the DLQ cannot take it) in Redis
    seen: dict[int, dict] = {}
    for rec in _dlq(kafka, topic, len(hostile)):
        h = dict(rec.headers)
        off = int(h["ctp-source"].decode().rsplit("/", 1)[1])
        assert h["ctp-source"].decode() == f"{topic}/0/{off}" and off not in seen
        seen[off] = {"code": h["ctp-error"].decode(), "truncated": "ctp-truncated" in h, "where": "dlq"}
        if "ctp-truncated" in h:
            assert int(h["ctp-original-bytes"]) == bad_offsets[off][1] and len(rec.value) <= 64 * 1024
        else:
            assert len(rec.value) == bad_offsets[off][1]
    from service.ingest import dlq_fallback_key

    for _, fields in redis_server.client().xrange(dlq_fallback_key(topic)):
        off = int(fields[b"offset"])
        assert off not in seen and fields[b"ctp-source"].decode() == f"{topic}/0/{off}"
        assert int(fields[b"original-bytes"]) == bad_offsets[off][1] and fields[b"send-error"]
        seen[off] = {"code": fields[b"ctp-error"].decode(), "truncated": False, "where": "redis"}
    assert {off: s["code"] for off, s in seen.items()} == {off: c for off, (c, _) in bad_offsets.items()}
    big = {off for off, (_, size) in bad_offsets.items() if size > 1_000_000}
    if mode in ("setting", "topic"):
        assert {off for off, s in seen.items() if s["truncated"]} == big
        assert all(s["where"] == "dlq" for s in seen.values())
    else:
        assert {off for off, s in seen.items() if s["where"] == "redis"} == {
            off for off, (_, size) in bad_offsets.items() if size > 20_000
        }

    # ingest's committed offset is past every message, the bad ones included
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id="g-poison", enable_auto_commit=False)
    from kafka import TopicPartition

    assert c.committed(TopicPartition(topic, 0)) == offset + 1
    c.close()
    assert w.stored_offset(0) == offset + 1
