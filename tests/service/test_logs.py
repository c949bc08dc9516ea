"""Rotated logs (service.local.logs): bounded files, nothing reordered, children's output drained,
and the servers ``ctp up`` starts (here a real redis-server) logging through it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from service.local.infra import RedisServer
from service.local.logs import RotatingLog, start_logged

pytestmark = pytest.mark.timeout(120)


def _files(log: RotatingLog) -> list[Path]:
    """The log's files, oldest first."""
    rotated = sorted(log.path.parent.glob(log.path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*rotated, log.path]


def _lines(log: RotatingLog) -> list[bytes]:
    return b"".join(p.read_bytes() for p in _files(log)).splitlines()


def test_a_rotating_log_stays_bounded_and_in_order(tmp_path):
    log = RotatingLog(tmp_path / "role.log", max_bytes=2000, backups=2)
    written = [f"line {i:05d} ".encode().ljust(99, b"x") + b"\n" for i in range(1000)]  # 100 kB
    for line in written:
        log.write(line)
    log.close()
    assert [p.name for p in _files(log)] == ["role.log.2", "role.log.1", "role.log"]
    assert all(p.stat().st_size <= 2000 for p in _files(log))
    kept = _lines(log)
    assert 40 <= len(kept) <= 60  # three files of up to 20 lines
    assert kept == [ln.rstrip(b"\n") for ln in written[-len(kept) :]]  # the newest, in order


def test_zero_max_bytes_never_rotates(tmp_path):
    log = RotatingLog(tmp_path / "role.log", max_bytes=0, backups=1)
    for _ in range(100):
        log.write(b"y" * 999 + b"\n")
    log.close()
    assert _files(log) == [log.path] and log.path.stat().st_size == 100_000


def test_a_childs_stdout_and_stderr_are_drained_into_the_log(tmp_path):
    log = RotatingLog(tmp_path / "child.log", max_bytes=10_000, backups=3)
    code = (
        "import sys\n"
        "for i in range(5000): print(f'out {i:06d}', flush=True)\n"
        "print('last words on stderr', file=sys.stderr)\n"
    )
    proc = start_logged([sys.executable, "-c", code], log)
    assert proc.wait(60) == 0
    lines = []
    for _ in range(100):  # the drain thread finishes after the child exits
        lines = _lines(log)
        if lines and lines[-1] == b"last words on stderr":
            break
        time.sleep(0.05)
    assert lines[-1] == b"last words on stderr"
    assert len(_files(log)) == 4 and all(p.stat().st_size <= 10_000 for p in _files(log))
    outs = [int(ln.split()[1]) for ln in lines[:-1]]
    assert outs == list(range(outs[0], 5000))  # a contiguous tail: nothing lost in a rotation


def test_redis_server_logs_through_the_rotating_log(tmp_path):
    server = RedisServer(aof=True, data_dir=tmp_path / "redis", log_max_bytes=600, log_backups=2)
    with server:
        for _ in range(3):  # each start logs its banner and the AOF load: over 600 bytes in all
            server.restart(kill=True)
        assert server.client().ping()
    names = sorted(p.name for p in (tmp_path / "redis").glob("redis.log*"))
    assert names == ["redis.log", "redis.log.1", "redis.log.2"]
    assert all((tmp_path / "redis" / n).stat().st_size <= 600 for n in names)
    assert b"Ready to accept connections" in b"".join((tmp_path / "redis" / n).read_bytes() for n in names)
