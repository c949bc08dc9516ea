"""Eval sets measured after every chunk, for a fixed run (``ctp experiment``) or an endless stream.

``EvalTracker`` keeps, per eval set, the metrics after each chunk and the task matrix R
(design.md): row i is measured after chunk i; column j holds the classes first seen in chunk j.
The stream's length is not known in advance, so each new row has one column per chunk so far
and earlier rows are padded with ``None`` (classes not seen yet belong to no group). Its whole
state is JSON (``state()`` / ``from_state``), so a trainer that restarts from a checkpoint's
metadata keeps the curves and the forgetting figures where they were.

Retrieval sets and unlabelled streams have one column: the whole set's score (classification:
acc1; retrieval: ``mean_recall@1``), so the summary follows the whole set (see ctp.experiment).

``EvalTracker`` keeps the whole matrix (T x T cells: fine for a run of a few dozen chunks).
``StreamEvalTracker`` is its bounded twin for a stream that never ends (the trainer service): it
measures the same row per chunk and the same summary (``RunningSummary``: average accuracy,
forgetting and BWT need only, per column, the best value so far and the diagonal), and its state
holds those per column with classes, never the rows: its size follows the eval sets, not the
number of chunks. Each chunk's row is returned to be stored once, in an append-only history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ctp.data import ClassificationSet, RetrievalSet
from ctp.evaluate import evaluate_classification, evaluate_retrieval
from ctp.metrics import continual_summary, group_accuracy
from ctp.models import ClipBundle

RETRIEVAL_SCORE = "mean_recall@1"  # (image_retrieval_recall@1 + text_retrieval_recall@1) / 2


def class_groups(classnames: list[str], chunk_labels: list[set[str]]) -> dict[int, int]:
    """Class index -> first chunk whose pairs carry that class name; unlabelled: all in group 0."""
    if not any(chunk_labels):
        return dict.fromkeys(range(len(classnames)), 0)
    index = {c: k for k, c in enumerate(classnames)}
    first: dict[int, int] = {}
    for j, labels in enumerate(chunk_labels):
        for lab in labels:
            if lab in index:
                first.setdefault(index[lab], j)
    return first


def measure_row(
    bundle: ClipBundle,
    cls_sets: dict[str, ClassificationSet],
    ret_sets: dict[str, RetrievalSet],
    groups: Callable[[ClassificationSet], dict[int, int]],
    *,
    width: int,
    labelled: bool,
    device: str,
) -> dict[str, tuple[dict[str, float], list[float | None]]]:
    """Per set: its metrics and its row of R (``width`` columns) on ``bundle`` now. ``groups(ds)``:
    class index -> chunk that first carried it; without labels a row is one column (acc1)."""
    out: dict[str, tuple[dict[str, float], list[float | None]]] = {}
    for name, ds in cls_sets.items():
        res = evaluate_classification(
            bundle.model, ds, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, device=device
        )
        if labelled:
            row = group_accuracy(res.correct, ds.targets, groups(ds), width)
        else:
            row = [res.metrics["acc1"]] + [None] * (width - 1)
        out[name] = (res.metrics, row)
    for name, ds in ret_sets.items():
        m = evaluate_retrieval(
            bundle.model, ds, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, device=device
        )
        m[RETRIEVAL_SCORE] = (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2
        out[name] = (m, [m[RETRIEVAL_SCORE]] + [None] * (width - 1))
    return out


class _EvalSets:
    """The eval sets a tracker measures after each chunk, by name, and each one's kind."""

    def __init__(
        self,
        classification: dict[str, ClassificationSet] | None = None,
        retrieval: dict[str, RetrievalSet] | None = None,
    ):
        self.cls_sets = dict(classification or {})
        self.ret_sets = dict(retrieval or {})
        self.kinds = {n: "classification" for n in self.cls_sets} | {n: "retrieval" for n in self.ret_sets}

    def __bool__(self) -> bool:
        return bool(self.kinds)


class EvalTracker(_EvalSets):
    def __init__(
        self,
        classification: dict[str, ClassificationSet] | None = None,
        retrieval: dict[str, RetrievalSet] | None = None,
        state: dict[str, Any] | None = None,
    ):
        super().__init__(classification, retrieval)
        state = state or {}
        self.chunk_labels: list[set[str]] = [set(x) for x in state.get("chunk_labels", [])]
        old = state.get("results", {})
        self.results: dict[str, dict[str, Any]] = {}
        for name, kind in self.kinds.items():
            prev = old.get(name)
            if prev and prev.get("kind") == kind and len(prev["rows"]) == len(self.chunk_labels):
                self.results[name] = {
                    "kind": kind,
                    "after_chunk": list(prev["after_chunk"]),
                    "rows": [list(r) for r in prev["rows"]],
                }
            else:  # a set added later starts at the next chunk: earlier rows were not measured
                self.results[name] = {
                    "kind": kind,
                    "after_chunk": [None] * len(self.chunk_labels),
                    "rows": [[None] * len(self.chunk_labels) for _ in self.chunk_labels],
                }

    def after_chunk(
        self, bundle: ClipBundle, labels: Iterable[str | None], *, device: str
    ) -> dict[str, dict]:
        """Evaluate every set on ``bundle`` after a chunk whose pairs carried ``labels``."""
        self.chunk_labels.append({lab for lab in labels if lab})
        width = len(self.chunk_labels)
        for r in self.results.values():
            for row in r["rows"]:
                row.extend([None] * (width - len(row)))
        rows = measure_row(
            bundle,
            self.cls_sets,
            self.ret_sets,
            lambda ds: class_groups(ds.classnames, self.chunk_labels),
            width=width,
            labelled=any(self.chunk_labels),
            device=device,
        )
        for name, (metrics, row) in rows.items():
            self.results[name]["after_chunk"].append(metrics)
            self.results[name]["rows"].append(row)
        return self.summary()

    def summary(self) -> dict[str, dict]:
        """Per set: kind, metrics after each chunk, final metrics, avg accuracy, forgetting, BWT."""
        out = {}
        labelled = any(self.chunk_labels)
        for name, r in self.results.items():
            if not r["rows"]:
                continue
            if r["kind"] == "classification" and labelled:
                matrix = r["rows"]
            elif r["kind"] == "classification":
                matrix = [
                    [m["acc1"] if m else None] + [None] * (len(row) - 1)
                    for m, row in zip(r["after_chunk"], r["rows"], strict=True)
                ]
            else:
                matrix = r["rows"]
            entry = {
                "kind": r["kind"],
                "after_chunk": r["after_chunk"],
                "final": r["after_chunk"][-1],
                **continual_summary(matrix),
            }
            if r["kind"] == "classification":
                entry["task_matrix"] = matrix
            else:
                entry["score"] = RETRIEVAL_SCORE
            out[name] = entry
        return out

    def state(self) -> dict[str, Any]:
        return {"chunk_labels": [sorted(x) for x in self.chunk_labels], "results": self.results}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class RunningSummary:
    """``ctp.metrics.continual_summary`` of R row by row, keeping only per column j the best value
    of the rows so far and ``R[j][j]``: O(columns with a value) memory, however many rows."""

    def __init__(self, state: dict[str, Any] | None = None):
        state = state or {}
        self.rows = int(state.get("rows", 0))
        self.best: dict[int, float] = {int(j): v for j, v in (state.get("best") or {}).items()}
        self.diag: dict[int, float] = {int(j): v for j, v in (state.get("diag") or {}).items()}

    def add(self, row: Sequence[float | None]) -> dict[str, float | None]:
        """Summary after row T = ``self.rows`` (average accuracy, forgetting, BWT); then counts it."""
        T = self.rows
        cells = {j: v for j, v in enumerate(row) if v is not None}
        avg = _mean([v for j, v in cells.items() if j <= T])
        forget = _mean([self.best[j] - v for j, v in cells.items() if j < T and j in self.best])
        back = _mean([v - self.diag[j] for j, v in cells.items() if j < T and j in self.diag])
        for j, v in cells.items():
            self.best[j] = max(self.best.get(j, v), v)
        if T in cells:
            self.diag[T] = cells[T]
        self.rows += 1
        return {"avg_accuracy": avg, "forgetting": forget or 0.0, "bwt": back or 0.0}

    def state(self) -> dict[str, Any]:
        return {"rows": self.rows, "best": self.best, "diag": self.diag}


class StreamEvalTracker(_EvalSets):
    """``EvalTracker``'s measurements and summary in bounded state (see the module docstring).

    ``after_chunk`` returns, per set, ``{"kind", "score", "metrics", "row", "avg_accuracy",
    "forgetting", "bwt"}`` with ``row`` the chunk's row of R as ``{column: value}`` (cells with a
    value only). ``state()`` is JSON: the chunk count, the chunk that first carried each eval class
    name, and a ``RunningSummary`` per set. A state written by ``EvalTracker`` is read too (its
    matrix folded into the running summaries), so a trainer upgrades without losing the curves.
    """

    def __init__(
        self,
        classification: dict[str, ClassificationSet] | None = None,
        retrieval: dict[str, RetrievalSet] | None = None,
        state: dict[str, Any] | None = None,
    ):
        super().__init__(classification, retrieval)
        state = _from_matrix_state(state) if state and "results" in state else (state or {})
        self.chunks = int(state.get("chunks", 0))
        self.labelled = bool(state.get("labelled", False))
        self._classes = {c for ds in self.cls_sets.values() for c in ds.classnames}
        seen = state.get("first_seen") or {}
        self.first_seen: dict[str, int] = {c: int(j) for c, j in seen.items() if c in self._classes}
        old = state.get("sets") or {}
        self.summaries = {
            n: RunningSummary(old[n]["summary"] if old.get(n, {}).get("kind") == kind else None)
            for n, kind in self.kinds.items()
        }

    def after_chunk(
        self, bundle: ClipBundle, labels: Iterable[str | None], *, device: str
    ) -> dict[str, dict[str, Any]]:
        """Evaluate every set on ``bundle`` after chunk ``self.chunks``, whose pairs carried ``labels``."""
        j = self.chunks
        chunk_labels = {lab for lab in labels if lab}
        self.labelled = self.labelled or bool(chunk_labels)
        for lab in chunk_labels & self._classes:
            self.first_seen.setdefault(lab, j)
        rows = measure_row(
            bundle,
            self.cls_sets,
            self.ret_sets,
            self._groups,
            width=j + 1,
            labelled=self.labelled,
            device=device,
        )
        self.chunks += 1
        out = {}
        for name, (metrics, row) in rows.items():
            kind = self.kinds[name]
            out[name] = {
                "kind": kind,
                "score": "acc1" if kind == "classification" else RETRIEVAL_SCORE,
                "metrics": metrics,
                "row": {str(c): v for c, v in enumerate(row) if v is not None},
                **self.summaries[name].add(row),
            }
        return out

    def _groups(self, ds: ClassificationSet) -> dict[int, int]:
        return {k: self.first_seen[c] for k, c in enumerate(ds.classnames) if c in self.first_seen}

    def state(self) -> dict[str, Any]:
        return {
            "format": "stream",
            "chunks": self.chunks,
            "labelled": self.labelled,
            "first_seen": self.first_seen,
            "sets": {n: {"kind": self.kinds[n], "summary": s.state()} for n, s in self.summaries.items()},
        }


def _from_matrix_state(state: dict[str, Any]) -> dict[str, Any]:
    """An ``EvalTracker`` state as a ``StreamEvalTracker`` one: its matrix folded row by row."""
    chunk_labels = [set(x) for x in state.get("chunk_labels") or []]
    first_seen: dict[str, int] = {}
    for j, labels in enumerate(chunk_labels):
        for lab in labels:
            first_seen.setdefault(lab, j)
    sets = {}
    for name, r in (state.get("results") or {}).items():
        summary = RunningSummary()
        for row in r.get("rows") or []:
            summary.add(row)
        sets[name] = {"kind": r.get("kind"), "summary": summary.state()}
    return {
        "chunks": len(chunk_labels),
        "labelled": any(chunk_labels),
        "first_seen": first_seen,
        "sets": sets,
    }
