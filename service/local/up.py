"""``ctp up [--demo]``: the whole local stack on one machine, stopped together on Ctrl-C.

Starts Kafka (KRaft, single node) and Redis (AOF) under the data dir, unless ``CTP_KAFKA_BOOTSTRAP``
/ ``CTP_REDIS_URL`` are set in the environment (then those are used as they are); creates the
topics; runs ``ctp ingest``, ``ctp train`` and ``ctp serve`` (when the API is installed) as child
processes with the same CTP_ settings; prints where everything is, and a status line when the
status changed. A child that dies is started again (with a growing pause), so one bad moment does not end
the stack. ``--demo`` also streams the synthetic class-incremental data through it, with the
stream's eval sets measured after every chunk, and settings sized for a CPU.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.cli import verbosity
from service.local.infra import KafkaServer, RedisServer, _parent_death_prefix, free_port, port_open

DEMO_STREAM = "class-incremental-small"
# CPU-sized demo: a chunk per 200 pairs, few epochs; any CTP_ variable set by the user wins.
DEMO_SETTINGS = {
    "CTP_CHUNK_SIZE": "200",
    "CTP_CHUNK_MAX_WAIT_S": "20",
    "CTP_EPOCHS": "8",
    "CTP_MEMORY_SIZE": "400",
}


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    once: bool = False  # a job (the demo producer): not restarted after it succeeds
    done: bool = field(default=False)

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            # SIGTERM to the child if `ctp up` itself dies (even by SIGKILL): no orphaned roles
            verbose = ["-v"] * verbosity()  # `ctp up -v`: the roles log more too
            self.proc = subprocess.Popen(
                [*_parent_death_prefix(), sys.executable, "-m", "service.cli", *verbose, *self.argv],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # a trainer mid-chunk: safe to kill, the chunk stays queued
            self.proc.kill()
            self.proc.wait()


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
    servers: list[KafkaServer | RedisServer] = []
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
            ).start()
            servers.append(kafka)
            env["CTP_KAFKA_BOOTSTRAP"] = kafka.bootstrap
        if "CTP_REDIS_URL" not in os.environ:
            redis_server = RedisServer(port=ports["redis"], aof=True, data_dir=data_dir / "redis").start()
            servers.append(redis_server)
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
        children = [
            Child("ingest", ["ingest"], logs / "ingest.log"),
            Child("trainer", ["train"], logs / "trainer.log"),
        ]
        api = not args.no_api and importlib.util.find_spec("service.serve.api") is not None
        if api:
            if "CTP_API_PORT" not in os.environ:  # 8000 unless something else holds it
                env["CTP_API_PORT"] = str(8000 if not port_open(8000) else free_port())
            children.append(Child("api", ["serve"], logs / "api.log"))
        if args.demo:
            children.append(
                Child(
                    "producer",
                    ["produce", "--shards", *map(str, stream.chunks), "--rate", str(args.rate)],
                    logs / "producer.log",
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
            s.stop()
        if "pid" in record:  # stopped: the ports stay for the next run, the locations go
            _record(data_dir, {k: record[k] for k in ports})
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _settings(env: dict[str, str]):
    from service.settings import Settings

    return Settings(**{k[4:].lower(): v for k, v in env.items() if k.startswith("CTP_")})


def _supervise(
    children: list[Child],
    env: dict[str, str],
    servers,
    status_every: float,
    stopped,
    *,
    exit_when_done: bool = False,
) -> None:
    from service.status import collect_status, status_line

    last_status = last_check = time.monotonic()
    shown = None
    while not stopped():
        time.sleep(0.5)
        for s in servers:
            if not s.running:
                raise SystemExit(f"{s!r} exited; log: {s.log_path}")
        for c in children:
            if c.done or c.proc is None or c.proc.poll() is None:
                continue
            rc = c.proc.returncode
            if c.once and rc == 0:
                c.done = True
                print(f"ctp up: {c.name} finished", flush=True)
                continue
            if c.next_start == 0.0:
                c.restarts += 1
                c.next_start = time.monotonic() + min(60.0, 2.0**c.restarts)
                print(
                    f"ctp up: {c.name} exited with {rc}; restart {c.restarts} in "
                    f"{c.next_start - time.monotonic():.0f} s (log {c.log})",
                    flush=True,
                )
            elif time.monotonic() >= c.next_start:
                c.next_start = 0.0
                c.start(env)
        if status_every and time.monotonic() - last_status >= status_every:
            last_status = time.monotonic()
            try:
                line = status_line(collect_status(_settings(env)))
            except Exception as e:  # status is a convenience: never let it end the stack
                line = f"unavailable: {e}"
            if line != shown:  # only what changed: an idle stack prints nothing
                print(f"status: {line}", flush=True)
                shown = line
        if exit_when_done and time.monotonic() - last_check >= 2.0:
            last_check = time.monotonic()
            if all(c.done for c in children if c.once) and _all_trained(collect_status(_settings(env))):
                print("ctp up: every produced pair is trained", flush=True)
                return


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
