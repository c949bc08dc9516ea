"""POST /ingest against a real Kafka broker: the pair reaches the topic and ingest chunks it."""

from __future__ import annotations

import uuid

import httpx

from ctp.data import read_chunk
from service.chunks import ChunkQueue, ChunkStore
from service.ingest import IngestWorker
from service.local.infra import ensure_topics
from service.messages import encode_message
from service.serve.api import create_app
from service.settings import load_settings
from tests.service.api_support import make_pairs, serving, trained_model, wait_for, write_checkpoint

KEY = "k-123"


def test_posted_pairs_land_on_the_topic_and_in_a_chunk(kafka, redis_server, tmp_path):
    topic = f"api-{uuid.uuid4().hex[:6]}"
    ensure_topics(kafka.bootstrap, {topic: 1})
    write_checkpoint(tmp_path / "ckpt" / "v000001", trained_model(), version=1)
    settings = load_settings(
        data_dir=tmp_path / "data",
        serve_checkpoint_dir=tmp_path / "ckpt",
        api_key=KEY,
        kafka_bootstrap=kafka.bootstrap,
        topic=topic,
    )
    pairs = make_pairs()[:3]
    with serving(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        answers = [
            client.post(
                "/ingest",
                content=encode_message(id=f"web-{i}", text=p.text, image=p.image, label=p.label),
                headers={"x-api-key": KEY},
            )
            for i, p in enumerate(pairs)
        ]
    assert [a.status_code for a in answers] == [202] * 3
    assert [a.json()["offset"] for a in answers] == [0, 1, 2] and answers[0].json()["id"] == "web-0"
    client_r = redis_server.client()
    worker = IngestWorker(
        bootstrap=kafka.bootstrap,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        group="api-test",
        redis_client=client_r,
        store=ChunkStore(tmp_path / "chunks"),
        queue=ChunkQueue(client_r),
        chunk_size=3,
    )
    assert worker.run(burst=True, idle_s=2)["chunks"] == 1
    task = ChunkQueue(client_r).take("t", block_ms=100)
    got = read_chunk(task.path)
    assert [s.meta["id"] for s in got] == ["web-0", "web-1", "web-2"]
    assert [s.image for s in got] == [p.image for p in pairs]
