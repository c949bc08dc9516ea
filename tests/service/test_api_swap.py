"""Hot-swap under load against a real redis-server: no failed request, every answer computed by
the version it names, and that version was the one served at some moment of its request."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import httpx
import torch
import torch.nn.functional as F

from ctp.models import create_model
from service.registry import Registry
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

CLIENTS = 32
SCALES = {1: 10.0, 2: 15.0, 3: 20.0, 6: 30.0}  # good versions: logit scale changes scores, not ranks


def _expected_top_scores(probes) -> dict[tuple[str, int], float]:
    """The top softmax score of each probe image under each good version, computed offline."""
    bundle = create_model("ctp-vit-micro-32")
    model = trained_model()
    from ctp.train import preprocess_images

    images = preprocess_images([p.image for p in probes], [p.key for p in probes], bundle.preprocess_val)
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(bundle.tokenizer([f"a {c}" for c in CLASSES])), dim=-1)
    return {
        (str(v), i): float((s * img[i] @ txt.T).softmax(-1).max())
        for v, s in SCALES.items()
        for i in range(len(probes))
    }


def _register_corrupt(reg: Registry) -> int:
    """A version whose weights file is damaged on disk, recorded exactly as ``Registry.publish`` does."""
    version = int(reg.r.incr(f"{reg.prefix}:next"))
    path = write_checkpoint(reg.root / f"v{version:06d}", trained_model(), version=version)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])  # truncated
    with reg.r.pipeline() as pipe:
        pipe.hset(
            reg._vkey(version),
            mapping={
                "path": str(path),
                "meta": json.dumps({"model": "ctp-vit-micro-32"}),
                "created": time.time(),
            },
        )
        pipe.zadd(f"{reg.prefix}:history", {str(version): version})
        pipe.set(f"{reg.prefix}:latest", version)
        pipe.publish(reg.channel, version)
        pipe.execute()
    return version


def test_hot_swap_under_load(redis_server, tmp_path):
    pairs = make_pairs()
    probes = [next(p for p in pairs if p.label == c) for c in CLASSES]
    expected = _expected_top_scores(probes)
    reg = Registry(redis_server.client(), root=tmp_path / "data" / "checkpoints")
    reg.publish(
        trained_model(logit_scale=SCALES[1]),
        {"model": "ctp-vit-micro-32", "strategy": "incclip", "chunks": 1},
    )
    write_chunk(tmp_path / "data" / "chunks", "chunk_000", pairs)  # re-embedded at every swap
    # polling every 30 s: swaps within the test's seconds come from the pub/sub wake-up
    settings = load_settings(data_dir=tmp_path / "data", redis_url=redis_server.url, watch_interval_s=30)
    app = create_app(settings)
    holder = app.state.ctx.holder
    results: list[tuple[str, str, int, dict | str, int]] = []
    stop = threading.Event()

    async def client(n: int, url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            i = n
            while not stop.is_set():
                i = (i + 1) % len(probes)
                before = holder.snapshot.version
                r = await c.post(
                    "/classify",
                    json={
                        "image": base64.b64encode(probes[i].image).decode(),
                        "labels": CLASSES,
                        "templates": ["a {c}"],
                    },
                )
                after = holder.snapshot.version
                results.append(
                    (before, after, r.status_code, r.json() if r.status_code == 200 else r.text, i)
                )

    async def load(url: str) -> None:
        await asyncio.gather(*(client(n, url) for n in range(CLIENTS)))

    def answered(version: str, at_least: int = 20) -> bool:
        return sum(1 for r in results if r[2] == 200 and r[3]["model_version"] == version) >= at_least

    with serving(app) as srv:
        assert holder.wait_ready(60)
        loader = threading.Thread(target=asyncio.run, args=(load(srv.url),))
        loader.start()
        try:
            wait_for(lambda: answered("1"), timeout=60)
            for v in (2, 3):
                reg.publish(
                    trained_model(logit_scale=SCALES[v]),
                    {"model": "ctp-vit-micro-32", "strategy": "incclip", "chunks": v},
                )
                wait_for(lambda v=v: answered(str(v)), timeout=60)
            assert _register_corrupt(reg) == 4
            wait_for(lambda: holder.stats.failures == 1, timeout=60)
            # 5: weights of another architecture under this model's name: strict loading refuses them
            reg.publish(
                create_model("ctp-rn-tiny-32").model, {"model": "ctp-vit-micro-32", "strategy": "incclip"}
            )
            wait_for(lambda: holder.stats.failures == 2, timeout=60)
            n_before = len(results)
            wait_for(lambda: len(results) > n_before + 50, timeout=60)  # still serving 3 after both refusals
            reg.publish(
                trained_model(logit_scale=SCALES[6]),
                {"model": "ctp-vit-micro-32", "strategy": "incclip", "chunks": 6},
            )
            wait_for(lambda: answered("6"), timeout=60)
        finally:
            stop.set()
            loader.join(60)
        model_info = httpx.get(f"{srv.url}/model").json()

    failed = [r for r in results if r[2] != 200]
    assert not failed, failed[:3]
    served = {r[3]["model_version"] for r in results}
    assert served == {"1", "2", "3", "6"}
    for before, after, _, body, i in results:
        v = body["model_version"]
        assert int(before) <= int(v) <= int(after), (before, v, after)  # live during the request
        assert body["predictions"][0]["label"] == CLASSES[i]
        assert abs(body["predictions"][0]["score"] - expected[(v, i)]) < 1e-3  # computed by version v
    assert holder.stats.swaps == 4 and holder.stats.failed_versions == ["4", "5"]
    assert model_info["model_version"] == "6" and model_info["failed_versions"] == ["4", "5"]
    assert [h["version"] for h in model_info["versions"]][-1] == "6"
    assert len(results) >= 500


def test_polling_finds_a_version_without_announcement_and_survives_a_redis_restart(redis_server, tmp_path):
    reg = Registry(redis_server.client(), root=tmp_path / "data" / "checkpoints")
    reg.publish(trained_model(), {"model": "ctp-vit-micro-32"})
    settings = load_settings(data_dir=tmp_path / "data", redis_url=redis_server.url, watch_interval_s=0.2)
    app = create_app(settings)
    with serving(app) as srv, httpx.Client(base_url=srv.url) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        # version 2 recorded without PUBLISH: only the pointer moves
        path = write_checkpoint(reg.root / "v000002", trained_model(), version=2)
        reg.r.incr(f"{reg.prefix}:next")
        reg.r.hset(reg._vkey(2), mapping={"path": str(path), "meta": "{}", "created": time.time()})
        reg.r.zadd(f"{reg.prefix}:history", {"2": 2})
        reg.r.set(f"{reg.prefix}:latest", 2)
        wait_for(lambda: c.get("/readyz").json().get("model_version") == "2", timeout=30)
        redis_server.restart()  # the pub/sub connection drops; AOF keeps the registry
        assert c.get("/readyz").json()["model_version"] == "2"  # serving goes on without Redis
        Registry(redis_server.client(), root=reg.root).publish(trained_model(), {"model": "ctp-vit-micro-32"})
        wait_for(lambda: c.get("/readyz").json().get("model_version") == "3", timeout=30)
