"""Real Kafka and Redis servers for tests, CI and the local stack: the one place that starts and stops them.

Kafka is Apache Kafka 4.x run from its Maven Central jars (no tarball, no Docker): a single node in
KRaft combined mode (broker + controller in one JVM), formatted once in its own data dir, on free
loopback ports, stopped by pid. Redis is Debian's ``redis-server``, with AOF when data must survive
a restart. Both children run in their own session (Ctrl-C in a terminal reaches only us, and we
stop them in order) and, where ``setpriv`` exists, die with the process that started them, so a
killed test run leaves no stray JVM behind.

    python -m service.local.infra fetch          # resolve the Kafka jars into the cache (CI does this once)
    python -m service.local.infra kafka          # run a broker until Ctrl-C, printing its bootstrap address
    python -m service.local.infra redis --aof    # run Redis until Ctrl-C, printing its URL
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import importlib.resources
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from service.local.logs import LOG_BACKUPS, LOG_MAX_BYTES, RotatingLog, start_logged

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

# The newest Kafka 4.x on Maven Central when this was written; the cache dir is keyed by it.
KAFKA_VERSION = "4.4.0"
_POM = "kafka_pom.xml"
_COMPLETE = ".complete"  # marker written last into a cache dir: present means every jar is there

# Broker logging: everything to stdout (redirected to <data dir>/server.log), chatty loggers quieted.
_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.utils.name = org.apache.kafka.common.utils.AppInfoParser
logger.utils.level = WARN
"""


def cache_root() -> Path:
    """``$CTP_CACHE`` or ``~/.cache/ctp``: where downloaded jars are kept between runs."""
    return Path(os.environ.get("CTP_CACHE") or Path.home() / ".cache" / "ctp")


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, *, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a server log, preceded by its last few ERROR/FATAL lines (a JVM's
    stack traces push the cause out of any short tail)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    if not text:
        return f"({path} is empty)"
    errors = [line[:500] for line in text[:-lines] if " ERROR " in line or " FATAL " in line][-3:]
    head = ["errors logged earlier:", *errors, "...", "last lines:"] if errors else []
    return "\n".join(head + text[-lines:])


def _parent_death_prefix() -> list[str]:
    # setpriv (util-linux) sets PR_SET_PDEATHSIG and execs the command, so the child keeps our pid
    # semantics and gets SIGTERM if the thread that started it dies. Done this way rather than with
    # preexec_fn, which is unsafe once the parent has threads (kafka-python clients start them).
    # Caveat: start servers from a thread that outlives them (the main thread in tests and CLIs).
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _stop_pid(proc: subprocess.Popen[bytes], *, name: str, timeout: float, kill: bool) -> None:
    """SIGTERM (or SIGKILL when ``kill``) by pid, wait up to ``timeout``, then SIGKILL and reap."""
    if proc.poll() is not None:
        return
    sig = signal.SIGKILL if kill else signal.SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", name, proc.pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------- Kafka


def kafka_classpath(cache_dir: Path | None = None, *, version: str = KAFKA_VERSION, mvn: str = "mvn") -> str:
    """The broker's Java classpath, resolving the Kafka ``version`` jars from Maven Central once.

    Jars land in ``cache_dir`` (default ``cache_root()/kafka-<version>``). The first caller runs
    ``mvn dependency:copy-dependencies`` into a temp dir next to it, writes the marker and renames
    the dir into place; an flock on ``<cache_dir>.lock`` makes racing processes wait for that one.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / f"kafka-{version}"
    if not (cache_dir / _COMPLETE).exists():
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_dir.with_name(cache_dir.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (cache_dir / _COMPLETE).exists():
                _fetch_kafka(cache_dir, version=version, mvn=mvn)
    jars = sorted(cache_dir.glob("*.jar"))
    if not any(j.name.startswith("kafka_2.13-") for j in jars):
        raise RuntimeError(f"{cache_dir} is marked complete but holds no kafka_2.13 jar; delete it and retry")
    return os.pathsep.join(str(j) for j in jars)


def _fetch_kafka(cache_dir: Path, *, version: str, mvn: str) -> None:
    mvn_path = shutil.which(mvn)
    if mvn_path is None:
        raise RuntimeError(
            f"Maven ({mvn!r}) is not on PATH; it resolves the Kafka jars. Install it "
            "(apt-get install -y maven openjdk-17-jre-headless) or run `bash .ci/install-servers`."
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    t0 = time.monotonic()
    log.info("resolving Kafka %s jars from Maven Central into %s", version, cache_dir)
    try:
        with importlib.resources.as_file(
            importlib.resources.files(__package__ or "service.local") / _POM
        ) as pom:
            cmd = [mvn_path, "-B", "-q", "-Dstyle.color=never", "-f", str(pom)]
            cmd += ["dependency:copy-dependencies", "-DincludeScope=runtime"]
            cmd += [f"-DoutputDirectory={tmp}", f"-Dkafka.version={version}"]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if out.returncode != 0:
            tail = "\n".join(out.stdout.splitlines()[-30:])
            raise RuntimeError(f"mvn could not resolve Kafka {version} (exit {out.returncode}):\n{tail}")
        (tmp / _COMPLETE).write_text(f"kafka {version}\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is readable like any other
        if cache_dir.exists():  # a partial dir from an older layout, never one with the marker
            shutil.rmtree(cache_dir)
        tmp.rename(cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Kafka %s jars ready in %.1fs", version, time.monotonic() - t0)


def _cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding; Uuid.randomUuid()
    # rejects ids starting with '-' (they read as command-line flags), so do we.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class _LocalServer:
    """What a server process started by this module shares: pid, state, log, stop, restart, dir
    cleanup. The server's output goes to ``log_path``, rotated past ``log_max_bytes`` (0: never)
    with ``log_backups`` older files kept (``service.local.logs``)."""

    NAME = "server"
    LOG_NAME = "server.log"

    def __init__(
        self,
        *,
        port: int | None,
        data_dir: Path | None,
        keep: bool,
        start_timeout: float,
        stop_timeout: float,
        log_max_bytes: int = LOG_MAX_BYTES,
        log_backups: int = LOG_BACKUPS,
    ) -> None:
        self.port = port  # None: a free port at start()
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.keep = keep  # keep a temp data dir after stop() (for post-mortems)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self._proc: subprocess.Popen[bytes] | None = None
        self._owns_dir = False
        self._log: RotatingLog | None = None

    def _ensure_data_dir(self, prefix: str) -> Path:
        """The data dir, made: a temp dir this server owns (removed at stop) when none was given."""
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix=prefix))
            self._owns_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """How the server process ended (None while it runs, or before it started)."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        if self.data_dir is None:
            raise RuntimeError(f"{type(self).__name__} has no data dir yet")
        return self.data_dir / self.LOG_NAME

    def _spawn(self, argv: list[str]) -> None:
        """Start the server process (in its own session, dying with us), output into its log."""
        assert self.data_dir is not None
        if self._log is None or self._log.path != self.log_path:
            self._log = RotatingLog(self.log_path, max_bytes=self.log_max_bytes, backups=self.log_backups)
        self._proc = start_logged(
            [*_parent_death_prefix(), *argv],
            self._log,
            stdin=subprocess.DEVNULL,
            cwd=self.data_dir,
            start_new_session=True,
        )

    def _terminate(self, *, kill: bool) -> None:
        if self._proc is not None:
            _stop_pid(self._proc, name=self.NAME, timeout=self.stop_timeout, kill=kill)

    def stop(self, *, kill: bool = False) -> None:
        """Stop by pid (SIGTERM, SIGKILL after ``stop_timeout``; SIGKILL at once if ``kill``: a crash,
        for persistence tests) and remove a temp data dir this server made, unless ``keep``."""
        self._terminate(kill=kill)
        self._remove_owned_dir()

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (SIGKILL if ``kill``; nothing if it already died) and start again on the same ports
        with the same dir and data."""
        self._terminate(kill=kill)
        return self.start()

    def _remove_owned_dir(self) -> None:
        if self._owns_dir and not self.keep and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
            self._owns_dir = False

    def _wait_ready(self, name: str, ready: Callable[[], bool], *, question: str, interval: float) -> None:
        """Until ``ready()`` (an exception from it means "not yet"); raise if the process exits or
        ``start_timeout`` passes, with the log's tail."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {self._proc.returncode} during startup; "
                    f"log tail (keep=True keeps the dir):\n{_tail(self.log_path)}"
                )
            try:
                if ready():
                    return
            except Exception as e:  # any failure here means "not ready yet"
                last = e
            time.sleep(interval)
        raise TimeoutError(
            f"{name} did not answer {question} within {self.start_timeout:.0f}s "
            f"(last error: {last!r}); log tail (keep=True keeps the dir):\n{_tail(self.log_path)}"
        )

    def start(self) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class KafkaServer(_LocalServer):
    """One Kafka 4.x node in KRaft combined mode (broker + controller) on loopback.

    ``start()`` picks free ports (unless given), writes ``server.properties`` into its data dir,
    formats the storage if the dir is new, launches ``java ... kafka.Kafka`` logging to
    ``<data dir>/server.log`` and waits until the broker answers a metadata request.
    ``stop()`` sends SIGTERM by pid (SIGKILL after ``stop_timeout``) and removes the temp data dir
    unless ``keep``; a ``data_dir`` you pass is never removed, and reusing it keeps the data.
    ``restart()`` keeps both ports and the data dir (cluster id and topics), so clients reconnect.
    """

    NAME = "Kafka"

    def __init__(
        self,
        *,
        num_partitions: int = 1,
        port: int | None = None,
        controller_port: int | None = None,
        data_dir: Path | None = None,
        keep: bool = False,
        heap: str = "512m",
        start_timeout: float = 90.0,
        stop_timeout: float = 30.0,
        cache_dir: Path | None = None,
        version: str = KAFKA_VERSION,
        java: str = "java",
        config: Mapping[str, str] | None = None,
        log_max_bytes: int = LOG_MAX_BYTES,
        log_backups: int = LOG_BACKUPS,
    ) -> None:
        super().__init__(
            port=port,
            data_dir=data_dir,
            keep=keep,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            log_max_bytes=log_max_bytes,
            log_backups=log_backups,
        )  # port: the PLAINTEXT listener
        self.num_partitions = num_partitions  # default partitions of auto-created topics
        self.controller_port = controller_port  # KRaft CONTROLLER listener; None: a free port
        self.heap = heap  # -Xmx; the broker idles well under 256m, 512m leaves headroom
        self.cache_dir = cache_dir
        self.version = version
        self.java = java
        self.config = dict(config or {})  # extra/overriding server.properties entries

    # -- addresses
    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise RuntimeError("KafkaServer is not started")
        return f"127.0.0.1:{self.port}"

    # -- lifecycle
    def start(self) -> Self:
        if self.running:
            return self
        t0 = time.monotonic()
        java = shutil.which(self.java)
        if java is None:
            raise RuntimeError(
                f"Java ({self.java!r}) is not on PATH; Kafka {self.version} needs Java 17+. "
                "Install it (apt-get install -y openjdk-17-jre-headless) or run `bash .ci/install-servers`."
            )
        classpath = kafka_classpath(self.cache_dir, version=self.version)
        self._ensure_data_dir("ctp-kafka-")
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        props = self.data_dir / "server.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in self._properties().items()))
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        jvm = [
            java,
            f"-Xmx{self.heap}",
            "-Xms64m",
            "-XX:+UseSerialGC",  # one GC thread: a small heap on a shared CI box, not a throughput broker
            "-XX:TieredStopAtLevel=1",  # C1 only: ~2x faster start, much less JIT CPU; fine for dev loads
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            classpath,
        ]
        try:
            if not (self.data_dir / "logs" / "meta.properties").exists():
                self._format(jvm, props)
            self._spawn([*jvm, "kafka.Kafka", str(props)])
            assert self._proc is not None
            (self.data_dir / "kafka.pid").write_text(f"{self._proc.pid}\n")
            self._wait_ready("Kafka", self._answers, question=f"at {self.bootstrap}", interval=0.25)
        except BaseException:
            self.stop(kill=True)
            raise
        log.info(
            "Kafka %s up at %s (pid %d, data %s) in %.1fs",
            self.version,
            self.bootstrap,
            self._proc.pid,
            self.data_dir,
            time.monotonic() - t0,
        )
        return self

    def _properties(self) -> dict[str, str]:
        assert self.data_dir is not None
        ctrl = f"127.0.0.1:{self.controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{ctrl}",  # static quorum: format needs no --standalone
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://{ctrl}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": "true",
            "group.initial.rebalance.delay.ms": "0",  # consumers join at once, not after 3s
            # a broker restarted after a crash waits until its old incarnation's session expires
            # (default 9 s) before it is unfenced: 4 s makes a supervised restart that much faster
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "4000",
            # one node: every internal topic has one replica; one offsets partition, not 50
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # messages up to CTP_MAX_MESSAGE_BYTES (8 MB) and then some, like the compose broker
            "message.max.bytes": "10485760",
            "replica.fetch.max.bytes": "10485760",
            "num.network.threads": "2",
            "num.io.threads": "2",
        }
        props.update(self.config)
        return props

    def _format(self, jvm: list[str], props: Path) -> None:
        assert self.data_dir is not None
        cmd = [*jvm, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        (self.data_dir / "format.log").write_bytes(out.stdout)
        if out.returncode != 0:
            tail = "\n".join(out.stdout.decode(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"kafka-storage format failed (exit {out.returncode}):\n{tail}")

    def _answers(self) -> bool:
        """The broker answers a metadata request and is not fenced."""
        from kafka import KafkaAdminClient  # imported here so `fetch` and Redis need no kafka-python

        assert self.port is not None
        if not port_open(self.port):  # cheap check first: kafka-python logs every failed connect
            return False
        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap, bootstrap_timeout_ms=3000, request_timeout_ms=5000
        )
        try:
            brokers = admin.describe_cluster()["brokers"]
        finally:
            admin.close()
        return bool(brokers) and not any(b.get("is_fenced") for b in brokers)

    def __repr__(self) -> str:
        state = f"pid={self.pid} bootstrap={self.bootstrap}" if self.running else "stopped"
        return f"KafkaServer({state})"


def ensure_topics(bootstrap: str, topics: Mapping[str, int], *, timeout_s: float = 30.0) -> list[str]:
    """Create the topics (name -> partitions) that do not exist yet and wait until every partition
    of them has a leader; returns the ones created."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        missing = [name for name in topics if name not in set(admin.list_topics())]
        if missing:
            specs = {name: {"num_partitions": topics[name], "replication_factor": 1} for name in missing}
            admin.create_topics(specs, wait_for_metadata=True)
        return missing
    finally:
        admin.close()


# ---------------------------------------------------------------------------------------------- Redis


class RedisServer(_LocalServer):
    """A ``redis-server`` on a free loopback port with its own dir (and AOF when ``aof``).

    RDB snapshots are off (``save ""``): with ``aof`` every write is appended to the AOF
    (fsync every second; a crash of the server process loses nothing already written, a crash of
    the machine at most the last second). ``restart()`` keeps dir and port, so a client's URL and
    the persisted data both survive it.
    """

    NAME = "redis-server"
    LOG_NAME = "redis.log"

    def __init__(
        self,
        *,
        aof: bool = False,
        port: int | None = None,
        data_dir: Path | None = None,
        keep: bool = False,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        executable: str = "redis-server",
        log_max_bytes: int = LOG_MAX_BYTES,
        log_backups: int = LOG_BACKUPS,
    ) -> None:
        super().__init__(
            port=port,
            data_dir=data_dir,
            keep=keep,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            log_max_bytes=log_max_bytes,
            log_backups=log_backups,
        )  # port: kept by restart()
        self.aof = aof
        self.executable = executable

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        if self.running:
            return self
        exe = shutil.which(self.executable)
        if exe is None:
            raise RuntimeError(
                f"{self.executable!r} is not on PATH. Install it (apt-get install -y redis-server) "
                "or run `bash .ci/install-servers`."
            )
        self._ensure_data_dir("ctp-redis-")
        self.port = self.port or free_port()
        conf = self.data_dir / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.data_dir}"',
            'logfile ""',  # stdout, into log_path through the rotating log
            "daemonize no",
            'save ""',  # no RDB snapshots: the AOF (when on) is the only persistence
            f"appendonly {'yes' if self.aof else 'no'}",
            "appendfsync everysec",
        ]
        conf.write_text("\n".join(lines) + "\n")
        try:
            self._spawn([exe, str(conf)])
            self._wait_ready("redis-server", self._pings, question=f"PING at {self.url}", interval=0.05)
        except BaseException:
            self._terminate(kill=True)
            self._remove_owned_dir()
            raise
        log.info("Redis up at %s (pid %d, aof=%s, dir %s)", self.url, self._proc.pid, self.aof, self.data_dir)
        return self

    def _pings(self) -> bool:
        """PING answers (not LOADING an AOF, listening)."""
        import redis

        assert self.port is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client for this server (``redis.Redis.from_url(self.url, **kwargs)``)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def __repr__(self) -> str:
        state = f"pid={self.pid} url={self.url}" if self.running else "stopped"
        return f"RedisServer({state})"


# ------------------------------------------------------------------------------------------------ CLI


@contextlib.contextmanager
def _until_signalled() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM (handlers restored afterwards)."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _serve(server: KafkaServer | RedisServer, line: str) -> int:
    with _until_signalled() as stop, server:
        print(line.format(s=server), flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print(f"server exited unexpectedly; log: {server.log_path}", file=sys.stderr, flush=True)
                return 1
        print("stopping", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.local.infra", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="resolve the Kafka jars into the cache and print the cache dir")
    f.add_argument("--cache-dir", type=Path)
    f.add_argument("--version", default=KAFKA_VERSION)
    k = sub.add_parser("kafka", help="run a single-node Kafka until Ctrl-C")
    k.add_argument("--port", type=int, help="PLAINTEXT port (default: a free one)")
    k.add_argument("--partitions", type=int, default=1, help="default partitions of new topics")
    k.add_argument("--data-dir", type=Path, help="persistent data dir (default: a temp dir)")
    k.add_argument("--keep", action="store_true", help="keep the temp data dir on exit")
    r = sub.add_parser("redis", help="run redis-server until Ctrl-C")
    r.add_argument("--port", type=int, help="port (default: a free one)")
    r.add_argument("--aof", action="store_true", help="append-only file persistence")
    r.add_argument("--data-dir", type=Path, help="persistent dir (default: a temp dir)")
    r.add_argument("--keep", action="store_true", help="keep the temp dir on exit")
    args = p.parse_args(argv)

    if args.cmd == "fetch":
        cp = kafka_classpath(args.cache_dir, version=args.version)
        print(Path(cp.split(os.pathsep)[0]).parent)
        return 0
    if args.cmd == "kafka":
        kafka = KafkaServer(
            port=args.port, num_partitions=args.partitions, data_dir=args.data_dir, keep=args.keep
        )
        return _serve(kafka, "kafka bootstrap={s.bootstrap} pid={s.pid} data={s.data_dir}")
    redis_ = RedisServer(port=args.port, aof=args.aof, data_dir=args.data_dir, keep=args.keep)
    return _serve(redis_, "redis url={s.url} pid={s.pid} dir={s.data_dir}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    sys.exit(main())
