"""Chunks on disk and the queue of chunks waiting for the trainer (a Redis stream).

A chunk id is derived from the Kafka offsets it holds (``p{partition}-{first}-{last}`` per
partition), so ingest replaying the same messages after a crash produces the same id: the
directory write and the enqueue are both idempotent on it.

``ChunkQueue`` owns the queue's whole Redis layout: the stream ``ctp:chunks`` and its consumer
group, the ``ctp:chunks:enqueued:{chunk id}`` markers, the dead chunks hash, and the ingest
progress recorded with each chunk (``offsets_key``, ``ids_key``), and the tries spent per chunk
(``TRIES``: only the trainer's chunk faults count, never a redelivery or a restart). Ingest calls
``record_chunk``, the trainer ``take``, ``tried``, ``ack`` and ``bury``, ``ctp status`` ``pending``.
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
from ctp.data import Sample, write_shards

logger = logging.getLogger(__name__)

STREAM = "ctp:chunks"
GROUP = "ctp-trainers"
DEAD_CHUNKS = "ctp:chunks:dead"  # hash: chunk id -> reason, chunks the trainer gave up on after max tries
TRIES = "ctp:chunks:tries"  # hash: chunk id -> chunk faults so far; removed when it is acked or buried


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
    deliveries: int = 1  # Redis's delivery count (restarts raise it too: not a count of failures)


# One script records a chunk whole: the stream entry (once per chunk id: the marker and the entry
# are written together or not at all) and, for ingest, the partition's next offset and the pair
# ids. KEYS: stream, enqueued marker[, offsets hash, ids set]. ARGV: chunk id ("" = no chunk, only
# the offset advances: every message was bad), path, pairs[, partition, next offset, ids...].
_RECORD = """
local entry = false
if ARGV[1] ~= '' and redis.call('SET', KEYS[2], ARGV[1], 'NX') then
  entry = redis.call('XADD', KEYS[1], '*', 'chunk_id', ARGV[1], 'path', ARGV[2], 'pairs', ARGV[3])
end
if #KEYS == 4 then
  local cur = tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '-1')
  if tonumber(ARGV[5]) > cur then redis.call('HSET', KEYS[3], ARGV[4], ARGV[5]) end
  for i = 6, #ARGV do redis.call('SADD', KEYS[4], ARGV[i]) end
end
return entry
"""


def offsets_key(topic: str) -> str:
    """Redis hash partition -> next offset to read: recorded with each chunk, the source of truth."""
    return f"ctp:ingest:{topic}:offsets"


def ids_key(topic: str) -> str:
    """Redis set of the pair ids recorded with a chunk (ingest drops a pair seen before)."""
    return f"ctp:ingest:{topic}:ids"


@dataclass(frozen=True)
class IngestProgress:
    """What ingest records with a chunk: the partition's next offset to read and the chunk's pair ids."""

    topic: str
    partition: int
    next_offset: int
    ids: Sequence[str] = ()


class ChunkQueue:
    def __init__(self, client: redis.Redis, *, stream: str = STREAM, group: str = GROUP):
        self.r = client
        self.stream = stream
        self.group = group
        self._record = self.r.register_script(_RECORD)

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def record_chunk(
        self, chunk_id: str, path: str | Path, pairs: int, *, progress: IngestProgress | None = None
    ) -> str | None:
        """Add the chunk to the stream unless it was added before; returns the entry id or None.

        With ``progress`` (ingest), the partition's next offset and the pair ids are recorded in
        the same script: all of it lands, or none. ``chunk_id=""`` records only the progress.
        """
        keys = [self.stream, f"{self.stream}:enqueued:{chunk_id}"]
        args: list[str | int] = [chunk_id, str(path), pairs]
        if progress is not None:
            keys += [offsets_key(progress.topic), ids_key(progress.topic)]
            args += [progress.partition, progress.next_offset, *progress.ids]
        entry = self._record(keys=keys, args=args)
        return entry.decode() if entry else None

    def take(self, consumer: str, *, block_ms: int = 1000, min_idle_ms: int = 60_000) -> ChunkTask | None:
        """The next chunk for ``consumer``: first one idle too long at a dead worker, else a new one."""
        self.ensure_group()
        _, claimed, _ = self.r.xautoclaim(
            self.stream, self.group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=1
        )
        if claimed:
            return self._task(*claimed[0], reclaimed=True)
        # our own pending entries first (a restart of the same consumer name), then new ones
        for start in ("0", ">"):
            got = self.r.xreadgroup(
                self.group, consumer, {self.stream: start}, count=1, block=None if start == "0" else block_ms
            )
            if got and got[0][1]:
                return self._task(*got[0][1][0], reclaimed=start == "0")
        return None

    def _task(self, message_id, fields, *, reclaimed: bool) -> ChunkTask:
        mid = message_id.decode() if isinstance(message_id, bytes) else message_id
        deliveries = 1
        if reclaimed:
            info = self.r.xpending_range(self.stream, self.group, min=mid, max=mid, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else 2
        return ChunkTask(
            message_id=mid,
            chunk_id=fields[b"chunk_id"].decode(),
            path=fields[b"path"].decode(),
            pairs=int(fields[b"pairs"]),
            deliveries=deliveries,
        )

    def tried(self, task: ChunkTask) -> int:
        """Count one failed try of the chunk (a fault of its own); returns the tries spent so far."""
        return int(self.r.hincrby(TRIES, task.chunk_id, 1))

    def tries(self, chunk_id: str) -> int:
        return int(self.r.hget(TRIES, chunk_id) or 0)

    def ack(self, task: ChunkTask) -> None:
        with self.r.pipeline() as pipe:
            pipe.xack(self.stream, self.group, task.message_id)
            pipe.hdel(TRIES, task.chunk_id)
            pipe.execute()

    def bury(self, task: ChunkTask, reason: str) -> None:
        """Give up on the chunk: its id and ``reason`` go to ``DEAD_CHUNKS``, and it is acked."""
        with self.r.pipeline() as pipe:
            pipe.hset(DEAD_CHUNKS, task.chunk_id, reason[:1000])
            pipe.xack(self.stream, self.group, task.message_id)
            pipe.hdel(TRIES, task.chunk_id)
            pipe.execute()

    def pending(self) -> int:
        """Chunks enqueued but not acknowledged (waiting or in training)."""
        self.ensure_group()
        groups = {g["name"].decode(): g for g in self.r.xinfo_groups(self.stream)}
        g = groups[self.group]
        lag = g.get("lag") or 0
        return int(g["pending"]) + int(lag)
