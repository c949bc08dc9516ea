#!/usr/bin/env python3
"""The image's HEALTHCHECK: finds the ctp role running in the container and probes it.

- ``ctp serve``: ``GET /healthz`` on ``CTP_API_PORT`` answers 200 (the process serves HTTP).
- ``ctp ingest`` / ``ctp train`` (also under torchrun): Redis at ``CTP_REDIS_URL`` answers PING;
  both workers hold their state there and do nothing useful without it.
- ``ctp produce`` and other one-shot commands: healthy while they run.
- no ctp process: unhealthy (the role has exited).

Standard library and redis-py only, no settings import (no torch): it runs every few seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

ROLES = ("serve", "ingest", "train", "produce", "status", "up")


def role_of(argv: list[str]) -> str | None:
    """The ctp subcommand in a command line: ``ctp serve``, ``python -m service.cli train``..."""
    for i, arg in enumerate(argv[:-1]):
        if os.path.basename(arg) == "ctp" or arg == "service.cli":
            return argv[i + 1] if argv[i + 1] in ROLES else None
    return None


def running_role(proc: Path = Path("/proc")) -> str | None:
    for cmdline in sorted(proc.glob("[0-9]*/cmdline")):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        role = role_of([a.decode(errors="replace") for a in argv if a])
        if role is not None:
            return role
    return None


def probe(role: str | None) -> str | None:
    """None when healthy, else the reason."""
    if role is None:
        return "no ctp process is running"
    if role == "serve":
        url = f"http://127.0.0.1:{os.environ.get('CTP_API_PORT', '8000')}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return None if r.status == 200 else f"{url} answered {r.status}"
        except OSError as e:
            return f"{url}: {e}"
    if role in ("ingest", "train"):
        import redis

        url = os.environ.get("CTP_REDIS_URL", "redis://127.0.0.1:6379/0")
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
        except redis.RedisError as e:
            return f"redis: {e}"  # not the URL: it may hold a password
    return None


def main() -> int:
    role = running_role()
    problem = probe(role)
    print(f"{role or '?'}: {problem or 'ok'}")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
