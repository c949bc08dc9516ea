import random

from ctp.memory import Counters, InProcessMemory, Slot, plan_admission

from .memory_contract import MemoryContract, items


class TestInProcessMemory(MemoryContract):
    def make_memory(self, **kwargs):
        return InProcessMemory(**kwargs)

    def test_save_and_load(self, tmp_path):
        mem = InProcessMemory(max_items=8, policy="class_balanced")
        mem.add(items(12), rng=random.Random(0))
        mem.set_pseudo_texts({mem.keys()[0]: ["a pseudo text"]}, version=2)
        mem.save(tmp_path / "mem")
        back = InProcessMemory.load(tmp_path / "mem")
        assert back.keys() == mem.keys()
        assert back.label_counts() == mem.label_counts()
        assert back.get([mem.keys()[0]])[0].pseudo_texts == ["a pseudo text"]
        # counters survive: the next admission decisions are the same
        a = mem.add(items(20, prefix="n"), rng=random.Random(5))
        b = back.add(items(20, prefix="n"), rng=random.Random(5))
        assert a.admitted == b.admitted and sorted(mem.keys()) == sorted(back.keys())


def test_plan_admission_is_pure():
    slots = [Slot("a", "x", 1)]
    counters = Counters(1, {"x": 1})
    new, c2 = plan_admission(
        policy="reservoir",
        slots=slots,
        incoming=[Slot("b", "y", 1)],
        counters=counters,
        max_items=1,
        max_bytes=None,
        rng=random.Random(0),
    )
    assert slots == [Slot("a", "x", 1)] and counters.seen == 1  # inputs untouched
    assert c2.seen == 2 and c2.seen_per_label == {"x": 1, "y": 1}
    assert len(new) == 1


def test_zero_capacity_keeps_nothing():
    mem = InProcessMemory(max_items=0)
    res = mem.add(items(5), rng=random.Random(0))
    assert len(mem) == 0 and res.admitted == []
