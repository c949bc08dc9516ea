"""Ingest: Kafka topic -> validated pairs -> chunks on disk -> chunk queue, exactly once.

Per assigned partition the worker buffers validated pairs and cuts a chunk when it holds
``chunk_size`` pairs or its first message waited ``chunk_max_wait_s``. A cut chunk is written
durably (``ChunkStore``) by a writer thread while consuming goes on, then recorded all at once
by ``ChunkQueue.record_chunk`` (one Redis script): the chunk on the queue, the next offset to
read for the partition, and the pair ids (to drop resends: ``service.chunks``). Only then are the Kafka
offsets committed (by the consumer's thread; before a rebalance gives partitions away, every cut
is recorded first). The offsets kept in Redis are the source of truth: on (re)assignment a
partition is sought to them, so messages after a crash are read again but can never land in a
second chunk, whatever the chunk boundaries are the second time.

Bad messages go to the dead-letter topic with the original bytes and headers ``ctp-error``
(code), ``ctp-reason``, ``ctp-source`` (topic/partition/offset); they never stop the worker. A
dead letter too large for the DLQ (``dlq_max_bytes``, or refused by the broker for its size) is
sent truncated to ``TRUNCATED_BYTES`` with ``ctp-truncated`` (why), ``ctp-original-bytes``; one
whose sends all fail is recorded in the bounded Redis stream ``dlq_fallback_key(topic)``. Every
dead letter of a chunk's offset range is confirmed (sent or recorded) before the range is.

Environment faults (``service.health``: Redis or Kafka away, the disk full or below
``min_free_bytes`` before a chunk is written) never end the worker: it drops what is not recorded
yet, pauses with backoff (``ctp:health`` says why), then seeks every partition back to the offset
Redis recorded and reads on. Recorded chunks stay as they are and their pair ids are known, so
nothing is lost and no pair lands in a second chunk (a dead letter of the dropped range may be
sent twice). A failed Kafka commit is only logged: Redis holds the offsets that count.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as Errors

from ctp.data import Sample
from service.chunks import ChunkQueue, ChunkStore, IngestProgress, chunk_id_for, offsets_key
from service.health import Backoff, Health, check_free_space, describe, is_environment_fault, until_up
from service.messages import (
    DEFAULT_LIMITS,
    InvalidMessage,
    Limits,
    ValidPair,
    pair_digest,
    validate_message,
)

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    future: Future
    partition: int
    next_offset: int
    ids: dict[str, bytes]  # pair id -> content digest


TRUNCATED_BYTES = 64 * 1024  # what a dead letter too large for the DLQ keeps of its value
FALLBACK_MAXLEN = 10_000  # dead letters kept in the Redis fallback stream (oldest dropped)
_SIZE_ERRORS = (Errors.MessageSizeTooLargeError, Errors.RecordListTooLargeError)


def dlq_fallback_key(topic: str) -> str:
    """Redis stream of the dead letters of ``topic`` that no DLQ send took (bounded, ~FALLBACK_MAXLEN)."""
    return f"ctp:ingest:{topic}:dlq-fallback"


@dataclass
class _DeadLetter:
    rec_topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    future: object | None  # the send's future; None: no send under way (refused at once, or failed)
    send_error: str = ""


@dataclass
class PartitionBuffer:
    first_offset: int | None = None
    last_offset: int | None = None
    started: float = 0.0  # monotonic time of the first message
    pairs: list[tuple[int, ValidPair]] = field(default_factory=list)
    ids: dict[str, bytes] = field(default_factory=dict)  # pair id -> content digest
    dead: list[_DeadLetter] = field(default_factory=list)  # sent, confirmed when the range is recorded

    def note(self, offset: int) -> None:
        if self.first_offset is None:
            self.first_offset = offset
            self.started = time.monotonic()
        self.last_offset = offset


class IngestWorker:
    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        dlq_topic: str,
        group: str,
        redis_client: redis.Redis,
        store: ChunkStore,
        queue: ChunkQueue,
        chunk_size: int = 256,
        chunk_max_wait_s: float = 60.0,
        limits: Limits = DEFAULT_LIMITS,
        client_id: str = "ctp-ingest",
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        poll_timeout_ms: int = 500,
        dlq_max_bytes: int = 10_485_760,
        dlq_timeout_s: float = 30.0,
        min_free_bytes: int = 0,
        backoff: Backoff | None = None,
    ):
        self.topic, self.dlq_topic, self.group = topic, dlq_topic, group
        self.r = redis_client
        self.store, self.queue = store, queue
        if (removed := store.remove_partial()) > 0:
            logger.info("removed %d chunk dirs a crash left half-written", removed)
        self.chunk_size, self.chunk_max_wait_s, self.limits = chunk_size, chunk_max_wait_s, limits
        self.poll_timeout_ms = poll_timeout_ms
        self.dlq_max_bytes, self.dlq_timeout_s = dlq_max_bytes, dlq_timeout_s
        self._fallback_key = dlq_fallback_key(topic)
        self.min_free_bytes = min_free_bytes
        self.backoff = backoff or Backoff()
        self.health = Health(redis_client, "ingest")
        self._rewind_needed = False  # seek every partition to Redis's offsets before reading on
        self.stats: Counter[str] = Counter()
        self.buffers: dict[int, PartitionBuffer] = {}
        # cut chunks are written and recorded by one writer thread, in order, while consuming
        # goes on; the main thread commits each to Kafka once it is recorded
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctp-chunk-writer")
        self._inflight: deque[_Job] = deque()
        self._batch_recorded: dict[str, bytes] = {}
        self.max_inflight = 2
        self._stop = threading.Event()
        self._offsets_key = offsets_key(topic)
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=max_poll_interval_ms,
            max_poll_records=500,
            # a member that died is noticed after this long (kafka-python's 45 s default delays
            # every restart after a crash by as much); heartbeats run on their own thread
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(1000, session_timeout_ms // 4),
        )
        self.consumer.subscribe([topic], listener=_Rebalance(self))
        # The DLQ carries messages as large as the broker takes (kafka-python's default is 1 MB).
        # Not idempotent: kafka-python's idempotent producer takes a broker's size refusal as fatal
        # and fails every later send; a dead letter sent twice (a retry) is harmless.
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            max_request_size=dlq_max_bytes,
            enable_idempotence=False,
        )

    # -- lifecycle
    def stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(
        self, *, burst: bool = False, idle_s: float = 3.0, assign_timeout_s: float = 120.0
    ) -> Counter[str]:
        """Consume until stopped; ``burst``: until nothing arrived for ``idle_s`` and all is cut.

        In burst mode the idle clock starts once partitions are assigned: joining a group whose
        previous member died waits for that member's session to time out first.
        """
        started = last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    if self._rewind_needed:
                        self._rewind()
                    check_free_space(self.store.root, self.min_free_bytes)  # read nothing it cannot write
                    if self._poll():
                        last_data = time.monotonic()
                    self._complete_done()
                    if burst and not self.consumer.assignment():
                        if time.monotonic() - started > assign_timeout_s:
                            raise TimeoutError(
                                f"no partitions of {self.topic} assigned in {assign_timeout_s:.0f} s"
                            )
                        last_data = time.monotonic()
                        continue
                    self._cut_due(force=burst and time.monotonic() - last_data > idle_s / 2)
                    self.health.clear()  # this round worked: a pause (if any) is over
                    self.backoff.reset()
                except Exception as e:
                    if not is_environment_fault(e):
                        raise
                    self._recover(e)
                    last_data = time.monotonic()
                    continue
                if (
                    burst
                    and time.monotonic() - last_data > idle_s
                    and not self._inflight
                    and not any(b.first_offset is not None for b in self.buffers.values())
                ):
                    break
            self._stop_gracefully()
        finally:
            self._writer.shutdown(wait=True)  # a write under way finishes (recorded, not committed)
            self.producer.flush()
            self.consumer.close(autocommit=False)
            self.producer.close()
        return self.stats

    def _poll(self) -> bool:
        """One poll, its records buffered; whether any arrived."""
        batches = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
        for tp, records in batches.items():
            self._handle_batch(tp.partition, records)
        return any(batches.values())

    def _stop_gracefully(self) -> None:
        """Cut and record what is buffered; with Redis or the disk away it is read again next time."""
        try:
            self._cut_due(force=True)
            self.drain()
        except Exception as e:
            if not is_environment_fault(e):
                raise
            logger.warning("stopping with unrecorded pairs (read again at the next start): %s", describe(e))

    # -- faults
    def _recover(self, err: BaseException) -> None:
        """An environment fault: drop what is not recorded, pause, then read again from Redis's offsets."""
        delay = self.backoff.next()
        self.stats["paused"] += 1
        self.health.paused(err, delay)
        self.abandon()
        self._stop.wait(delay)
        self._rewind_needed = True

    def abandon(self) -> None:
        """Forget every buffer and every cut not recorded yet (a write under way finishes first)."""
        for job in self._inflight:
            try:
                job.future.result()
            except Exception as e:  # not recorded: its range is read again
                logger.debug("chunk of partition %d not recorded: %s", job.partition, describe(e))
        self._inflight.clear()
        self._batch_recorded = {}
        self.buffers = {p: PartitionBuffer() for p in self.buffers}

    def _rewind(self) -> None:
        """Seek every assigned partition to the next offset Redis recorded (else Kafka's commit)."""
        for tp in self.consumer.assignment():
            stored = self.stored_offset(tp.partition)
            if stored is None:
                stored = self.consumer.committed(tp)
            if stored is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, stored)
            self.buffers[tp.partition] = PartitionBuffer()
        self._rewind_needed = False

    # -- per message
    def _handle_batch(self, partition: int, records) -> None:
        """Validate a poll's records, look their ids up in Redis at once, then buffer them in order."""
        checked = [(rec, self._validate(partition, rec)) for rec in records]
        ids = [pair.id for _, pair in checked if isinstance(pair, ValidPair)]
        # An id seen before is in Redis (recorded with a chunk within the dedup window: one script
        # for the batch, ChunkQueue.seen), in a chunk being written, in an open buffer, or recorded
        # during this batch. The same content again is a resend (dropped); other content under a
        # used id is dead-lettered (id_conflict): the first pair stays the one trained.
        self._batch_recorded = {}
        known = {i: d for i, d in zip(ids, self.queue.seen(self.topic, ids), strict=True) if d is not None}
        for rec, pair in checked:
            buf = self.buffers.setdefault(partition, PartitionBuffer())
            buf.note(rec.offset)
            if isinstance(pair, InvalidMessage):
                self._dead_letter(buf, rec, pair)
                continue
            digest = pair_digest(pair)
            before = self._digest_before(pair.id, known)
            if before is not None:
                if before in (b"", digest):  # b"": recorded by an earlier release, content unknown
                    self.stats["duplicates"] += 1
                else:
                    conflict = InvalidMessage(
                        "id_conflict",
                        f"id {pair.id!r} was taken by a pair with other content within the dedup window "
                        "(CTP_DEDUP_WINDOW_S); the first one is kept: send new content under a new id",
                    )
                    self._dead_letter(buf, rec, conflict)
                continue
            buf.ids[pair.id] = digest
            buf.pairs.append((rec.offset, pair))
            self.stats["valid"] += 1
            if len(buf.pairs) >= self.chunk_size:
                self._cut(partition)

    def _digest_before(self, pair_id: str, known: dict[str, bytes]) -> bytes | None:
        """The content digest of an earlier pair under ``pair_id``, or None. Looks in Redis's answer
        for this batch, the cuts recorded during it, the cuts being written and every open buffer
        of this worker. (Another worker's open buffer is not visible: producers should key
        messages by id, so resent pairs land in the same partition and so in the same worker.)"""
        for ids in (
            known,
            self._batch_recorded,
            *(j.ids for j in self._inflight),
            *(b.ids for b in self.buffers.values()),
        ):
            if pair_id in ids:
                return ids[pair_id]
        return None

    def _validate(self, partition: int, rec) -> ValidPair | InvalidMessage:
        self.stats["messages"] += 1
        default_id = f"{self.topic}-{partition}-{rec.offset}"
        try:
            return validate_message(rec.value, default_id=default_id, limits=self.limits)
        except InvalidMessage as e:
            return e
        except RecursionError:  # a nesting validate_message did not foresee: hostile, not a bug
            return InvalidMessage("too_deep", "message nested too deeply to validate")
        except MemoryError:
            return InvalidMessage("too_large", "message too large to validate in memory")
        except Exception as e:  # a bug must not stop ingest: dead-letter it with the error
            logger.exception("unexpected error validating %s", default_id)
            return InvalidMessage("internal", f"{type(e).__name__}: {e}")

    def _dead_letter(self, buf: PartitionBuffer, rec, err: InvalidMessage) -> None:
        """Send a dead letter (whole, or truncated when too large for the DLQ); it is confirmed with
        its buffer's range (``_confirm_dead_letters``)."""
        self.stats["dead_letters"] += 1
        self.stats[f"dlq:{err.code}"] += 1
        headers = [
            ("ctp-error", err.code.encode()),
            ("ctp-reason", err.reason.encode()[:1000]),
            ("ctp-source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode()),
        ]
        value = rec.value if rec.value is not None else b""
        dead = _DeadLetter(rec.topic, rec.partition, rec.offset, rec.key, value, headers, None)
        # headers, key and record framing fit in the margin
        if len(value) + len(rec.key or b"") + 2048 > self.dlq_max_bytes:
            dead.send_error = f"{len(value)} bytes, over the DLQ limit of {self.dlq_max_bytes}"
            self._send_truncated(dead)
        else:
            try:
                dead.future = self.producer.send(self.dlq_topic, value=value, key=rec.key, headers=headers)
            except _SIZE_ERRORS as e:
                dead.send_error = f"{type(e).__name__}: {e}"
                self._send_truncated(dead)
            except Exception as e:  # e.g. the buffer stayed full: the Redis fallback takes it
                dead.send_error = f"{type(e).__name__}: {e}"
        buf.dead.append(dead)
        logger.info("dead letter %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, err)

    def _send_truncated(self, dead: _DeadLetter) -> None:
        """Send ``TRUNCATED_BYTES`` of the value with why and the original size in the headers."""
        keep = min(TRUNCATED_BYTES, max(0, self.dlq_max_bytes // 2))
        headers = dead.headers
        if len(dead.value) > keep:
            self.stats["dlq_truncated"] += 1
            headers = [
                *headers,
                ("ctp-truncated", dead.send_error.encode()[:1000]),
                ("ctp-original-bytes", str(len(dead.value)).encode()),
            ]
        try:
            dead.future = self.producer.send(
                self.dlq_topic, value=dead.value[:keep], key=(dead.key or b"")[:1024] or None, headers=headers
            )
        except Exception as e:  # refused at once: the Redis fallback takes it when confirmed
            dead.future = None
            dead.send_error += f"; truncated send: {type(e).__name__}: {e}"

    def _confirm_dead_letters(self, dead_letters: list[_DeadLetter]) -> None:
        """Writer thread, before a range is recorded: each dead letter in the DLQ (a size failure is
        sent again truncated), or else in the Redis fallback stream. Raises only if Redis fails too:
        then the range is not recorded and is read again."""
        for dead in dead_letters:
            sent = False
            while dead.future is not None:
                try:
                    dead.future.get(timeout=self.dlq_timeout_s)
                    sent = True
                    break
                except _SIZE_ERRORS as e:  # the broker or topic takes less than dlq_max_bytes
                    already_truncated = bool(dead.send_error)
                    dead.send_error += f"{'; ' if already_truncated else ''}{type(e).__name__}: {e}"
                    if already_truncated:
                        break
                    self._send_truncated(dead)
                except Exception as e:  # broker gone, timeout: the fallback keeps it
                    dead.send_error += f"{'; ' if dead.send_error else ''}{type(e).__name__}: {e}"
                    break
            if not sent:
                self._record_fallback(dead)

    def _record_fallback(self, dead: _DeadLetter) -> None:
        self.stats["dlq_fallback"] += 1
        fields = {k: v for k, v in dead.headers if k in ("ctp-error", "ctp-reason", "ctp-source")}
        fields |= {
            "topic": dead.rec_topic.encode(),
            "partition": str(dead.partition).encode(),
            "offset": str(dead.offset).encode(),
            "original-bytes": str(len(dead.value)).encode(),
            "send-error": dead.send_error.encode()[:1000],
            "head": dead.value[:1024],
        }
        self.r.xadd(self._fallback_key, fields, maxlen=FALLBACK_MAXLEN, approximate=True)
        logger.warning(
            "dead letter %s/%d/%d not sent to %s (%s); recorded in Redis %s",
            dead.rec_topic,
            dead.partition,
            dead.offset,
            self.dlq_topic,
            dead.send_error,
            self._fallback_key,
        )

    # -- chunks
    def _cut_due(self, *, force: bool) -> None:
        now = time.monotonic()
        for p, buf in list(self.buffers.items()):
            if buf.first_offset is not None and (force or now - buf.started >= self.chunk_max_wait_s):
                self._cut(p)

    def _cut(self, partition: int) -> None:
        """Hand the partition's buffer to the writer thread; consuming goes on meanwhile."""
        buf = self.buffers[partition]
        if buf.first_offset is None:
            return
        self.buffers[partition] = PartitionBuffer()
        future = self._writer.submit(self._write_and_record, partition, buf)
        self._inflight.append(_Job(future, partition, buf.last_offset + 1, buf.ids))
        while len(self._inflight) > self.max_inflight:  # backpressure: the disk sets the pace
            self._complete_oldest()

    def _write_and_record(self, partition: int, buf: PartitionBuffer) -> tuple[str, int]:
        """Writer thread: shards durably on disk, then the one Redis record (queue, offset, ids)."""
        self._confirm_dead_letters(buf.dead)  # dead letters of this range are stored before it is recorded
        chunk_id, path, n = "", "", len(buf.pairs)
        if buf.pairs:
            check_free_space(self.store.root, self.min_free_bytes)
            chunk_id = chunk_id_for({partition: (buf.first_offset, buf.last_offset)})
            samples = [
                Sample(
                    key=f"p{partition}-o{off}",
                    image=p.image,
                    text=p.text,
                    label=p.label,
                    meta={"id": p.id, **p.meta},
                    ext=p.ext,
                )
                for off, p in buf.pairs
            ]
            path = str(self.store.write(chunk_id, samples))
        progress = IngestProgress(
            self.topic,
            partition,
            buf.last_offset + 1,
            [p.id for _, p in buf.pairs],
            [buf.ids[p.id] for _, p in buf.pairs],
        )
        self.queue.record_chunk(chunk_id, path, n, progress=progress)
        return chunk_id, n

    def _complete_oldest(self, *, commit: bool = True) -> None:
        """Main thread: wait for the oldest cut to be recorded, then commit its offset to Kafka."""
        job = self._inflight.popleft()
        chunk_id, n = job.future.result()  # a failed write raises here: nothing is committed
        self._batch_recorded.update(job.ids)
        if commit:
            self._commit(job)
        if chunk_id:
            self.stats["chunks"] += 1
            logger.info("chunk %s: %d pairs", chunk_id, n)

    def _commit(self, job: _Job) -> None:
        """Tell Kafka too (the group's lag); Redis already has the offset, so a failure only logs."""
        try:
            self.consumer.commit(
                {TopicPartition(self.topic, job.partition): _offset_meta(job.next_offset)}, timeout_ms=10_000
            )
        except Errors.KafkaError as e:
            logger.warning("Kafka commit of partition %d failed (Redis has it): %s", job.partition, e)

    def _complete_done(self) -> None:
        while self._inflight and self._inflight[0].future.done():
            self._complete_oldest()

    def drain(self, *, commit: bool = True) -> None:
        """Every cut recorded (and committed to Kafka unless ``commit=False``)."""
        while self._inflight:
            self._complete_oldest(commit=commit)

    def stored_offset(self, partition: int) -> int | None:
        v = self.r.hget(self._offsets_key, partition)
        return int(v) if v is not None else None


def _offset_meta(offset: int):
    from kafka.structs import OffsetAndMetadata

    try:
        return OffsetAndMetadata(offset, "", -1)
    except TypeError:  # older kafka-python: (offset, metadata)
        return OffsetAndMetadata(offset, "")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: IngestWorker):
        self.w = worker

    def on_partitions_revoked(self, revoked):
        # Cut chunks are recorded before the partitions go: the next owner starts at the offsets
        # recorded in Redis. (No Kafka commit here: kafka-python runs this callback on its IO
        # thread, where blocking calls are refused; Redis is the source of truth anyway.) What
        # is not chunked yet the next owner reads again.
        try:
            self.w.drain(commit=False)
        except Exception as e:  # Redis or the disk away: nothing more is recorded, all is read again
            if not is_environment_fault(e):
                raise
            logger.warning("cuts not recorded before the rebalance: %s", describe(e))
            self.w.abandon()
        for tp in revoked:
            self.w.buffers.pop(tp.partition, None)

    def on_partitions_assigned(self, assigned):
        logger.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
        for tp in assigned:
            self.w.buffers[tp.partition] = PartitionBuffer()
            try:
                stored = self.w.stored_offset(tp.partition)
            except Exception as e:  # Redis away: the main loop seeks once it answers
                if not is_environment_fault(e):
                    raise
                self.w._rewind_needed = True
                continue
            if stored is not None:
                self.w.consumer.seek(tp, stored)


def main(argv: list[str] | None = None) -> int:
    """``ctp ingest [--burst]``: run the ingest worker with the CTP_ settings."""
    from service.cli import ingest_parser
    from service.settings import load_settings

    args = ingest_parser().parse_args(argv)
    s = load_settings()
    client = redis.Redis.from_url(s.redis_url)
    from service import effective

    worker = until_up(lambda: _make_worker(s, client), what="ingest")
    worker.install_signal_handlers()
    # the chunk size status and the dashboard show
    until_up(lambda: effective.record(client, "ingest", s), what="ingest")
    stats = worker.run(burst=args.burst)
    print(dict(stats))
    return 0


def _make_worker(s: Settings, client: redis.Redis) -> IngestWorker:
    """The worker ``ctp ingest`` runs, from the settings (it connects to Kafka)."""
    return IngestWorker(
        bootstrap=s.kafka_bootstrap,
        topic=s.topic,
        dlq_topic=s.dlq_topic,
        group=s.consumer_group,
        redis_client=client,
        store=ChunkStore(s.data_dir / "chunks"),
        queue=ChunkQueue(client, dedup_window_s=s.dedup_window_s),
        chunk_size=s.chunk_size,
        chunk_max_wait_s=s.chunk_max_wait_s,
        session_timeout_ms=s.kafka_session_timeout_ms,
        max_poll_interval_ms=s.kafka_max_poll_interval_ms,
        limits=s.message_limits(),
        dlq_max_bytes=s.dlq_max_message_bytes,
        min_free_bytes=s.min_free_bytes,
    )
