"""The Redis replay memory passes the library's memory contract, against a real redis-server."""

import random

import pytest

from ctp.memory import InProcessMemory
from service.redis_memory import RedisMemory
from tests.ctp.memory_contract import MemoryContract, items


class TestRedisMemory(MemoryContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server):
        self.server = redis_server
        self.client = redis_server.client()
        self.n = 0

    def make_memory(self, **kwargs):
        self.n += 1  # a fresh namespace per memory made in a test
        return RedisMemory(client=self.client, prefix=f"t{self.n}", **kwargs)

    def test_survives_a_redis_restart_with_aof(self):
        mem = self.make_memory(max_items=10, policy="class_balanced")
        mem.add(items(15), rng=random.Random(0))
        mem.set_pseudo_texts({mem.keys()[0]: ["a blue ring"]}, version=3)
        before = (mem.keys(), mem.label_counts(), mem.nbytes())
        self.server.restart(kill=True)  # SIGKILL: only the AOF (fsync every second) survives
        mem.r = self.server.client()
        assert (mem.keys(), mem.label_counts(), mem.nbytes()) == before
        assert mem.get([before[0][0]])[0].pseudo_texts == ["a blue ring"]

    def test_two_writers_stay_consistent(self):
        a = self.make_memory(max_items=30)
        b = RedisMemory(client=self.server.client(), prefix=a.prefix, max_items=30)
        for i in range(10):
            a.add(items(5, prefix=f"a{i}-"), rng=random.Random(i))
            b.add(items(5, prefix=f"b{i}-"), rng=random.Random(100 + i))
        keys = a.keys()
        assert len(keys) == 30 and len(set(keys)) == 30
        assert len(a.get(keys)) == 30  # every slot has its item hash
        stored = {k.decode() for k in self.client.scan_iter(f"{a.prefix}:item:*")}
        assert stored == {f"{a.prefix}:item:{k}" for k in keys}  # no orphan hashes

    def test_matches_the_in_process_memory(self):
        mem, ref = (
            self.make_memory(max_items=12, policy="class_balanced"),
            InProcessMemory(max_items=12, policy="class_balanced"),
        )
        for c in range(3):
            batch = items(20, prefix=f"{c}-", label_of=lambda i, c=c: f"l{(c + i) % 5}")
            assert (
                mem.add(batch, rng=random.Random(c)).admitted == ref.add(batch, rng=random.Random(c)).admitted
            )
        assert mem.keys() == ref.keys()

    def test_export(self, tmp_path):
        mem = self.make_memory(max_items=5)
        mem.add(items(5), rng=random.Random(0))
        mem.save(tmp_path / "backup")
        back = InProcessMemory.load(tmp_path / "backup")
        assert back.keys() == mem.keys()
