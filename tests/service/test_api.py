"""The serving API through a real uvicorn server: answers, errors, auth, readiness, gallery, swaps
from a checkpoint directory."""

from __future__ import annotations

import base64
import threading

import httpx
import pytest

from service.serve.api import create_app
from service.settings import load_settings
from tests.service.api_support import (
    CLASSES,
    make_pairs,
    serving,
    trained_model,
    wait_for,
    write_checkpoint,
    write_chunk,
)

KEY = "s3cret-key"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def pairs():
    return make_pairs()


@pytest.fixture(scope="module")
def server(tmp_path_factory, pairs):
    """Checkpoint-dir mode (no Redis): version 1 of the trained model, its pairs as the gallery."""
    root = tmp_path_factory.mktemp("api")
    write_checkpoint(root / "ckpt" / "v000001", trained_model(), version=1)
    write_chunk(root / "data" / "chunks", "chunk_000", pairs)
    settings = load_settings(
        data_dir=root / "data",
        serve_checkpoint_dir=root / "ckpt",
        watch_interval_s=0.1,
        api_key=KEY,
        max_body_bytes=200_000,
        max_labels=8,
        max_image_pixels=64 * 64,
        kafka_bootstrap="127.0.0.1:1",
        max_k=20,
    )
    app = create_app(settings)
    with serving(app) as srv:
        srv.app, srv.root = app, root
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200)
            srv.client = client
            yield srv


@pytest.fixture
def client(server) -> httpx.Client:
    return server.client


def test_classify_ranks_the_true_label_first_for_training_images(client, pairs):
    right = 0
    for p in pairs:
        r = client.post("/classify", json={"image": b64(p.image), "labels": CLASSES, "templates": ["a {c}"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "1"
        scores = [x["score"] for x in body["predictions"]]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
        assert sorted(x["label"] for x in body["predictions"]) == sorted(CLASSES)
        right += body["predictions"][0]["label"] == p.label
    assert right / len(pairs) >= 0.95


def test_classify_multipart_default_template_and_top_k(client, pairs):
    p = pairs[0]
    r = client.post(
        "/classify",
        files={"file": ("x.png", p.image, "image/png")},
        data={"labels": CLASSES, "templates": ["a {c}"], "top_k": "2"},
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and preds[0]["label"] == p.label
    as_json = client.post(
        "/classify", json={"image": b64(p.image), "labels": CLASSES, "templates": ["a {c}"], "top_k": 2}
    ).json()["predictions"]
    assert [x["label"] for x in as_json] == [x["label"] for x in preds]
    assert as_json[0]["score"] == pytest.approx(preds[0]["score"], abs=1e-5)
    # curl -F labels=a,b,c: one field of comma-separated labels
    one_field = client.post(
        "/classify",
        files={"file": ("x.png", p.image, "image/png")},
        data={"labels": ",".join(CLASSES), "templates": ["a {c}"]},
    ).json()["predictions"]
    assert sorted(x["label"] for x in one_field) == sorted(CLASSES) and one_field[0]["label"] == p.label


def test_retrieve_text_finds_images_of_the_class_and_image_finds_its_caption(client, pairs):
    for shape in CLASSES:
        r = client.post("/retrieve", json={"text": f"a {shape}", "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "1" and body["gallery_size"] == len(pairs)
        assert [x["text"] for x in body["results"]] == [f"a {shape}"] * 5
        scores = [x["score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True)
    p = pairs[3]
    r = client.post("/retrieve", json={"image": b64(p.image), "k": 3}).json()
    assert r["results"][0]["text"] == f"a {p.label}"
    assert {x["id"] for x in r["results"]} <= {q.key for q in pairs}


def test_model_health_and_metrics(client):
    info = client.get("/model").json()
    assert (
        info["model_version"] == "1"
        and info["model"] == "ctp-vit-micro-32"
        and info["strategy"] == "finetune"
    )
    assert info["index"] == "exact" and info["versions"][0]["version"] == "1"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": "1"}
    text = client.get("/metrics").text
    for name in (
        "ctp_requests_total",
        "ctp_request_seconds_bucket",
        "ctp_batch_size_bucket",
        "ctp_queue_depth",
        "ctp_swaps_total",
        "ctp_swap_seconds_bucket",
        "ctp_gallery_items",
    ):
        assert name in text
    assert "ctp_model_version 1.0" in text
    assert 'ctp_requests_total{endpoint="/classify",status="200"}' in text


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "reason"} and body["reason"]
    if code is not None:
        assert body["error"] == code
    return body


@pytest.mark.parametrize(
    "payload,code",
    [
        ({"image": "not base64!", "labels": ["a"]}, "bad_base64"),
        ({"image": b64(b"\x89PNG\r\n\x1a\n garbage"), "labels": ["a"]}, "bad_image"),
        ({"image": "", "labels": ["a"]}, "bad_image"),
        ({"labels": ["a"]}, "invalid_request"),
        ({"image": "AAAA", "labels": []}, "invalid_request"),
        ({"image": "AAAA", "labels": ["a", "a"]}, "duplicate_labels"),
        ({"image": "AAAA", "labels": [" "]}, "empty_labels"),
        ({"image": "AAAA", "labels": [str(i) for i in range(9)]}, "too_many_labels"),
        ({"image": "AAAA", "labels": ["a"], "templates": ["no placeholder"]}, "bad_template"),
        ({"image": "AAAA", "labels": ["a"], "top_k": 0}, "invalid_request"),
        ({"image": "AAAA", "labels": ["a"], "extra": 1}, "invalid_request"),
    ],
)
def test_classify_invalid_input_is_422(client, payload, code):
    _error(client.post("/classify", json=payload), 422, code)


def test_classify_too_many_pixels_is_422(client):
    from PIL import Image

    from ctp.images import encode_image

    big = encode_image(Image.new("RGB", (65, 64)), "png")  # 4160 pixels > 64*64
    body = _error(client.post("/classify", json={"image": b64(big), "labels": ["a"]}), 422, "bad_image")
    assert "pixels" in body["reason"]


def test_other_errors(client):
    _error(client.post("/classify", content=b"x", headers={"content-type": "text/plain"}), 415)
    _error(client.post("/classify", content=b"{not json", headers={"content-type": "application/json"}), 422)
    _error(client.post("/classify", files={"labels": (None, "a")}), 422, "missing_file")
    _error(client.post("/retrieve", json={"k": 3}), 422, "one_query")
    _error(client.post("/retrieve", json={"text": "a", "image": "AAAA"}), 422, "one_query")
    _error(client.post("/retrieve", json={"text": "a", "k": 21}), 422, "k_too_large")
    _error(client.get("/nowhere"), 404)
    _error(client.get("/classify"), 405)


def test_oversized_body_is_413_before_it_is_read(client, server):
    _error(
        client.post("/classify", content=b"x" * 200_001, headers={"content-type": "application/json"}),
        413,
        "too_large",
    )

    sent = []

    def body():  # chunked (no Content-Length): refused once the count passes the limit
        for _ in range(100):
            sent.append(1)
            yield b"y" * 10_000

    _error(client.post("/classify", content=body(), headers={"content-type": "application/json"}), 413)
    # a Content-Length over the limit is answered without the body (raw socket: no client buffering)
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(4096):  # the server closes after the answer
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"too_large" in reply


def test_ingest_needs_the_key(client, pairs):
    from service.messages import encode_message

    msg = encode_message(text="a circle", image=pairs[0].image, id="x1")
    _error(client.post("/ingest", content=msg), 401, "missing_api_key")
    _error(client.post("/ingest", content=msg, headers={"x-api-key": "wrong"}), 403, "wrong_api_key")
    _error(client.post("/ingest", content=b'{"text": "a"}', headers={"x-api-key": KEY}), 422, "schema")
    # valid, but Kafka (port 1) is not there: 503 with Retry-After, not a 500
    r = client.post("/ingest", content=msg, headers={"x-api-key": KEY})
    _error(r, 503, "kafka_unavailable")
    assert r.headers["retry-after"] == "5"


def test_full_queue_is_503_with_retry_after(server, pairs):
    """Hold the forward thread; the queue (cut to 2 here) fills, and requests past it get 503."""
    ctx = server.app.state.ctx
    body = {"image": b64(pairs[0].image), "labels": CLASSES}
    server.client.post("/classify", json=body).raise_for_status()  # label embeddings cached: 1 job a request
    gate = threading.Event()
    statuses = []

    def one():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/classify", json=body)
            statuses.append((r.status_code, r.headers.get("retry-after")))

    old_size, old_batch = ctx.batcher._queue._maxsize, ctx.batcher.max_batch_size
    ctx.batcher._executor.submit(gate.wait)  # the next forward waits behind this
    ctx.batcher._queue._maxsize = 2
    ctx.batcher.max_batch_size = 1  # the worker takes exactly one job into the blocked forward
    threads = [threading.Thread(target=one) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(statuses) >= 5, timeout=30)  # 1 taken by the worker + 2 queued wait; 5 refused
    finally:
        gate.set()
        for t in threads:
            t.join(30)
        ctx.batcher._queue._maxsize, ctx.batcher.max_batch_size = old_size, old_batch
    assert sorted(s for s, _ in statuses) == [200] * 3 + [503] * 5
    assert all(ra == "1" for s, ra in statuses if s == 503)


def test_gallery_grows_when_a_chunk_lands(client, server):
    extra = make_pairs(per_class=2, seed=7)
    write_chunk(server.root / "data" / "chunks", "chunk_001", extra)
    wait_for(
        lambda: client.post("/retrieve", json={"text": "a star"}).json()["gallery_size"] == 48 + len(extra)
    )
    assert client.get("/model").json()["model_version"] == "1"


def test_directory_mode_swaps_and_refuses_a_corrupt_checkpoint(client, server):
    ckpt = server.root / "ckpt"
    bad = ckpt / "v000002"
    write_checkpoint(bad, trained_model(), version=2)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)  # corrupt weights
    wait_for(lambda: server.app.state.ctx.holder.stats.failures == 1)
    assert client.get("/readyz").json()["model_version"] == "1"
    assert client.get("/model").json()["failed_versions"] == ["2"]
    write_checkpoint(ckpt / "v000003", trained_model(logit_scale=20.0), version=3)
    wait_for(lambda: client.get("/readyz").json()["model_version"] == "3")
    metrics = client.get("/metrics").text
    assert "ctp_swap_failures_total 1.0" in metrics and "ctp_swaps_total 2.0" in metrics


def test_not_ready_until_a_model_loads_and_cors_off_by_default(tmp_path):
    settings = load_settings(
        data_dir=tmp_path / "data", serve_checkpoint_dir=tmp_path / "none", watch_interval_s=0.1
    )
    with serving(create_app(settings)) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/readyz")
        _error(r, 503, "not_ready")
        assert r.headers["retry-after"] == "5"
        _error(c.post("/classify", json={"image": "AAAA", "labels": ["a"]}), 503, "not_ready")
        assert c.get("/healthz").status_code == 200
        r = c.get("/healthz", headers={"origin": "http://example.com"})
        assert "access-control-allow-origin" not in r.headers


def test_cors_when_enabled(tmp_path):
    settings = load_settings(
        data_dir=tmp_path, serve_checkpoint_dir=tmp_path, cors_origins=["http://ok.example"]
    )
    with serving(create_app(settings)) as srv, httpx.Client(base_url=srv.url) as c:
        assert (
            c.get("/healthz", headers={"origin": "http://ok.example"}).headers["access-control-allow-origin"]
            == "http://ok.example"
        )
        assert (
            "access-control-allow-origin" not in c.get("/healthz", headers={"origin": "http://evil"}).headers
        )
