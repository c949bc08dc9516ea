import os
import time

import pytest

from ctp.data import Sample, read_chunk
from service.chunks import ChunkQueue, ChunkStore, chunk_id_for


def samples(n, tag="a"):
    return [
        Sample(key=f"{tag}{i}", image=b"\x89PNG fake %d" % i, text=f"text {i}", label="x") for i in range(n)
    ]


def test_chunk_id_is_deterministic():
    assert chunk_id_for({1: (5, 9), 0: (10, 20)}) == "p0-10-20_p1-5-9"
    with pytest.raises(ValueError):
        chunk_id_for({})


def test_store_writes_whole_chunks_once(tmp_path):
    store = ChunkStore(tmp_path)
    p = store.write("p0-0-9", samples(10))
    assert [s.key for s in read_chunk(store.path("p0-0-9"))] == [f"a{i}" for i in range(10)]
    mtime = os.stat(p).st_mtime_ns
    assert store.write("p0-0-9", samples(10, tag="b")) == p  # replay after a crash: kept as is
    assert os.stat(p).st_mtime_ns == mtime and read_chunk(store.path("p0-0-9"))[0].key == "a0"
    (tmp_path / ".p0-10-19.abc").mkdir()  # a crash mid-write leaves only a hidden temp dir
    assert not store.exists("p0-10-19")
    assert store.remove_partial() == 0  # fresh: maybe another worker is writing it
    old = time.time() - 7200
    os.utime(tmp_path / ".p0-10-19.abc", (old, old))
    assert store.remove_partial() == 1 and not (tmp_path / ".p0-10-19.abc").exists()


def test_queue_enqueue_is_idempotent_and_acks(redis_server):
    q = ChunkQueue(redis_server.client())
    assert q.record_chunk("p0-0-9", "/d/p0-0-9", 10) is not None
    assert q.record_chunk("p0-0-9", "/d/p0-0-9", 10) is None  # same chunk again: not queued twice
    q.record_chunk("p0-10-19", "/d/p0-10-19", 10)
    assert q.pending() == 2
    t = q.take("w1", block_ms=10)
    assert t.chunk_id == "p0-0-9" and t.pairs == 10 and t.deliveries == 1
    q.ack(t)
    t2 = q.take("w1", block_ms=10)
    assert t2.chunk_id == "p0-10-19"
    q.ack(t2)
    assert q.take("w1", block_ms=10) is None and q.pending() == 0


def test_a_dead_workers_chunk_is_claimed_again(redis_server):
    q = ChunkQueue(redis_server.client())
    q.record_chunk("p0-0-9", "/d", 10)
    t = q.take("dead-worker", block_ms=10)  # never acked
    assert q.take("w2", block_ms=10, min_idle_ms=60_000) is None  # not idle long enough yet
    again = q.take("w2", block_ms=10, min_idle_ms=0)
    assert again.chunk_id == t.chunk_id and again.deliveries >= 2
    q.ack(again)
    assert q.pending() == 0


def test_a_restarted_worker_resumes_its_own_pending_chunk(redis_server):
    q = ChunkQueue(redis_server.client())
    q.record_chunk("p0-0-9", "/d", 10)
    first = q.take("w1", block_ms=10)
    again = q.take("w1", block_ms=10)  # same consumer name after a restart
    assert again.chunk_id == first.chunk_id
