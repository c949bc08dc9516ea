"""Continual-learning metrics on the task matrix R (pure Python, no torch).

Definitions (docs/design.md, "Metrics"); i, j, T are 0-based chunk indices:

- ``R[i][j]`` = accuracy on the eval examples of the classes first seen in chunk j, measured
  after training chunk i (classification over all class names of the eval set). Entries with
  j > i (classes not trained on yet) are measured and kept, but no summary metric uses them.
- average accuracy after chunk T = mean over j <= T of ``R[T][j]``.
- forgetting after chunk T = mean over j < T of ``max_{i<T} R[i][j] - R[T][j]``. The max runs
  over *all* i < T, as docs/design.md states, including i < j (before chunk j was trained on, i.e.
  zero-shot accuracy on classes not seen yet). The common literature definition takes the max
  over j <= i < T only; the two differ only when an earlier zero-shot accuracy beats every
  accuracy reached after training on the chunk.
- BWT after chunk T = mean over j < T of ``R[T][j] - R[j][j]``.

A cell is ``None`` when its group had no eval examples. Summary metrics average over the terms
they can compute and skip the rest (a forgetting term needs ``R[T][j]`` and at least one
``R[i][j]``, i < T; a BWT term needs ``R[T][j]`` and ``R[j][j]``); when no term is left,
average accuracy is ``None`` and forgetting/BWT are ``0.0`` like at T == 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

TaskMatrix = Sequence[Sequence[float | None]]  # rows: after chunk i; columns: classes of chunk j


def first_seen_chunk(chunk_classes: Sequence[Iterable[int]]) -> dict[int, int]:
    """Map each class index to the first chunk (0-based) whose training data contains it.

    ``chunk_classes[i]`` holds the class indices present in chunk i. The result is the
    ``class_to_group`` argument of :func:`group_accuracy` for building one row of R.
    """
    first: dict[int, int] = {}
    for chunk, classes in enumerate(chunk_classes):
        for c in classes:
            first.setdefault(int(c), chunk)
    return first


def group_accuracy(
    correct: Sequence[bool],
    targets: Sequence[int],
    class_to_group: dict[int, int],
    num_groups: int,
) -> list[float | None]:
    """Top-1 accuracy per group of classes; ``None`` for a group without examples.

    ``correct[n]`` / ``targets[n]`` are per eval example (same order). Examples whose class is
    not in ``class_to_group`` (never seen in any chunk) belong to no group and are ignored.
    """
    if len(correct) != len(targets):
        raise ValueError(f"correct ({len(correct)}) and targets ({len(targets)}) differ in length")
    hits = [0] * num_groups
    counts = [0] * num_groups
    for ok, target in zip(correct, targets, strict=True):
        group = class_to_group.get(int(target))
        if group is None:
            continue
        if not 0 <= group < num_groups:
            raise ValueError(f"class {target} maps to group {group}, outside [0, {num_groups})")
        counts[group] += 1
        hits[group] += bool(ok)
    return [h / n if n else None for h, n in zip(hits, counts, strict=True)]


def _check(R: TaskMatrix, T: int) -> None:
    if not 0 <= T < len(R):
        raise ValueError(f"T={T} outside the {len(R)} measured rows of R")
    for i in range(T + 1):
        if len(R[i]) <= T:
            raise ValueError(f"row {i} of R has {len(R[i])} columns, needs at least {T + 1}")


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def average_accuracy(R: TaskMatrix, T: int) -> float | None:
    """Mean over j <= T of R[T][j] (``None`` cells skipped; ``None`` if all are)."""
    _check(R, T)
    return _mean([R[T][j] for j in range(T + 1) if R[T][j] is not None])


def forgetting(R: TaskMatrix, T: int) -> float:
    """Mean over j < T of (max_{i<T} R[i][j] - R[T][j]); 0.0 when T == 0.

    The max is over all i < T exactly as in docs/design.md (see the module docstring).
    """
    _check(R, T)
    terms = []
    for j in range(T):
        past = [R[i][j] for i in range(T) if R[i][j] is not None]
        if R[T][j] is None or not past:
            continue
        terms.append(max(past) - R[T][j])
    mean = _mean(terms)
    return 0.0 if mean is None else mean


def bwt(R: TaskMatrix, T: int) -> float:
    """Backward transfer: mean over j < T of (R[T][j] - R[j][j]); 0.0 when T == 0."""
    _check(R, T)
    terms = [R[T][j] - R[j][j] for j in range(T) if R[T][j] is not None and R[j][j] is not None]
    mean = _mean(terms)
    return 0.0 if mean is None else mean


def continual_summary(R: TaskMatrix) -> dict[str, float | None]:
    """``{"avg_accuracy", "forgetting", "bwt"}`` after the last measured chunk T = len(R) - 1."""
    if not R:
        raise ValueError("R has no rows")
    T = len(R) - 1
    return {"avg_accuracy": average_accuracy(R, T), "forgetting": forgetting(R, T), "bwt": bwt(R, T)}


def format_task_matrix(R: TaskMatrix) -> str:
    """R as a fixed-width text table (rows: after chunk i; columns: classes of chunk j)."""
    width = max((len(row) for row in R), default=0)
    lines = ["after\\seen " + " ".join(f"{j:>6d}" for j in range(width))]
    for i, row in enumerate(R):
        cells = ["     -" if v is None else f"{v:6.3f}" for v in row]
        lines.append(f"{i:>10d} " + " ".join(cells))
    return "\n".join(lines)
