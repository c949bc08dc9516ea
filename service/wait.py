"""``ctp wait [--version N] [--timeout S]``: block until the API answers and serves version N or newer.

For scripts and the README walk-through: ``ctp wait`` returns once the API answers at all,
``ctp wait --version 3`` once it serves version 3 or a newer one (0 on success, 1 on timeout,
with the last thing seen). The API is the one the running ``ctp up`` recorded in
``DATA_DIR/up.json``, else ``--api`` or ``http://CTP_API_HOST:CTP_API_PORT``; with
``--registry`` (or a ``ctp up --no-api``) the newest version registered in Redis is waited for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def served_version(api: str, *, timeout_s: float = 5.0) -> tuple[bool, int | None, str]:
    """``(answered, version, what was seen)`` from ``GET {api}/model``; version None while nothing
    is served (503 before the first version)."""
    try:
        with urllib.request.urlopen(f"{api}/model", timeout=timeout_s) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 before the first version
        try:
            reason = json.loads(e.read()).get("reason", e.reason)
        except ValueError:
            reason = e.reason
        return True, None, f"{api} answers {e.code}: {reason}"
    except (OSError, ValueError) as e:  # not listening yet, or not JSON
        return False, None, f"{api} does not answer ({getattr(e, 'reason', e)})"
    version = body.get("model_version")
    try:
        number = int(version)
    except (TypeError, ValueError):  # a checkpoint dir served under its own name
        return True, None, f"{api} serves {version!r}"
    return True, number, f"version {number} served at {api} ({body.get('chunks')} chunks)"


def registry_version(settings) -> tuple[bool, int | None, str]:
    import redis

    from service.registry import Registry

    try:
        r = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        latest = Registry(r, root=settings.data_dir / "checkpoints").latest_version()
    except redis.RedisError as e:
        return False, None, f"Redis at {settings.redis_url} unavailable ({e})"
    if latest is None:
        return True, None, "no version registered yet"
    return True, int(latest), f"version {latest} registered"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctp wait", description=__doc__.splitlines()[0])
    p.add_argument("--version", type=int, default=0, help="wait for this version or a newer one (0: any)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--api", help="the API's URL (default: the running ctp up's, else CTP_API_HOST:PORT)")
    p.add_argument("--registry", action="store_true", help="wait for the version in Redis, not the API")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    args = p.parse_args(argv)
    from service.settings import load_settings, stack_record

    deadline = time.monotonic() + args.timeout
    while True:
        # looked up each time: a `ctp up` still starting writes its record once its servers are up
        settings = load_settings()
        record = stack_record(settings.data_dir) or {}
        api = args.api or record.get("api_url") or f"http://{settings.api_host}:{settings.api_port}"
        registry = args.registry or ("api_url" in record and record["api_url"] is None and not args.api)
        answered, version, seen = registry_version(settings) if registry else served_version(api.rstrip("/"))
        if answered and (args.version <= 0 or (version is not None and version >= args.version)):
            print(seen, flush=True)
            return 0
        if time.monotonic() >= deadline:
            want = f"version {args.version}" if args.version > 0 else "an answer"
            print(f"ctp wait: no {want} after {args.timeout:g} s; last: {seen}", file=sys.stderr)
            return 1
        time.sleep(max(0.0, min(args.interval, deadline - time.monotonic())))
