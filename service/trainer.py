"""The trainer worker: chunk queue -> ``ContinualLearner`` -> checkpoint registry, then ack.

Order per chunk: take it (XREADGROUP, or XAUTOCLAIM if a dead worker left it), train (teacher =
the model before the chunk), publish the checkpoint (written atomically, then registered and
announced), then XACK. A crash anywhere before the ack leaves the last good checkpoint and the
chunk pending, so it is trained again on top of that checkpoint. A chunk whose id is already in
the latest checkpoint's ``chunk_ids`` was published before the ack was lost: it is acked only.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass

from ctp.continual import ContinualLearner, TrainConfig
from ctp.data import read_chunk
from ctp.models import create_model
from ctp.pseudo_texts import create_generator
from ctp.strategies import get_strategy
from service.chunks import ChunkQueue
from service.redis_memory import RedisMemory
from service.registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class TrainerStats:
    chunks: int = 0
    skipped: int = 0  # already in the latest checkpoint
    last_version: int | None = None


class TrainerWorker:
    def __init__(
        self,
        *,
        queue: ChunkQueue,
        registry: Registry,
        memory: RedisMemory,
        model: str,
        pretrained: str | None = None,
        strategy: str = "incclip",
        generator: str = "edit",
        config: TrainConfig,
        consumer: str | None = None,
        claim_idle_ms: int = 600_000,
    ):
        self.queue, self.registry, self.memory = queue, registry, memory
        self.model_name, self.strategy = model, get_strategy(strategy)
        self.config = config
        self.consumer = consumer or f"trainer-{socket.gethostname()}"
        self.claim_idle_ms = claim_idle_ms
        self.stats = TrainerStats()
        self._stop = threading.Event()
        latest = registry.latest()
        # resume from the newest checkpoint; else the configured (pre)trained weights
        self.bundle = create_model(model, pretrained=str(latest.path) if latest else pretrained,
                                   device=config.device, seed=config.seed)
        self.trained_ids: list[str] = list(latest.meta.get("chunk_ids", [])) if latest else []
        self.learner = ContinualLearner(
            bundle=self.bundle, strategy=self.strategy, memory=memory,
            generator=create_generator(generator) if self.strategy.pseudo_texts else None,
            config=config, chunks_done=len(self.trained_ids), pretrained=bool(pretrained) or latest is not None,
        )

    def stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, *, burst: bool = False, block_ms: int = 1000) -> TrainerStats:
        """Train chunks until stopped; ``burst``: until the queue is empty."""
        while not self._stop.is_set():
            task = self.queue.take(self.consumer, block_ms=block_ms, min_idle_ms=self.claim_idle_ms)
            if task is None:
                if burst:
                    break
                continue
            if task.chunk_id in self.trained_ids:
                logger.info("chunk %s is in the latest checkpoint already; acking", task.chunk_id)
                self.queue.ack(task)
                self.stats.skipped += 1
                continue
            t0 = time.perf_counter()
            samples = read_chunk(task.path)
            report = self.learner.learn_chunk(samples, chunk_id=task.chunk_id)
            self.trained_ids.append(task.chunk_id)
            info = self.registry.publish(self.bundle.model, {
                "model": self.model_name, "config": self.bundle.config, "strategy": self.strategy.name,
                "chunks": len(self.trained_ids), "chunk_ids": self.trained_ids,
                "train": report.to_dict(), "seconds": time.perf_counter() - t0,
            })
            self.queue.ack(task)
            self.stats.chunks += 1
            self.stats.last_version = info.version
            logger.info("chunk %s -> version %d (%d pairs, %.1f s)", task.chunk_id, info.version, len(samples),
                        time.perf_counter() - t0)
        return self.stats


def main(argv: list[str] | None = None) -> int:
    """``ctp train [--burst]``: run the trainer worker with the CTP_ settings."""
    import argparse

    import redis

    from service.settings import load_settings

    p = argparse.ArgumentParser(prog="ctp train", description="chunk queue -> continual training -> checkpoints")
    p.add_argument("--burst", action="store_true", help="stop once the chunk queue is empty")
    p.add_argument("--generator", default="edit", help="pseudo-text generator: edit, captioner or random")
    args = p.parse_args(argv)
    s = load_settings()
    client = redis.Redis.from_url(s.redis_url)
    worker = TrainerWorker(
        queue=ChunkQueue(client), registry=Registry(client, root=s.data_dir / "checkpoints", keep=s.keep_checkpoints),
        memory=RedisMemory(client=client, max_items=s.memory_size, max_bytes=s.memory_max_bytes,
                           policy=s.memory_policy),
        model=s.model, pretrained=s.pretrained, strategy=s.strategy, generator=args.generator,
        config=TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, device=s.device),
    )
    worker.install_signal_handlers()
    print(worker.run(burst=args.burst))
    return 0
