"""The trainer worker: chunk queue -> ``ContinualLearner`` -> checkpoint registry, then ack.

Order per chunk: take it (XREADGROUP, or XAUTOCLAIM if a dead worker left it), train (teacher =
the model before the chunk), publish the checkpoint (written atomically, then registered and
announced), then XACK. A crash anywhere before the ack leaves the last good checkpoint and the
chunk pending, so it is trained again on top of that checkpoint. A chunk whose id is already in
the latest checkpoint's ``chunk_ids`` was published before the ack was lost: it is acked only.

What a version carries stays the same size however long the stream runs (``service.registry``):
the newest chunk ids, its own eval row and the bounded ``StreamEvalTracker`` state; the curves
are the registry's eval history. With ``chunk_retention`` the directories of all but the newest
N trained chunks are deleted after each ack (never while the strategy is ``joint``).

Faults (``service.health``): an environment fault (disk full or below ``min_free_bytes`` before a
checkpoint is written, Redis away, CUDA out of memory) pauses the worker with backoff and a record
in ``ctp:health``; the chunk stays pending and no try is spent. A checkpoint whose write or
registration hit one is written again with the model already trained (no retraining). Only a
chunk's own fault (unreadable shards, a decode error) spends a try (``ChunkQueue.tried``); after
``max_attempts`` the chunk is set aside. A restart re-reads its own pending chunk and spends none.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ctp.config import TrainConfig
from ctp.data import load_classification_set, load_retrieval_set, read_chunk
from ctp.strategies import get_strategy
from service.chunks import DEAD_CHUNKS, ChunkQueue, ChunkTask
from service.health import Backoff, Health, check_free_space, describe, is_environment_fault, until_up
from service.redis_memory import RedisMemory
from service.registry import FencedOut, Registry, VersionInfo, eval_fields, recent_chunk_ids

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger(__name__)


class _TorchDistributed:
    """``torch.distributed``, imported on first use: ``ctp train --help`` waits for no torch."""

    def __getattr__(self, name: str):
        import torch.distributed

        return getattr(torch.distributed, name)


dist = _TorchDistributed()


@dataclass
class TrainerStats:
    chunks: int = 0
    skipped: int = 0  # already in the latest checkpoint
    failed: int = 0  # tries that raised for the chunk's own fault (it stays pending, tried again)
    dead: int = 0  # chunks given up after max_attempts
    paused: int = 0  # environment faults waited out (no try spent)
    fenced: bool = False  # stopped: the lease was lost, another trainer took over
    last_version: int | None = None


class _RankMemory:
    """The shared Redis memory as seen by one rank of a torchrun trainer.

    Every rank runs the same continual step, so every rank must read the same memory: a barrier
    after ``sample`` keeps rank 0's writes (pseudo texts, admissions) after every rank's read,
    and only rank 0 writes. Ranks > 0 keep their computed pseudo texts locally for the step.
    """

    def __init__(self, inner: RedisMemory, rank: int):
        self.inner, self.rank = inner, rank

    def sample(self, n, *, rng):
        items = self.inner.sample(n, rng=rng)
        dist.barrier()
        return items

    def add(self, items, *, rng):
        if self.rank == 0:
            return self.inner.add(items, rng=rng)
        from ctp.memory import AddResult

        return AddResult(admitted=[], evicted=[])

    def set_pseudo_texts(self, texts, *, version):
        if self.rank == 0:
            self.inner.set_pseudo_texts(texts, version=version)

    def __getattr__(self, name):  # keys, get, __len__ via len(), nbytes, label_counts: reads
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


class TrainerLease:
    """One active trainer per registry: a Redis key set with a TTL, renewed while it works.

    A second trainer (a standby, or a restart while the dead one's lease still runs) waits for
    the key to expire. The registry registers a version only while the key still names this
    holder (``Registry.publish(fence=...)``), so a trainer that lost its lease during a long
    pause cannot fork the lineage. Redis away: the keeper retries every second; when Redis answers
    again the key is renewed if it still names this holder, or set again if it is gone (nobody
    took it meanwhile; the worker checks before publishing that the lineage has not moved). Only
    a key naming another holder means the lease is lost.
    """

    KEY = "ctp:trainer:lease"
    _RENEW = (
        "local v = redis.call('GET', KEYS[1]) "
        "if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end "
        "if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end "
        "return 0"
    )
    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, client, holder: str, *, ttl_s: float = 30.0):
        self.r, self.holder, self.ttl_ms = client, holder, int(ttl_s * 1000)
        self._renew = client.register_script(self._RENEW)
        self._release = client.register_script(self._RELEASE)
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()
        self._done = threading.Event()

    @property
    def fence(self) -> tuple[str, str]:
        return self.KEY, self.holder

    def acquire(self, stop: threading.Event) -> bool:
        """Wait until this holder has the lease (or ``stop``); then keep it renewed."""
        if self._thread is not None and self._thread.is_alive():
            return True  # held already (a start retried after Redis went away half-way)
        waited = False
        while not stop.is_set():
            if self.r.set(self.KEY, self.holder, nx=True, px=self.ttl_ms):
                self._thread = threading.Thread(target=self._keep, name="ctp-trainer-lease", daemon=True)
                self._thread.start()
                return True
            if not waited:
                logger.info("another trainer holds %s (%s): standing by", self.KEY, self.r.get(self.KEY))
                waited = True
            stop.wait(min(1.0, self.ttl_ms / 3000))
        return False

    def _keep(self) -> None:
        every_s, failing = self.ttl_ms / 3000, False
        while not self._done.wait(min(1.0, every_s) if failing else every_s):
            try:
                ok = self._renew(keys=[self.KEY], args=[self.holder, self.ttl_ms])
            except Exception as e:  # Redis away: retry every second until it answers
                if not failing:
                    logger.warning("lease renewal failed (retrying): %s", describe(e))
                failing = True
                continue
            if failing:
                how = "set again (it had expired; nobody took it)" if ok == 2 else "renewed"
                logger.info("Redis answers again: lease %s %s", self.KEY, how)
                failing = False
            if not ok:
                logger.error("lost the trainer lease %s; stopping after this chunk", self.KEY)
                self.lost.set()
                return

    def release(self) -> None:
        self._done.set()
        if self._thread is not None:  # a renewal under way would set the key again after the DEL
            self._thread.join(self.ttl_ms / 1000)
        try:
            self._release(keys=[self.KEY], args=[self.holder])
        except Exception as e:  # it expires on its own
            logger.warning("lease release failed: %s", e)


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
        max_attempts: int = 3,
        lease_s: float = 30.0,
        min_free_bytes: int = 0,
        backoff: Backoff | None = None,
        eval_classification: dict[str, Path] | None = None,
        eval_retrieval: dict[str, Path] | None = None,
        chunk_retention: int = 0,
    ):
        self.queue, self.registry = queue, registry
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.memory = _RankMemory(memory, self.rank) if self.world > 1 else memory
        self.model_name, self.pretrained, self.strategy = model, pretrained, get_strategy(strategy)
        self.generator_name = generator
        self.config = config
        # A stable name: a restarted worker first takes the chunks it held when it died.
        self.consumer = consumer or f"trainer-{socket.gethostname()}"
        self.claim_idle_ms, self.max_attempts = claim_idle_ms, max_attempts
        self.chunk_retention = chunk_retention
        self.min_free_bytes = min_free_bytes
        self.backoff = backoff or Backoff()
        self.health = Health(queue.r, "trainer")
        self.stats = TrainerStats()
        self._reload = False  # the model may be half-trained: load the checkpoint before the next chunk
        self._stop = threading.Event()
        self._eval_sets = (
            {n: load_classification_set(d) for n, d in (eval_classification or {}).items()},
            {n: load_retrieval_set(d) for n, d in (eval_retrieval or {}).items()},
        )
        self.lease = TrainerLease(
            queue.r, f"{self.consumer}:{os.getpid()}:{uuid.uuid4().hex[:8]}", ttl_s=lease_s
        )
        self._load()

    def _load(self) -> None:
        """Model, learner and eval curves from the newest checkpoint; else the configured weights."""
        from ctp.continual import ContinualLearner
        from ctp.models import create_model
        from ctp.pseudo_texts import create_generator
        from ctp.tracking import StreamEvalTracker

        latest = self.registry.latest()
        self.loaded_version = latest.version if latest else None
        self.bundle = create_model(
            self.model_name,
            pretrained=str(latest.path) if latest else self.pretrained,
            device=self.config.device,
            seed=self.config.seed,
        )
        meta = latest.meta if latest else {}
        self.trained_ids: list[str] = list(meta.get("chunk_ids", []))  # the newest ones
        self.chunks_done = int(meta.get("chunks", len(self.trained_ids)))
        self.tracker = StreamEvalTracker(*self._eval_sets, state=meta.get("eval_state"))
        self.learner = ContinualLearner(
            bundle=self.bundle,
            strategy=self.strategy,
            memory=self.memory,
            generator=create_generator(self.generator_name) if self.strategy.pseudo_texts else None,
            config=self.config,
            chunks_done=self.chunks_done,
            pretrained=bool(self.pretrained) or latest is not None,
        )

    def stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _next(self, *, burst: bool, block_ms: int) -> ChunkTask | str | None:
        """Rank 0 takes the next chunk and tells the other ranks: a task, None (idle) or "stop"."""
        msg: ChunkTask | str | None = None
        if self.rank == 0:
            if self._stop.is_set():
                msg = "stop"
            else:
                msg = self.queue.take(self.consumer, block_ms=block_ms, min_idle_ms=self.claim_idle_ms)
                if msg is None and burst:
                    msg = "stop"
        if self.world > 1:
            box = [msg]
            dist.broadcast_object_list(box, src=0)
            msg = box[0]
        return msg

    def _start(self) -> bool:
        """Rank 0 takes the lease (waiting as a standby if needed); all ranks catch up with the
        registry (versions published while standing by) and clear what a crash left."""
        got = self.lease.acquire(self._stop) if self.rank == 0 else True
        if self.world > 1:
            box = [got]
            dist.broadcast_object_list(box, src=0)
            got = box[0]
        if not got:
            return False
        if self.rank == 0:
            self.registry.remove_unregistered()
        if self.registry.latest_version() != self.loaded_version:
            self._load()
        return True

    def run(self, *, burst: bool = False, block_ms: int = 1000) -> TrainerStats:
        """Train chunks until stopped; ``burst``: until the queue is empty. Rank 0 drives."""
        try:
            if not self._until_healthy(self._start):
                return self.stats
        except Exception as e:  # stopped while waiting for Redis
            if not (self._stop.is_set() and is_environment_fault(e)):
                raise
            return self.stats
        try:
            self._loop(burst=burst, block_ms=block_ms)
        finally:
            if self.rank == 0:
                self.lease.release()
        return self.stats

    def _loop(self, *, burst: bool, block_ms: int) -> None:
        while True:
            if self.lease.lost.is_set():
                self._stop.set()
            try:
                task = self._next(burst=burst, block_ms=block_ms)
                if task == "stop":
                    break
                if isinstance(task, ChunkTask):
                    self._handle(task)
                self.health.clear()  # this round worked: a pause (if any) is over
                self.backoff.reset()
            except FencedOut as e:  # another trainer holds the lineage now: leave the chunk to it
                logger.error("%s; stopping", e)
                self.stats.fenced = True
                return
            except Exception as e:
                if not is_environment_fault(e):
                    raise
                self._pause(e)  # the chunk stays pending: the next round takes it again

    def _handle(self, task: ChunkTask) -> None:
        if self._reload:
            self._load()  # the last try may have changed the model half-way
            self._reload = False
        if task.chunk_id in self.trained_ids:
            logger.info("chunk %s is in the latest checkpoint already; acking", task.chunk_id)
            if self.rank == 0:
                self.queue.ack(task)
                self._retire_chunks()
            self.stats.skipped += 1
            return
        try:
            self._train(task)
        except FencedOut:
            raise
        except Exception as e:  # a bad chunk must not stop the worker; its model state is reloaded
            self._reload = True
            if is_environment_fault(e):
                raise
            self._failed(task, e)

    def _pause(self, err: BaseException) -> None:
        """Wait out an environment fault (backoff, status in ``ctp:health``); nothing is spent."""
        delay = self.backoff.next()
        self.stats.paused += 1
        self.health.paused(err, delay)
        self._stop.wait(delay)

    def _until_healthy(self, op):
        """``op()``, again after each environment fault (paused with backoff) until it succeeds; a
        stop request or any other error raises."""
        while True:
            try:
                return op()
            except FencedOut:
                raise
            except Exception as e:
                if self._stop.is_set() or self.lease.lost.is_set() or not is_environment_fault(e):
                    raise
                self._pause(e)

    def _publish(self, meta: dict) -> VersionInfo:
        """Check the disk, that the lineage is still the one trained on, then write and register."""
        check_free_space(self.registry.root, self.min_free_bytes)
        latest = self.registry.latest()
        if latest is not None and latest.version != self.loaded_version:
            if latest.meta.get("chunk_ids") == meta["chunk_ids"]:
                return latest  # this very publish landed before Redis went away (its reply was lost)
            raise FencedOut(f"version {latest.version} was published meanwhile, not on top of ours")
        return self.registry.publish(self.bundle.model, meta, fence=self.lease.fence)

    def _train(self, task: ChunkTask) -> None:
        t0 = time.perf_counter()
        samples = read_chunk(task.path)
        if not samples:
            raise ValueError(f"chunk {task.chunk_id} at {task.path} holds no pairs")
        report = self.learner.learn_chunk(samples, chunk_id=task.chunk_id)
        chunk_ids = recent_chunk_ids(self.trained_ids, task.chunk_id)
        if self.rank != 0:
            self.trained_ids, self.chunks_done = chunk_ids, self.chunks_done + 1
            return
        meta = {
            "model": self.model_name,
            "config": self.bundle.config,
            "strategy": self.strategy.name,
            "chunks": self.chunks_done + 1,
            "chunk_id": task.chunk_id,
            "chunk_ids": chunk_ids,
            "pairs": len(samples),
            "train": report.to_dict(),
        }
        if self.tracker:
            evals = self.tracker.after_chunk(
                self.bundle, [s.label for s in samples], device=self.config.device
            )
            meta |= eval_fields(evals)
            meta["eval_state"] = self.tracker.state()
        meta["seconds"] = time.perf_counter() - t0
        info = self._until_healthy(lambda: self._publish(meta))  # the trained model waits for the disk
        self.loaded_version = info.version
        self.trained_ids, self.chunks_done = chunk_ids, self.chunks_done + 1
        self.queue.ack(task)
        self._retire_chunks()
        self.stats.chunks += 1
        self.stats.last_version = info.version
        logger.info(
            "chunk %s -> version %d (%d pairs, %.1f s)",
            task.chunk_id,
            info.version,
            len(samples),
            time.perf_counter() - t0,
        )

    def _retire_chunks(self) -> None:
        """Chunk retention after an ack: never for ``joint`` (it trains on every chunk so far); a
        failure is logged, not counted against the chunk (it is acked already)."""
        if self.chunk_retention <= 0 or self.strategy.joint:
            return
        try:
            self.queue.retire_trained(self.chunk_retention)
        except Exception as e:
            logger.warning("chunk retention failed (tried again after the next chunk): %s", e)

    def _failed(self, task: ChunkTask, err: Exception) -> None:
        """A fault of the chunk's own: one try spent; set aside once ``max_attempts`` are."""
        self.stats.failed += 1
        if self.rank != 0:
            return
        tries = self.queue.tried(task)
        logger.exception("chunk %s failed (try %d of %d): %s", task.chunk_id, tries, self.max_attempts, err)
        if tries >= self.max_attempts:
            self.queue.bury(task, describe(err))
            self.stats.dead += 1
            logger.error(
                "chunk %s given up after %d tries; recorded in %s", task.chunk_id, tries, DEAD_CHUNKS
            )


def main(argv: list[str] | None = None) -> int:
    """``ctp train [--burst]``: the trainer worker with the CTP_ settings; under torchrun, DDP."""
    import redis

    from ctp.experiment import init_distributed
    from service.cli import train_parser
    from service.settings import load_settings

    args = train_parser().parse_args(argv)
    s = load_settings()
    rank, device = init_distributed(s.device)
    client = redis.Redis.from_url(s.redis_url)
    worker = until_up(lambda: _make_worker(s, client, args.generator, rank, device), what="trainer")
    worker.install_signal_handlers()
    if rank == 0:  # what status, the API and the dashboard show as the trainer's settings
        from service import effective

        until_up(
            lambda: effective.record(
                client, "trainer", s, consumer=worker.consumer, generator=args.generator
            ),
            what="trainer",
        )
    stats = worker.run(burst=args.burst)
    if rank == 0:
        print(stats)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 3 if stats.fenced else 0


def _make_worker(s: Settings, client, generator: str, rank: int, device: str) -> TrainerWorker:
    """The worker ``ctp train`` runs, from the settings (Redis is asked for the latest version)."""
    return TrainerWorker(
        queue=ChunkQueue(client),
        registry=Registry(
            client, root=s.data_dir / "checkpoints", keep=s.keep_checkpoints, eval_max=s.eval_history_max
        ),
        memory=RedisMemory(
            client=client, max_items=s.memory_size, max_bytes=s.memory_max_bytes, policy=s.memory_policy
        ),
        model=s.model,
        pretrained=s.pretrained,
        strategy=s.strategy,
        generator=generator,
        config=TrainConfig(
            epochs=s.epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            device=device,
            progress=rank == 0,
            full_chunk_pairs=s.chunk_size if s.epochs_follow_chunk_size else 0,
        ),
        eval_classification=s.eval_classification_sets(),
        eval_retrieval=s.eval_retrieval_sets(),
        consumer=s.trainer_name,
        claim_idle_ms=int(s.claim_idle_s * 1000),
        max_attempts=s.chunk_max_tries,
        lease_s=s.trainer_lease_s,
        chunk_retention=s.chunk_retention,
        min_free_bytes=s.min_free_bytes,
    )
