import random

import pytest

from ctp.continual import TrainConfig
from ctp.synthetic import make_stream
from service.chunks import ChunkQueue
from service.redis_memory import RedisMemory
from service.registry import Registry
from service.trainer import TrainerWorker


def _worker(client, root, **kw):
    return TrainerWorker(queue=ChunkQueue(client), registry=Registry(client, root=root), model="ctp-vit-micro-32",
                         memory=RedisMemory(client=client, max_items=30, policy="class_balanced"),
                         strategy="incclip", config=TrainConfig(epochs=1, batch_size=32, progress=False), **kw)


def test_chunks_become_versions(redis_server, tmp_path):
    stream = make_stream(tmp_path / "stream", "tiny")
    client = redis_server.client()
    queue = ChunkQueue(client)
    for d in stream.chunks:
        queue.enqueue(d.name, d, 80)
    stats = _worker(client, tmp_path / "ckpt").run(burst=True, block_ms=50)
    assert stats.chunks == 2 and stats.last_version == 2
    reg = Registry(client, root=tmp_path / "ckpt")
    assert reg.latest().meta["chunk_ids"] == ["chunk_000", "chunk_001"]
    assert reg.latest().meta["train"]["pseudo"]["items"] == 30  # pseudo texts made for chunk 1
    assert queue.pending() == 0
    mem = RedisMemory(client=client, max_items=30)
    assert len(mem) == 30 and mem.sample(1, rng=random.Random(0))[0].chunk in (0, 1)


def test_a_chunk_published_but_not_acked_is_not_trained_again(redis_server, tmp_path):
    stream = make_stream(tmp_path / "stream", "tiny")
    client = redis_server.client()
    queue = ChunkQueue(client)
    queue.enqueue("chunk_000", stream.chunks[0], 80)
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
