"""Eval sets measured after every chunk, for a fixed run (``ctp experiment``) or an endless stream.

``EvalTracker`` keeps, per eval set, the metrics after each chunk and the task matrix R
(design.md): row i is measured after chunk i; column j holds the classes first seen in chunk j.
The stream's length is not known in advance, so each new row has one column per chunk so far
and earlier rows are padded with ``None`` (classes not seen yet belong to no group). Its whole
state is JSON (``state()`` / ``from_state``), so a trainer that restarts from a checkpoint's
metadata keeps the curves and the forgetting figures where they were.

Retrieval sets and unlabelled streams have one column: the whole set's score (classification:
acc1; retrieval: ``mean_recall@1``), so the summary follows the whole set (see ctp.experiment).
"""

from __future__ import annotations

from collections.abc import Iterable
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


class EvalTracker:
    def __init__(
        self,
        classification: dict[str, ClassificationSet] | None = None,
        retrieval: dict[str, RetrievalSet] | None = None,
        state: dict[str, Any] | None = None,
    ):
        self.cls_sets = dict(classification or {})
        self.ret_sets = dict(retrieval or {})
        state = state or {}
        self.chunk_labels: list[set[str]] = [set(x) for x in state.get("chunk_labels", [])]
        old = state.get("results", {})
        self.results: dict[str, dict[str, Any]] = {}
        for name, kind in [(n, "classification") for n in self.cls_sets] + [
            (n, "retrieval") for n in self.ret_sets
        ]:
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

    def __bool__(self) -> bool:
        return bool(self.cls_sets or self.ret_sets)

    def after_chunk(
        self, bundle: ClipBundle, labels: Iterable[str | None], *, device: str
    ) -> dict[str, dict]:
        """Evaluate every set on ``bundle`` after a chunk whose pairs carried ``labels``."""
        self.chunk_labels.append({lab for lab in labels if lab})
        width = len(self.chunk_labels)
        for r in self.results.values():
            for row in r["rows"]:
                row.extend([None] * (width - len(row)))
        labelled = any(self.chunk_labels)
        for name, ds in self.cls_sets.items():
            res = evaluate_classification(
                bundle.model, ds, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, device=device
            )
            r = self.results[name]
            r["after_chunk"].append(res.metrics)
            if labelled:
                row = group_accuracy(
                    res.correct, ds.targets, class_groups(ds.classnames, self.chunk_labels), width
                )
            else:
                row = [res.metrics["acc1"]] + [None] * (width - 1)
            r["rows"].append(row)
        for name, ds in self.ret_sets.items():
            m = evaluate_retrieval(
                bundle.model, ds, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, device=device
            )
            m[RETRIEVAL_SCORE] = (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2
            self.results[name]["after_chunk"].append(m)
            self.results[name]["rows"].append([m[RETRIEVAL_SCORE]] + [None] * (width - 1))
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
