"""service.local.infra against the real servers: Kafka round trip, Redis basics and AOF, clean stops."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from service.local.infra import KafkaServer, RedisServer, ensure_topics, main, port_open

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _assert_gone(*, pid: int, port: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not port_open(port)


def _consume(consumer: KafkaConsumer, n: int, *, timeout: float = 30.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


# ---------------------------------------------------------------------------------------------- Kafka


def test_kafka_produce_consume_with_group(kafka: KafkaServer) -> None:
    topic, group, partitions = _name("roundtrip"), _name("group"), 3
    ensure_topics(kafka.bootstrap, {topic: partitions})
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    for i in range(100):
        producer.send(topic, value=str(i).encode(), partition=i % partitions)
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        records = _consume(consumer, 100)
        consumer.commit()
        committed = {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close()

    assert len(records) == 100
    for p in range(partitions):
        mine = [r for r in records if r.partition == p]
        assert [int(r.value) for r in mine] == list(range(p, 100, partitions))  # order kept per partition
        assert [r.offset for r in mine] == list(range(len(mine)))
        assert committed[p] == len(mine)  # the group's offsets reached the end


def test_kafka_auto_creates_topics(kafka: KafkaServer) -> None:
    topic = _name("auto")
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    producer.send(topic, b"hello").get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest")
    try:
        assert [r.value for r in _consume(consumer, 1)] == [b"hello"]
    finally:
        consumer.close()


def test_second_kafka_gets_own_ports_and_stops(kafka: KafkaServer) -> None:
    other = KafkaServer().start()
    try:
        assert other.port not in (kafka.port, kafka.controller_port)
        assert other.data_dir != kafka.data_dir
        ensure_topics(other.bootstrap, {_name("other"): 1})
    finally:
        pid, port, data_dir = other.pid, other.port, other.data_dir
        other.stop()
    assert pid is not None and port is not None and data_dir is not None
    _assert_gone(pid=pid, port=port)
    assert not data_dir.exists()
    assert kafka.running  # the session broker is untouched


# ---------------------------------------------------------------------------------------------- Redis


def test_redis_set_get(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    assert r.set("k", "v")
    assert r.get("k") == "v"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_redis_aof_survives_restart_and_crash(redis_server: RedisServer) -> None:
    url, first_pid = redis_server.url, redis_server.pid
    r = redis_server.client(decode_responses=True)
    r.mset({f"key:{i}": str(i) for i in range(100)})
    r.hset("h", mapping={"a": "1", "b": "2"})
    r.close()

    redis_server.restart()  # SIGTERM: Redis flushes the AOF and exits
    assert redis_server.url == url and redis_server.pid != first_pid
    r = redis_server.client(decode_responses=True)
    assert r.dbsize() == 101
    assert r.get("key:42") == "42"
    assert r.hgetall("h") == {"a": "1", "b": "2"}
    r.rpush("after", "x")
    r.close()

    redis_server.restart(kill=True)  # SIGKILL: what was write()n to the AOF is in the page cache
    r = redis_server.client(decode_responses=True)
    assert r.dbsize() == 102
    assert r.lrange("after", 0, -1) == ["x"]
    r.close()


def test_redis_without_aof_forgets_on_restart() -> None:
    # The control for the AOF test: with persistence off a restart really starts empty.
    with RedisServer(aof=False) as server:
        server.client().set("k", "v")
        server.restart()
        assert server.client().get("k") is None


def test_redis_stop_really_stops() -> None:
    server = RedisServer().start()
    pid, port, data_dir = server.pid, server.port, server.data_dir
    assert pid is not None and port is not None and data_dir is not None
    assert port_open(port)
    server.stop()
    _assert_gone(pid=pid, port=port)
    assert not data_dir.exists()


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_fetch_prints_cache_dir(kafka: KafkaServer, capsys: pytest.CaptureFixture[str]) -> None:
    # kafka (the session broker) already resolved the jars, so this only reads the cache.
    assert main(["fetch"]) == 0
    cache = Path(capsys.readouterr().out.strip())
    assert (cache / ".complete").exists()
    assert any(cache.glob("kafka_2.13-*.jar"))


def test_cli_redis_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.local.infra", "redis", "--aof"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "redis url=redis://127.0.0.1:PORT/0 pid=... dir=..."
        assert line.startswith("redis url=redis://127.0.0.1:"), line
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        port = int(fields["url"].rsplit(":", 1)[1].split("/")[0])
        assert port_open(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:  # a failed assertion above: stop it (and its redis) cleanly
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    _assert_gone(pid=int(fields["pid"]), port=port)


def _dead(pid: int) -> bool:
    # Gone, or a zombie: an orphan is reaped by whatever pid 1 is, which in a container may be slow.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) for PR_SET_PDEATHSIG")
def test_server_dies_with_killed_parent() -> None:
    # A test run killed hard (CI timeout, OOM killer) must not leave servers running.
    code = (
        "from service.local.infra import RedisServer; s = RedisServer().start(); "
        "print(s.pid, s.port, s.data_dir, flush=True); input()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    pid_s, port_s, data_dir = proc.stdout.readline().split()
    pid, port = int(pid_s), int(port_s)
    try:
        assert port_open(port)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while not _dead(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dead(pid)
        assert not port_open(port)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)  # its owner died before it could clean up
