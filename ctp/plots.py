"""PNG plots of continual results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def headline_score(entry: dict) -> str:
    """The per-chunk score plotted for an eval entry: acc1 or the retrieval score."""
    return entry.get("score", "acc1")


def plot_accuracy_curves(runs: dict[str, dict | list[dict]], path: Path) -> Path:
    """One panel per eval set: score after each chunk, one line per strategy (mean ± std over runs)."""
    groups = {k: v if isinstance(v, list) else [v] for k, v in runs.items()}
    names = sorted({n for ms in groups.values() for m in ms for n in m["eval"]})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for label, ms in groups.items():
            curves = [
                [a[headline_score(m["eval"][name])] for a in m["eval"][name]["after_chunk"]]
                for m in ms
                if name in m["eval"]
            ]
            if not curves:
                continue
            arr = np.array(curves)
            x = np.arange(1, arr.shape[1] + 1)  # chunks counted from 1, as the dashboard and versions do
            mean = arr.mean(0)
            ax.plot(x, mean, marker="o", label=label)
            if len(curves) > 1:
                ax.fill_between(x, mean - arr.std(0), mean + arr.std(0), alpha=0.2)
        ax.set_title(name)
        ax.set_xlabel("after chunk (1 = the first)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("acc1" if "retrieval" not in name else "mean recall@1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_task_matrix(R: list[list[float | None]], path: Path, *, title: str = "") -> Path:
    arr = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * arr.shape[1], 1 + 0.7 * arr.shape[0]))
    im = ax.imshow(arr, vmin=0, vmax=1, cmap="viridis")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if not np.isnan(arr[i, j]):
                ax.text(
                    j,
                    i,
                    f"{arr[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if arr[i, j] < 0.5 else "black",
                    fontsize=8,
                )
    # chunks numbered from 1 on both axes, as in the accuracy curves and the dashboard
    ax.set_xticks(range(arr.shape[1]), [str(j + 1) for j in range(arr.shape[1])])
    ax.set_yticks(range(arr.shape[0]), [str(i + 1) for i in range(arr.shape[0])])
    ax.set_xlabel("classes first seen in chunk j")
    ax.set_ylabel("after chunk i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
