"""A bounded soak: the whole local stack fed a steady stream for ``--minutes``, its state sampled.

    python benchmarks/soak.py [--minutes 30] [--rate 60] [--every 30] [--out benchmarks/results/soak]
                              [--data-dir runs/soak]

Why: the service is meant to run for months. Every piece of state it keeps is bounded by a
retention setting (docs/operations.md, "Retention"); this run checks that on real servers. It
starts ``ctp up`` (Kafka, Redis, ingest, trainer, API: the same stack as ``make demo``) on a fresh
data dir, sends valid pairs at ``--rate`` per second from a producer thread (plus one bad message
in ``BAD_EVERY``, cycling through the DLQ codes, so the dead-letter path runs too), and every
``--every`` seconds records: pairs produced and chunked, chunks, versions, Redis ``used_memory``
and ``DBSIZE``, the API's RSS, the data dir's size (ctp's part and Kafka's log apart), the newest
checkpoint's ``meta.json`` size and the log dir's size.

Writes ``OUT/soak.json`` (settings, command, samples, verdicts) and ``OUT/soak.png`` (one panel per
series) and prints, per series, the value after warm-up (the first ``--warmup`` of the run), at
the end, and the fitted slope after warm-up, with a verdict: **flat** when the fitted line moves by
at most ``TOLERANCE`` of the series' median over the post-warm-up window, **bounded** when it
moves more but stays under the bound its retention setting gives (printed with it: a run shorter
than the retention has not reached that bound yet), else **GROWING**. ``ctp up``'s own output goes
to ``<data dir>-up.log`` beside the data dir.

Settings (``SOAK_SETTINGS``; a ``CTP_`` variable set in the environment wins), chosen so that
~100 k pairs flow through in 30 minutes on a 2-core CPU box:

- 32 px JPEGs (``benchmarks/ingest.make_image``, ~1 KB a message) and the smallest model preset,
  ``ctp-vit-micro-32``, one epoch a chunk, 1024-pair chunks: the trainer's cost is mostly per
  chunk (checkpoint, registry, gallery re-embedding in the API), so large chunks let it come
  close to the stream. It need not keep up: the chunks waiting for it are recorded
  (``chunks_pending``), and what is measured is that each part's state stays bounded either way
  (in the 3-minute smoke run on a loaded 2-core machine it did keep up).
- a 120 s dedup window (the ids of ~135-150 s of stream stay in Redis, then expire), chunk
  retention 4 (the newest 4 trained chunk dirs), a 2,048-pair gallery, 3 checkpoints, a
  500-pair replay memory, logs rotated at 1 MB with 2 backups.
- Kafka: the topics get ``retention.ms`` of ``KAFKA_RETENTION_MS`` (3 min) and 1-minute segments
  (the broker checks retention every 5 minutes), so Kafka's own log holds at most ~9 minutes of
  stream. Redis: ``auto-aof-rewrite-min-size`` ``REDIS_AOF_REWRITE_MIN`` (16 MiB, default 64),
  so the AOF, which grows with every replay-memory write, is rewritten within the run and its
  bound (about twice the rewritten size, at least that minimum) shows. Both are set on the
  running servers (``bound_servers``), as an operator would.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from ingest import make_image  # noqa: E402

from service.messages import encode_message  # noqa: E402

SOAK_SETTINGS = {
    "CTP_MODEL": "ctp-vit-micro-32",
    "CTP_EPOCHS": "1",
    "CTP_CHUNK_SIZE": "1024",
    "CTP_CHUNK_MAX_WAIT_S": "20",
    "CTP_BATCH_SIZE": "64",
    "CTP_MEMORY_SIZE": "500",
    "CTP_DEDUP_WINDOW_S": "120",
    "CTP_CHUNK_RETENTION": "4",
    "CTP_GALLERY_MAX_PAIRS": "2048",
    "CTP_KEEP_CHECKPOINTS": "3",
    "CTP_LOG_MAX_BYTES": "1000000",
    "CTP_LOG_BACKUPS": "2",
    "CTP_WATCH_INTERVAL_S": "5",
}
KAFKA_RETENTION_MS = 3 * 60_000
KAFKA_RETENTION_CHECK_MS = 5 * 60_000  # the broker's log.retention.check.interval.ms (default)
REDIS_AOF_REWRITE_MIN = 16 * 2**20
KAFKA_SEGMENT_MS = 60_000
BAD_EVERY = 100  # one bad message in this many
IMAGE_SIZE = 32
CLASSES = 10
TOLERANCE = 0.2  # flat: the fitted line moves <= 20 % of the median after warm-up
ROLES_WITH_LOGS = 3  # ingest, trainer, api write DATA_DIR/logs/<role>.log


def bad_messages() -> Iterator[tuple[str, bytes]]:
    """Messages ingest must dead-letter, one of each kind in turn: (expected code, value)."""
    kinds = [
        ("not_json", b"{not json"),
        ("schema", json.dumps({"image": "aGk="}).encode()),
        ("bad_base64", json.dumps({"text": "x", "image": "***"}).encode()),
        ("bad_image", encode_message(text="x", image=b"not an image at all")),
        ("too_deep", b"[" * 40 + b"]" * 40),
    ]
    return itertools.cycle(kinds)


class Producer(threading.Thread):
    """Sends ``rate`` messages per second (paced against the start), valid pairs but for one bad
    message in ``BAD_EVERY``, until ``stop`` is set; counts what it sent, and in ``failed`` the
    sends refused or not delivered."""

    def __init__(self, bootstrap: str, topic: str, rate: float, *, run_id: str):
        super().__init__(daemon=True, name="soak-producer")
        self.bootstrap, self.topic, self.rate, self.run_id = bootstrap, topic, rate, run_id
        self.valid = self.bad = self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        from service.produce import kafka_producer
        from service.settings import load_settings

        rng = np.random.default_rng(0)
        images = [make_image(rng, IMAGE_SIZE) for _ in range(256)]
        bad = bad_messages()
        producer = kafka_producer(self.bootstrap, load_settings().message_limits())
        t0 = time.monotonic()
        for i in itertools.count():
            if self.stop.is_set():
                break
            time.sleep(max(0.0, t0 + i / self.rate - time.monotonic()))
            if i % BAD_EVERY == BAD_EVERY - 1:
                key, value = None, next(bad)[1]
            else:
                key = f"{self.run_id}-{i}"
                c = i % CLASSES
                value = encode_message(
                    id=key, text=f"a photo of thing {c}", image=images[i % len(images)], label=f"thing {c}"
                )
            try:
                sent = producer.send(self.topic, value=value, key=key.encode() if key else None)
            except Exception:  # broker away: counted, the stream goes on
                self._failed()
                continue
            sent.add_errback(self._failed)
            if key is None:
                self.bad += 1
            else:
                self.valid += 1
        producer.flush(timeout=30)
        producer.close(timeout=10)

    def _failed(self, *_: object) -> None:
        self.failed += 1


# ---------------------------------------------------------------------------------------- the stack


def start_stack(data_dir: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ctp up`` on ``data_dir`` (emptied first: a soak starts from nothing), output to ``log``."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--status-every", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def wait_for_stack(up: subprocess.Popen, data_dir: Path, log: Path, timeout: float = 240.0) -> dict:
    """``up.json`` once this ``ctp up`` recorded its servers (its topics exist by then)."""
    from service.settings import stack_record

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"ctp up exited with {up.returncode}:\n{log.read_text()[-3000:]}")
        record = stack_record(data_dir)
        if record and record.get("pid") == up.pid:
            return record
        time.sleep(0.5)
    raise RuntimeError(f"ctp up not ready within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def bound_servers(record: dict, topics: list[str]) -> None:
    """Time retention on the topics and an earlier AOF rewrite, so the servers' own files stay
    bounded within the run too (see the module docstring)."""
    import redis
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    redis.Redis.from_url(record["redis_url"]).config_set(
        "auto-aof-rewrite-min-size", str(REDIS_AOF_REWRITE_MIN)
    )
    bootstrap = record["kafka_bootstrap"]
    configs = {"retention.ms": str(KAFKA_RETENTION_MS), "segment.ms": str(KAFKA_SEGMENT_MS)}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, configs=configs) for t in topics])
    finally:
        admin.close()


def stop_stack(up: subprocess.Popen, timeout: float = 180.0) -> int | None:
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
    try:
        return up.wait(timeout)
    except subprocess.TimeoutExpired:
        up.kill()
        up.wait()
        return None


# ---------------------------------------------------------------------------------------- the sampler


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def api_pid(up_pid: int) -> int | None:
    """The ``ctp serve`` process among ``ctp up``'s children (a restarted API has a new pid)."""
    for pid in children(up_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.cli" in argv and b"serve" in argv:
            return pid
    return None


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of ``pid``: psutil when installed, else /proc's VmRSS."""
    if pid is None:
        return None
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # gone
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dir_bytes(path: Path, *, exclude: Path | None = None) -> int:
    """Disk usage of the files below ``path``, as ``du`` counts it (allocated blocks: Kafka's
    preallocated sparse index files count for what they hold); files vanishing meanwhile are skipped."""
    total = 0
    for root, dirs, files in os.walk(path):
        if exclude is not None:
            dirs[:] = [d for d in dirs if Path(root, d) != exclude]
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def file_bytes(path: Path) -> int | None:
    """A file's size; None when it is gone (a checkpoint retention deleted meanwhile)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


@dataclass
class Sampler:
    """One row of figures per call; keeps the pairs trained so far from the eval history."""

    data_dir: Path
    up_pid: int
    producer: Producer
    t0: float = field(default_factory=time.monotonic)
    trained_pairs: int = 0
    _last_eval_id: str = "-"

    def sample(self) -> dict[str, Any]:
        import redis

        from service.registry import Registry
        from service.settings import load_settings
        from service.status import collect_status

        settings = load_settings(data_dir=self.data_dir)
        s = collect_status(settings)  # a store that is away: its part is missing, named in errors
        r = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        reg = Registry(r, root=self.data_dir / "checkpoints")
        try:
            latest = reg.latest()
            redis_figures = {
                "trained_pairs": self._trained(reg),
                "redis_used_memory": int(r.info("memory")["used_memory"]),
                "redis_dbsize": int(r.dbsize()),
            }
        except redis.RedisError as e:
            latest, redis_figures = (
                None,
                dict.fromkeys(("trained_pairs", "redis_used_memory", "redis_dbsize")),
            )
            s["errors"].setdefault("redis", f"{type(e).__name__}: {e}")
        ingest = s.get("ingest") or {}
        chunks = s.get("chunks") or {}
        dl = ingest.get("dead_letters") or {}
        kafka_dir = self.data_dir / "kafka"
        return {
            "t": round(time.monotonic() - self.t0, 1),
            "sent_valid": self.producer.valid,
            "sent_bad": self.producer.bad,
            "send_failed": self.producer.failed,
            "produced": ingest.get("produced"),
            "lag": ingest.get("lag"),
            "messages_chunked": sum(p["chunked"] for p in (ingest.get("partitions") or {}).values()),
            "dead_letters": dl.get("written"),  # every one sent to the DLQ topic
            "dead_letters_kept": dl.get("count"),  # those its retention still keeps
            "chunks_enqueued": chunks.get("enqueued"),
            "chunks_pending": chunks.get("pending"),
            "chunks_dead": chunks.get("dead"),
            "versions": s.get("latest"),
            "memory_items": (s.get("memory") or {}).get("items"),
            **redis_figures,
            "api_rss": rss_bytes(api_pid(self.up_pid)),
            "data_dir_bytes": dir_bytes(self.data_dir, exclude=kafka_dir),
            "kafka_dir_bytes": dir_bytes(kafka_dir),
            "chunk_dirs_bytes": dir_bytes(self.data_dir / "chunks"),
            "checkpoints_bytes": dir_bytes(self.data_dir / "checkpoints"),
            "redis_dir_bytes": dir_bytes(self.data_dir / "redis"),
            "meta_json_bytes": file_bytes(latest.path / "meta.json") if latest else None,
            "log_dir_bytes": dir_bytes(self.data_dir / "logs"),
            "load1": os.getloadavg()[0],
            "errors": s["errors"],
        }

    def _trained(self, reg) -> int:
        """Pairs trained so far: the messages of each chunk id (``p<partition>-<first>-<last>``)
        in the eval history rows added since the last call, less their dead letters' share."""
        for entry_id, fields in reg.r.xrange(reg.eval_key, min=self._last_eval_id, max="+"):
            if entry_id.decode() == self._last_eval_id:
                continue
            self._last_eval_id = entry_id.decode()
            chunk_id = json.loads(fields[b"row"]).get("chunk_id") or ""
            for part in chunk_id.split("_"):
                _, first, last = part.split("-")
                span = int(last) - int(first) + 1
                self.trained_pairs += span - span // BAD_EVERY
        return self.trained_pairs


# ---------------------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Series:
    key: str
    title: str
    unit: str = "MB"
    scale: float = 1e6
    bound: Callable[[dict], float | None] = lambda result: None  # from the retention settings


def _log_bound(result: dict) -> float:
    """Each role's log and its backups: (backups + 1) x max bytes (+5 %: a line past the limit)."""
    s = result["settings"]
    return ROLES_WITH_LOGS * (int(s["CTP_LOG_BACKUPS"]) + 1) * int(s["CTP_LOG_MAX_BYTES"]) * 1.05


def _kafka_bound(result: dict) -> float | None:
    """What the topics can hold before retention deletes: the stream of retention + one segment
    + one retention check, at the bytes per message measured up to warm-up (+25 %)."""
    after = [r for r in result["samples"] if r["t"] >= result["warmup_s"] and r["produced"]]
    if not after:
        return None
    per_message = after[0]["kafka_dir_bytes"] / after[0]["produced"]
    window_s = (KAFKA_RETENTION_MS + KAFKA_SEGMENT_MS + KAFKA_RETENTION_CHECK_MS) / 1000
    return 1.25 * per_message * result["rate"] * (1 + 1 / BAD_EVERY) * window_s


def _aof_bound(result: dict) -> float:
    """Redis rewrites the AOF once it doubled since the last rewrite and passed the minimum: the
    dataset here is a few MB, so the minimum is the bound (+25 %)."""
    return 1.25 * REDIS_AOF_REWRITE_MIN


BOUNDED = [
    Series("redis_used_memory", "Redis used_memory"),
    Series("redis_dbsize", "Redis DBSIZE (keys)", unit="keys", scale=1.0),
    Series("api_rss", "API RSS"),
    Series("data_dir_bytes", "data dir (without Kafka)"),
    Series("kafka_dir_bytes", "Kafka log dir", bound=_kafka_bound),
    Series("redis_dir_bytes", "Redis AOF dir", bound=_aof_bound),
    Series("meta_json_bytes", "newest meta.json", unit="KB", scale=1e3),
    Series("log_dir_bytes", "log dir", bound=_log_bound),
]
PROGRESS = [
    Series("sent_valid", "pairs sent", unit="pairs", scale=1.0),
    Series("messages_chunked", "messages chunked (valid + DLQ)", unit="msgs", scale=1.0),
    Series("trained_pairs", "pairs trained", unit="pairs", scale=1.0),
    Series("versions", "model versions", unit="", scale=1.0),
    Series("chunks_pending", "chunks waiting for the trainer", unit="chunks", scale=1.0),
]


def verdict(result: dict, series: Series) -> dict:
    """Value after warm-up and at the end, slope after warm-up, and flat / bounded / GROWING."""
    points = [
        (r["t"], r[series.key])
        for r in result["samples"]
        if r["t"] >= result["warmup_s"] and r[series.key] is not None
    ]
    if len(points) < 3:
        return {"verdict": "too few samples after warm-up", "samples": len(points)}
    t = np.array([p[0] for p in points])
    v = np.array([p[1] for p in points], dtype=float)
    slope = float(np.polyfit(t, v, 1)[0])  # per second
    median = statistics.median(v)
    moved = abs(slope) * (t[-1] - t[0])
    bound = series.bound(result)
    if moved <= TOLERANCE * max(median, 1e-9):
        word = "flat"
    elif bound is not None and v.max() <= bound:
        word = "bounded"
    else:
        word = "GROWING"
    return {
        "after_warmup": float(v[0]),
        "end": float(v[-1]),
        "max": float(v.max()),
        "slope_per_min": slope * 60,
        "moved_over_window": moved,
        "median": median,
        "bound": bound,
        "verdict": word,
    }


def summary_lines(result: dict) -> list[str]:
    lines = [
        f"after warm-up ({result['warmup_s']:.0f} s) vs end; flat: the fitted line moves <= "
        f"{TOLERANCE:.0%} of the median over the rest of the run"
    ]
    for s in BOUNDED:
        v = result["verdicts"][s.key]
        if "end" not in v:
            lines.append(f"  {s.title:28s} {v['verdict']}")
            continue
        f = 1 / s.scale
        lines.append(
            f"  {s.title:28s} {v['after_warmup'] * f:10.2f} -> {v['end'] * f:10.2f} {s.unit:5s} "
            f"slope {v['slope_per_min'] * f:+9.3f} {s.unit}/min  {v['verdict']}"
            + (f" (bound {v['bound'] * f:.1f} {s.unit})" if v["bound"] is not None else "")
        )
    last = result["samples"][-1]
    lines.append(
        f"  through the stack: {last['sent_valid']} pairs sent ({last['sent_bad']} bad), "
        f"{last['messages_chunked']} messages chunked, {last['dead_letters']} dead letters "
        f"({last.get('dead_letters_kept')} still on the DLQ topic), "
        f"{last['trained_pairs']} pairs trained in {last['versions']} versions, "
        f"{last['chunks_pending']} chunks waiting for the trainer"
    )
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = BOUNDED + PROGRESS
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    t = [r["t"] / 60 for r in result["samples"]]
    for ax, s in zip(axes.flat, panels, strict=False):
        v = [r[s.key] / s.scale if r[s.key] is not None else np.nan for r in result["samples"]]
        ax.plot(t, v, marker=".", ms=3)
        ax.axvline(result["warmup_s"] / 60, color="grey", ls=":", lw=1)
        word = result["verdicts"].get(s.key, {}).get("verdict")
        ax.set_title(s.title + (f" ({word})" if word else ""), fontsize=9)
        ax.set_xlabel("minutes", fontsize=8)
        ax.set_ylabel(s.unit, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"ctp soak: {result['minutes']:g} min at {result['rate']:g} pairs/s", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main


def soak_env(data_dir: Path) -> dict[str, str]:
    """The environment of ``ctp up``: the soak settings, any CTP_ variable already set winning."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env = {**SOAK_SETTINGS, **env, "CTP_DATA_DIR": str(data_dir)}
    env.setdefault("OMP_NUM_THREADS", "1")
    if "CTP_API_PORT" not in env:
        from service.local.infra import free_port

        env["CTP_API_PORT"] = str(free_port())
    return env


def progress(row: dict) -> dict[str, Any]:
    """The progress bar's figures from a sample."""

    def mb(x: int | None) -> str:
        return "?" if x is None else f"{x / 1e6:.1f}MB"

    return {
        "sent": row["sent_valid"],
        "chunked": row["messages_chunked"],
        "v": row["versions"],
        "redis": mb(row["redis_used_memory"]),
        "api": mb(row["api_rss"]),
    }


def run(args: argparse.Namespace, command: list[str]) -> dict:
    data_dir = args.data_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = soak_env(data_dir)
    log = data_dir.parent / f"{data_dir.name}-up.log"  # ctp up's own output, beside its data dir
    up = start_stack(data_dir, env, log)
    samples: list[dict] = []
    producer = None
    try:
        record = wait_for_stack(up, data_dir, log)
        topics = [env.get("CTP_TOPIC", "ctp.pairs"), env.get("CTP_DLQ_TOPIC", "ctp.pairs.dlq")]
        bound_servers(record, topics)
        producer = Producer(record["kafka_bootstrap"], topics[0], args.rate, run_id=f"soak{int(time.time())}")
        sampler = Sampler(data_dir, up.pid, producer)
        producer.start()
        duration = args.minutes * 60
        with tqdm(total=round(duration), desc="soak", unit="s") as bar:
            while (elapsed := time.monotonic() - sampler.t0) < duration:
                if up.poll() is not None:
                    raise RuntimeError(f"ctp up exited with {up.returncode}:\n{log.read_text()[-3000:]}")
                samples.append(sampler.sample())
                bar.set_postfix(progress(samples[-1]), refresh=False)
                bar.update(round(min(elapsed, duration)) - bar.n)
                time.sleep(max(0.0, sampler.t0 + len(samples) * args.every - time.monotonic()))
            producer.stop.set()
            producer.join(60)
            samples.append(sampler.sample())
            bar.update(bar.total - bar.n)
    finally:
        if producer is not None:
            producer.stop.set()
        rc = stop_stack(up)
    result = {
        "command": command,
        "minutes": args.minutes,
        "rate": args.rate,
        "every_s": args.every,
        "warmup_s": args.warmup * args.minutes * 60,
        "tolerance": TOLERANCE,
        "bad_every": BAD_EVERY,
        "image_size": IMAGE_SIZE,
        "kafka_topic_config": {"retention.ms": KAFKA_RETENTION_MS, "segment.ms": KAFKA_SEGMENT_MS},
        "redis_config": {"auto-aof-rewrite-min-size": REDIS_AOF_REWRITE_MIN},
        "settings": {k: env[k] for k in sorted(env) if k.startswith("CTP_")},
        "cpus": os.cpu_count(),
        "ctp_up_exit": rc,
        "ctp_up_log": str(log),
        "samples": samples,
    }
    result["verdicts"] = {s.key: verdict(result, s) for s in BOUNDED}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=60.0, help=f"messages per second (1 in {BAD_EVERY} bad)")
    p.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=1 / 3, help="share of the run counted as warm-up")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    p.add_argument("--data-dir", type=Path, default=ROOT / "runs" / "soak", help="emptied at start")
    args = p.parse_args(argv)
    command = ["python", "benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)]
    result = run(args, command)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "soak.png")
    print("\n".join(summary_lines(result)))
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
