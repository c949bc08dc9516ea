"""``ctp up [--demo]``: the whole local stack on one machine, stopped together on Ctrl-C.

Starts Kafka (KRaft, single node) and Redis (AOF) under the data dir, unless ``CTP_KAFKA_BOOTSTRAP``
/ ``CTP_REDIS_URL`` are set in the environment (then those are used as they are); creates the
topics; runs ``ctp ingest``, ``ctp train`` and ``ctp serve`` (when the API is installed) as child
processes with the same CTP_ settings; prints where everything is, and a status line when the
status changed. ``--demo`` also streams the synthetic class-incremental data through it, with the
stream's eval sets measured after every chunk, and settings sized for a CPU.

Everything it started is supervised: a role that dies, and a Kafka broker or redis-server that
dies, is started again after a pause (1 s, then doubling up to 60 s while it keeps dying; back to
1 s once it stayed up a minute), with a line saying so. A server comes back on the same port with
the same data dir (Kafka's cluster id and topics, Redis's AOF), so the roles, which keep running,
reconnect to the address they have; the API keeps serving the model it has loaded meanwhile.
Servers are restarted by this process's main thread (they die with it), so while Kafka starts
again (seconds) a dead role waits for its own restart. Ctrl-C stops everything, roles first.

Every role's output goes to ``DATA_DIR/logs/<role>.log`` (Kafka's and Redis's to
``DATA_DIR/kafka/server.log`` and ``DATA_DIR/redis/redis.log``), rotated by size:
``CTP_LOG_MAX_BYTES`` per file, ``CTP_LOG_BACKUPS`` older files kept (``service.local.logs``).

Where the servers and the API are is written to ``DATA_DIR/up.json`` with this process's pid;
while it runs, every command on the same data dir finds them there (``service.settings.
load_settings``, ``ctp wait``). State survives a restart: ``DATA_DIR/kafka``, ``DATA_DIR/redis``
(AOF), chunks and checkpoints stay, and the ports are reused from ``up.json`` when free.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.cli import verbosity
from service.local.infra import KafkaServer, RedisServer, _parent_death_prefix, free_port, port_open
from service.local.logs import RotatingLog, start_logged

DEMO_STREAM = "class-incremental-small"
# CPU-sized demo: a chunk per 200 pairs, few epochs; any CTP_ variable set by the user wins.
DEMO_SETTINGS = {
    "CTP_CHUNK_SIZE": "200",
    "CTP_CHUNK_MAX_WAIT_S": "20",
    "CTP_EPOCHS": "8",
    "CTP_MEMORY_SIZE": "400",
}


MAX_PAUSE_S = 60.0  # the longest pause before a dead process is started again
STABLE_S = 60.0  # up this long: its next death counts as the first one again


@dataclass
class Restarts:
    """When a dead process is started again: 1 s after a death, doubling (up to ``MAX_PAUSE_S``)
    with each death in a row; one that stayed up ``STABLE_S`` starts over at 1 s."""

    count: int = 0  # deaths in a row
    total: int = 0  # restarts scheduled in all
    next_start: float = 0.0  # 0: none scheduled
    started_at: float = field(default_factory=time.monotonic)

    def died(self, now: float) -> float:
        """Schedule the next start; the pause before it."""
        if now - self.started_at >= STABLE_S:
            self.count = 0
        self.count += 1
        self.total += 1
        pause = min(MAX_PAUSE_S, 2.0 ** (self.count - 1))
        self.next_start = now + pause
        return pause

    def due(self, now: float) -> bool:
        return 0.0 < self.next_start <= now

    def started(self, now: float) -> None:
        self.next_start = 0.0
        self.started_at = now


@dataclass
class Child:
    name: str
    argv: list[str]
    log: RotatingLog
    proc: subprocess.Popen | None = None
    restarts: Restarts = field(default_factory=Restarts)
    once: bool = False  # a job (the demo producer): not restarted after it succeeds
    done: bool = field(default=False)

    def start(self, env: dict[str, str]) -> None:
        # SIGTERM to the child if `ctp up` itself dies (even by SIGKILL): no orphaned roles
        verbose = ["-v"] * verbosity()  # `ctp up -v`: the roles log more too
        self.proc = start_logged(
            [*_parent_death_prefix(), sys.executable, "-m", "service.cli", *verbose, *self.argv],
            self.log,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        self.restarts.started(time.monotonic())

    def stop(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # a trainer mid-chunk: safe to kill, the chunk stays queued
            self.proc.kill()
            self.proc.wait()


@dataclass
class Server:
    """A Kafka or Redis server this ``ctp up`` started, and when to start it again."""

    name: str
    server: KafkaServer | RedisServer
    restarts: Restarts = field(default_factory=Restarts)

    @property
    def address(self) -> str:
        s = self.server
        return s.bootstrap if isinstance(s, KafkaServer) else s.url


def _ports(data_dir: Path) -> dict[str, int]:
    """The ports of the last run where they are free (state and clients stay put), else new ones."""
    from service.settings import STACK_FILE

    path = data_dir / STACK_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    ports = {}
    for name in ("kafka", "kafka_controller", "redis"):
        port = saved.get(name)
        ports[name] = port if isinstance(port, int) and not port_open(port) else free_port()
    return ports


def _record(data_dir: Path, record: dict) -> None:
    """``DATA_DIR/up.json``: the ports (reused next time) and, while this ``ctp up`` runs (``pid``),
    where its servers and API are: ``load_settings`` and ``ctp wait`` read it."""
    from ctp.atomic import write_text_atomic
    from service.settings import STACK_FILE

    data_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(data_dir / STACK_FILE, json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctp up", description=__doc__.splitlines()[0])
    p.add_argument(
        "--demo", action="store_true", help=f"also stream the synthetic {DEMO_STREAM} data through it"
    )
    p.add_argument("--rate", type=float, default=40.0, help="demo: pairs per second")
    p.add_argument("--partitions", type=int, default=2, help="partitions of a new topic")
    p.add_argument("--no-api", action="store_true", help="do not start the API server")
    p.add_argument(
        "--status-every",
        type=float,
        default=10.0,
        help="look at the status this often, in seconds; a line is printed when it changed (0: never)",
    )
    p.add_argument(
        "--exit-when-done",
        action="store_true",
        help="demo: stop once every produced pair is trained, and report the curves",
    )
    args = p.parse_args(argv)
    if args.exit_when_done and not args.demo:
        p.error("--exit-when-done needs --demo")
    # imported after parsing: `ctp up --help` waits for no pydantic
    from service.settings import STACK_FILE, load_settings, stack_record

    env = dict(os.environ)
    if args.demo:
        env = {**DEMO_SETTINGS, **env}
    settings = load_settings(**{k[4:].lower(): v for k, v in env.items() if k.startswith("CTP_")})
    data_dir = settings.data_dir.resolve()
    env["CTP_DATA_DIR"] = str(data_dir)
    if (running := stack_record(data_dir)) is not None:
        raise SystemExit(f"ctp up: another ctp up (pid {running['pid']}) runs on {data_dir}")
    ports = _ports(data_dir)
    record: dict = dict(ports)
    servers: list[Server] = []
    log_limits = {"log_max_bytes": settings.log_max_bytes, "log_backups": settings.log_backups}
    children: list[Child] = []
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if "CTP_KAFKA_BOOTSTRAP" not in os.environ:
            kafka = KafkaServer(
                port=ports["kafka"],
                controller_port=ports["kafka_controller"],
                data_dir=data_dir / "kafka",
                num_partitions=args.partitions,
                **log_limits,
            ).start()
            servers.append(Server("kafka", kafka))
            env["CTP_KAFKA_BOOTSTRAP"] = kafka.bootstrap
        if "CTP_REDIS_URL" not in os.environ:
            redis_server = RedisServer(
                port=ports["redis"], aof=True, data_dir=data_dir / "redis", **log_limits
            ).start()
            servers.append(Server("redis", redis_server))
            env["CTP_REDIS_URL"] = redis_server.url
        from service.local.infra import ensure_topics

        ensure_topics(env["CTP_KAFKA_BOOTSTRAP"], {settings.topic: args.partitions, settings.dlq_topic: 1})
        if args.demo:
            import contextlib

            from ctp.synthetic import make_stream

            with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # no progress bars
                stream = make_stream(data_dir / "demo-stream", DEMO_STREAM)
            env.setdefault("CTP_EVAL_CLASSIFICATION", f"synthetic={stream.classification}")
            env.setdefault("CTP_EVAL_RETRIEVAL", f"synthetic_retrieval={stream.retrieval}")
        logs = data_dir / "logs"

        def role_log(name: str) -> RotatingLog:
            return RotatingLog(
                logs / f"{name}.log", max_bytes=settings.log_max_bytes, backups=settings.log_backups
            )

        children = [
            Child("ingest", ["ingest"], role_log("ingest")),
            Child("trainer", ["train"], role_log("trainer")),
        ]
        api = not args.no_api and importlib.util.find_spec("service.serve.api") is not None
        if api:
            if "CTP_API_PORT" not in os.environ:  # 8000 unless something else holds it
                env["CTP_API_PORT"] = str(8000 if not port_open(8000) else free_port())
            children.append(Child("api", ["serve"], role_log("api")))
        if args.demo:
            children.append(
                Child(
                    "producer",
                    ["produce", "--shards", *map(str, stream.chunks), "--rate", str(args.rate)],
                    role_log("producer"),
                    once=True,
                )
            )
        record.update(
            pid=os.getpid(),
            data_dir=str(data_dir),
            kafka_bootstrap=env["CTP_KAFKA_BOOTSTRAP"],
            redis_url=env["CTP_REDIS_URL"],
            api_url=f"http://{env.get('CTP_API_HOST', '127.0.0.1')}:{env['CTP_API_PORT']}" if api else None,
        )
        _record(data_dir, record)
        for c in children:
            c.start(env)
        lines = [
            f"ctp up: data in {data_dir}",
            f"  kafka   {env['CTP_KAFKA_BOOTSTRAP']}  topic {settings.topic} "
            f"(dead letters: {settings.dlq_topic})",
            f"  redis   {env['CTP_REDIS_URL']}",
        ]
        if api:
            host, port = env.get("CTP_API_HOST", "127.0.0.1"), env.get("CTP_API_PORT", "8000")
            lines.append(f"  api     http://{host}:{port}  (docs at /docs, dashboard at /)")
        lines += [
            f"  logs    {logs}/{{{','.join(c.name for c in children)}}}.log",
            f"  clients ctp status, ctp wait, ctp produce find it all in {data_dir / STACK_FILE}",
            f"          (from another directory: CTP_DATA_DIR={data_dir})",
            "Ctrl-C stops everything.",
        ]
        print("\n".join(lines), flush=True)
        _supervise(
            children, env, servers, args.status_every, lambda: stop, exit_when_done=args.exit_when_done
        )
        if args.exit_when_done:
            _report(env, data_dir)
    finally:
        print("ctp up: stopping", flush=True)
        for c in reversed(children):
            c.stop(timeout=30)
        for s in reversed(servers):
            s.server.stop()
        if "pid" in record:  # stopped: the ports stay for the next run, the locations go
            _record(data_dir, {k: record[k] for k in ports})
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _settings(env: dict[str, str]):
    from service.settings import Settings

    return Settings(**{k[4:].lower(): v for k, v in env.items() if k.startswith("CTP_")})


def _keep_server(s: Server) -> None:
    """Start a dead server again when its pause is over (same port, same data dir)."""
    if s.server.running:
        return
    r = s.restarts
    if not r.next_start:
        pause = r.died(time.monotonic())
        print(
            f"ctp up: {s.name} ({s.address}) exited with {s.server.returncode}; restart {r.total} "
            f"in {pause:.0f} s on the same port and data (log {s.server.log_path})",
            flush=True,
        )
    elif r.due(time.monotonic()):
        try:
            s.server.start()
        except Exception as e:  # port taken, start timeout: try again after a longer pause
            pause = r.died(time.monotonic())
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"ctp up: {s.name} did not start ({first}); next try in {pause:.0f} s", flush=True)
            return
        r.started(time.monotonic())
        print(f"ctp up: {s.name} is back at {s.address} (pid {s.server.pid})", flush=True)


def _keep_child(c: Child, env: dict[str, str]) -> None:
    """Start a dead role again when its pause is over; a finished job stays finished."""
    if c.done or c.proc is None or c.proc.poll() is None:
        return
    rc = c.proc.returncode
    if c.once and rc == 0:
        c.done = True
        print(f"ctp up: {c.name} finished", flush=True)
    elif not c.restarts.next_start:
        pause = c.restarts.died(time.monotonic())
        print(
            f"ctp up: {c.name} exited with {rc}; restart {c.restarts.total} in {pause:.0f} s "
            f"(log {c.log.path})",
            flush=True,
        )
    elif c.restarts.due(time.monotonic()):
        c.start(env)


def _supervise(
    children: list[Child],
    env: dict[str, str],
    servers: list[Server],
    status_every: float,
    stopped: Callable[[], bool],
    *,
    exit_when_done: bool = False,
) -> None:
    """Until ``stopped()`` (or, with ``exit_when_done``, every produced pair is trained): keep
    servers and roles running, in this thread (they die with it). The status is asked for in
    other threads: asking a server that is away takes seconds, which must not delay a restart."""
    done = threading.Event()

    def over() -> bool:
        return stopped() or done.is_set()

    if status_every:
        _thread(_print_status, env, status_every, over)
    if exit_when_done:
        _thread(_watch_done, env, children, done, over)
    while not over():
        time.sleep(0.5)
        for s in servers:
            _keep_server(s)
        for c in children:
            _keep_child(c, env)
    if done.is_set():
        print("ctp up: every produced pair is trained", flush=True)


def _thread(target: Callable[..., None], *args) -> None:
    threading.Thread(target=target, args=args, name=f"ctp-up-{target.__name__}", daemon=True).start()


def _watch_done(
    env: dict[str, str], children: list[Child], done: threading.Event, stopped: Callable[[], bool]
) -> None:
    """Set ``done`` once the jobs finished and every pair they produced is trained."""
    while not stopped():
        time.sleep(2.0)
        if all(c.done for c in children if c.once) and _all_trained(_status(env)):
            done.set()
            return


def _status(env: dict[str, str]) -> dict:
    """``collect_status`` for the stack; ``{"errors": {"status": ...}}`` if even that fails."""
    from service.status import collect_status

    try:
        return collect_status(_settings(env))
    except Exception as e:  # status is a convenience: never let it end the stack
        return {"errors": {"status": str(e)}}


def _print_status(env: dict[str, str], every: float, stopped: Callable[[], bool]) -> None:
    """A status line every ``every`` s when it changed (an idle stack prints nothing)."""
    from service.status import status_line

    shown = None
    while not stopped():
        deadline = time.monotonic() + every
        while not stopped() and time.monotonic() < deadline:
            time.sleep(0.2)
        s = _status(env)
        line = f"unavailable: {s['errors']['status']}" if "status" in s["errors"] else status_line(s)
        if line != shown and not stopped():
            print(f"status: {line}", flush=True)
            shown = line


def _all_trained(s: dict) -> bool:
    return (
        not s["errors"]
        and s["ingest"]["lag"] == 0
        and s["chunks"]["pending"] == 0
        and s["chunks"]["enqueued"] > 0
        and s["latest"] is not None
    )


def _report(env: dict[str, str], data_dir: Path) -> None:
    """The demo's outcome: the eval curves of the newest version, printed and plotted."""
    import redis

    from ctp.plots import plot_accuracy_curves
    from service.registry import Registry

    settings = _settings(env)
    latest = Registry(
        redis.Redis.from_url(settings.redis_url), root=settings.data_dir / "checkpoints"
    ).latest()
    results = (latest.meta.get("eval_state") or {}).get("results", {}) if latest else {}
    evals = {}
    print(
        f"ctp up: version {latest.version if latest else None} after {latest.meta['chunks'] if latest else 0}"
        " chunks"
    )
    for name, r in results.items():
        after = [m for m in r["after_chunk"] if m]
        if not after:
            continue
        key = "acc1" if r["kind"] == "classification" else "mean_recall@1"
        evals[name] = {"after_chunk": after, "score": key}
        m = latest.meta["metrics"][name]
        print(
            f"  {name}: {key} after each chunk "
            + " ".join(f"{a[key]:.3f}" for a in after)
            + f"; average accuracy {_f(m.get('avg_accuracy'))}, forgetting {_f(m.get('forgetting'))}"
        )
    if evals:
        path = plot_accuracy_curves({settings.strategy: {"eval": evals}}, data_dir / "demo-accuracy.png")
        print(f"  plot: {path}")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
