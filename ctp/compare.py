"""``ctp compare OUT1 OUT2 ...``: strategies side by side (mean ± std where seeds repeat)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

# numpy and matplotlib (ctp.plots) are imported where used: `ctp compare --help` stays fast


def load_runs(dirs: list[Path]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for d in dirs:
        f = Path(d) / "metrics.json"
        if not f.is_file():
            raise SystemExit(f"no metrics.json in {d}")
        m = json.loads(f.read_text())
        label = m["strategy"] + (f"[{m['generator']}]" if m.get("generator") not in (None, "edit") else "")
        runs[label].append(m)
    return dict(runs)


def _cell(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    import numpy as np

    return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}"


def summary_table(runs: dict[str, list[dict]]) -> str:
    """Markdown table in points (x100): final score, average accuracy, forgetting, BWT."""
    from ctp.plots import headline_score

    names = sorted({n for ms in runs.values() for m in ms for n in m["eval"]})
    lines = []
    for name in names:
        score = None
        rows = []
        for label, ms in runs.items():
            es = [m["eval"][name] for m in ms if name in m["eval"]]
            if not es:
                continue
            score = headline_score(es[0])
            rows.append(
                f"| {label} | {len(es)} | "
                + " | ".join(_cell([e[k] for e in es]) for k in ("avg_accuracy", "forgetting", "bwt"))
                + f" | {_cell([e['final'][score] for e in es])} |"
            )
        lines += [
            f"### {name}",
            "",
            f"| strategy | runs | avg accuracy | forgetting | BWT | final {score} |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctp compare", description=__doc__)
    p.add_argument("outs", nargs="+", type=Path, help="experiment output directories")
    p.add_argument("--plot", type=Path, default=Path("compare.png"), help="where to write the plot (PNG)")
    args = p.parse_args(argv)
    from ctp.plots import plot_accuracy_curves

    runs = load_runs(args.outs)
    print(summary_table(runs))
    plot_accuracy_curves(runs, args.plot)
    print(f"wrote {args.plot}")
    return 0
