"""Checkpoint registry: versions in Redis, files in the data dir, retention, and announcements.

- ``{prefix}:next``: version counter (INCR); a version number is never reused.
- ``{prefix}:v:{n}``: hash with ``path``, ``meta`` (JSON: model, strategy, chunks, metrics...),
  ``created``.
- ``{prefix}:history``: sorted set of live versions (score = version).
- ``{prefix}:latest``: the newest version: the pollable pointer for watchers.
- channel ``{prefix}:updates``: the version number is published when it becomes latest.
- ``{prefix}:eval``: stream, the eval history: one entry per version ever registered (field
  ``row``, JSON: version, created, chunks, chunk id, strategy, metrics, its row of the task
  matrix), appended in the registering transaction and never trimmed by retention. It is the one
  copy of the curves: a version's ``meta`` carries only its own row (``eval``) and the bounded
  tracker state, so ``meta.json`` and the version hash stay the same size however long the
  stream runs. ``chunk_ids`` in a meta is the newest ``RECENT_CHUNK_IDS`` (the trainer's check
  for a chunk published but not acked); the whole lineage is the history's ``chunk_id`` column.

A checkpoint is written whole on disk first (``ctp.checkpoint.save_checkpoint``), then recorded
in one MULTI/EXEC; a crash in between leaves an unregistered directory, never a registered
version without files. Retention keeps the newest ``keep`` versions (files and entries).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:  # torch only where a version is written: readers (ctp status) import no torch
    import torch

logger = logging.getLogger(__name__)


RECENT_CHUNK_IDS = 32  # chunk ids a version's meta keeps (newest last)
EVAL_HISTORY_MAX = 100_000  # eval rows kept (one per version; CTP_EVAL_HISTORY_MAX)


def recent_chunk_ids(ids: list[str], new: str) -> list[str]:
    """``ids`` + ``new``, only the newest ``RECENT_CHUNK_IDS``."""
    return [*ids, new][-RECENT_CHUNK_IDS:]


def eval_fields(evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A version's ``metrics`` (per set: the metrics after its chunk, average accuracy, forgetting,
    BWT) and ``eval`` (per set: kind, score and its own row) from ``StreamEvalTracker.after_chunk``."""
    summary = ("avg_accuracy", "forgetting", "bwt")
    return {
        "metrics": {n: {**(e["metrics"] or {}), **{k: e[k] for k in summary}} for n, e in evals.items()},
        "eval": {n: {"kind": e["kind"], "score": e["score"], "row": e["row"]} for n, e in evals.items()},
    }


def eval_row(version: int, meta: dict[str, Any], created: float | None) -> dict[str, Any]:
    """The version's entry in the eval history (``{prefix}:eval``)."""
    return {
        "version": version,
        "created": created,
        "chunks": meta.get("chunks"),
        "chunk_id": meta.get("chunk_id"),
        "strategy": meta.get("strategy"),
        "metrics": meta.get("metrics", {}),
        "eval": meta.get("eval", {}),
    }


class FencedOut(RuntimeError):
    """The publisher no longer holds the lease it published under."""


@dataclass
class VersionInfo:
    version: int
    path: Path
    meta: dict[str, Any]
    created: float

    def summary(self) -> dict[str, Any]:
        """What a version list shows (``ctp status``, ``GET /model``, the dashboard)."""
        return version_summary(self.version, self.meta, self.created)


def version_summary(version: int | str, meta: dict[str, Any], created: float | None) -> dict[str, Any]:
    """A version's summary from its ``meta``: also for checkpoints outside a registry (no ``created``)."""
    return {
        "version": version,
        "created": created,
        "strategy": meta.get("strategy"),
        "chunks": meta.get("chunks"),
        "metrics": meta.get("metrics", {}),
        "train": meta.get("train", {}),
    }


class Registry:
    def __init__(
        self,
        client: redis.Redis,
        *,
        root: str | Path,
        prefix: str = "ctp:registry",
        keep: int = 5,
        eval_max: int = EVAL_HISTORY_MAX,
    ):
        if keep < 1 or eval_max < 0:
            raise ValueError("keep must be at least 1 and eval_max at least 0")
        self.r = client
        self.root = Path(root)
        self.prefix = prefix
        self.keep = keep
        self.eval_max = eval_max  # eval rows kept (the oldest trimmed with each XADD); 0: all
        self.channel = f"{prefix}:updates"
        self.eval_key = f"{prefix}:eval"

    def _vkey(self, version: int) -> str:
        return f"{self.prefix}:v:{version}"

    def publish(
        self, model: torch.nn.Module, meta: dict[str, Any], *, fence: tuple[str, str] | None = None
    ) -> VersionInfo:
        """Write the checkpoint, then register it in one transaction.

        ``fence=(key, value)``: register only while Redis ``key`` still holds ``value`` (the
        trainer's lease), checked under WATCH in the same transaction; else ``FencedOut``
        and nothing is registered (a trainer that lost its lease cannot fork the lineage). The
        connection lost meanwhile raises ``redis.ConnectionError`` (the version may or may not be
        registered: ``latest()`` tells).
        """
        from ctp.checkpoint import save_checkpoint

        version = int(self.r.incr(f"{self.prefix}:next"))
        path = save_checkpoint(self.root / f"v{version:06d}", model, {**meta, "version": version})
        created = time.time()
        with self.r.pipeline() as pipe:
            try:
                if fence is not None:
                    pipe.watch(fence[0])
                    if pipe.get(fence[0]) != fence[1].encode():
                        raise FencedOut(f"lease {fence[0]} is not held by {fence[1]}")
                pipe.multi()
                pipe.hset(
                    self._vkey(version),
                    mapping={"path": str(path), "meta": json.dumps(meta, default=str), "created": created},
                )
                pipe.zadd(f"{self.prefix}:history", {str(version): version})
                row = eval_row(version, meta, created)
                pipe.xadd(
                    self.eval_key,
                    {"row": json.dumps(row, default=str)},
                    maxlen=self.eval_max or None,
                    approximate=False,
                )
                pipe.set(f"{self.prefix}:latest", version)
                pipe.publish(self.channel, version)
                pipe.execute()
            except (FencedOut, redis.WatchError) as e:
                if isinstance(e.__context__, redis.ConnectionError | redis.TimeoutError):
                    # the connection died, not the lease: an environment fault to retry. EXEC may
                    # have run, so the files stay (an unregistered dir is removed at the next start)
                    raise redis.ConnectionError(f"Redis went away registering version {version}") from e
                shutil.rmtree(path, ignore_errors=True)
                raise FencedOut(
                    f"lease {fence[0] if fence else '?'} lost before version {version} was registered"
                ) from None
        logger.info("published checkpoint version %d at %s", version, path)
        self._retain()
        return VersionInfo(version, path, meta, created)

    def _retain(self) -> None:
        live = [int(v) for v in self.r.zrange(f"{self.prefix}:history", 0, -1)]
        for version in live[: max(0, len(live) - self.keep)]:
            info = self.get(version)
            with self.r.pipeline() as pipe:
                pipe.zrem(f"{self.prefix}:history", str(version))
                pipe.delete(self._vkey(version))
                pipe.execute()
            if info is not None:
                shutil.rmtree(info.path, ignore_errors=True)

    def remove_unregistered(self) -> list[Path]:
        """Delete what a crash mid-publish left: temp dirs and version dirs never registered.

        Call it from the single trainer at start, when no publish can be in progress.
        """
        if not self.root.is_dir():
            return []
        live = {Path(info.path).name for info in self.history()}
        removed = [
            d
            for d in self.root.iterdir()
            if d.is_dir() and d.name not in live and (d.name.startswith(".v") or d.name[:1] == "v")
        ]
        for d in removed:
            shutil.rmtree(d, ignore_errors=True)
            logger.info("removed unregistered checkpoint dir %s", d)
        return removed

    def get(self, version: int) -> VersionInfo | None:
        h = self.r.hgetall(self._vkey(version))
        if not h:
            return None
        return VersionInfo(version, Path(h[b"path"].decode()), json.loads(h[b"meta"]), float(h[b"created"]))

    def latest_version(self) -> int | None:
        v = self.r.get(f"{self.prefix}:latest")
        return int(v) if v is not None else None

    def latest(self) -> VersionInfo | None:
        v = self.latest_version()
        return self.get(v) if v is not None else None

    def history(self) -> list[VersionInfo]:
        return [
            info
            for v in self.r.zrange(f"{self.prefix}:history", 0, -1)
            if (info := self.get(int(v))) is not None
        ]

    def eval_history(self, *, count: int | None = None) -> list[dict[str, Any]]:
        """The eval history, oldest first (the newest ``count`` rows when given)."""
        if count is None:
            entries = self.r.xrange(self.eval_key)
        else:
            entries = self.r.xrevrange(self.eval_key, count=count)[::-1]
        return [json.loads(fields[b"row"]) for _, fields in entries]

    def subscribe(self) -> redis.client.PubSub:
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        return pubsub
