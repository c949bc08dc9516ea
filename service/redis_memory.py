"""The replay memory in Redis: ctp's ``ReplayMemory`` protocol, shared by trainer processes.

Layout under ``{prefix}`` (default ``ctp:memory``):
- ``{prefix}:state``: JSON of the slot list ``[[key, label, nbytes], ...]`` (reservoir slots are
  positional) and the policy counters; one string so a change is one atomic SET.
- ``{prefix}:item:{key}``: a hash with ``image`` (bytes), ``text``, ``label``, ``chunk``,
  ``pseudo`` (JSON list) and ``pseudo_version``.
Admission runs ``ctp.memory.plan_admission`` (the same pure policy as the in-process memory)
on the state read under WATCH, then applies the plan in one MULTI/EXEC: new item hashes, deleted
evictions and the new state together, or nothing if another writer got there first (retried).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import redis

from ctp.memory import (
    POLICIES,
    AddResult,
    Counters,
    InProcessMemory,
    MemoryItem,
    Policy,
    Slot,
    plan_admission,
    sample_keys,
)


class RedisMemory:
    def __init__(
        self,
        *,
        client: redis.Redis,
        max_items: int,
        max_bytes: int | None = None,
        policy: Policy = "reservoir",
        prefix: str = "ctp:memory",
        max_retries: int = 50,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown memory policy {policy!r}; choose from {POLICIES}")
        self.r = client
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.policy: Policy = policy
        self.prefix = prefix
        self.max_retries = max_retries
        self._state_key = f"{prefix}:state"

    def _item_key(self, key: str) -> str:
        return f"{self.prefix}:item:{key}"

    def _read_state(self, r) -> tuple[list[Slot], Counters]:
        raw = r.get(self._state_key)
        if raw is None:
            return [], Counters()
        state = json.loads(raw)
        return [Slot(*s) for s in state["slots"]], Counters(state["seen"], state["seen_per_label"])

    @staticmethod
    def _state_json(slots: list[Slot], counters: Counters) -> str:
        return json.dumps(
            {
                "slots": [[s.key, s.label, s.nbytes] for s in slots],
                "seen": counters.seen,
                "seen_per_label": counters.seen_per_label,
            }
        )

    def _transaction(self, fn):
        """Run ``fn(pipe)`` under WATCH of the state until it commits without a conflict."""
        for _ in range(self.max_retries):
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(self._state_key)
                    result = fn(pipe)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue
        raise RuntimeError(
            f"replay memory {self.prefix}: too much contention, gave up after {self.max_retries} tries"
        )

    def add(self, items: Sequence[MemoryItem], *, rng: random.Random) -> AddResult:
        by_key = {it.key: it for it in items}
        state = rng.getstate()

        def apply(pipe) -> AddResult:
            rng.setstate(state)  # a retry must replay the same random decisions
            slots, counters = self._read_state(pipe)
            new_slots, new_counters = plan_admission(
                policy=self.policy,
                slots=slots,
                incoming=[Slot(it.key, it.label, it.nbytes) for it in items],
                counters=counters,
                max_items=self.max_items,
                max_bytes=self.max_bytes,
                rng=rng,
            )
            old = {s.key for s in slots}
            keep = {s.key for s in new_slots}
            admitted = [s.key for s in new_slots if s.key in by_key and s.key not in old]
            evicted = [k for k in old if k not in keep]
            pipe.multi()
            for k in evicted:
                pipe.delete(self._item_key(k))
            for k in admitted:
                it = by_key[k]
                pipe.hset(
                    self._item_key(k),
                    mapping={
                        "image": it.image,
                        "text": it.text,
                        "label": json.dumps(it.label),
                        "chunk": it.chunk,
                        "pseudo": json.dumps(it.pseudo_texts),
                        "pseudo_version": it.pseudo_version,
                    },
                )
            pipe.set(self._state_key, self._state_json(new_slots, new_counters))
            return AddResult(admitted=admitted, evicted=evicted)

        return self._transaction(apply)

    def keys(self) -> list[str]:
        return [s.key for s in self._read_state(self.r)[0]]

    def __len__(self) -> int:
        return len(self._read_state(self.r)[0])

    def get(self, keys: Sequence[str]) -> list[MemoryItem]:
        with self.r.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hgetall(self._item_key(k))
            rows = pipe.execute()
        out = []
        for k, h in zip(keys, rows, strict=True):
            if not h:
                raise KeyError(f"replay memory {self.prefix}: no item {k!r}")
            out.append(
                MemoryItem(
                    key=k,
                    image=h[b"image"],
                    text=h[b"text"].decode(),
                    label=json.loads(h[b"label"]),
                    chunk=int(h[b"chunk"]),
                    pseudo_texts=json.loads(h[b"pseudo"]),
                    pseudo_version=int(h[b"pseudo_version"]),
                )
            )
        return out

    def sample(self, n: int, *, rng: random.Random) -> list[MemoryItem]:
        return self.get(sample_keys(self.keys(), n, rng))

    def set_pseudo_texts(self, texts: dict[str, list[str]], *, version: int) -> None:
        def apply(pipe) -> None:
            slots, counters = self._read_state(pipe)
            present = {s.key for s in slots}
            updates = {k: v for k, v in texts.items() if k in present}  # evicted meanwhile: skip
            sizes = {}
            for k, pts in updates.items():
                text = pipe.hget(self._item_key(k), "text").decode()
                image_len = pipe.hstrlen(self._item_key(k), "image")
                sizes[k] = image_len + len(text.encode()) + sum(len(t.encode()) for t in pts)
            pipe.multi()
            for k, pts in updates.items():
                pipe.hset(self._item_key(k), mapping={"pseudo": json.dumps(pts), "pseudo_version": version})
            new_slots = [Slot(s.key, s.label, sizes.get(s.key, s.nbytes)) for s in slots]
            pipe.set(self._state_key, self._state_json(new_slots, counters))

        self._transaction(apply)

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._read_state(self.r)[0])

    def seen(self) -> int:
        return self._read_state(self.r)[1].seen

    def label_counts(self) -> dict[str | None, int]:
        return dict(Counter(s.label for s in self._read_state(self.r)[0]))

    def save(self, path: str | Path) -> None:
        """Export to the in-process memory's directory format (a portable backup)."""
        snapshot = InProcessMemory(max_items=self.max_items, max_bytes=self.max_bytes, policy=self.policy)
        slots, counters = self._read_state(self.r)
        snapshot._counters = counters
        for it in self.get([s.key for s in slots]):
            snapshot._items[it.key] = it
        snapshot._slots = list(slots)
        snapshot.save(path)

    def clear(self) -> None:
        def apply(pipe) -> None:
            slots, _ = self._read_state(pipe)
            pipe.multi()
            for s in slots:
                pipe.delete(self._item_key(s.key))
            pipe.delete(self._state_key)

        self._transaction(apply)
