"""Behaviour every ReplayMemory implementation must have.

Subclass ``MemoryContract`` in a test module and define ``make_memory(**kwargs)``; the Redis
memory of the service runs the same class against a real Redis server.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ctp.memory import MemoryItem, ReplayMemory


def items(n: int, *, label_of=lambda i: f"c{i % 4}", chunk: int = 0, prefix: str = "k", size: int = 10):
    return [
        MemoryItem(
            key=f"{prefix}{i}",
            image=bytes([i % 256]) * size,
            text=f"text {i}",
            label=label_of(i),
            chunk=chunk,
        )
        for i in range(n)
    ]


class MemoryContract:
    def make_memory(self, **kwargs) -> ReplayMemory:  # pragma: no cover - overridden
        raise NotImplementedError

    def test_is_a_replay_memory(self):
        assert isinstance(self.make_memory(max_items=4), ReplayMemory)

    def test_fills_up_to_capacity_then_stays_bounded(self):
        mem = self.make_memory(max_items=10)
        res = mem.add(items(6), rng=random.Random(0))
        assert (
            len(mem) == 6 and sorted(res.admitted) == sorted(f"k{i}" for i in range(6)) and res.evicted == []
        )
        mem.add(items(50, prefix="x"), rng=random.Random(1))
        assert len(mem) == 10
        assert len(set(mem.keys())) == 10

    def test_items_round_trip(self):
        mem = self.make_memory(max_items=10)
        src = items(3)
        mem.add(src, rng=random.Random(0))
        got = {it.key: it for it in mem.get(["k0", "k1", "k2"])}
        for it in src:
            assert got[it.key].image == it.image
            assert got[it.key].text == it.text
            assert got[it.key].label == it.label
            assert got[it.key].chunk == it.chunk

    def test_reservoir_is_uniform_over_the_stream(self):
        # 200 items through a memory of 20, many trials: each item kept with p = 20/200.
        kept = Counter()
        trials = 300
        for t in range(trials):
            mem = self.make_memory(max_items=20, policy="reservoir")
            rng = random.Random(t)
            for c in range(4):  # offered in 4 chunks, like a stream
                mem.add(items(50, prefix=f"c{c}-"), rng=rng)
            kept.update(k.split("-")[0] for k in mem.keys())
        # each chunk holds a quarter of the stream: expect 5 of 20 slots per chunk
        for c in range(4):
            assert kept[f"c{c}"] / trials == pytest.approx(5.0, abs=0.6)

    def test_class_balanced_keeps_minority_classes(self):
        mem = self.make_memory(max_items=20, policy="class_balanced")
        rng = random.Random(0)
        mem.add(items(100, label_of=lambda i: "big"), rng=rng)
        mem.add(items(10, label_of=lambda i: "small", prefix="s"), rng=rng)
        counts = mem.label_counts()
        assert counts["small"] == 10 and counts["big"] == 10
        # a reservoir would keep about 20 * 10/110 ~ 2 of the minority class
        res = self.make_memory(max_items=20, policy="reservoir")
        res.add(items(100, label_of=lambda i: "big"), rng=random.Random(0))
        res.add(items(10, label_of=lambda i: "small", prefix="s"), rng=random.Random(0))
        assert res.label_counts().get("small", 0) < 10

    def test_byte_bound(self):
        mem = self.make_memory(max_items=100, max_bytes=500)
        mem.add(items(40, size=30), rng=random.Random(0))
        assert mem.nbytes() <= 500
        assert 0 < len(mem) < 40

    def test_sample(self):
        mem = self.make_memory(max_items=10)
        assert mem.sample(4, rng=random.Random(0)) == []
        mem.add(items(10), rng=random.Random(0))
        a = [it.key for it in mem.sample(5, rng=random.Random(3))]
        b = [it.key for it in mem.sample(5, rng=random.Random(3))]
        assert a == b and len(set(a)) == 5
        assert len(mem.sample(25, rng=random.Random(0))) == 25  # with replacement past the size

    def test_pseudo_texts_cached_with_items(self):
        mem = self.make_memory(max_items=10)
        mem.add(items(3), rng=random.Random(0))
        before = mem.nbytes()
        mem.set_pseudo_texts({"k1": ["a blue star", "a red ring"], "gone": ["x"]}, version=4)
        (it,) = mem.get(["k1"])
        assert it.pseudo_texts == ["a blue star", "a red ring"] and it.pseudo_version == 4
        assert mem.get(["k0"])[0].pseudo_version == -1
        assert mem.nbytes() == before + len("a blue star") + len("a red ring")

    def test_same_seed_same_contents(self):
        def run():
            mem = self.make_memory(max_items=15, policy="class_balanced")
            rng = random.Random(42)
            for c in range(3):
                mem.add(items(40, prefix=f"{c}-", label_of=lambda i, c=c: f"l{c}{i % 3}"), rng=rng)
            return sorted(mem.keys())

        assert run() == run()

    def test_unknown_policy_is_rejected(self):
        with pytest.raises(ValueError, match="policy"):
            self.make_memory(max_items=3, policy="lru")
