"""Chunks on disk and the queue of chunks waiting for the trainer (a Redis stream).

A chunk id is derived from the Kafka offsets it holds (``p{partition}-{first}-{last}`` per
partition), so ingest replaying the same messages after a crash produces the same id: the
directory write and the enqueue are both idempotent on it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from ctp.atomic import atomic_directory
from ctp.data import Sample, read_chunk, write_shards

logger = logging.getLogger(__name__)

STREAM = "ctp:chunks"
GROUP = "ctp-trainers"
DEAD_CHUNKS = "ctp:chunks:dead"  # hash: chunk id -> reason, chunks the trainer gave up on after max attempts


def chunk_id_for(offsets: dict[int, tuple[int, int]]) -> str:
    """Deterministic id from {partition: (first offset, last offset)}."""
    if not offsets:
        raise ValueError("a chunk needs at least one message")
    return "_".join(f"p{p}-{a}-{b}" for p, (a, b) in sorted(offsets.items()))


class ChunkStore:
    """Chunk directories under ``root``; each appears whole (temp dir + fsync + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, chunk_id: str) -> Path:
        return self.root / chunk_id

    def exists(self, chunk_id: str) -> bool:
        return self.path(chunk_id).is_dir()

    def write(self, chunk_id: str, samples: Sequence[Sample], *, shard_size: int = 1000) -> Path:
        final = self.path(chunk_id)
        if final.is_dir():  # written before a crash: the same offsets give the same content
            logger.info("chunk %s already on disk", chunk_id)
            return final
        with atomic_directory(final, replace=False) as tmp:
            write_shards(samples, tmp, shard_size=shard_size)  # fsyncs each shard
        return final

    def read(self, chunk_id: str) -> list[Sample]:
        return read_chunk(self.path(chunk_id))

    def remove_partial(self, *, older_than_s: float = 3600.0) -> int:
        """Delete temp dirs left by a crash mid-write; returns how many.

        Only those untouched for ``older_than_s``: another ingest worker sharing the directory
        may be writing one right now.
        """
        n = 0
        cutoff = time.time() - older_than_s
        for p in self.root.glob(".*"):
            if p.is_dir() and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


@dataclass
class ChunkTask:
    message_id: str  # stream entry id, to ack
    chunk_id: str
    path: str
    pairs: int
    deliveries: int = 1  # >1: a dead worker's chunk, claimed again


# Enqueue once per chunk id: the marker and the stream entry are written together or not at all.
_ENQUEUE = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX') then
  return redis.call('XADD', KEYS[1], '*', 'chunk_id', ARGV[1], 'path', ARGV[2], 'pairs', ARGV[3])
end
return false
"""


class ChunkQueue:
    def __init__(self, client: redis.Redis, *, stream: str = STREAM, group: str = GROUP):
        self.r = client
        self.stream = stream
        self.group = group
        self._enqueue = self.r.register_script(_ENQUEUE)

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def enqueue(self, chunk_id: str, path: str | Path, pairs: int) -> str | None:
        """Add the chunk to the stream unless it was added before; returns the entry id or None."""
        entry = self._enqueue(keys=[self.stream, f"{self.stream}:enqueued:{chunk_id}"],
                              args=[chunk_id, str(path), pairs])
        return entry.decode() if entry else None

    def take(self, consumer: str, *, block_ms: int = 1000, min_idle_ms: int = 60_000) -> ChunkTask | None:
        """The next chunk for ``consumer``: first one idle too long at a dead worker, else a new one."""
        self.ensure_group()
        _, claimed, _ = self.r.xautoclaim(self.stream, self.group, consumer, min_idle_time=min_idle_ms,
                                          start_id="0-0", count=1)
        if claimed:
            return self._task(*claimed[0], reclaimed=True)
        # our own pending entries first (a restart of the same consumer name), then new ones
        for start in ("0", ">"):
            got = self.r.xreadgroup(self.group, consumer, {self.stream: start}, count=1,
                                    block=None if start == "0" else block_ms)
            if got and got[0][1]:
                return self._task(*got[0][1][0], reclaimed=start == "0")
        return None

    def _task(self, message_id, fields, *, reclaimed: bool) -> ChunkTask:
        mid = message_id.decode() if isinstance(message_id, bytes) else message_id
        deliveries = 1
        if reclaimed:
            info = self.r.xpending_range(self.stream, self.group, min=mid, max=mid, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else 2
        return ChunkTask(message_id=mid, chunk_id=fields[b"chunk_id"].decode(), path=fields[b"path"].decode(),
                         pairs=int(fields[b"pairs"]), deliveries=deliveries)

    def ack(self, task: ChunkTask) -> None:
        self.r.xack(self.stream, self.group, task.message_id)

    def pending(self) -> int:
        """Chunks enqueued but not acknowledged (waiting or in training)."""
        self.ensure_group()
        groups = {g["name"].decode(): g for g in self.r.xinfo_groups(self.stream)}
        g = groups[self.group]
        lag = g.get("lag") or 0
        return int(g["pending"]) + int(lag)
