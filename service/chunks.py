"""Chunks on disk and the queue of chunks waiting for the trainer (a Redis stream).

A chunk id is derived from the Kafka offsets it holds (``p{partition}-{first}-{last}`` per
partition), so ingest replaying the same messages after a crash produces the same id: the
directory write and the enqueue are both idempotent on it.

``ChunkQueue`` owns the queue's whole Redis layout: the stream ``ctp:chunks`` and its consumer
group, the ``ctp:chunks:enqueued:{chunk id}`` markers, the dead chunks, the trained chunks kept
on disk, the tries spent per chunk (``TRIES``: only the trainer's chunk faults count, never a
redelivery or a restart), and the ingest progress recorded with each chunk (``offsets_key``,
``ids_key``). Ingest calls ``seen`` and ``record_chunk``, the trainer ``take``, ``tried``,
``ack``, ``bury`` and ``retire_trained``, ``ctp status`` ``pending`` and ``enqueued``.

Everything it keeps is bounded, O(1) per chunk:

- **Pair ids** (dropping resent pairs) live in time buckets, ``pairs_key(topic):<n>``: bucket n is
  a hash of the ids recorded during ``[n, n+1) * bucket_ms`` (Redis server time), each with an
  8-byte digest of its content (``service.messages.pair_digest``: text and image bytes).
  ``bucket_ms`` is ``dedup_window_s / DEDUP_BUCKETS``, and each bucket expires once its newest id
  is ``dedup_window_s`` old. ``seen`` checks the live buckets and returns each id's digest, so a
  resend within the window is dropped, a different pair under an id already used is told apart
  (ingest dead-letters it, ``id_conflict``), and an id older than the window plus one bucket is
  accepted as a new pair (chunked and trained again), in between either. The id sets of earlier
  releases (``ids_key(topic)`` and its set buckets ``ids_key(topic):<n>``, no digests) are still
  consulted until they expire; the unbounded one is given the window as its TTL by the first
  record.
- **The stream** keeps every entry not yet acked (pending or not yet delivered) and the newest
  ``keep_acked`` acked ones; older acked entries are trimmed on each ack (``XTRIM MINID``).
  ``enqueued()`` is the stream's ``entries-added``: every chunk ever queued.
- **Markers** (a chunk is queued once per id) get a TTL of ``marker_ttl_s`` when acked.
- **Dead chunks**: the hash ``DEAD_CHUNKS`` (chunk id -> reason) holds the newest
  ``DEAD_CHUNKS_MAX``; ``DEAD_ORDER`` (sorted set, burial time) says which are oldest.
- **Tries**: a chunk's entry in ``TRIES`` goes when it is acked or buried.
- **Trained chunks** on disk: ``ack`` pushes the chunk on ``TRAINED`` (newest first, at most
  ``TRAINED_MAX``); ``retire_trained(keep)`` deletes the directories of all but the newest
  ``keep``. Chunks not yet acked, and dead ones, are never on that list, so never deleted.

Dropping a resend is checked before the pairs are buffered (``seen``, read only) and the ids are
recorded in the one script that records the chunk: a crash in between records nothing, the
messages are read again and checked again, so no pair is lost or chunked twice.
"""

from __future__ import annotations

import logging
import math
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
DEAD_ORDER = "ctp:chunks:dead:order"  # sorted set: dead chunk id -> burial time (oldest trimmed first)
DEAD_CHUNKS_MAX = 10_000  # dead chunks remembered
TRIES = "ctp:chunks:tries"  # hash: chunk id -> chunk faults so far; removed when it is acked or buried
TRAINED = "ctp:chunks:trained"  # list of "chunk id\tpath", newest first: trained chunks still on disk
TRAINED_MAX = 100_000  # the list's cap (retention off: the newest ones, for turning it on later)
DEDUP_BUCKETS = 8  # the dedup window is split into this many expiring buckets
DEFAULT_DEDUP_WINDOW_S = 7 * 24 * 3600.0
KEEP_ACKED = 1000  # acked stream entries kept for inspection
MARKER_TTL_S = 24 * 3600.0  # an acked chunk's enqueued marker lives on this long


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


# Redis server time in ms and the current dedup bucket; ARGV[1] = bucket_ms.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket_ms = tonumber(ARGV[1])
local bucket = math.floor(now / bucket_ms)
"""

# One script records a chunk whole: the stream entry (once per chunk id: the marker and the entry
# are written together or not at all) and, for ingest, the partition's next offset and the pair
# ids with their digests (into the current bucket). KEYS: stream, enqueued marker[, offsets hash,
# pairs key prefix, ids set of earlier releases]. ARGV: bucket_ms, buckets, chunk id ("" = no
# chunk, only the offset advances: every message was bad), path, pairs[, partition, next offset,
# id, digest, id, digest...].
_RECORD = (
    _NOW
    + """
local entry = false
if ARGV[3] ~= '' and redis.call('SET', KEYS[2], ARGV[3], 'NX') then
  entry = redis.call('XADD', KEYS[1], '*', 'chunk_id', ARGV[3], 'path', ARGV[4], 'pairs', ARGV[5])
end
if #KEYS == 5 then
  local cur = tonumber(redis.call('HGET', KEYS[3], ARGV[6]) or '-1')
  if tonumber(ARGV[7]) > cur then redis.call('HSET', KEYS[3], ARGV[6], ARGV[7]) end
  if #ARGV >= 9 then
    local key = KEYS[4] .. ':' .. bucket
    for i = 8, #ARGV - 1, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
    redis.call('PEXPIREAT', key, (bucket + 1 + tonumber(ARGV[2])) * bucket_ms)
  end
  if redis.call('PTTL', KEYS[5]) == -1 then  -- the unbounded set of earlier releases
    redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[2]) * bucket_ms)
  end
end
return entry
"""
)

# Which ids are in a live bucket, with their digests. KEYS: pairs key prefix, ids key prefix of
# earlier releases (sets, no digest). ARGV: bucket_ms, buckets, ids... Returns per id: 0 (not
# seen), the digest, or '' (seen by an earlier release: content unknown).
_SEEN = (
    _NOW
    + """
local out = {}
for i = 3, #ARGV do out[i - 2] = 0 end
local function check(key, hashed)
  if redis.call('EXISTS', key) == 1 then
    for i = 3, #ARGV do
      if out[i - 2] == 0 then
        if hashed then
          local d = redis.call('HGET', key, ARGV[i])
          if d then out[i - 2] = d end
        elseif redis.call('SISMEMBER', key, ARGV[i]) == 1 then
          out[i - 2] = ''
        end
      end
    end
  end
end
for b = bucket, bucket - tonumber(ARGV[2]), -1 do check(KEYS[1] .. ':' .. b, true) end
check(KEYS[2], false)
for b = bucket - tonumber(ARGV[2]), bucket do check(KEYS[2] .. ':' .. b, false) end
return out
"""
)

# Trim acked entries: keep the newest ARGV[1] entries and every entry some group has not acked
# (pending) or not delivered yet. KEYS: stream. Returns the number of entries removed.
_TRIM = """
local function parse(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local n = redis.call('XLEN', KEYS[1])
local keep = tonumber(ARGV[1])
if n <= keep then return 0 end
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', n - keep + 1)
local floor = head[#head][1]
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local pend = redis.call('XPENDING', KEYS[1], name)
  if pend[1] > 0 and older(pend[2], floor) then floor = pend[2] end
  local undelivered = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
  if #undelivered > 0 and older(undelivered[1][1], floor) then floor = undelivered[1][1] end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""

# Bury a chunk: reason recorded, acked, marker given its TTL, oldest dead chunks past the cap
# forgotten. KEYS: dead hash, dead order, stream, marker. ARGV: chunk id, reason, now, cap, entry
# id, group, marker ttl ms.
_BURY = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('XACK', KEYS[3], ARGV[6], ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[7])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do redis.call('HDEL', KEYS[1], id) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
return 1
"""


def offsets_key(topic: str) -> str:
    """Redis hash partition -> next offset to read: recorded with each chunk, the source of truth."""
    return f"ctp:ingest:{topic}:offsets"


def pairs_key(topic: str) -> str:
    """Prefix of the dedup buckets ``{pairs_key}:<n>``: hashes pair id -> content digest, of the ids
    recorded with a chunk."""
    return f"ctp:ingest:{topic}:pairs"


def ids_key(topic: str) -> str:
    """The dedup sets of earlier releases (ids without digests), read until they expire: the key
    itself (unbounded, given the window as its TTL) and its buckets ``{ids_key}:<n>``."""
    return f"ctp:ingest:{topic}:ids"


@dataclass(frozen=True)
class IngestProgress:
    """What ingest records with a chunk: the partition's next offset to read and the chunk's pair ids,
    each with its content digest (``digests``, parallel to ``ids``; none given: empty digests)."""

    topic: str
    partition: int
    next_offset: int
    ids: Sequence[str] = ()
    digests: Sequence[bytes] = ()


class ChunkQueue:
    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = STREAM,
        group: str = GROUP,
        dedup_window_s: float = DEFAULT_DEDUP_WINDOW_S,
        keep_acked: int = KEEP_ACKED,
        marker_ttl_s: float = MARKER_TTL_S,
        dead_max: int = DEAD_CHUNKS_MAX,
    ):
        if dedup_window_s <= 0:
            raise ValueError("dedup_window_s must be positive")
        self.r = client
        self.stream = stream
        self.group = group
        self.bucket_ms = max(1, math.ceil(dedup_window_s * 1000 / DEDUP_BUCKETS))
        self.keep_acked, self.dead_max = keep_acked, dead_max
        self.marker_ttl_ms = max(1, int(marker_ttl_s * 1000))
        self._record = self.r.register_script(_RECORD)
        self._seen = self.r.register_script(_SEEN)
        self._trim = self.r.register_script(_TRIM)
        self._bury = self.r.register_script(_BURY)

    def _marker(self, chunk_id: str) -> str:
        return f"{self.stream}:enqueued:{chunk_id}"

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
        keys = [self.stream, self._marker(chunk_id)]
        args: list[str | int] = [self.bucket_ms, DEDUP_BUCKETS, chunk_id, str(path), pairs]
        if progress is not None:
            keys += [offsets_key(progress.topic), pairs_key(progress.topic), ids_key(progress.topic)]
            args += [progress.partition, progress.next_offset]
            digests = progress.digests or [b""] * len(progress.ids)
            for pair_id, digest in zip(progress.ids, digests, strict=True):
                args += [pair_id, digest]
        entry = self._record(keys=keys, args=args)
        return entry.decode() if entry else None

    def seen(self, topic: str, ids: Sequence[str]) -> list[bytes | None]:
        """Per id recorded with a chunk of ``topic`` within the dedup window, its content digest
        (``b""`` when an earlier release recorded it: content unknown); None for a new id."""
        if not ids:
            return []
        hits = self._seen(keys=[pairs_key(topic), ids_key(topic)], args=[self.bucket_ms, DEDUP_BUCKETS, *ids])
        return [None if h == 0 else bytes(h) for h in hits]

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
        """The chunk is trained: acked, on ``TRAINED``, its marker expiring; old entries trimmed."""
        with self.r.pipeline() as pipe:
            pipe.xack(self.stream, self.group, task.message_id)
            pipe.lpush(TRAINED, f"{task.chunk_id}\t{task.path}")
            pipe.ltrim(TRAINED, 0, TRAINED_MAX - 1)
            pipe.pexpire(self._marker(task.chunk_id), self.marker_ttl_ms)
            pipe.hdel(TRIES, task.chunk_id)
            pipe.execute()
        self.trim()

    def trim(self) -> int:
        """Drop acked entries past the newest ``keep_acked``; returns how many went."""
        return int(self._trim(keys=[self.stream], args=[self.keep_acked]))

    def bury(self, task: ChunkTask, reason: str) -> None:
        """Give up on the chunk: its id and ``reason`` go to ``DEAD_CHUNKS`` (the newest
        ``dead_max`` are kept), and it is acked."""
        self._bury(
            keys=[DEAD_CHUNKS, DEAD_ORDER, self.stream, self._marker(task.chunk_id)],
            args=[
                task.chunk_id,
                reason[:1000],
                time.time(),
                self.dead_max,
                task.message_id,
                self.group,
                self.marker_ttl_ms,
            ],
        )
        self.r.hdel(TRIES, task.chunk_id)
        self.trim()

    def retire_trained(self, keep: int) -> list[str]:
        """Delete the directories of trained chunks past the newest ``keep``; returns their ids.

        Only chunks on ``TRAINED`` (acked after training) are candidates; the directory goes before
        its entry, so a crash in between deletes it again (a no-op) at the next call.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1 (0 keeps every chunk: do not call)")
        removed = []
        while self.r.llen(TRAINED) > keep:
            oldest = self.r.lindex(TRAINED, -1)
            if oldest is None:
                break
            chunk_id, _, path = oldest.decode().partition("\t")
            shutil.rmtree(path, ignore_errors=True)
            self.r.rpop(TRAINED)
            removed.append(chunk_id)
        if removed:
            logger.info("chunk retention: removed %d trained chunk dirs (kept %d)", len(removed), keep)
        return removed

    def pending(self) -> int:
        """Chunks enqueued but not acknowledged (waiting or in training)."""
        self.ensure_group()
        groups = {g["name"].decode(): g for g in self.r.xinfo_groups(self.stream)}
        g = groups[self.group]
        lag = g.get("lag") or 0
        return int(g["pending"]) + int(lag)

    def enqueued(self) -> int:
        """Chunks ever queued (the stream's ``entries-added``: trimming does not lower it)."""
        self.ensure_group()
        return int(self.r.xinfo_stream(self.stream)["entries-added"])
