"""Faults that heal and faults that do not: the classifier, the backoff, the free-space check and the
health record that ``ctp status`` and ``/status`` show.

A chunk that cannot be trained (corrupt shards, a decode error, a bug its data triggers) is a
*chunk fault*: it spends one of the chunk's tries. An environment that cannot work now (disk full,
Redis or Kafka away, CUDA out of memory) is an *environment fault*: ``is_environment_fault`` says
so, and the role pauses with ``Backoff``, records why in ``HEALTH_KEY``, and retries the same work
when the pause ends, spending nothing. ``check_free_space`` raises ``LowDiskSpace`` (an ENOSPC
``OSError``, so an environment fault) before a chunk or a checkpoint is written on a disk with less
than ``CTP_MIN_FREE_BYTES`` free. This module imports neither torch nor kafka at import time.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_KEY = "ctp:health"  # hash: role -> JSON {state, reason, since, retry_in}; a role clears its own
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


class LowDiskSpace(OSError):
    """Less than the minimum free bytes on the disk about to be written (an environment fault)."""

    def __init__(self, path: Path, free: int, minimum: int):
        super().__init__(
            errno.ENOSPC, f"{free / 2**20:.0f} MiB free on {path}, below CTP_MIN_FREE_BYTES {minimum}"
        )


def _redis_fault(exc: BaseException) -> bool:
    import redis

    # BusyLoadingError (Redis replaying its AOF) is a ConnectionError
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError)


def _kafka_fault(exc: BaseException) -> bool:
    if not type(exc).__module__.startswith("kafka"):
        return False
    from kafka import errors as Errors

    # retriable: broker away, timeouts, no leader; CommitFailed: the group rebalanced meanwhile
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, Errors.CommitFailedError)


def _cuda_oom(exc: BaseException) -> bool:
    if type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch"):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def is_environment_fault(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the environment cannot work now:
    no space (ENOSPC, EDQUOT) or an I/O error, Redis or Kafka unreachable, CUDA out of memory.
    Anything else is the work's own fault."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return True
        if _redis_fault(e) or _kafka_fault(e) or _cuda_oom(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def free_bytes(path: str | Path) -> int:
    """Free bytes (for an unprivileged writer) on the disk holding ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | Path, minimum: int) -> None:
    """Raise ``LowDiskSpace`` when the disk of ``path`` has fewer than ``minimum`` bytes free."""
    if minimum > 0 and (free := free_bytes(path)) < minimum:
        raise LowDiskSpace(Path(path), free, minimum)


def disk_status(path: str | Path, minimum: int) -> dict[str, Any]:
    """What status shows of a data dir: free bytes, the minimum and whether it is below it."""
    free = free_bytes(path)
    return {
        "path": str(Path(path).absolute()),
        "free_bytes": free,
        "min_free_bytes": minimum,
        "low": free < minimum,
    }


@dataclass
class Backoff:
    """Exponential delays with a cap and jitter: ``first``, ``2 * first``, ... up to ``cap`` seconds,
    each scaled by a random factor in [1 - jitter, 1]; ``reset()`` after a success."""

    first: float = 0.5
    cap: float = 30.0
    jitter: float = 0.25
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return delay * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


def until_up(make: Callable[[], T], *, what: str, backoff: Backoff | None = None) -> T:
    """``make()``, again after each environment fault (Redis or Kafka not up yet) until it succeeds:
    a role started before its servers waits for them instead of exiting. Other errors raise."""
    backoff = backoff or Backoff()
    while True:
        try:
            return make()
        except Exception as e:
            if not is_environment_fault(e):
                raise
            delay = backoff.next()
            log = logger.warning if backoff.attempt == 1 else logger.debug
            log("%s: waiting for the servers (%s); retrying in %.1f s", what, describe(e), delay)
            time.sleep(delay)


class Health:
    """One role's pause record in ``HEALTH_KEY``: ``paused(exc, retry_in)`` while it waits for the
    environment, ``clear()`` when its work succeeds again. Writes are best effort (Redis may be the
    fault); the log says the pause once and the recovery once."""

    def __init__(self, client: redis.Redis, role: str):
        self.r, self.role = client, role
        self.since: float | None = None  # when the current pause began; None: working
        self._stale = True  # a record an earlier process left: the first clear() removes it

    @property
    def is_paused(self) -> bool:
        return self.since is not None

    def paused(self, exc: BaseException, retry_in: float) -> None:
        reason = describe(exc)
        if self.since is None:
            self.since = time.time()
            logger.warning("%s paused: %s (retrying, nothing is spent)", self.role, reason)
        else:
            logger.debug("%s still paused: %s", self.role, reason)
        record = {"state": "paused", "reason": reason, "since": self.since, "retry_in": round(retry_in, 2)}
        self._stale = True
        self._write(lambda: self.r.hset(HEALTH_KEY, self.role, json.dumps(record)))

    def clear(self) -> None:
        if self.since is not None:
            logger.info("%s resumed after %.1f s", self.role, time.time() - self.since)
            self.since = None
        if self._stale:
            self._stale = not self._write(lambda: self.r.hdel(HEALTH_KEY, self.role))

    def _write(self, op) -> bool:
        try:
            op()
            return True
        except Exception as e:  # Redis is away: the log has it; written again on the next try
            logger.debug("health record for %s not written: %s", self.role, e)
            return False


def read_health(client: redis.Redis) -> dict[str, Any]:
    """Every role's pause record (role -> {state, reason, since, retry_in}); empty when all work."""
    out: dict[str, Any] = {}
    for role, raw in client.hgetall(HEALTH_KEY).items():
        try:
            out[role.decode()] = json.loads(raw)
        except ValueError:
            out[role.decode()] = {"state": "unknown", "reason": raw.decode("utf-8", "replace")}
    return out
