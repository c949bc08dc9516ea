import hashlib
import os
import time

import pytest

from ctp.data import Sample, read_chunk
from service.chunks import (
    DEAD_CHUNKS,
    DEAD_ORDER,
    DEDUP_BUCKETS,
    TRAINED,
    ChunkQueue,
    ChunkStore,
    IngestProgress,
    chunk_id_for,
    ids_key,
    pairs_key,
)


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


# ---- bounded state: dedup window, stream trimming, markers, dead chunks, chunk retention -----------


def _progress(ids, *, offset=0, topic="t"):
    digests = [hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids]  # as ingest's are
    return IngestProgress(topic, 0, offset, ids, digests)


def _dedup_keys(r, topic="t"):
    return sorted(k.decode() for k in r.scan_iter(f"{pairs_key(topic)}:*"))


def test_a_resend_is_dropped_within_the_window_and_accepted_after_it(redis_server):
    r = redis_server.client()
    q = ChunkQueue(r, dedup_window_s=2.0)  # 8 buckets of 250 ms
    digests = [b"\x01" * 8, b"\x02" * 8, b"\x03" * 8]
    q.record_chunk("p0-0-2", "/d", 3, progress=IngestProgress("t", 0, 3, ["a", "b", "c"], digests))
    assert q.seen("t", ["a", "x", "c"]) == [digests[0], None, digests[2]]  # each id's content digest
    assert q.seen("other-topic", ["a"]) == [None]
    time.sleep(1.0)
    assert q.seen("t", ["a", "b"]) == digests[:2]  # half the window later: still a resend
    time.sleep(1.0 + 0.25 + 0.1)  # past the window plus one bucket
    assert q.seen("t", ["a", "b", "c"]) == [None, None, None]  # a new pair now
    assert _dedup_keys(r) == []  # the bucket expired with its ids


def test_the_set_of_earlier_releases_is_read_and_expires(redis_server):
    r = redis_server.client()
    r.sadd(ids_key("t"), "old-id")  # an unbounded set left by an earlier release
    q = ChunkQueue(r, dedup_window_s=1.0)
    now_bucket = int(r.time()[0] * 1000 // q.bucket_ms)
    r.sadd(f"{ids_key('t')}:{now_bucket}", "bucketed-id")  # and a set bucket of the last release
    assert q.seen("t", ["old-id", "bucketed-id", "new"]) == [b"", b"", None]  # seen, content unknown
    q.record_chunk("p0-0-0", "/d", 1, progress=_progress(["new"], offset=1))
    assert 0 < r.pttl(ids_key("t")) <= 1000  # given the window as its TTL
    time.sleep(1.4)
    assert not r.exists(ids_key("t")) and q.seen("t", ["old-id", "new"]) == [None, None]


def test_dedup_state_stays_bounded_as_pairs_pass(redis_server):
    """12,000 ids over ~3 s through a 0.5 s window: the buckets and their ids stay those of the
    last window, and Redis's memory stops growing with the ids passed."""
    r = redis_server.client()
    q = ChunkQueue(r, dedup_window_s=0.5)  # buckets of 63 ms
    bucket_ms = q.bucket_ms
    per_round, rounds, offset = 400, 30, 0
    live, used = [], []
    for k in range(rounds):
        ids = [f"pair-{k}-{i}" for i in range(per_round)]
        offset += per_round
        q.record_chunk(
            f"p0-{offset - per_round}-{offset - 1}", "/d", per_round, progress=_progress(ids, offset=offset)
        )
        time.sleep(0.1)
        keys = _dedup_keys(r)
        live.append(sum(r.hlen(k) for k in keys))
        used.append(sum(r.memory_usage(k) or 0 for k in keys))
        assert len(keys) <= DEDUP_BUCKETS + 1
        ttls = [r.pttl(k) for k in keys]  # -2: expired since the scan, 0: expiring this ms
        assert all(t == -2 or 0 <= t <= (DEDUP_BUCKETS + 1) * bucket_ms for t in ttls), ttls
    # 100 ms between rounds, a window of 500 + 63 ms: at most 6 rounds' ids are live
    assert max(live) <= 6 * per_round < rounds * per_round
    assert max(used[10:]) < 2 * max(used[:10])  # flat after the first window
    markers = len(list(r.scan_iter(f"{q.stream}:enqueued:*")))  # one per chunk until acked
    assert markers == rounds and r.dbsize() - markers <= DEDUP_BUCKETS + 3  # + offsets, stream


def test_acked_entries_are_trimmed_and_unacked_ones_kept(redis_server):
    r = redis_server.client()
    q = ChunkQueue(r, keep_acked=3, marker_ttl_s=0.5)
    for i in range(20):
        q.record_chunk(f"c{i}", f"/d/c{i}", 1)
        q.ack(q.take("w", block_ms=10))
    assert r.xlen(q.stream) == 3 and q.pending() == 0 and q.enqueued() == 20
    assert [f[b"chunk_id"] for _, f in r.xrange(q.stream)] == [b"c17", b"c18", b"c19"]
    assert q.record_chunk("c19", "/d/c19", 1) is None  # marker still there: not queued twice
    for i in range(20, 26):
        q.record_chunk(f"c{i}", f"/d/c{i}", 1)
    in_training = q.take("w", block_ms=10)  # c20: pending, never acked
    q.trim()
    assert in_training.chunk_id == "c20" and q.pending() == 6 and q.enqueued() == 26
    ids = [f[b"chunk_id"].decode() for _, f in r.xrange(q.stream)]
    assert ids[-6:] == [f"c{i}" for i in range(20, 26)]  # pending and undelivered all kept
    assert len(ids) <= 3 + 6
    time.sleep(0.7)
    markers = sorted(k.decode() for k in r.scan_iter(f"{q.stream}:enqueued:*"))
    assert markers == sorted(f"{q.stream}:enqueued:c{i}" for i in range(20, 26))  # acked ones expired
    q.ack(in_training)
    t = q.take("w", block_ms=10)
    assert t.chunk_id == "c21"  # the queue still works after trimming


def test_dead_chunks_are_capped_newest_kept(redis_server):
    r = redis_server.client()
    q = ChunkQueue(r, dead_max=3)
    for i in range(5):
        q.record_chunk(f"c{i}", f"/d/c{i}", 1)
        q.bury(q.take("w", block_ms=10), f"ValueError: bad {i}")
    dead = {k.decode(): v.decode() for k, v in r.hgetall(DEAD_CHUNKS).items()}
    assert dead == {f"c{i}": f"ValueError: bad {i}" for i in (2, 3, 4)}
    assert r.zcard(DEAD_ORDER) == 3 and q.pending() == 0


def test_retention_keeps_the_newest_trained_dirs_and_every_untrained_one(redis_server, tmp_path):
    r = redis_server.client()
    store, q = ChunkStore(tmp_path), ChunkQueue(r)
    for i in range(8):
        q.record_chunk(f"c{i}", store.write(f"c{i}", samples(2, tag=f"s{i}")), 2)
    tasks = [q.take(f"w{i}", block_ms=10) for i in range(7)]  # c7 never taken
    for t in tasks[:5]:
        q.ack(t)  # trained: c0..c4
    q.bury(tasks[5], "bad")  # c5 dead; c6 taken, in training
    assert q.retire_trained(2) == ["c0", "c1", "c2"]
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == ["c3", "c4", "c5", "c6", "c7"]  # 2 trained, the dead, the pending, the new
    q.ack(tasks[6])
    assert q.retire_trained(2) == ["c3"] and not store.exists("c3") and store.exists("c7")
    assert r.llen(TRAINED) == 2
    with pytest.raises(ValueError):
        q.retire_trained(0)
