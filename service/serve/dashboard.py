"""What the dashboard page shows: ``ctp status`` plus the curves of the newest version's eval state.

``DashboardStatus.gather()`` (blocking; the API runs it in a thread) returns one JSON-able dict:
everything ``service.status.collect_status`` reports, and

- ``ingest``: topic lag, ``produced`` and ``dead_letters`` (count, newest reasons) from Kafka, with
  ``rate_per_s``: messages produced per second, from successive ``produced`` counts (over the
  last ``rate_window_s``). Kafka is asked by a background thread, never by the request: an
  unreachable broker takes kafka-python 30 s to give up, and the page must not wait for that.
  Until the first answer ``ingest_pending`` is true.
- ``serving``: the version this process serves (null before the first load).
- ``curves``: per eval set, after each chunk: the headline score (classification ``acc1``,
  retrieval ``mean_recall@1``), average accuracy and forgetting (design.md definitions), and
  ``chunk``, the chunk count each point is after. They come from the registry's eval history
  (``Registry.eval_history``, one row per version, the newest ``CURVE_POINTS``), read again only
  when the latest version changed; without a registry (or before any row), from the versions
  listed (each carries its own metrics).
- ``version_metrics``: per eval set, one point per registry version: its chunks, score,
  forgetting and average accuracy from the version's ``metrics``.

Non-finite floats become null (JSON has no NaN). Errors are keyed by the store that failed: Redis
away is ``errors.redis`` (also when it failed the lag's check, which is then retried at once once
Redis answers), a broker away ``errors.kafka``; each is gone with the first answer after.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any

import redis

from service.registry import Registry
from service.serve.holder import ModelHolder
from service.serve.sources import DirectorySource
from service.settings import Settings
from service.status import collect_status, store_of, topic_lag

logger = logging.getLogger(__name__)

SCORE = {"classification": "acc1", "retrieval": "mean_recall@1"}


def finite(x: Any) -> Any:
    """``x`` with every NaN/inf float (at any depth) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


CURVE_POINTS = 1000  # newest history rows the curves show: the page and the API stay bounded


def eval_curves(rows: list[dict[str, Any]], *, version: Any = None) -> dict[str, Any]:
    """Per eval set, one point per row (a version: the metrics after its chunk, ``eval_row``
    format, or a version summary): score, average accuracy, forgetting; ``None`` where a set
    was not measured."""
    rows = [r for r in rows if isinstance(r, dict)][-CURVE_POINTS:]
    sets: dict[str, dict[str, Any]] = {}
    for row in rows:
        for name, m in (row.get("metrics") or {}).items():
            if not isinstance(m, dict) or name in sets:
                continue
            kind = "classification" if "acc1" in m else "retrieval"
            sets[name] = {"kind": kind, "score": SCORE[kind]}
    chunks = [r.get("chunks") if isinstance(r.get("chunks"), int) else i + 1 for i, r in enumerate(rows)]
    for name, c in sets.items():
        metrics = [(row.get("metrics") or {}).get(name) for row in rows]
        metrics = [m if isinstance(m, dict) else {} for m in metrics]
        c["chunk"] = chunks
        c["after_chunk"] = [_num(m.get(c["score"])) for m in metrics]
        c["avg_accuracy"] = [_num(m.get("avg_accuracy")) for m in metrics]
        c["forgetting"] = [_num(m.get("forgetting")) for m in metrics]
    return {
        "version": version if version is not None else (rows[-1].get("version") if rows else None),
        "chunks": chunks[-1] if chunks else 0,
        "sets": sets,
    }


def version_metrics(versions: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per eval set, one point per version that has metrics for it: the forgetting curve over versions."""
    out: dict[str, list[dict[str, Any]]] = {}
    for v in versions:
        for name, m in (v.get("metrics") or {}).items():
            if not isinstance(m, dict):
                continue
            key = "acc1" if "acc1" in m else "mean_recall@1"
            out.setdefault(name, []).append(
                {
                    "version": str(v.get("version")),
                    "chunks": v.get("chunks"),
                    "score": key,
                    "value": _num(m.get(key)),
                    "forgetting": _num(m.get("forgetting")),
                    "avg_accuracy": _num(m.get("avg_accuracy")),
                    "bwt": _num(m.get("bwt")),
                }
            )
    return out


class IngestRate:
    """Messages per second from successive ``(time, produced)`` samples over the last ``window_s``."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque(maxlen=1000)

    def add(self, t: float, produced: int) -> None:
        if self.samples and produced < self.samples[-1][1]:  # topic recreated: start again
            self.samples.clear()
        self.samples.append((t, produced))
        while len(self.samples) > 2 and self.samples[0][0] < t - self.window_s:
            self.samples.popleft()

    def per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, p0), (t1, p1) = self.samples[0], self.samples[-1]
        return (p1 - p0) / (t1 - t0) if t1 > t0 else None


class KafkaLag:
    """The topic's lag, refreshed by one background thread at most every ``every_s`` while asked."""

    def __init__(
        self,
        settings: Settings,
        *,
        every_s: float = 2.0,
        retry_s: float = 15.0,
        rate_window_s: float = 60.0,
        timeout_ms: int = 5000,
    ):
        self.settings = settings
        self.every_s = every_s
        self.retry_s = retry_s  # after a failure: kafka-python logs every reconnect, spare the log
        self.timeout_ms = timeout_ms
        self.rate = IngestRate(rate_window_s)
        self.ingest: dict[str, Any] | None = None
        self.error: str | None = None
        self.error_store: str | None = None  # "kafka" or "redis": which one the last check failed on
        self.checked_at: float | None = None
        self._next_at = -math.inf  # monotonic time from which the next check may start
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def poll(self) -> dict[str, Any]:
        """The last answer (``ingest``, ``error``, ``checked_at``); starts a refresh when due."""
        with self._lock:
            idle = self._thread is None or not self._thread.is_alive()
            if idle and time.monotonic() >= self._next_at:
                self._next_at = time.monotonic() + self.every_s
                self._thread = threading.Thread(target=self._check, name="ctp-dashboard-kafka", daemon=True)
                self._thread.start()
            return {"ingest": self.ingest, "error": self.error, "checked_at": self.checked_at}

    def error_from(self) -> str | None:
        """The store the last check failed on (None: it answered)."""
        return self.error_store if self.error is not None else None

    def retry_now(self) -> None:
        """Let the next ``poll`` check again at once (the store that failed answers again)."""
        with self._lock:
            self._next_at = -math.inf

    def _check(self) -> None:
        r = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
        try:
            lag = topic_lag(self.settings, r, timeout_ms=self.timeout_ms, previous=self.ingest)
            now = time.time()
            with self._lock:
                self.rate.add(now, int(lag["produced"]))
                self.ingest = {**lag, "rate_per_s": self.rate.per_s()}
                self.error, self.error_store, self.checked_at = None, None, now
        except Exception as e:  # broker or Redis away: report it, keep the page up
            with self._lock:
                self.ingest, self.error, self.checked_at = None, f"{type(e).__name__}: {e}", time.time()
                self.error_store = store_of(e)
                # the long pause spares the log kafka-python fills while a broker is away
                self._next_at = time.monotonic() + (
                    self.retry_s if self.error_store == "kafka" else self.every_s
                )
        finally:
            r.close()


class DashboardStatus:
    def __init__(self, settings: Settings, holder: ModelHolder, *, kafka: KafkaLag | None = None):
        self.settings = settings
        self.holder = holder
        self.kafka = kafka if kafka is not None else KafkaLag(settings)
        self._curves_key: Any = None
        self._curves: dict[str, Any] = eval_curves([])

    def gather(self) -> dict[str, Any]:
        s = self.settings
        out = collect_status(s, kafka=False)
        k = self.kafka.poll()
        if k["ingest"] is not None:
            out["ingest"] = k["ingest"]
        elif (store := self.kafka.error_from()) == "redis" and "redis" not in out["errors"]:
            self.kafka.retry_now()  # Redis answers again: the lag's Redis error is stale
        elif store is not None:
            out["errors"].setdefault(store, k["error"])
        out["ingest_pending"] = k["checked_at"] is None
        out["ingest_checked_at"] = k["checked_at"]
        if isinstance(self.holder.source, DirectorySource):  # no registry: versions are the dir's
            try:
                out["versions"] = self.holder.source.history()
                out["latest"] = out["versions"][-1]["version"] if out["versions"] else None
            except Exception as e:
                out["errors"]["checkpoints"] = f"{type(e).__name__}: {e}"
        out["serving"] = self._serving()
        out["curves"] = self._latest_curves(out.get("versions") or [])
        out["version_metrics"] = version_metrics(out.get("versions") or [])
        return finite(out)

    def _serving(self) -> dict[str, Any] | None:
        snap = self.holder.snapshot
        if snap is None:
            return None
        m = snap.meta
        return {
            "model_version": snap.version,
            "model": m.get("model"),
            "strategy": m.get("strategy"),
            "chunks": m.get("chunks"),
            "loaded_at": snap.loaded_at,
            "gallery_size": len(snap.index),
            "index": snap.index.kind,
            "swaps": self.holder.stats.swaps,
        }

    def _latest_curves(self, versions: list[dict[str, Any]]) -> dict[str, Any]:
        """The curves from the registry's eval history, read again when the latest version moved;
        from ``versions`` (their own metrics) without a registry or a history."""
        if isinstance(self.holder.source, DirectorySource):
            return eval_curves(versions)
        try:
            r = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
            try:
                reg = Registry(r, root=self.settings.data_dir / "checkpoints")
                key = reg.latest_version()
                if key != self._curves_key or key is None:
                    rows = reg.eval_history(count=CURVE_POINTS)
                    self._curves_key, self._curves = key, eval_curves(rows or versions)
            finally:
                r.close()
        except Exception as e:  # Redis away: keep the curves computed last
            logger.debug("eval history unavailable: %s", e)
        return self._curves
