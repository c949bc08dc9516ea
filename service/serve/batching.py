"""Dynamic batching: concurrent requests share one forward pass.

Requests ``submit`` a job (images or texts, with the snapshot they hold) to a bounded queue and
await its future. One worker task takes the first waiting job, then keeps collecting until it
holds ``max_batch_size`` jobs or ``max_wait_ms`` passed since the first, and runs the forward in
a single dedicated thread (forwards never overlap, the event loop never blocks). Jobs of one
batch are grouped by (snapshot, kind): each group is one forward on its own snapshot's model, so
batching never mixes versions. A full queue refuses at once (``Overloaded``): the API answers
503 with Retry-After instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from service.serve.snapshot import Snapshot

logger = logging.getLogger(__name__)

Kind = Literal["images", "texts"]


class Overloaded(RuntimeError):
    """The queue is full; retry later."""


@dataclass
class _Job:
    snapshot: Snapshot
    kind: Kind
    payload: Tensor | list[str]  # images [n, 3, H, W] or n texts
    future: asyncio.Future = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.payload)


class Batcher:
    def __init__(
        self,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.queue_size = queue_size
        self.on_batch = on_batch  # (jobs in the batch, forward seconds)
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctp-forward")

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.create_task(self._run(), name="ctp-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue is not None:  # nothing left waiting forever
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(Overloaded("server shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, snapshot: Snapshot, kind: Kind, payload: Tensor | list[str]) -> Tensor:
        """Embeddings ``[n, D]`` of ``payload`` by ``snapshot``'s model; ``Overloaded`` if the queue is
        full."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        job = _Job(snapshot, kind, payload, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue_size} requests already waiting") from None
        return await job.future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, _forward, batch)
            except Exception as e:  # fail this batch's requests, keep the worker
                logger.exception("forward failed")
                results = [e] * len(batch)
            if self.on_batch:
                self.on_batch(len(batch), time.perf_counter() - t0)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # the request was cancelled meanwhile
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)


def _forward(batch: list[_Job]) -> list[Tensor | BaseException]:
    """One forward per (snapshot, kind) group; rows are split back to their jobs."""
    out: list[Tensor | BaseException | None] = [None] * len(batch)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, job in enumerate(batch):
        groups.setdefault((id(job.snapshot), job.kind), []).append(i)
    for members in groups.values():
        jobs = [batch[i] for i in members]
        snap, kind = jobs[0].snapshot, jobs[0].kind
        try:
            if kind == "images":
                emb = snap.encode_images(torch.cat([j.payload for j in jobs]))  # [sum n, D]
            else:
                emb = snap.encode_texts([t for j in jobs for t in j.payload])
            parts = torch.split(emb, [j.n for j in jobs])
            for i, part in zip(members, parts, strict=True):
                out[i] = part
        except Exception as e:
            for i in members:
                out[i] = e
    return out  # type: ignore[return-value]
