"""Transient faults heal, only bad chunks die: real Redis (and Kafka for ingest), faults injected at
random points. Environment faults (disk full, Redis or Kafka away) pause and resume without spending
a chunk's tries; a corrupt chunk is set aside after its tries; restarts spend nothing."""

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaProducer

import ctp.checkpoint
import ctp.continual
from ctp.continual import TrainConfig
from ctp.data import Sample, read_chunk
from service.chunks import DEAD_CHUNKS, TRIES, ChunkQueue, ChunkStore
from service.health import Backoff, free_bytes, is_environment_fault, read_health
from service.ingest import IngestWorker
from service.local.infra import ensure_topics
from service.messages import encode_message
from service.redis_memory import RedisMemory
from service.registry import Registry
from service.trainer import TrainerLease, TrainerWorker
from tests.service.test_ingest import _png
from tests.service.test_trainer import ROOT, _queued

pytestmark = pytest.mark.timeout(120)
# Each randomised fault test runs 5 times in CI (fault point drawn anew each trial);
# CTP_FAULT_TRIALS=20 runs each 20 times (a soak).
trials = pytest.mark.parametrize("trial", range(int(os.environ.get("CTP_FAULT_TRIALS", "5"))))


def _trainer(client, root: Path, *, epochs: int = 1, **kw) -> TrainerWorker:
    kw.setdefault("backoff", Backoff(first=0.05, cap=0.2))
    return TrainerWorker(
        queue=ChunkQueue(client),
        registry=Registry(client, root=root),
        model="ctp-vit-micro-32",
        memory=RedisMemory(client=client, max_items=30, policy="class_balanced"),
        strategy="incclip",
        config=TrainConfig(epochs=epochs, batch_size=32, progress=False),
        **kw,
    )


def _count_training(monkeypatch, after=None) -> list[int]:
    """Count ``train_on_chunk`` calls (one per chunk trained from scratch); ``after`` runs after each."""
    calls: list[int] = []
    real = ctp.continual.train_on_chunk

    def counted(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        if after is not None:
            after()
        return out

    monkeypatch.setattr(ctp.continual, "train_on_chunk", counted)
    return calls


def _wait(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond():
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _pending(client, queue: ChunkQueue) -> int:
    try:
        return int(client.xpending(queue.stream, queue.group)["pending"])
    except Exception:  # no group yet
        return 0


def _in_thread(worker: TrainerWorker) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go():
        try:
            out["stats"] = worker.run(burst=True, block_ms=50)
        except BaseException as e:  # the test sees it
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_the_classifier_tells_environment_from_chunk_faults():
    import redis
    from kafka import errors as Errors

    def chained(outer: Exception, inner: Exception) -> Exception:
        try:
            raise outer from inner
        except Exception as e:
            return e

    env = [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        redis.ConnectionError("Connection refused"),
        redis.BusyLoadingError("LOADING"),
        redis.TimeoutError("timed out"),
        Errors.KafkaTimeoutError("no broker"),
        Errors.KafkaConnectionError("refused"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        chained(ValueError("shard x: unreadable tar"), OSError(errno.EIO, "Input/output error")),
    ]
    chunk = [
        ValueError("shard x: unreadable tar: bad header"),
        FileNotFoundError(errno.ENOENT, "no such chunk"),
        OSError("cannot identify image file"),
        KeyError("txt"),
        redis.ResponseError("WRONGTYPE"),
    ]
    assert [is_environment_fault(e) for e in env] == [True] * len(env)
    assert [is_environment_fault(e) for e in chunk] == [False] * len(chunk)
    b = Backoff(first=1, cap=8, jitter=0.25, rng=random.Random(0))
    delays = [b.next() for _ in range(6)]
    assert all(0.75 * c <= d <= c for d, c in zip(delays, [1, 2, 4, 8, 8, 8], strict=True))
    b.reset()
    assert b.next() <= 1


@trials
def test_a_full_disk_at_the_checkpoint_pauses_and_spends_no_try(trial, redis_server, tmp_path, monkeypatch):
    """The checkpoint write fails with ENOSPC 1-3 times: the trained model waits, the chunk is
    neither retrained nor set aside, the health record says why, and it is published once."""
    stream, client, queue = _queued(redis_server, tmp_path, chunks=1)
    fails = random.randint(1, 3)
    writes: list[int] = []
    real = ctp.checkpoint.save_checkpoint

    def full_disk(*a, **k):
        writes.append(1)
        if len(writes) <= fails:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ctp.checkpoint, "save_checkpoint", full_disk)
    trained = _count_training(monkeypatch)
    w = _trainer(client, tmp_path / "ckpt")
    seen: list[dict] = []
    real_paused = w.health.paused

    def paused(err, retry_in):
        real_paused(err, retry_in)
        seen.append({"health": read_health(client), "tries": queue.tries("chunk_000")})

    w.health.paused = paused
    stats = w.run(burst=True, block_ms=50)
    assert stats.chunks == 1 and stats.paused == fails and stats.failed == 0 and stats.dead == 0
    assert len(seen) == fails and all(s["tries"] == 0 for s in seen)
    record = seen[0]["health"]["trainer"]
    assert record["state"] == "paused" and "No space left" in record["reason"] and record["retry_in"] > 0
    assert len(trained) == 1  # the model trained once waited for the disk
    assert read_health(client) == {}  # cleared once it worked again
    assert client.hlen(DEAD_CHUNKS) == 0 and client.hlen(TRIES) == 0 and queue.pending() == 0
    reg = Registry(client, root=tmp_path / "ckpt")
    assert [v.meta["chunk_ids"] for v in reg.history()] == [["chunk_000"]]


@trials
def test_low_disk_is_seen_before_the_checkpoint_and_heals_when_freed(
    trial, redis_server, tmp_path, monkeypatch
):
    """``min_free_bytes`` above the disk's free space: paused with a status, nothing written; the
    threshold lowered (space freed): it trains on by itself."""
    stream, client, queue = _queued(redis_server, tmp_path, chunks=2)
    trained = _count_training(monkeypatch)
    w = _trainer(client, tmp_path / "ckpt", min_free_bytes=free_bytes(tmp_path) + 2**50)
    t, out = _in_thread(w)
    record = _wait(lambda: read_health(client).get("trainer"), what="the pause")
    time.sleep(random.uniform(0, 0.5))
    assert record["state"] == "paused" and "CTP_MIN_FREE_BYTES" in record["reason"]
    reg = Registry(client, root=tmp_path / "ckpt")
    assert reg.latest() is None and not any((tmp_path / "ckpt").glob("v*"))  # nothing written
    assert queue.tries("chunk_000") == 0 and client.hlen(DEAD_CHUNKS) == 0 and t.is_alive()
    w.min_free_bytes = 0  # space freed
    t.join(60)
    assert "error" not in out and out["stats"].chunks == 2 and out["stats"].dead == 0
    assert len(trained) == 2 and read_health(client) == {}
    assert reg.latest().meta["chunk_ids"] == ["chunk_000", "chunk_001"]


def _corrupt_chunk(tmp_path: Path, stream, how: str) -> Path:
    if how == "garbage tar":
        d = tmp_path / "bad" / "chunk_bad"
        d.mkdir(parents=True)
        (d / "000000.tar").write_bytes(os.urandom(4096))
        return d
    # a well-formed shard whose images do not decode
    good = read_chunk(stream.chunks[0])[:10]
    bad = [Sample(key=s.key, image=os.urandom(300), text=s.text, label=s.label, ext="png") for s in good]
    return ChunkStore(tmp_path / "bad").write("chunk_bad", bad)


@pytest.mark.parametrize("how", ["garbage tar", "undecodable images"])
def test_a_corrupt_chunk_dies_after_its_tries_and_the_rest_train(redis_server, tmp_path, how):
    stream, client, queue = _queued(redis_server, tmp_path, chunks=0)
    tries = random.randint(1, 3)
    queue.record_chunk("chunk_bad", _corrupt_chunk(tmp_path, stream, how), 10)
    queue.record_chunk("chunk_000", stream.chunks[0], 80)
    stats = _trainer(client, tmp_path / "ckpt", max_attempts=tries).run(burst=True, block_ms=50)
    assert stats.failed == tries and stats.dead == 1 and stats.chunks == 1 and stats.paused == 0
    reason = client.hget(DEAD_CHUNKS, "chunk_bad").decode()
    assert ("unreadable tar" in reason) if how == "garbage tar" else ("image" in reason.lower())
    assert client.hlen(TRIES) == 0 and queue.pending() == 0 and read_health(client) == {}
    assert Registry(client, root=tmp_path / "ckpt").latest().meta["chunk_ids"] == ["chunk_000"]


@trials
def test_a_trainer_killed_mid_chunk_spends_no_try_and_trains_it_once(trial, redis_server, tmp_path):
    """``ctp train`` killed (-9) at a random point of its first chunk, then started again under the
    same name: its pending chunk is re-read (Redis counts a second delivery), no try is spent, and
    the lineage has each chunk once."""
    stream, client, queue = _queued(redis_server, tmp_path, chunks=2)
    env = {
        **os.environ,
        "CTP_REDIS_URL": redis_server.url,
        "CTP_DATA_DIR": str(tmp_path / "data"),
        "CTP_MODEL": "ctp-vit-micro-32",
        "CTP_EPOCHS": "2000",  # a chunk outlasts the kill point (0-2 s after taking it), on any machine
        "CTP_BATCH_SIZE": "16",
        "CTP_MEMORY_SIZE": "30",
        "CTP_TRAINER_NAME": "trainer-x",
        "CTP_TRAINER_LEASE_S": "2",
        "CTP_CHUNK_MAX_TRIES": "1",  # one failure would set it aside: a restart must not count as one
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "train"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: _pending(client, queue), timeout=90, what="the first chunk taken")
        time.sleep(random.uniform(0, 2))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reg = Registry(client, root=tmp_path / "data" / "checkpoints")
    before = reg.latest_version()
    pending = client.xpending_range(queue.stream, queue.group, min="-", max="+", count=10)
    assert [p["consumer"] for p in pending] == [b"trainer-x"] and client.hlen(TRIES) == 0
    w = _trainer(client, tmp_path / "data" / "checkpoints", consumer="trainer-x", lease_s=2, max_attempts=1)
    stats = w.run(burst=True, block_ms=50)
    assert stats.failed == 0 and stats.dead == 0 and client.hlen(DEAD_CHUNKS) == 0
    assert stats.chunks + stats.skipped + (before or 0) >= 2
    lineage = reg.latest().meta["chunk_ids"]
    assert lineage == ["chunk_000", "chunk_001"]  # each once, in order
    grown = [len(v.meta["chunk_ids"]) for v in reg.history()]
    assert grown == sorted(set(grown))  # every version adds one chunk on top of the one before
    assert queue.pending() == 0 and client.hlen(TRIES) == 0


@trials
def test_the_lease_and_the_chunk_survive_a_redis_restart_within_the_ttl(
    trial, redis_server, tmp_path, monkeypatch
):
    """Redis stopped while a chunk trains and started again (same port, same AOF) within the lease's
    TTL: the lease is kept, the chunk in progress is finished (not trained again), one version."""
    stream, client, queue = _queued(redis_server, tmp_path, chunks=1)
    started, back = threading.Event(), threading.Event()
    trained = _count_training(monkeypatch, after=lambda: (started.set(), back.wait(60)))
    w = _trainer(client, tmp_path / "ckpt", lease_s=6)
    holder = w.lease.holder
    t, out = _in_thread(w)
    _wait(started.is_set, timeout=60, what="training to start")
    os.kill(redis_server.pid, signal.SIGTERM)  # AOF flushed; the lease key keeps its expiry time
    _wait(lambda: not redis_server.running, what="Redis to stop")
    time.sleep(random.uniform(0.5, 3.0))  # renewals fail meanwhile
    redis_server.start()
    assert client.get(TrainerLease.KEY).decode() == holder
    back.set()
    t.join(60)
    assert "error" not in out, out.get("error")
    stats = out["stats"]
    assert not stats.fenced and not w.lease.lost.is_set() and stats.chunks == 1 and len(trained) == 1
    reg = Registry(client, root=tmp_path / "ckpt")
    assert [v.version for v in reg.history()] == [1] and reg.latest().meta["chunk_ids"] == ["chunk_000"]
    assert client.hlen(TRIES) == 0 and client.hlen(DEAD_CHUNKS) == 0 and queue.pending() == 0


@trials
def test_redis_away_at_the_checkpoint_the_trained_model_waits(trial, redis_server, tmp_path, monkeypatch):
    """Redis stops right after the checkpoint files are written (before they are registered) and
    comes back a random moment later: the publish is retried, no retraining, one version."""
    stream, client, queue = _queued(redis_server, tmp_path, chunks=1)
    real = ctp.checkpoint.save_checkpoint
    gone = threading.Event()

    def then_redis_goes(*a, **k):
        path = real(*a, **k)
        if not gone.is_set():
            _stop_server(redis_server, signal.SIGTERM)
            gone.set()
        return path

    monkeypatch.setattr(ctp.checkpoint, "save_checkpoint", then_redis_goes)
    trained = _count_training(monkeypatch)
    t, out = _in_thread(_trainer(client, tmp_path / "ckpt"))
    _wait(gone.is_set, timeout=60, what="the checkpoint write")
    time.sleep(random.uniform(0.3, 1.5))
    redis_server.start()  # from this thread: the server dies with the thread that started it
    t.join(60)
    assert "error" not in out, out.get("error")
    stats = out["stats"]
    assert stats.chunks == 1 and stats.paused >= 1 and not stats.fenced and len(trained) == 1
    reg = Registry(client, root=tmp_path / "ckpt")
    assert [v.meta["chunk_ids"] for v in reg.history()] == [["chunk_000"]]
    assert client.hlen(TRIES) == 0 and client.hlen(DEAD_CHUNKS) == 0 and queue.pending() == 0


def test_a_role_started_before_redis_waits_for_it(redis_server):
    import redis

    from service.health import until_up

    client = redis_server.client()
    _stop_server(redis_server, signal.SIGTERM)
    out: dict = {}
    fast = Backoff(first=0.05, cap=0.2)
    t = threading.Thread(target=lambda: out.setdefault("ping", until_up(client.ping, what="t", backoff=fast)))
    t.start()
    time.sleep(random.uniform(0.3, 1.0))
    assert t.is_alive() and not out  # still waiting
    redis_server.start()
    t.join(10)
    assert out["ping"] is True
    with pytest.raises(redis.ResponseError):  # not the environment: raised at once
        until_up(lambda: client.execute_command("NO-SUCH-COMMAND"), what="t", backoff=fast)


@trials
def test_a_redis_outage_while_idle_pauses_and_resumes(trial, redis_server, tmp_path):
    """Redis goes away while the trainer waits for chunks: it pauses (no crash, health recorded
    once Redis answers) and, Redis back, trains the chunk queued then."""
    stream, client, queue = _queued(redis_server, tmp_path, chunks=0)
    w = _trainer(client, tmp_path / "ckpt", lease_s=6)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("stats", w.run(block_ms=50)), daemon=True)
    t.start()
    _wait(lambda: client.get(TrainerLease.KEY), what="the lease")
    time.sleep(random.uniform(0, 0.5))
    os.kill(redis_server.pid, signal.SIGTERM)
    _wait(lambda: not redis_server.running, what="Redis to stop")
    _wait(lambda: w.stats.paused >= 2, what="the trainer to pause")
    redis_server.start()
    queue.record_chunk("chunk_000", stream.chunks[0], 80)
    _wait(lambda: w.stats.chunks == 1, timeout=60, what="the chunk trained after Redis came back")
    w.stop()
    t.join(30)
    assert done["stats"].dead == 0 and not done["stats"].fenced and read_health(client) == {}
    assert Registry(client, root=tmp_path / "ckpt").latest().meta["chunk_ids"] == ["chunk_000"]


# ------------------------------------------------------------------------------------------- ingest


def _ingest(kafka, redis_server, tmp_path, topic: str, **kw) -> IngestWorker:
    client = redis_server.client()
    return IngestWorker(
        bootstrap=kafka.bootstrap,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        group=f"g-{topic}",
        redis_client=client,
        store=ChunkStore(tmp_path / "chunks"),
        queue=ChunkQueue(client),
        chunk_size=15,
        chunk_max_wait_s=1,
        session_timeout_ms=6000,
        backoff=Backoff(first=0.1, cap=1.0),
        **kw,
    )


def _produce(bootstrap: str, topic: str, ids: range, *, resend: int = 0) -> None:
    """Valid pairs with these ids over two partitions, a bad message every 25, ``resend`` ids again."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in ids:
        producer.send(topic, encode_message(id=f"pair-{i}", text=f"pair {i}", image=_png(i)), partition=i % 2)
        if i % 25 == 0:
            producer.send(topic, b"not json", partition=i % 2)
    for i in list(ids)[:resend]:
        producer.send(topic, encode_message(id=f"pair-{i}", text=f"pair {i}", image=_png(i)), partition=1)
    producer.flush()
    producer.close()


def _chunked_ids(client) -> list[str]:
    queue, ids = ChunkQueue(client), []
    while (task := queue.take("reader", block_ms=50)) is not None:
        ids += [s.meta["id"] for s in read_chunk(task.path)]
        queue.ack(task)
    return ids


def _ingest_in_thread(worker: IngestWorker) -> tuple[threading.Thread, dict]:
    """The worker running until stopped (not burst: a broker away means nothing arrives for a while)."""
    out: dict = {}

    def go():
        try:
            out["stats"] = worker.run()
        except BaseException as e:  # the test sees it
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def _stop_when_recorded(
    worker: IngestWorker, client, t: threading.Thread, n: int, timeout: float = 90
) -> None:
    """Wait until ``n`` pair ids are recorded with chunks (or the worker died), then stop it."""
    from service.chunks import pairs_key

    def recorded() -> int:  # ids live in the dedup window's time buckets (ChunkQueue)
        return sum(client.hlen(k) for k in client.scan_iter(f"{pairs_key(worker.topic)}:*"))

    _wait(lambda: recorded() >= n or not t.is_alive(), timeout, "every pair recorded")
    time.sleep(0.5)  # a duplicate chunk, were one to come, would be recorded by now
    worker.stop()
    t.join(30)


def _stop_server(server, sig: int) -> None:
    os.kill(server.pid, sig)
    _wait(lambda: not server.running, what=f"{server!r} to stop")


def _ingest_through_a_restart(kafka, redis_server, tmp_path, server, *, send_while_away: bool) -> dict:
    """150 pairs (10 of them resent) under ingest; ``server`` (Redis or the broker) killed (-9 or TERM,
    at random) after 1-4 chunks and started again on the same port and data a moment later; 100
    more pairs sent while it is away (``send_while_away``, then ingest must have paused) or once it
    is back. Ingest keeps running and every valid pair lands in exactly one chunk; its stats."""
    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 2, f"{topic}.dlq": 1})
    _produce(kafka.bootstrap, topic, range(0, 150), resend=10)
    client = redis_server.client()
    w = _ingest(kafka, redis_server, tmp_path, topic)
    t, out = _ingest_in_thread(w)
    after = random.randint(1, 4)
    _wait(lambda: client.exists("ctp:chunks") and client.xlen("ctp:chunks") >= after, what="chunks")
    _stop_server(server, random.choice([signal.SIGKILL, signal.SIGTERM]))
    if send_while_away:
        _produce(kafka.bootstrap, topic, range(150, 250))
        _wait(lambda: w.stats["paused"] >= 1, what="ingest to pause")
    time.sleep(random.uniform(0.2, 2.0))
    server.start()  # same port(s) and data
    if not send_while_away:
        _produce(kafka.bootstrap, topic, range(150, 250))
    _stop_when_recorded(w, client, t, 250)
    assert not t.is_alive() and "error" not in out, out.get("error")
    assert sorted(_chunked_ids(client)) == sorted(f"pair-{i}" for i in range(250))  # each in one chunk
    assert read_health(client) == {}
    return out["stats"]


@trials
def test_ingest_rides_out_a_redis_restart(trial, kafka, redis_server, tmp_path):
    """Redis away while pairs arrive: ingest pauses, then carries on from what Redis recorded."""
    stats = _ingest_through_a_restart(kafka, redis_server, tmp_path, redis_server, send_while_away=True)
    assert stats["paused"] >= 1


@trials
def test_ingest_rides_out_a_kafka_broker_restart(trial, kafka, redis_server, tmp_path):
    """The session's broker away: ingest reconnects and reads on from Redis's offsets."""
    _ingest_through_a_restart(kafka, redis_server, tmp_path, kafka, send_while_away=False)


@trials
def test_ingest_pauses_on_low_disk_and_resumes_when_freed(trial, kafka, redis_server, tmp_path):
    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 2, f"{topic}.dlq": 1})
    _produce(kafka.bootstrap, topic, range(0, 60))
    client = redis_server.client()
    w = _ingest(kafka, redis_server, tmp_path, topic, min_free_bytes=free_bytes(tmp_path) + 2**50)
    t, out = _ingest_in_thread(w)
    record = _wait(lambda: read_health(client).get("ingest"), what="the pause")
    assert record["state"] == "paused" and "CTP_MIN_FREE_BYTES" in record["reason"]
    assert not client.exists("ctp:chunks") and not any((tmp_path / "chunks").iterdir())
    time.sleep(random.uniform(0, 1))
    w.min_free_bytes = 0
    _stop_when_recorded(w, client, t, 60)
    assert "error" not in out, out.get("error")
    assert sorted(_chunked_ids(client)) == sorted(f"pair-{i}" for i in range(60))
    assert read_health(client) == {}


# ------------------------------------------------------------------------------------------- status


def test_status_names_the_store_that_failed_and_shows_disk_and_pauses(kafka, redis_server, tmp_path):
    """Redis stopped with Kafka up: ``ctp status`` and ``/status`` say ``errors.redis`` (never
    ``kafka``), and the error is gone within seconds of Redis answering again; a paused role and a
    low disk are shown."""
    from types import SimpleNamespace

    from service.health import Health
    from service.serve.dashboard import DashboardStatus, KafkaLag
    from service.settings import load_settings
    from service.status import collect_status, format_status, status_line

    topic = f"pairs-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 1, f"{topic}.dlq": 1})
    s = load_settings(
        redis_url=redis_server.url, kafka_bootstrap=kafka.bootstrap, topic=topic, data_dir=tmp_path
    )
    page = DashboardStatus(s, SimpleNamespace(source=None, snapshot=None), kafka=KafkaLag(s, every_s=0.1))
    _wait(lambda: "ingest" in page.gather(), what="the first lag")
    client = redis_server.client()
    Health(client, "trainer").paused(OSError(errno.ENOSPC, "No space left on device"), 2.0)
    ok = collect_status(s)
    assert ok["errors"] == {} and ok["health"]["trainer"]["state"] == "paused" and not ok["disk"]["low"]
    assert "trainer: PAUSED" in format_status(ok) and "No space left" in status_line(ok)

    _stop_server(redis_server, random.choice([signal.SIGKILL, signal.SIGTERM]))
    down = collect_status(s)
    assert set(down["errors"]) == {"redis"}  # the lag's Redis read failed too: still Redis's error
    seen = [page.gather()["errors"] for _ in range(3)]
    seen.append(_wait(lambda: (e := page.gather()["errors"]) and page.kafka.error_from() == "redis" and e))
    assert all(set(e) <= {"redis"} for e in seen) and "redis" in seen[-1]
    time.sleep(random.uniform(0, 1))
    redis_server.start()
    t0 = time.monotonic()
    _wait(lambda: (g := page.gather())["errors"] == {} and "ingest" in g, what="the errors to clear")
    assert time.monotonic() - t0 < 10
    assert collect_status(s)["errors"] == {}

    low = collect_status(load_settings(**{**s.model_dump(), "min_free_bytes": free_bytes(tmp_path) + 2**50}))
    assert low["disk"]["low"] and "LOW" in format_status(low) and "disk LOW" in status_line(low)
