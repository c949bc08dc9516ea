"""``ctp up`` supervises the servers it started: the Kafka broker and the redis-server are killed
with SIGKILL at random moments, and each comes back on the same port with its data (a topic's
record, a Redis key, the registry), while ``ctp up`` and its roles keep running and the API
answers ``/healthz`` and ``/classify`` (HTTP 200, the model it loaded) throughout.

Five kills per server by default (CI); ``CTP_TEST_KILLS=N`` (read by this test only) makes it N each,
in a random order, for a longer soak (the pauses double while a server keeps dying: 1, 2, 4 s ...).

The registry's one version is published beforehand into the Redis data dir ``ctp up`` will use
(its port recorded in ``up.json``, which ``ctp up`` reuses), so the API has a model to serve.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from ctp.images import encode_image
from ctp.models import create_model
from service.local.infra import RedisServer, free_port, port_open
from service.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
MODEL = "ctp-vit-micro-32"
KILLS = int(os.environ.get("CTP_TEST_KILLS", "5"))  # per server (CI: 5 each)
# kills come within a minute of the restart, so the pause grows to its 60 s cap (MAX_PAUSE_S): a Kafka
# kill costs up to ~70 s once the pauses are capped
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180 + 100 * KILLS)]


def _prepare(data: Path) -> dict[str, int]:
    """A Redis data dir holding version 1 and a marker key, and the ports ``ctp up`` will reuse."""
    ports = {"kafka": free_port(), "kafka_controller": free_port(), "redis": free_port()}
    with RedisServer(aof=True, port=ports["redis"], data_dir=data / "redis") as server:
        Registry(server.client(), root=data / "checkpoints").publish(
            create_model(MODEL).model, {"model": MODEL, "strategy": "finetune", "chunks": 1}
        )
        server.client().set("test:marker", "kept")
    (data / "up.json").write_text(json.dumps(ports))
    return ports


class Prober(threading.Thread):
    """Asks /healthz and /classify without pause; every answer that is not 200 (or, with ``version``,
    not from that model version) is kept."""

    def __init__(self, url: str, version: str | None = "1"):
        super().__init__(daemon=True)
        self.url, self.version = url, version
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        image = base64.b64encode(encode_image(Image.new("RGB", (32, 32), "red"), "png")).decode()
        self.body = {"image": image, "labels": ["red", "blue"]}

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self.stop.is_set():
                for method, path, kw in (("GET", "/healthz", {}), ("POST", "/classify", {"json": self.body})):
                    try:
                        r = c.request(method, path, **kw)
                        got = r.json().get("model_version", self.version)
                        ok = r.status_code == 200 and (self.version is None or got == self.version)
                        detail = f"{r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as e:
                        ok, detail = False, repr(e)
                    if ok:
                        self.ok += 1
                    else:
                        self.failures.append(f"{path}: {detail}")
                time.sleep(0.05)


def _kafka_pid(data: Path) -> int:
    return int((data / "kafka" / "kafka.pid").read_text())


def _redis_pid(port: int) -> int:
    return int(redis.Redis(port=port, socket_timeout=2).info("server")["process_id"])


def _wait(predicate, timeout: float, what: str, up: subprocess.Popen):
    """``predicate()``'s first true value within ``timeout``, while ``ctp up`` keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert up.poll() is None, f"ctp up exited with {up.returncode} while waiting for {what}"
        try:
            if value := predicate():
                return value
        except Exception:  # not back yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def _kill_and_wait(pid_of, answers, timeout: float, up: subprocess.Popen) -> float:
    """SIGKILL the server whose pid ``pid_of()`` gives; wait for another pid that ``answers()``;
    the seconds that took."""
    pid = pid_of()
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: pid_of() != pid and answers(), timeout, f"a server in place of pid {pid}", up)
    return time.monotonic() - t0


def _records(bootstrap: str, topic: str) -> list[bytes]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        return [m.value for m in consumer]
    finally:
        consumer.close()


def test_ctp_up_brings_killed_servers_back_with_their_data_while_the_api_serves(tmp_path):
    data = tmp_path / "data"
    ports = _prepare(data)
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTP_")}
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        CTP_DATA_DIR=str(data),
        CTP_API_PORT=str(api_port),
        CTP_MODEL=MODEL,
        CTP_WATCH_INTERVAL_S="0.5",
    )
    out = tmp_path / "up.out"
    with open(out, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--status-every", "0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prober = Prober(f"http://127.0.0.1:{api_port}")
    bootstrap = f"127.0.0.1:{ports['kafka']}"
    try:
        ready = lambda: httpx.get(f"{prober.url}/readyz").json()["model_version"] == "1"  # noqa: E731
        _wait(ready, 120, "the API serving v1", up)
        from kafka import KafkaProducer

        topic, record = f"supervised-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex.encode()
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        producer.send(topic, record).get(timeout=30)
        producer.close()
        prober.start()
        rng = random.Random()
        kinds = ["kafka", "redis"] * KILLS
        if KILLS > 2:
            rng.shuffle(kinds)
        for kind in kinds:
            time.sleep(rng.uniform(0.3, 3.0))  # a random moment: any state of the roles
            if kind == "kafka":
                away = _kill_and_wait(lambda: _kafka_pid(data), lambda: port_open(ports["kafka"]), 90, up)
                assert _wait(lambda: record in _records(bootstrap, topic), 60, "the record", up)
            else:
                away = _kill_and_wait(lambda: _redis_pid(ports["redis"]), lambda: True, 30, up)
                r = redis.Redis(port=ports["redis"])
                assert r.get("test:marker") == b"kept"  # the AOF was replayed
                assert r.get("ctp:registry:latest") == b"1"
            assert up.poll() is None, out.read_text()[-3000:]
            print(f"{kind} killed, back after {away:.1f} s")  # figures for docs/operations.md (-s)
        time.sleep(1.0)
        prober.stop.set()
        prober.join(15)
        assert prober.failures == [], prober.failures[:5]
        assert prober.ok >= 20 * KILLS  # it really asked all along
        record_now = json.loads((data / "up.json").read_text())
        assert {k: record_now[k] for k in ports} == ports and record_now["pid"] == up.pid
        assert record_now["kafka_bootstrap"] == bootstrap
        text = out.read_text()
        assert text.count("ctp up: kafka (") == KILLS == text.count("ctp up: redis ("), text[-3000:]
        assert text.count("is back at") == 2 * KILLS, text[-3000:]
        assert "ctp up: api exited" not in text  # the API process itself never went down
    finally:
        prober.stop.set()
        up.send_signal(signal.SIGINT)
        try:
            rc = up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            rc = None
    assert rc == 0, out.read_text()[-3000:]
    assert not port_open(ports["kafka"]) and not port_open(ports["redis"])  # stopped with it


def test_restart_pauses_double_while_a_process_keeps_dying_and_reset_once_it_stayed_up():
    from service.local.up import MAX_PAUSE_S, STABLE_S, Restarts

    r = Restarts(started_at=0.0)
    now = 1.0
    pauses = []
    for _ in range(8):  # dies again right after each start
        pauses.append(r.died(now))
        assert not r.due(now) and r.due(now + pauses[-1])
        now += pauses[-1]
        r.started(now)
    assert pauses == [1, 2, 4, 8, 16, 32, MAX_PAUSE_S, MAX_PAUSE_S]
    assert r.died(now + STABLE_S) == 1  # it ran a minute: the next pause is the shortest again
    assert r.total == 9


def _child_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CTP_")}, "PYTHONPATH": str(ROOT)}


def test_a_role_that_exits_is_started_again_and_a_finished_job_is_not(tmp_path, monkeypatch, capsys):
    from service.local import up
    from service.local.logs import RotatingLog

    env = _child_env()
    role = up.Child("role", ["no-such-command"], RotatingLog(tmp_path / "role.log"))  # exits 2 at once
    job = up.Child("job", ["--help"], RotatingLog(tmp_path / "job.log"), once=True)  # exits 0
    for c in (role, job):
        c.start(env)
    first = role.proc.pid
    trained = {"errors": {}, "ingest": {"lag": 0}, "chunks": {"pending": 0, "enqueued": 1}, "latest": 1}
    # "all trained" only once the role was started again: _supervise returning proves the restart
    monkeypatch.setattr(up, "_status", lambda env: trained if role.proc.pid != first else {"errors": {1: 1}})
    t0 = time.monotonic()
    up._supervise([role, job], env, [], 0, lambda: time.monotonic() - t0 > 60, exit_when_done=True)
    out = capsys.readouterr().out
    assert time.monotonic() - t0 < 60  # it returned because all was trained, not at the deadline
    assert job.done and "ctp up: job finished" in out and "every produced pair is trained" in out
    assert "ctp up: role exited with 2; restart 1 in 1 s" in out
    assert b"usage: ctp" in (tmp_path / "job.log").read_bytes()  # its output went to its log
    role.stop(5)
