"""The continual benchmark: every strategy x several seeds on the class-incremental stream.

    python benchmarks/continual.py --out runs/bench [--seeds 0 1 2] [--jobs 2]

Runs ``ctp experiment`` once per (strategy, seed) in parallel worker processes (one torch
thread each; a finished run is reused), then writes ``OUT/results.md`` (tables in points,
mean ± std over seeds) and ``OUT/continual.png``. Targets checked and printed: incclip's final
average accuracy >= er + 4.6 points; incclip's forgetting <= 0.6 x finetune's; incclip within
5 points of joint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ctp.compare import load_runs, summary_table
from ctp.plots import plot_accuracy_curves

DEFAULT_STRATEGIES = ["incclip", "er", "finetune", "lwf", "joint", "er_kd", "er_pt"]


def run_one(strategy: str, seed: int, args, extra: list[str]) -> tuple[str, int, float, Path]:
    out = args.out / f"{strategy}-seed{seed}"
    if (out / "metrics.json").is_file():
        return strategy, seed, 0.0, out
    cmd = [sys.executable, "-m", "service.cli", "experiment", "--synthetic", args.stream, "--strategy", strategy,
           "--seed", str(seed), "--no-progress", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{strategy} seed {seed} failed, see {out / 'log.txt'}")
    return strategy, seed, time.perf_counter() - t0, out


def targets(runs: dict[str, list[dict]], name: str) -> list[str]:
    def mean(strategy, key):
        vals = [m["eval"][name][key] for m in runs.get(strategy, [])]
        return float(np.mean(vals)) if vals else None

    lines = []
    inc, er, ft, joint = (mean(s, "avg_accuracy") for s in ("incclip", "er", "finetune", "joint"))
    f_inc, f_ft = mean("incclip", "forgetting"), mean("finetune", "forgetting")
    if None not in (inc, er):
        gap = 100 * (inc - er)
        lines.append(f"- incclip − er average accuracy: {gap:+.2f} points (target ≥ +4.60): "
                     f"{'met' if gap >= 4.6 else 'missed'}")
    if None not in (f_inc, f_ft):
        ratio = f_inc / f_ft if f_ft > 0 else float("nan")
        lines.append(f"- incclip forgetting / finetune forgetting: {ratio:.2f} (target ≤ 0.60): "
                     f"{'met' if ratio <= 0.6 else 'missed'}")
    if None not in (inc, joint):
        gap = 100 * (joint - inc)
        lines.append(f"- joint − incclip average accuracy: {gap:+.2f} points (target ≤ 5.00): "
                     f"{'met' if gap <= 5 else 'missed'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--stream", default="class-incremental-small")
    p.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="experiments run at once")
    p.add_argument("--threads", type=int, default=2, help="torch threads per experiment")
    args, extra = p.parse_known_args(argv)  # the rest goes to every `ctp experiment`
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(s, seed) for seed in args.seeds for s in args.strategies]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(jobs), desc="experiments") as bar:
        futures = [pool.submit(run_one, s, seed, args, extra) for s, seed in jobs]
        for f in as_completed(futures):
            strategy, seed, seconds, _ = f.result()
            bar.set_postfix_str(f"{strategy} seed {seed}: {seconds:.0f}s")
            bar.update(1)
    runs = load_runs([args.out / f"{s}-seed{seed}" for s, seed in jobs])
    plot = plot_accuracy_curves(runs, args.out / "continual.png")
    first = next(iter(runs.values()))[0]
    cls_name = next(n for n, e in first["eval"].items() if e["kind"] == "classification")
    lines = [
        f"Stream `{args.stream}`, seeds {args.seeds}, model `{first['model']}`, "
        f"{first['train_config']['epochs']} epochs per chunk, batch {first['train_config']['batch_size']}, "
        f"lr {first['train_config']['lr']}, memory {first['memory_size']} ({first['memory_policy']}); "
        f"wall time {time.perf_counter() - t0:.0f} s with {args.jobs} jobs. Values in points (×100), "
        "mean ± std over seeds.",
        "",
        summary_table(runs),
        "Targets (classification set, average accuracy after the last chunk):",
        "",
        *targets(runs, cls_name),
        "",
        f"![accuracy after each chunk]({plot.name})",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(
        {s: [{n: {k: e[k] for k in ("avg_accuracy", "forgetting", "bwt")} for n, e in m["eval"].items()}
             for m in ms] for s, ms in runs.items()}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
