"""Size-rotated logs for the processes ``ctp up`` and ``service.local.infra`` start.

A child's stdout and stderr go into a pipe that a daemon thread of the parent drains, line by
line, into a ``RotatingLog``: ``name.log`` grows to ``max_bytes``, then ``name.log.1`` ..
``name.log.N`` shift up (the oldest is deleted) and a new ``name.log`` starts, so a role's logs
take at most ``(backups + 1) * max_bytes`` (plus one line) however long the stack runs.
``max_bytes=0`` never rotates. Rotation happens between lines only; a line longer than
``MAX_LINE`` bytes is written in pieces. A write that fails (disk full) drops that line and the
drain goes on, so a child never blocks on a full pipe because its log cannot be written.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

LOG_MAX_BYTES = 10_000_000  # the defaults of CTP_LOG_MAX_BYTES and CTP_LOG_BACKUPS
LOG_BACKUPS = 3
MAX_LINE = 65536


class RotatingLog:
    """An append-only log file rotated by size; thread-safe (a restarted child's new drain thread
    may write while the old one flushes the dead child's last lines)."""

    def __init__(self, path: str | Path, *, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS):
        if max_bytes < 0 or backups < 1:
            raise ValueError("max_bytes must be >= 0 and backups >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None

    def backup(self, n: int) -> Path:
        """The n-th newest rotated file (``name.log.n``)."""
        return self.path.with_name(f"{self.path.name}.{n}")

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                out = self._open()
                if self.max_bytes and out.tell() and out.tell() + len(data) > self.max_bytes:
                    out = self._rotate()
                out.write(data)
                out.flush()
            except OSError:  # disk full, dir removed: this line is lost, the next one tries again
                self._close()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open between writes
        return self._file

    def _rotate(self) -> IO[bytes]:
        self._close()
        for n in range(self.backups - 1, 0, -1):
            if self.backup(n).exists():
                os.replace(self.backup(n), self.backup(n + 1))
        os.replace(self.path, self.backup(1))
        return self._open()

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def close(self) -> None:
        with self._lock:
            self._close()


def _drain(stream: IO[bytes], log: RotatingLog) -> None:
    with stream:
        for line in iter(lambda: stream.readline(MAX_LINE), b""):
            log.write(line)


def start_logged(argv: Sequence[str], log: RotatingLog, **popen: Any) -> subprocess.Popen[bytes]:
    """``Popen(argv, **popen)`` with stdout and stderr drained into ``log`` by a daemon thread."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    assert proc.stdout is not None
    name = f"log-{Path(argv[0]).name}-{proc.pid}"
    threading.Thread(target=_drain, args=(proc.stdout, log), name=name, daemon=True).start()
    return proc
