"""Where served versions come from: the registry (``RegistrySource``) or a checkpoint directory
(``DirectorySource``). ``ModelHolder`` asks ``latest()`` each round and ``wait``s between rounds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

from ctp.checkpoint import META_NAME, WEIGHTS_NAME, CheckpointError, load_meta
from service.registry import Registry, version_summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionRef:
    key: Any  # identity of this version at the source: never loaded twice, never retried
    version: str  # the name answers carry
    path: Path


class VersionSource(Protocol):
    def latest(self) -> VersionRef | None: ...
    def wait(self, timeout: float, stop: threading.Event) -> None: ...
    def history(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class RegistrySource:
    """The registry's latest pointer, woken early by its pub/sub channel.

    Pub/sub only shortens the wait: a dropped connection or a missed message costs at most one
    polling interval, because ``latest()`` always reads the pointer itself.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._pubsub: redis.client.PubSub | None = None
        self._pubsub_down = False  # warned about already: once per outage

    def latest(self) -> VersionRef | None:
        info = self.registry.latest()
        return None if info is None else VersionRef(info.version, str(info.version), info.path)

    def wait(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        try:
            if self._pubsub is None:
                self._pubsub = self.registry.subscribe()
                if self._pubsub_down:
                    logger.info("registry pub/sub subscribed again")
                    self._pubsub_down = False
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if self._pubsub.get_message(timeout=min(left, 0.5)) is not None:
                    return
        except (redis.RedisError, OSError) as e:
            log = logger.debug if self._pubsub_down else logger.warning
            log("registry pub/sub unavailable (%s); polling", e)
            self._pubsub_down = True
            self.close()
            stop.wait(max(0.0, deadline - time.monotonic()))

    def history(self) -> list[dict[str, Any]]:
        return [{**i.summary(), "version": str(i.version)} for i in self.registry.history()]

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self._pubsub.close()
            self._pubsub = None


class DirectorySource:
    """Checkpoints on disk without Redis: ``root`` is one checkpoint directory, or a directory of
    them (the newest by name wins: the registry's ``v000001`` names sort by version).

    A checkpoint replaced in place (new weights mtime) counts as a new version.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._unreadable: set[Path] = set()  # warned about once each

    def _dirs(self) -> list[Path]:
        if (self.root / META_NAME).is_file():
            return [self.root]
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / META_NAME).is_file()
        )

    def latest(self) -> VersionRef | None:
        dirs = self._dirs()
        if not dirs:
            return None
        path = dirs[-1]
        try:
            mtime = (path / WEIGHTS_NAME).stat().st_mtime_ns
            version = str(load_meta(path).get("version", path.name))
        except (OSError, CheckpointError) as e:  # load_meta raises CheckpointError for a bad meta.json
            if path not in self._unreadable:
                self._unreadable.add(path)
                logger.warning("checkpoint %s unreadable: %s", path, e)
            return VersionRef((str(path), -1), path.name, path)  # fails to load, once
        return VersionRef((str(path), mtime), version, path)

    def wait(self, timeout: float, stop: threading.Event) -> None:
        stop.wait(timeout)

    def history(self) -> list[dict[str, Any]]:
        out = []
        for path in self._dirs():
            try:
                meta = load_meta(path)
            except CheckpointError:
                continue
            out.append(version_summary(str(meta.get("version", path.name)), meta, None))
        return out

    def close(self) -> None:
        pass
