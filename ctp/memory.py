"""Replay memory: the protocol, the admission policies and an in-process implementation.

Policies are pure functions over item metadata (key, label, size) and counters, so every
implementation (this one, the Redis one in ``service``) admits and evicts exactly alike and only
has to apply the resulting plan atomically.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from ctp.atomic import write_text_atomic

Policy = Literal["reservoir", "class_balanced"]
POLICIES: tuple[str, ...] = ("reservoir", "class_balanced")


@dataclass
class MemoryItem:
    key: str  # unique id of the pair across the stream
    image: bytes  # encoded image
    text: str  # true caption
    label: str | None = None  # class name, if known
    chunk: int = 0  # index of the chunk the pair came from
    pseudo_texts: list[str] = field(default_factory=list)  # cached hard-negative texts
    pseudo_version: int = -1  # model version the pseudo texts were made with (-1: none yet)

    @property
    def nbytes(self) -> int:
        return len(self.image) + len(self.text.encode()) + sum(len(t.encode()) for t in self.pseudo_texts)


@dataclass
class AddResult:
    admitted: list[str]  # keys of incoming items now in memory
    evicted: list[str]  # keys of items that left memory


@runtime_checkable
class ReplayMemory(Protocol):
    """What the trainer needs from a replay memory."""

    max_items: int
    max_bytes: int | None

    def add(self, items: Sequence[MemoryItem], *, rng: random.Random) -> AddResult: ...

    def sample(self, n: int, *, rng: random.Random) -> list[MemoryItem]: ...

    def get(self, keys: Sequence[str]) -> list[MemoryItem]: ...

    def keys(self) -> list[str]: ...

    def set_pseudo_texts(self, texts: dict[str, list[str]], *, version: int) -> None: ...

    def nbytes(self) -> int: ...

    def seen(self) -> int: ...  # items offered so far (the stream's length, for the memory)

    def label_counts(self) -> dict[str | None, int]: ...

    def save(self, path: str | Path) -> None: ...

    def __len__(self) -> int: ...


@dataclass
class Counters:
    """Stream statistics the policies need; persisted with the memory."""

    seen: int = 0  # items offered so far
    seen_per_label: dict[str, int] = field(default_factory=dict)


@dataclass
class Slot:
    key: str
    label: str | None
    nbytes: int


def plan_admission(
    *,
    policy: Policy,
    slots: list[Slot],
    incoming: Iterable[Slot],
    counters: Counters,
    max_items: int,
    max_bytes: int | None,
    rng: random.Random,
) -> tuple[list[Slot], Counters]:
    """Return the memory's new slot list and counters after offering ``incoming`` in order.

    reservoir: Vitter's algorithm R, every item seen so far is in memory with equal probability.
    class_balanced: class-balancing reservoir (Chrysakis & Moens, ICML 2020): a full memory
    makes room by evicting from the largest class; an item of a largest class replaces one of
    its own class with probability m_c / n_c, so each class stays a reservoir of itself.
    ``max_bytes`` then evicts uniformly at random until the memory fits.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown memory policy {policy!r}; choose from {POLICIES}")
    slots = list(slots)
    counters = Counters(counters.seen, dict(counters.seen_per_label))
    for item in incoming:
        counters.seen += 1
        lab = str(item.label)
        counters.seen_per_label[lab] = counters.seen_per_label.get(lab, 0) + 1
        if max_items <= 0:
            continue
        if len(slots) < max_items:
            slots.append(item)
            continue
        if policy == "reservoir":
            j = rng.randrange(counters.seen)
            if j < max_items:
                slots[j] = item
        else:
            counts = Counter(str(s.label) for s in slots)
            largest = max(counts.values())
            if counts.get(lab, 0) < largest:
                big = [c for c, n in counts.items() if n == largest]
                victim_label = big[rng.randrange(len(big))]
                idx = [i for i, s in enumerate(slots) if str(s.label) == victim_label]
                slots[idx[rng.randrange(len(idx))]] = item
            elif rng.random() < counts[lab] / counters.seen_per_label[lab]:
                idx = [i for i, s in enumerate(slots) if str(s.label) == lab]
                slots[idx[rng.randrange(len(idx))]] = item
    if max_bytes is not None:
        total = sum(s.nbytes for s in slots)
        while slots and total > max_bytes:
            victim = slots.pop(rng.randrange(len(slots)))
            total -= victim.nbytes
    return slots, counters


def sample_keys(keys: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """n keys uniformly without replacement (with replacement when n > len(keys))."""
    if not keys or n <= 0:
        return []
    if n <= len(keys):
        return rng.sample(list(keys), n)
    return [keys[rng.randrange(len(keys))] for _ in range(n)]


class InProcessMemory:
    """A replay memory held in this process; ``save``/``load`` persist it to a directory."""

    def __init__(self, *, max_items: int, max_bytes: int | None = None, policy: Policy = "reservoir"):
        if policy not in POLICIES:
            raise ValueError(f"unknown memory policy {policy!r}; choose from {POLICIES}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.policy: Policy = policy
        self._slots: list[Slot] = []
        self._items: dict[str, MemoryItem] = {}
        self._counters = Counters()

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, items: Sequence[MemoryItem], *, rng: random.Random) -> AddResult:
        by_key = {it.key: it for it in items}
        new_slots, self._counters = plan_admission(
            policy=self.policy,
            slots=self._slots,
            incoming=[Slot(it.key, it.label, it.nbytes) for it in items],
            counters=self._counters,
            max_items=self.max_items,
            max_bytes=self.max_bytes,
            rng=rng,
        )
        keep = {s.key for s in new_slots}
        evicted = [k for k in self._items if k not in keep]
        for k in evicted:
            del self._items[k]
        admitted = [s.key for s in new_slots if s.key in by_key and s.key not in self._items]
        for k in admitted:
            self._items[k] = by_key[k]
        self._slots = new_slots
        return AddResult(admitted=admitted, evicted=evicted)

    def sample(self, n: int, *, rng: random.Random) -> list[MemoryItem]:
        return self.get(sample_keys(self.keys(), n, rng))

    def get(self, keys: Sequence[str]) -> list[MemoryItem]:
        return [self._items[k] for k in keys]

    def keys(self) -> list[str]:
        return [s.key for s in self._slots]

    def set_pseudo_texts(self, texts: dict[str, list[str]], *, version: int) -> None:
        for key, pts in texts.items():
            item = self._items.get(key)
            if item is None:  # evicted meanwhile: nothing to cache
                continue
            item.pseudo_texts = list(pts)
            item.pseudo_version = version
        self._slots = [Slot(s.key, s.label, self._items[s.key].nbytes) for s in self._slots]

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._slots)

    def seen(self) -> int:
        return self._counters.seen

    def label_counts(self) -> dict[str | None, int]:
        return dict(Counter(s.label for s in self._slots))

    def save(self, path: str | Path) -> None:
        """Write the memory as WebDataset shards (pairs + pseudo texts) and state.json."""
        from ctp.data import Sample, write_shards

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.tar"):
            old.unlink()
        samples = [
            Sample(
                key=f"m{i:08d}",
                image=it.image,
                text=it.text,
                label=it.label,
                meta={
                    "key": it.key,
                    "chunk": it.chunk,
                    "pseudo_texts": it.pseudo_texts,
                    "pseudo_version": it.pseudo_version,
                },
            )
            for i, it in enumerate(self.get(self.keys()))
        ]
        write_shards(samples, path, prefix="memory")
        state = {
            "max_items": self.max_items,
            "max_bytes": self.max_bytes,
            "policy": self.policy,
            "seen": self._counters.seen,
            "seen_per_label": self._counters.seen_per_label,
        }
        write_text_atomic(path / "state.json", json.dumps(state))

    @classmethod
    def load(cls, path: str | Path) -> InProcessMemory:
        from ctp.data import read_chunk

        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        mem = cls(max_items=state["max_items"], max_bytes=state["max_bytes"], policy=state["policy"])
        mem._counters = Counters(state["seen"], dict(state["seen_per_label"]))
        for s in read_chunk(path):
            meta = dict(s.meta)
            item = MemoryItem(
                key=meta["key"],
                image=s.image,
                text=s.text,
                label=s.label,
                chunk=meta["chunk"],
                pseudo_texts=list(meta.get("pseudo_texts", [])),
                pseudo_version=meta.get("pseudo_version", -1),
            )
            mem._items[item.key] = item
            mem._slots.append(Slot(item.key, item.label, item.nbytes))
        return mem


def create_memory(
    *, max_items: int, max_bytes: int | None = None, policy: Policy = "reservoir"
) -> InProcessMemory:
    return InProcessMemory(max_items=max_items, max_bytes=max_bytes, policy=policy)
