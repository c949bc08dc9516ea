import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ctp.checkpoint import load_checkpoint
from ctp.continual import TrainConfig
from ctp.models import create_model
from ctp.synthetic import make_stream
from service.chunks import DEAD_CHUNKS, ChunkQueue
from service.redis_memory import RedisMemory
from service.registry import RECENT_CHUNK_IDS, Registry
from service.trainer import TrainerWorker

ROOT = Path(__file__).resolve().parents[2]


def _worker(client, root, *, registry=None, **kw):
    return TrainerWorker(
        queue=ChunkQueue(client),
        registry=registry or Registry(client, root=root),
        model="ctp-vit-micro-32",
        memory=RedisMemory(client=client, max_items=30, policy="class_balanced"),
        strategy=kw.pop("strategy", "incclip"),
        config=TrainConfig(epochs=1, batch_size=32, progress=False),
        **kw,
    )


def _queued(redis_server, tmp_path, chunks: int = 2):
    """The tiny synthetic stream; its first ``chunks`` chunks queued. -> (stream, client, queue)"""
    stream = make_stream(tmp_path / "stream", "tiny")
    client = redis_server.client()
    queue = ChunkQueue(client)
    for d in stream.chunks[:chunks]:
        queue.record_chunk(d.name, d, 80)
    return stream, client, queue


def test_chunks_become_versions(redis_server, tmp_path):
    stream, client, queue = _queued(redis_server, tmp_path)
    stats = _worker(client, tmp_path / "ckpt").run(burst=True, block_ms=50)
    assert stats.chunks == 2 and stats.last_version == 2
    reg = Registry(client, root=tmp_path / "ckpt")
    assert reg.latest().meta["chunk_ids"] == ["chunk_000", "chunk_001"]
    assert reg.latest().meta["train"]["pseudo"]["items"] == 30  # pseudo texts made for chunk 1
    assert queue.pending() == 0
    mem = RedisMemory(client=client, max_items=30)
    assert len(mem) == 30 and mem.sample(1, rng=random.Random(0))[0].chunk in (0, 1)


def test_a_chunk_published_but_not_acked_is_not_trained_again(redis_server, tmp_path):
    stream, client, queue = _queued(redis_server, tmp_path, chunks=1)
    w = _worker(client, tmp_path / "ckpt", consumer="w1")

    def crash(task):
        raise SystemExit("killed after publish, before the ack")

    w.queue.ack = crash
    with pytest.raises(SystemExit):
        w.run(burst=True, block_ms=50)
    # a new worker resumes from the checkpoint, claims the chunk, sees it trained, acks it
    w2 = _worker(client, tmp_path / "ckpt", consumer="w1")
    stats = w2.run(burst=True, block_ms=50)
    assert stats.skipped == 1 and stats.chunks == 0
    assert Registry(client, root=tmp_path / "ckpt").latest_version() == 1 and queue.pending() == 0


def test_eval_sets_are_measured_and_stored_with_each_version(redis_server, tmp_path):
    stream, client, queue = _queued(redis_server, tmp_path, chunks=1)
    _worker(
        client,
        tmp_path / "ckpt",
        eval_classification={"syn": stream.classification},
        eval_retrieval={"syn_ret": stream.retrieval},
    ).run(burst=True, block_ms=50)
    # a restarted worker continues the curves from the checkpoint's metadata
    queue.record_chunk("chunk_001", stream.chunks[1], 80)
    _worker(
        client,
        tmp_path / "ckpt",
        eval_classification={"syn": stream.classification},
        eval_retrieval={"syn_ret": stream.retrieval},
    ).run(burst=True, block_ms=50)
    reg = Registry(client, root=tmp_path / "ckpt")
    v1, v2 = reg.history()
    assert set(v2.meta["metrics"]) == {"syn", "syn_ret"}
    assert 0 <= v2.meta["metrics"]["syn"]["acc1"] <= 1 and v2.meta["metrics"]["syn"]["forgetting"] is not None
    # each version carries its own row; the history holds every row once, in order
    history = reg.eval_history()
    assert [h["version"] for h in history] == [1, 2] and [h["chunk_id"] for h in history] == [
        "chunk_000",
        "chunk_001",
    ]
    assert [h["eval"] for h in history] == [v1.meta["eval"], v2.meta["eval"]]
    assert v2.meta["eval"]["syn"]["row"] and set(v2.meta["eval"]["syn"]["row"]) <= {"0", "1"}
    assert v2.meta["eval_state"]["chunks"] == 2  # the restarted worker went on from v1's state
    assert history[1]["metrics"] == v2.meta["metrics"]


def test_meta_stays_the_same_size_as_versions_pile_up(redis_server, tmp_path):
    """30 versions with two eval sets: the last meta.json is as big as the 2nd (the matrix and the
    lineage are in the eval history, not copied into every version)."""
    stream, client, queue = _queued(redis_server, tmp_path, chunks=0)
    n = 30
    for i in range(n):  # the tiny stream's chunks again and again, as new chunk ids
        queue.record_chunk(f"c{i:03d}", stream.chunks[i % len(stream.chunks)], 80)
    reg = Registry(client, root=tmp_path / "ckpt", keep=n)
    stats = _worker(
        client,
        tmp_path / "ckpt",
        registry=reg,
        eval_classification={"syn": stream.classification},
        eval_retrieval={"syn_ret": stream.retrieval},
    ).run(burst=True, block_ms=50)
    assert stats.chunks == n
    sizes = [(info.path / "meta.json").stat().st_size for info in reg.history()]
    hashes = [len(client.hget(f"ctp:registry:v:{v}", "meta")) for v in range(1, n + 1)]
    # ids and numbers vary by a few digits; the per-set cells stop at one per class group
    assert sizes[-1] - sizes[1] < 1500 and hashes[-1] - hashes[1] < 1500, (sizes, hashes)
    # past the newest RECENT_CHUNK_IDS ids, flat once every class is seen; every number counts
    # as one character (a loss or a KD weight of 0.0 or 0.7333333333333334 is the same field)
    rest = [
        len(
            re.sub(
                r"-?\d+(\.\d+)?(e-?\d+)?",
                "0",
                json.dumps({k: v for k, v in i.meta.items() if k != "chunk_ids"}),
            )
        )
        for i in reg.history()
    ]
    assert max(rest[len(stream.chunks) :]) - min(rest[len(stream.chunks) :]) < 20, rest
    history = reg.eval_history()
    assert [h["version"] for h in history] == list(range(1, n + 1))
    assert [h["chunk_id"] for h in history] == [f"c{i:03d}" for i in range(n)]  # the whole lineage
    assert [h["chunks"] for h in history] == list(range(1, n + 1))
    assert reg.latest().meta["chunk_ids"] == [f"c{i:03d}" for i in range(n)][-RECENT_CHUNK_IDS:]


def test_chunk_retention_keeps_the_newest_trained_dirs_but_not_for_joint(redis_server, tmp_path):
    stream, client, queue = _queued(redis_server, tmp_path, chunks=0)
    chunks = tmp_path / "chunks"
    for i in range(4):
        shutil.copytree(stream.chunks[i % len(stream.chunks)], chunks / f"c{i}")
        queue.record_chunk(f"c{i}", chunks / f"c{i}", 80)
    stats = _worker(client, tmp_path / "ckpt", chunk_retention=2).run(burst=True, block_ms=50)
    assert stats.chunks == 4 and sorted(p.name for p in chunks.iterdir()) == ["c2", "c3"]
    for i in range(4, 7):
        shutil.copytree(stream.chunks[i % len(stream.chunks)], chunks / f"c{i}")
        queue.record_chunk(f"c{i}", chunks / f"c{i}", 80)
    joint = _worker(client, tmp_path / "ckpt", chunk_retention=2, strategy="joint")
    assert joint.run(burst=True, block_ms=50).chunks == 3
    assert sorted(p.name for p in chunks.iterdir()) == ["c2", "c3", "c4", "c5", "c6"]  # joint keeps all


def test_a_bad_chunk_is_retried_then_set_aside_and_the_worker_goes_on(redis_server, tmp_path):
    stream, client, queue = _queued(redis_server, tmp_path, chunks=0)
    queue.record_chunk("chunk_gone", tmp_path / "no-such-chunk", 80)
    queue.record_chunk("chunk_000", stream.chunks[0], 80)
    stats = _worker(client, tmp_path / "ckpt", max_attempts=2).run(burst=True, block_ms=50)
    assert stats.failed == 2 and stats.dead == 1 and stats.chunks == 1
    assert b"no-such-chunk" in client.hget(DEAD_CHUNKS, "chunk_gone")
    assert queue.pending() == 0
    latest = Registry(client, root=tmp_path / "ckpt").latest()
    assert latest.meta["chunk_ids"] == ["chunk_000"]
    load_checkpoint(latest.path)  # loadable


@pytest.mark.timeout(600)
def test_trainer_under_torchrun_trains_each_chunk_once(redis_server, tmp_path):
    stream, client, queue = _queued(redis_server, tmp_path)
    env = {
        **os.environ,
        "CTP_REDIS_URL": redis_server.url,
        "CTP_DATA_DIR": str(tmp_path / "data"),
        "CTP_MODEL": "ctp-vit-micro-32",
        "CTP_EPOCHS": "1",
        "CTP_BATCH_SIZE": "16",
        "CTP_MEMORY_SIZE": "30",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "service.cli", "train", "--burst"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reg = Registry(client, root=tmp_path / "data" / "checkpoints")
    assert [v.version for v in reg.history()] == [1, 2]  # one version per chunk: rank 0 alone publishes
    assert reg.latest().meta["chunk_ids"] == ["chunk_000", "chunk_001"]
    assert queue.pending() == 0
    assert len(RedisMemory(client=client, max_items=30)) == 30  # admitted once, not once per rank


def test_one_trainer_at_a_time_a_standby_takes_over_from_the_latest_version(redis_server, tmp_path):
    stream, client, queue = _queued(redis_server, tmp_path, chunks=1)
    first = _worker(client, tmp_path / "ckpt", consumer="a", lease_s=2)
    second = _worker(client, tmp_path / "ckpt", consumer="b", lease_s=2)  # loaded before version 1 exists
    assert first.lease.acquire(threading.Event())  # the active trainer
    done = {}
    standby = threading.Thread(target=lambda: done.setdefault("stats", second.run(burst=True, block_ms=50)))
    standby.start()
    first.lease.release()
    first_stats = _worker(client, tmp_path / "ckpt", consumer="a", lease_s=2).run(burst=True, block_ms=50)
    standby.join(60)
    # whichever held the lease trained chunk 0; then chunk 1 goes to the other, on top of version 1
    queue.record_chunk("chunk_001", stream.chunks[1], 80)
    assert first_stats.chunks + done["stats"].chunks == 1
    third = _worker(client, tmp_path / "ckpt", consumer="c", lease_s=2).run(burst=True, block_ms=50)
    assert third.chunks == 1
    assert Registry(client, root=tmp_path / "ckpt").latest().meta["chunk_ids"] == ["chunk_000", "chunk_001"]


def test_a_publish_without_the_lease_is_refused_and_leaves_nothing(redis_server, tmp_path):
    from service.registry import FencedOut
    from service.trainer import TrainerLease

    client = redis_server.client()
    reg = Registry(client, root=tmp_path / "ckpt")
    model = create_model("ctp-vit-micro-32", seed=0).model
    lease = TrainerLease(client, "me", ttl_s=5)
    client.set(TrainerLease.KEY, "someone-else")
    with pytest.raises(FencedOut):
        reg.publish(model, {"chunks": 1}, fence=lease.fence)
    assert reg.latest() is None and not any((tmp_path / "ckpt").iterdir())
    client.delete(TrainerLease.KEY)
    assert lease.acquire(threading.Event())
    assert reg.publish(model, {"chunks": 1}, fence=lease.fence).version == 2  # version 1 was burnt
    lease.release()
    assert client.get(TrainerLease.KEY) is None


def test_epochs_follow_the_chunk_size():
    cfg = TrainConfig(epochs=8, full_chunk_pairs=200)
    assert [cfg.epochs_for(n) for n in (400, 200, 100, 26, 2)] == [8, 8, 4, 1, 1]
    assert TrainConfig(epochs=8).epochs_for(2) == 8  # 0: every chunk gets the full epochs


def test_a_small_partial_chunk_is_not_trained_for_the_full_epochs(redis_server, tmp_path):
    """A 4-pair chunk after a full 80-pair one: one epoch (one step), not the four a full chunk gets."""
    from ctp.data import read_chunk
    from tests.service.api_support import write_chunk

    stream, client, queue = _queued(redis_server, tmp_path, chunks=1)
    small = write_chunk(tmp_path / "chunks", "p0-80-83", read_chunk(stream.chunks[1])[:4])
    queue.record_chunk("p0-80-83", small, 4)
    w = TrainerWorker(
        queue=ChunkQueue(client),
        registry=Registry(client, root=tmp_path / "ckpt"),
        model="ctp-vit-micro-32",
        memory=RedisMemory(client=client, max_items=30, policy="class_balanced"),
        strategy="er",
        config=TrainConfig(epochs=4, batch_size=32, progress=False, full_chunk_pairs=80),
    )
    assert w.run(burst=True, block_ms=50).chunks == 2
    reg = Registry(client, root=tmp_path / "ckpt")
    full, partial = (reg.get(v).meta["train"] for v in (1, 2))
    assert full["epochs"] == 4 and full["train"]["steps"] >= 4
    assert partial["epochs"] == 1 and partial["train"]["steps"] == 1


def test_status_shows_the_trainers_recorded_settings_not_its_own(redis_server, tmp_path):
    from service import effective
    from service.settings import load_settings
    from service.status import collect_status, format_status

    client = redis_server.client()
    mine = load_settings(redis_url=redis_server.url, data_dir=tmp_path)
    assert (
        collect_status(mine, kafka=False)["memory"]["capacity"] == mine.memory_size == 2000
    )  # nothing recorded
    trainer = load_settings(memory_size=400, epochs=8, chunk_size=200, data_dir=tmp_path)
    effective.record(client, "trainer", trainer, consumer="trainer-x")
    effective.record(client, "ingest", trainer)
    s = collect_status(mine, kafka=False)
    assert s["memory"]["capacity"] == 400 and s["memory"]["capacity_from"] == "trainer"
    assert s["settings"]["trainer"]["epochs"] == 8 and s["settings"]["trainer"]["consumer"] == "trainer-x"
    assert s["settings"]["ingest"]["chunk_size"] == 200
    text = format_status(s)
    assert "memory: 0 of 400 pairs" in text and "epochs=8" in text and "chunk_size=200" in text
