"""Helpers for the serving API tests: a tiny model trained in seconds, a real uvicorn server."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import uvicorn

from ctp.checkpoint import save_checkpoint
from ctp.data import Sample
from ctp.losses import contrastive_loss
from ctp.models import create_model
from ctp.synthetic import generate_pairs
from ctp.train import preprocess_images
from service.chunks import ChunkStore
from service.local.infra import free_port

MODEL = "ctp-vit-micro-32"
CLASSES = ["circle", "square", "triangle", "star"]


def make_pairs(per_class: int = 12, seed: int = 0) -> list[Sample]:
    """Synthetic shapes captioned "a {shape}" (the label is what the tiny model must learn)."""
    pairs = generate_pairs(CLASSES, per_class, np.random.default_rng(seed), 32, key_prefix=f"s{seed}")
    return [
        Sample(key=p.key, image=p.image, text=f"a {p.label}", label=p.label, meta={"id": p.key})
        for p in pairs
    ]


@functools.cache
def trained_state() -> dict[str, torch.Tensor]:
    """The weights of ``train_tiny(make_pairs())``, trained once per test process."""
    return {k: v.clone() for k, v in train_tiny(make_pairs()).state_dict().items()}


def trained_model(*, logit_scale: float | None = None) -> torch.nn.Module:
    """A fresh copy of the trained model; ``logit_scale`` (not its log) changes scores, not ranks."""
    model = create_model(MODEL).model
    model.load_state_dict(trained_state())
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    return model.eval()


def train_tiny(pairs: list[Sample], *, steps: int = 200, seed: int = 0) -> torch.nn.Module:
    """Full-batch contrastive training of the micro ViT: ~5 s on one CPU thread."""
    bundle = create_model(MODEL, seed=seed)
    model = bundle.model
    images = preprocess_images([p.image for p in pairs], [p.key for p in pairs], bundle.preprocess_val)
    tokens = bundle.tokenizer([p.text for p in pairs])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = contrastive_loss(
            model.encode_image(images, normalize=True),
            model.encode_text(tokens, normalize=True),
            model.logit_scale.exp(),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_checkpoint(path: Path, model: torch.nn.Module, **meta) -> Path:
    return save_checkpoint(path, model, {"model": MODEL, "strategy": "finetune", "chunks": 1, **meta})


def write_chunk(root: Path, name: str, samples: list[Sample]) -> Path:
    """Atomically, as ingest does (a watcher never sees half a chunk)."""
    return ChunkStore(root).write(name, samples)


class ServerThread:
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app, port: int | None = None, *, config: uvicorn.Config | None = None):
        """``config``: run with this one (its port) instead of a plain one for ``app``."""
        self.port = config.port if config is not None else port or free_port()
        self.server = uvicorn.Server(
            config
            or uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextmanager
def serving(app) -> Iterator[ServerThread]:
    server = ServerThread(app).start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
