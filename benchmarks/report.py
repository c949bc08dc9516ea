"""Tables and plots of a continual sweep, from its committed result files only.

    python benchmarks/continual.py report --sweep test      # writes docs/results/test.md + PNGs

Statistics: per cell, mean over seeds with a 95 % confidence interval (Student t, n - 1 degrees
of freedom); incclip against a baseline as the *paired* difference (same seed: same class order
and data), mean ± 95 % interval of the per-seed differences. Values in points (x 100).
Primary score: average accuracy after the last chunk on the classification set (mean over chunk
groups j of R[T][j]); retrieval: mean recall@1 (image->text and text->image) after the last chunk.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30 (beyond: 1.96)
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]
BASELINES = ("finetune", "er", "lwf")


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_ci(values) -> tuple[float, float]:
    """(mean, half-width of the 95 % interval); half-width nan for one value."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def load(sweep: str) -> dict[tuple[str, str, str], dict[int, dict]]:
    """(stream, label, mem) -> seed -> trimmed metrics."""
    runs: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for f in sorted((RESULTS / sweep).glob("*/*/*/seed*.json")):
        stream, label, mem = f.parts[-4:-1]
        runs[(stream, label, mem)][int(f.stem[4:])] = json.loads(f.read_text())
    return runs


def cls_name(m: dict) -> str:
    return next(n for n, e in m["eval"].items() if e["kind"] == "classification" and "task_matrix" in e)


def ret_name(m: dict) -> str | None:
    return next((n for n, e in m["eval"].items() if e["kind"] == "retrieval"), None)


def score(m: dict, what: str) -> float | None:
    if what == "avg":
        return m["eval"][cls_name(m)]["avg_accuracy"]
    if what == "forgetting":
        return m["eval"][cls_name(m)]["forgetting"]
    if what == "retrieval":
        r = ret_name(m)
        return m["eval"][r]["final"]["mean_recall@1"] if r else None
    if what == "pairs":
        return m["compute"]["pairs"]
    if what == "seconds":
        return m["compute"]["train_seconds"]
    if what in ("kept", "peak"):  # keeping's ceilings from the task matrix (_ceiling_lines)
        rows = m["eval"][cls_name(m)]["task_matrix"]
        cols = [j for j, x in enumerate(rows[-1]) if x is not None]  # groups with classes of their own
        if what == "kept":  # each chunk's classes as they stood right after their chunk
            return float(np.mean([rows[j][j] for j in cols]))
        return float(np.mean([max(r[j] for r in rows[j:]) for j in cols]))  # ... at their best
    if what.startswith("eval:"):  # final acc1 of another classification set (warm start: the base's)
        return m["eval"][what[5:]]["final"]["acc1"]
    raise ValueError(what)


def mems(runs, stream) -> list[str]:
    ms = sorted({k[2] for k in runs if k[0] == stream and k[2] != "nomem"}, key=_share)
    return ms


def cell_runs(runs, stream, label, mem) -> dict[int, dict]:
    """A memory-free strategy (finetune, lwf, joint) has one result for every memory size."""
    return runs.get((stream, label, mem)) or runs.get((stream, label, "nomem")) or {}


def fmt(mean: float, half: float, scale: float = 100.0) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * half:.1f}"


def per_seed(a: dict[int, dict], b: dict[int, dict], what: str = "avg") -> dict[int, float]:
    """a − b for each seed both have."""
    return {s: score(a[s], what) - score(b[s], what) for s in sorted(set(a) & set(b))}


def paired(a: dict[int, dict], b: dict[int, dict], what: str = "avg") -> tuple[float, float, int]:
    d = per_seed(a, b, what)
    m, h = mean_ci(list(d.values()))
    return m, h, len(d)


ENV_KEYS = ("cpu", "cpu_flags", "cpu_capability", "torch", "numpy", "pillow", "open_clip_torch")


def env_key(m: dict) -> tuple | None:
    env = m.get("env")
    return tuple(env.get(k) for k in ENV_KEYS) if env else None


def cross_env(a: dict[int, dict], b: dict[int, dict]) -> int:
    """How many of the seeds both have were made in different environments: such a pair
    differs by the machine as well as by the method (docs/results.md). One side recorded and
    the other not counts as different (environments were kept from a later session on); two
    unrecorded sides are not counted (the Environments table lists them)."""
    keys = [(env_key(a[s]), env_key(b[s])) for s in set(a) & set(b)]
    return sum(1 for x, y in keys if x != y)


def n_note(a: dict[int, dict], b: dict[int, dict], n: int) -> str:
    """``n=5``, or ``n=5, 3 across environments`` when some pairs were made apart."""
    k = cross_env(a, b)
    return f"n={n}" + (f", {k} across environments" if k else "")


def best_baseline(runs, stream, mem) -> str | None:
    cands = [
        (mean_ci([score(m, "avg") for m in cell_runs(runs, stream, b, mem).values()])[0], b)
        for b in BASELINES
        if cell_runs(runs, stream, b, mem)
    ]
    return max(cands)[1] if cands else None


def write_report(sweep: str, *, out_dir: Path) -> Path:
    pool = reference_pool(sweep)
    runs = pool[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    streams = sorted({k[0] for k in runs})
    # the same-machine er and incclip references that knob-only sweeps are read against
    knob_refs = _pooled([load(r) for r in SCREEN_REFS]) if sweep in KNOB_SWEEPS else {}
    lines = [
        f"# Continual sweep `{sweep}`",
        "",
        f"Generated by `python benchmarks/continual.py report --sweep {sweep}` from "
        f"`benchmarks/results/{sweep}/`. Points (x100), mean ± 95 % interval over seeds.",
        "",
    ]
    for stream in streams:
        labels = sorted({k[1] for k in runs if k[0] == stream}, key=_order)
        some = next(iter(next(v for k, v in runs.items() if k[0] == stream).values()))
        lines += [
            f"## {stream}",
            "",
            f"{some['chunks']} chunks, {some['cell']['stream_pairs']} pairs, model "
            f"`{some['model']}`, common arguments `{' '.join(some['cell']['common'])}`.",
            "",
        ]
        ms = mems(runs, stream) or ["nomem"]
        for what, title in (
            ("avg", "average accuracy after the last chunk"),
            ("forgetting", "forgetting"),
            ("retrieval", "retrieval mean recall@1 after the last chunk"),
        ):
            lines += _mem_table_head(title, "strategy", runs, stream, ms)
            for label in labels:
                cells = []
                for mem in ms:
                    rs = cell_runs(runs, stream, label, mem)
                    cells.append(
                        fmt(*mean_ci([score(m, what) for m in rs.values()])) + f" (n={len(rs)})"
                        if rs
                        else "–"
                    )
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += _mem_table_head(
            "paired differences, average accuracy (same seeds)", "comparison", runs, stream, ms
        )
        for other in ("best baseline", *BASELINES, "er_kd", "er_pt", "joint"):
            cells = []
            for mem in ms:
                base = best_baseline(runs, stream, mem) if other == "best baseline" else other
                a, b = (
                    cell_runs(runs, stream, "incclip", mem),
                    cell_runs(runs, stream, base, mem) if base else {},
                )
                if not a or not b:
                    cells.append("–")
                    continue
                m, h, n = paired(a, b)
                tag = f" ({base})" if other == "best baseline" else ""
                cells.append(f"{fmt(m, h)}{tag}, {n_note(a, b, n)}")
            lines.append(f"| incclip − {other} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _per_seed_lines(runs, stream, labels, ms)
        lines += _ablation_lines(runs, stream, ms, pool)
        ceiling = _ceiling_lines(runs, stream, ms)
        if ceiling:
            plot_ceiling(runs, stream, ms, out_dir / f"{sweep}-{stream}-ceiling.png")
            ceiling += [f"![how far keeping could go]({sweep}-{stream}-ceiling.png)", ""]
        lines += ceiling
        compute = _compute_lines(runs, stream, ms)
        lines += compute
        base_sets = sorted(
            {
                n
                for k, v in runs.items()
                if k[0] == stream
                for m in v.values()
                for n in m["eval"]
                if n.endswith("_base")
            }
        )
        for bs in base_sets:
            lines += _retention_lines(runs, stream, ms, bs, sweep)
        if sweep in KNOB_SWEEPS:  # knob cells only: their curves beside the references of their seeds
            refs = with_references(runs, knob_refs, stream)
            plot_curves(refs, stream, ms, out_dir / f"{sweep}-{stream}-curves.png", variants=True)
            lines += [f"![accuracy after each chunk, beside the references]({sweep}-{stream}-curves.png)", ""]
            continue
        plot_curves(runs, stream, ms, out_dir / f"{sweep}-{stream}-curves.png")
        plot_paired(runs, stream, ms, out_dir / f"{sweep}-{stream}-paired.png")
        plot_compute(runs, stream, ms, out_dir / f"{sweep}-{stream}-compute.png")
        lines += [
            f"![accuracy after each chunk]({sweep}-{stream}-curves.png)",
            "",
            f"![paired differences]({sweep}-{stream}-paired.png)",
            "",
            f"![accuracy against compute]({sweep}-{stream}-compute.png)",
            "",
        ]
    if sweep == "validation-warm":
        pooled = _pooled([runs, load("validation-warm-confirm")])
        for stream in streams:
            rule = remedy_lines(stream, runs, pooled)
            if rule:
                lines += [f"## {stream}: the remedies against the adoption rule", "", *rule, ""]
    if sweep == "validation-novelty":
        lines += ["## The novelty rule", "", *novelty_lines(runs), ""]
        heldout = novelty_lines(runs, "incclip[novelty-heldout]", beat="incclip[novelty]")
        if heldout:
            lines += ["## The novelty rule, against a held-out slice", "", *heldout, ""]
        storage = storage_lines(runs)
        if storage:
            lines += ["## The late slice at equal storage", "", *storage, ""]
    if sweep == "validation-ii":
        known = known_lines(runs, load("validation-novelty"))
        if known:
            lines += ["## The kd_known rule", "", *known, ""]
    if sweep == "validation-shift":
        refs = _pooled([load("validation-novelty"), load("validation-novelty-confirm")])
        shift = shift_lines(runs, refs)
        if shift:
            lines += ["## The style-shift diagnostic", "", *shift, ""]
    if sweep == "validation-kdpast":
        refs = knob_refs
        lines += ["## Per seed, beside the references of each seed", "", *screen_lines(runs, refs), ""]
        for label in sorted({k[1] for k in runs}):
            lines += [
                f"## {label}: the reading, fixed before the cells ran",
                "",
                *kdpast_lines(runs, refs, label),
                "",
            ]
    if sweep in SCREENS:
        refs = knob_refs
        lines += ["## The screen, beside the references of each seed", "", *screen_lines(runs, refs), ""]
        rule = screen_rule_lines(runs, refs)
        if rule:
            lines += ["## The screen's setting on six seeds, against its rule", "", *rule, ""]
    if sweep == "validation-novelty-confirm":
        lines += [
            "## The novelty rule on fresh seeds",
            "",
            "Part (a), seeds 103-105 alone, as the first rule:",
            "",
            *novelty_lines(runs),
            "",
            "Part (b), pooled with seeds 100-102 (`validation-novelty`): each seed's mean of its four "
            "differences against incclip.",
            "",
            *novelty_pooled_lines([load("validation-novelty"), runs]),
            "",
        ]
    lines += _environment_lines(runs)
    accept = acceptance_table(runs, streams)
    lines[4:4] = ["## Acceptance targets", "", accept, ""]
    path = out_dir / f"{sweep}.md"
    path.write_text("\n".join(lines) + "\n")
    _update_results_md(sweep, headline_table(sweep, streams), out_dir.parent / "results.md")
    _update_results_md(sweep, accept, out_dir.parent / "results.md", block="acceptance")
    print(f"wrote {path}")
    return path


def _environment_lines(runs) -> list[str]:
    """How many cells each recorded environment made. Paired cells made in different
    environments differ by more than their seed: only same-environment pairs are exact."""
    count: dict[str, int] = defaultdict(int)
    for v in runs.values():
        for m in v.values():
            env = m.get("env")
            key = (
                ", ".join(f"{k} {env[k]}" for k in ENV_KEYS if k in env)
                if env
                else "not recorded (made before environments were kept)"
            )
            count[key] += 1
    lines = [
        "## Environments",
        "",
        "A paired figure says `k across environments` when k of its seed pairs were made in "
        "different environments (or one side's was not recorded): those pairs carry a machine "
        "effect beside the method's. Pairs whose sides were both made before environments were "
        "kept are not marked.",
        "",
        "| environment | cells |",
        "|---|---|",
    ]
    lines += [f"| {k} | {n} |" for k, n in sorted(count.items(), key=lambda kv: -kv[1])]
    return [*lines, ""]


def _mem_table_head(title: str, first: str, runs, stream, ms) -> list[str]:
    """A bold title and the header of a table with one column per memory size."""
    return [
        f"**{title}**",
        "",
        f"| {first} | " + " | ".join(_mem_title(runs, stream, m) for m in ms) + " |",
        "|---|" + "---|" * len(ms),
    ]


def _per_seed_lines(runs, stream, labels, ms) -> list[str]:
    """Average accuracy of every cell per seed: the spread the intervals summarise."""
    seeds = sorted({s for k, v in runs.items() if k[0] == stream for s in v})
    lines = [
        "**per seed, average accuracy**",
        "",
        "| strategy | memory | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for label in labels:
        for mem in ms if "nomem" in ms else [*ms, "nomem"]:  # memory-free strategies: once
            rs = runs.get((stream, label, mem))
            if not rs:
                continue
            row = [f"{100 * score(rs[s], 'avg'):.1f}" if s in rs else "–" for s in seeds]
            lines.append(f"| {label} | {_mem_label(mem)} | " + " | ".join(row) + " |")
    return [*lines, ""]


def reference_pool(sweep: str) -> list[dict]:
    """The sweep's own results, then its reruns (``<sweep>-rerun*`` folders: the references made
    again in another environment), for pairing each knob cell with a same-environment reference."""
    reruns = sorted(d.name for d in RESULTS.glob(f"{sweep}-rerun*") if d.is_dir())
    return [load(sweep), *(load(r) for r in reruns)]


def matched(a: dict[int, dict], pool: list[dict], key: tuple) -> dict[int, dict]:
    """Per seed of ``a``, the reference cell ``key`` made in a's environment where the pool has
    one, else the first the pool has (that pair is then counted across environments)."""
    out = {}
    for seed, m in a.items():
        cands = [r[key][seed] for r in pool if seed in r.get(key, {})]
        same = [c for c in cands if env_key(m) is not None and env_key(c) == env_key(m)]
        if same or cands:
            out[seed] = (same or cands)[0]
    return out


def _pooled(pool: list[dict]) -> dict:
    """Several folders' results as one: per cell and seed, the first folder that has it."""
    out: dict = defaultdict(dict)
    for r in pool:
        for key, seeds in r.items():
            for seed, m in seeds.items():
                out[key].setdefault(seed, m)
    return out


# one-seed screens of a knob, each cell beside the same-machine references of its seed
SCREENS = (
    "validation-balance",
    "validation-headroom",
    "validation-text",
    "validation-views",
    "validation-names",
)
SCREEN_REFS = ("validation-novelty", "validation-novelty-confirm", "validation-ii")
# sweeps of knob cells only, read against those references
KNOB_SWEEPS = (*SCREENS, "validation-kdpast")


def with_references(runs: dict, refs: dict, stream: str) -> dict:
    """``runs``' cells of ``stream`` and, beside each memory size, the er and incclip references
    of the same seeds (for plots that show a knob against what it is measured against)."""
    out = {k: v for k, v in runs.items() if k[0] == stream}
    for _, _, mem in list(out):
        seeds = {s for k, v in out.items() if k[2] == mem for s in v}
        for ref in ("er", "incclip"):
            cells = {s: m for s, m in cell_runs(refs, stream, ref, mem).items() if s in seeds}
            if cells:
                out[stream, ref, mem] = cells
    return out


def screen_lines(runs: dict, refs: dict) -> list[str]:
    """Per screened cell: its accuracy, its difference to incclip and er of the same stream, seed
    and memory, the accuracy on each chunk's classes after the last chunk (the task matrix's
    last row) and, where measured, the headroom g per chunk (ctp.continual.fit_gain)."""

    def last_row(m: dict) -> str:
        row = m["eval"][cls_name(m)]["task_matrix"][-1]
        return " / ".join("–" if x is None else f"{100 * x:.0f}" for x in row)

    lines = [
        "| stream | memory | variant | seed | accuracy | − incclip | − er "
        "| last row: each chunk's classes | g per chunk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (stream, label, mem), seeds in sorted(runs.items()):
        for seed, m in sorted(seeds.items()):
            diffs = []
            for ref in ("incclip", "er"):
                r = cell_runs(refs, stream, ref, mem).get(seed)
                cross = " (across environments)" if r and env_key(r) != env_key(m) else ""
                diffs.append(f"{100 * (score(m, 'avg') - score(r, 'avg')):+.1f}{cross}" if r else "–")
            g = [c.get("headroom") for c in m.get("chunk_reports", [])]
            g_text = (
                " / ".join("–" if x is None else f"{x:.3f}" for x in g)
                if any(x is not None for x in g)
                else "–"
            )
            lines.append(
                f"| {stream} | {_mem_label(mem)} | {label} | {seed} | {100 * score(m, 'avg'):.1f} | "
                f"{diffs[0]} | {diffs[1]} | {last_row(m)} | {g_text} |"
            )
    return lines


def screen_rule_lines(runs: dict, refs: dict) -> list[str]:
    """Each screened setting run on several seeds, paired with the references per memory share,
    and the rule of the six-seed screens (benchmarks/continual.py): it goes on only if its
    interval against incclip lies above zero at one share and its mean is >= -1 point at the
    other. Empty when no setting has more than one seed."""
    rows = []
    for stream, label in sorted({(k[0], k[1]) for k, seeds in runs.items() if len(seeds) > 1}):
        mems_ = sorted((k[2] for k in runs if k[:2] == (stream, label) and len(runs[k]) > 1), key=_share)
        against_incclip = {}
        for mem in mems_:
            a, cells = runs[stream, label, mem], []
            for ref in ("incclip", "er"):
                b = cell_runs(refs, stream, ref, mem)
                m, h, n = paired(a, b)
                cells.append(f"{fmt(m, h)} ({n_note(a, b, n)})" if n else "–")
                if ref == "incclip" and n:
                    against_incclip[mem] = (m, h)
            rows.append(f"| {stream} | {_mem_label(mem)} | {label} | " + " | ".join(cells) + " |")
        passes = any(
            m - h > 0 and all(m2 >= -0.01 for k2, (m2, _) in against_incclip.items() if k2 != k)
            for k, (m, h) in against_incclip.items()
            if not math.isnan(h)
        )
        rows.append(f"| | | **{label}: {'goes on' if passes else 'stops here'}** | | |")
    if not rows:
        return []
    return [
        "| stream | memory | variant | − incclip (paired) | − er (paired) |",
        "|---|---|---|---|---|",
        *rows,
    ]


TARGET = 0.046  # the main target: incclip − the best baseline >= +4.6 points


def kdpast_lines(runs: dict, refs: dict, label: str = "incclip[kdpast]") -> list[str]:
    """The diagnostic of Strategy.kd_past against its reading (benchmarks/continual.py): at 1 %,
    the interval of ``label`` − er above +4.6 says the teacher's knowledge is there and KD lacks
    data within the memory; a mean below +4.6 says even unlimited KD data misses the target;
    between, undecided. Each share's paired figures against er and incclip beside it."""
    rows, verdict = [], None
    for stream, lab, mem in sorted((k for k in runs if k[1] == label), key=lambda k: (k[0], _share(k[2]))):
        a, cells = runs[stream, lab, mem], []
        for ref in ("er", "incclip"):
            b = cell_runs(refs, stream, ref, mem)
            m, h, n = paired(a, b)
            cells.append(f"{fmt(m, h)} ({n_note(a, b, n)})" if n else "–")
            if ref == "er" and mem == "mem1" and n > 1:
                verdict = (
                    "above: the teacher's knowledge is there to keep, and the few pairs KD sees within "
                    "the memory are what stops incclip"
                    if m - h > TARGET
                    else "below: even with every past pair as KD data, incclip's KD does not reach the "
                    "target on this model, so no choice of KD rows within the memory will"
                    if m < TARGET
                    else "undecided: the mean reaches +4.6, the interval does not clear it"
                )
        rows.append(f"| {stream} | {_mem_label(mem)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        f"| stream | memory | {label} − er (paired) | {label} − incclip (paired) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"At 1 % against er's +4.6: {verdict or 'not measured yet'}.",
    ]


def compare(folders: list[str], a_label: str, b_label: str) -> list[str]:
    """``a_label − b_label`` paired per seed over several result folders (e.g. the validation
    references and a later sweep on fresh seeds), each a-cell with a b-cell of its own
    environment where one exists; one line per stream and memory size."""
    pool = [load(f) for f in folders]
    keys = sorted({k for r in pool for k in r if k[1] == a_label}, key=lambda k: (k[0], _share(k[2])))
    lines = []
    for stream, _, mem in keys:
        a: dict[int, dict] = {}
        for r in pool:
            for seed, m in r.get((stream, a_label, mem), {}).items():
                a.setdefault(seed, m)
        b = matched(a, pool, (stream, b_label, mem))
        a = {s: m for s, m in a.items() if s in b}
        if not a:
            continue
        m, h, n = paired(a, b)
        lines.append(
            f"{stream} {_mem_label(mem)}: {a_label} − {b_label} "
            f"{fmt(m, h)} ({n_note(a, b, n)}; seeds {', '.join(map(str, sorted(a)))})"
        )
    return lines


# The adoption rule of the warm-start remedies (benchmarks/continual.py, WARM_REMEDIES), stated
# before their cells ran: part 1 on the validation seeds, part 2 pooled with the fresh seeds.
RULE_SEEDS = 5  # seeds a part needs before it is judged


def remedy_lines(stream: str, first: dict, pooled: dict) -> list[str]:
    """One row per incclip[remedy] of ``first`` (the ``validation-warm`` results): its paired
    gains over incclip and er at 1 % and 3 % memory, whether it passes part 1 of the rule
    (gain over incclip >= +2 at 1 % and >= 0 at 3 %, and >= −1 against er at both), and, for
    the part-1 winner (largest gain at 1 %), part 2 on ``pooled`` (those seeds and the fresh
    ones of ``validation-warm-confirm``): gain over incclip at 1 % with its interval above
    zero, and >= 0 at 3 %. A part not yet judged (fewer seeds than RULE_SEEDS) reads "–"."""
    remedies = sorted({k[1] for k in first if k[0] == stream and k[1].startswith("incclip[")})
    if not remedies:
        return []

    def diff(runs, a, b, mem, need):
        x, y = runs.get((stream, a, mem), {}), runs.get((stream, b, mem), {})
        m, h, n = paired(x, y) if x and y else (math.nan, math.nan, 0)
        return (m, h) if n >= need else None

    rows, part1 = [], {}
    for r in remedies:
        d = {
            (b, mem): diff(first, r, b, mem, RULE_SEEDS)
            for b in ("incclip", "er")
            for mem in ("mem1", "mem3")
        }
        ok = None
        if all(v is not None for v in d.values()):
            eps = 1e-9  # a difference of exactly a threshold passes despite float rounding
            ok = (
                d["incclip", "mem1"][0] >= 0.02 - eps
                and d["incclip", "mem3"][0] >= -eps
                and d["er", "mem1"][0] >= -0.01 - eps
                and d["er", "mem3"][0] >= -0.01 - eps
            )
            if ok:
                part1[r] = d["incclip", "mem1"][0]
        rows.append((r, d, ok))
    winner = max(part1, key=part1.get) if part1 else None
    lines = [
        "| remedy | − incclip, 1 % | 3 % | − er, 1 % | 3 % | part 1 | pooled − incclip, 1 % | 3 % | part 2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, d, ok in rows:
        cells = [fmt(*v) if v else "–" for v in d.values()]
        p1, p2 = _passed(ok), ["–", "–", "–"]
        if r == winner:
            c1 = diff(pooled, r, "incclip", "mem1", 2 * RULE_SEEDS)
            c3 = diff(pooled, r, "incclip", "mem3", 2 * RULE_SEEDS)
            if c1 and c3:
                p2 = [fmt(*c1), fmt(*c3), _passed(c1[0] - c1[1] > 0 and c3[0] >= -1e-9)]
        lines.append(f"| {r} | " + " | ".join([*cells, p1, *p2]) + " |")
    return lines


NOVELTY_SEEDS = 3  # validation seeds 100-102 (continual.py, the validation-novelty sweep)


def novelty_lines(runs, label: str = "incclip[novelty]", *, beat: str | None = None) -> list[str]:
    """The ``validation-novelty`` rule for one novelty knob (``label``): its difference to
    incclip, paired, at every (stream, share) point, with the chunks' mean novelty nu (as recorded
    per chunk); the knob passes if the mean differences sum to >= 0 and none is below −1 point,
    and, with ``beat``, if that sum is also larger than the ``beat`` knob's on the same cells.
    "–" until every point has NOVELTY_SEEDS pairs."""
    points = sorted({(k[0], k[2]) for k in runs if k[1] == label}, key=lambda p: (p[0], _share(p[1])))
    if not points:
        return []
    lines = [
        f"| stream | memory | mean nu (chunks 1-) | {label} − incclip | − er |",
        "|---|---|---|---|---|",
    ]
    diffs = _novelty_diffs(runs, label)
    for stream, mem in points:
        a = runs[stream, label, mem]
        nus = [
            c["novelty"]
            for m in a.values()
            for c in m.get("chunk_reports", [])
            if c.get("novelty") is not None
        ]
        cells = []
        for ref in ("incclip", "er"):
            b = runs.get((stream, ref, mem), {})
            m, h, n = paired(a, b) if b else (math.nan, math.nan, 0)
            cells.append(f"{fmt(m, h)}, {n_note(a, b, n)}" if n else "–")
        nu = f"{np.mean(nus):.2f} ({min(nus):.2f}-{max(nus):.2f})" if nus else "–"
        lines.append(f"| {stream} | {_mem_label(mem)} | {nu} | " + " | ".join(cells) + " |")
    ok = None
    total = None if any(d is None for d in diffs) else sum(diffs)
    note = ""
    if total is not None:
        eps = 1e-9
        ok = total >= -eps and min(diffs) >= -0.01 - eps
        if beat is not None:
            other_diffs = _novelty_diffs(runs, beat)
            other = None if not other_diffs or None in other_diffs else sum(other_diffs)
            ok = None if other is None else ok and total > other + eps
            note = "" if other is None else f" ({beat}: {100 * other:+.1f})"
    shown = "–" if total is None else f"{100 * total:+.1f}"
    return [*lines, "", f"Sum of the mean differences: {shown} points{note}; the rule: {_passed(ok)}."]


def _novelty_diffs(runs, label: str) -> list[float | None]:
    """``label`` − incclip's mean paired difference at each (stream, share) point of ``label``, in
    the order ``novelty_lines`` shows them; None at a point with fewer than NOVELTY_SEEDS pairs."""
    points = sorted({(k[0], k[2]) for k in runs if k[1] == label}, key=lambda p: (p[0], _share(p[1])))
    out = []
    for stream, mem in points:
        m, _, n = paired(runs[stream, label, mem], runs.get((stream, "incclip", mem), {}))
        out.append(m if n >= NOVELTY_SEEDS else None)
    return out


NOVELTY_POOLED_SEEDS = 6  # seeds 100-105: validation-novelty and validation-novelty-confirm


def novelty_pooled_lines(pool: list[dict]) -> list[str]:
    """Part (b) of the novelty confirmation: per seed, the mean over the four (stream, share)
    points of incclip[novelty] − incclip; the knob passes if those per-seed means have a 95 %
    interval above zero. Judged only when NOVELTY_POOLED_SEEDS seeds have all four points."""
    runs = _pooled(pool)
    points = sorted({(k[0], k[2]) for k in runs if k[1] == "incclip[novelty]"})
    per_seed: dict[int, list[float]] = defaultdict(list)
    for stream, mem in points:
        a, b = runs[stream, "incclip[novelty]", mem], runs.get((stream, "incclip", mem), {})
        for seed in sorted(set(a) & set(b)):
            per_seed[seed].append(score(a[seed], "avg") - score(b[seed], "avg"))
    full = {s: float(np.mean(d)) for s, d in per_seed.items() if len(d) == len(points) == 4}
    if not full:
        return []
    m, h = mean_ci(list(full.values()))
    ok = None if len(full) < NOVELTY_POOLED_SEEDS else bool(m - h > 0)
    seeds = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in sorted(full.items()))
    return [
        f"Per seed: {seeds}.",
        "",
        f"Pooled over {len(full)} seeds: {fmt(m, h)}; the rule (interval above zero): {_passed(ok)}.",
    ]


# er[delay]'s storage on the 1,600-pair validation stream: its memory plus the 50-pair slice
EQUAL_STORAGE = {"mem1": "mem4.125", "mem3": "mem6.125"}


def storage_lines(runs) -> list[str]:
    """er[delay] against er at equal storage (memory + slice) on the class-incremental validation
    stream, paired. The reading fixed before those cells ran (continual.py): within 2 points or
    below, the slice's gain is its storage; above +2 with the interval above zero, a recent slice
    within CTP_MEMORY_SIZE is a candidate."""
    stream = "class-incremental-small"
    rows = []
    for mem, equal in EQUAL_STORAGE.items():
        a, b = runs.get((stream, "er[delay]", mem), {}), runs.get((stream, "er", equal), {})
        m, h, n = paired(a, b) if a and b else (math.nan, math.nan, 0)
        if n < NOVELTY_SEEDS:
            return []
        gain = paired(a, runs.get((stream, "er", mem), {}))
        verdict = "a candidate" if m > 0.02 and m - h > 0 else "its storage"
        cells = (
            _mem_label(mem),
            _mem_label(equal),
            fmt(*gain[:2]),
            f"{fmt(m, h)}, {n_note(a, b, n)}",
            verdict,
        )
        rows.append("| " + " | ".join(cells) + " |")
    return [
        "| er[delay]'s memory | er with as much storage | er[delay] − er (same memory) "
        "| er[delay] − er (equal storage) | reading |",
        "|---|---|---|---|---|",
        *rows,
    ]


def known_lines(runs, synthetic_runs) -> list[str]:
    """incclip[known] − incclip on the real-image instance-incremental validation stream (this
    sweep, seeds 100-104) and on the synthetic twin (``synthetic_runs``: validation-novelty, seeds
    100-102), paired, with the rule fixed before the cells ran (continual.py): (1) here the mean
    gain >= +2 points at 1 % and >= 0 at 3 %; (2) on the synthetic twin the mean >= −1 at both."""
    label = "incclip[known]"
    rows, verdicts = [], []
    for stream, source, seeds, bars in (
        ("emoji-ii-10-val", runs, 5, {"mem1": 0.02, "mem3": 0.0}),
        ("instance-incremental-small", synthetic_runs, NOVELTY_SEEDS, {"mem1": -0.01, "mem3": -0.01}),
    ):
        for mem, bar in bars.items():
            a, b = source.get((stream, label, mem), {}), source.get((stream, "incclip", mem), {})
            m, h, n = paired(a, b) if a and b else (math.nan, math.nan, 0)
            verdicts.append(None if n < seeds else m >= bar - 1e-9)
            cell = "–" if n < seeds else f"{fmt(m, h)}, {n_note(a, b, n)}"
            refs = [source.get((stream, "er", mem), {}), source.get((stream, "lwf", "nomem"), {})]
            er, lwf = (fmt(*paired(a, ref)[:2]) if a and ref else "–" for ref in refs)
            rows.append(f"| {stream} | {_mem_label(mem)} | {cell} | ≥ {100 * bar:+.0f} | {er} | {lwf} |")
    return [
        f"| stream | memory | {label} − incclip | the rule's bar (mean) | − er | − lwf |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"The rule: {_passed(None if None in verdicts else all(verdicts))}.",
    ]


SHIFT_SEEDS = 5  # validation seeds 100-104 (continual.py, the validation-shift sweep)


def _gap(runs, stream, a_label, b_label, mem) -> dict[int, float]:
    """Per seed, a − b on ``stream`` at memory ``mem`` (average accuracy)."""
    return per_seed(runs.get((stream, a_label, mem), {}), runs.get((stream, b_label, mem), {}))


def shift_lines(runs, unshifted_refs) -> list[str]:
    """The style-shift diagnostic (continual.py, the validation-shift sweep): lwf − finetune and
    incclip − er on the instance-incremental stream evaluated on a background never trained on,
    against the same on the unshifted twin (its er and incclip from ``unshifted_refs``:
    validation-novelty and -confirm), paired per seed. The reading fixed before the cells ran:
    the shift explains the split if the shifted gap is > 0 on the mean and the per-seed shifted −
    unshifted difference S has its interval above zero; it does not if S <= 0 on the mean."""
    shifted, plain = "instance-incremental-small-shift", "instance-incremental-small"
    both = _pooled([runs, unshifted_refs])
    rows, verdict = [], None
    for a_label, b_label, mem, main in (
        ("lwf", "finetune", "nomem", True),
        ("incclip", "er", "mem1", False),
        ("incclip", "er", "mem3", False),
    ):
        g_shift, g_plain = (
            _gap(runs, shifted, a_label, b_label, mem),
            _gap(both, plain, a_label, b_label, mem),
        )
        seeds = sorted(set(g_shift) & set(g_plain))
        if len(seeds) < SHIFT_SEEDS:
            if main:
                return []
            continue
        g_shift, g_plain = {s: g_shift[s] for s in seeds}, {s: g_plain[s] for s in seeds}
        diff = mean_ci([g_shift[s] - g_plain[s] for s in seeds])
        shift_mean = mean_ci(list(g_shift.values()))[0]
        if diff[0] <= 0:
            reading = "does not explain it"
        elif shift_mean > 0 and diff[0] - diff[1] > 0:
            reading = "explains it"
        else:
            reading = "undecided"
        if main:
            verdict = reading
        rows.append(
            f"| {a_label} − {b_label} | {_mem_label(mem)} | {fmt(*mean_ci(list(g_plain.values())))} "
            f"| {fmt(*mean_ci(list(g_shift.values())))} | {fmt(*diff)} (n={len(seeds)}) | {reading} |"
        )
    return [
        "| gap | memory | unshifted twin | shifted twin | S = shifted − unshifted (per seed) | reading |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"The style shift, by the reading fixed before the cells (lwf − finetune): {verdict}.",
    ]


def _passed(ok: bool | None) -> str:
    return "–" if ok is None else ("passed" if ok else "**failed**")


def _share(mem: str) -> float:
    """``mem3`` -> 3.0; a memory-free cell (``nomem``) sorts first."""
    return -1.0 if mem == "nomem" else float(mem[3:])


def _mem_label(mem: str) -> str:
    return "–" if mem == "nomem" else mem[3:] + " %"


def _ablation_lines(runs, stream, ms, pool: list[dict] | None = None) -> list[str]:
    """Each knob variant (``incclip[kd2]``...) and incclip's own parts (er_kd, er_pt) against
    incclip's defaults, paired over the seeds both have; each knob seed is paired with an
    incclip cell of its own environment where the pool (``reference_pool``) holds one."""
    pool = pool or [runs]
    others = sorted({k[1] for k in runs if k[0] == stream and "[" in k[1]}, key=_order)
    others = [o for o in ("er_kd", "er_pt") if any(k[:2] == (stream, o) for k in runs)] + others
    if not others or not any(k[:2] == (stream, "incclip") for r in pool for k in r):
        return []
    lines = _mem_table_head(
        "knobs and parts against incclip's defaults: other − incclip, average accuracy (paired "
        "with a same-environment incclip where one was made)",
        "variant",
        runs,
        stream,
        ms,
    )
    for o in others:
        cells = []
        for mem in ms:
            a = runs.get((stream, o, mem), {})
            b = matched(a, pool, (stream, "incclip", mem))
            if not a or not b:
                cells.append("–")
                continue
            m, h, n = paired(a, b)
            cells.append(f"{fmt(m, h)}, {n_note(a, b, n)}")
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _against_best_baseline(runs, stream, mem) -> tuple[str | None, dict, dict, list[int]]:
    """(the best baseline, incclip's cells, the baseline's cells, the seeds both have)."""
    base = best_baseline(runs, stream, mem)
    a = cell_runs(runs, stream, "incclip", mem)
    b = cell_runs(runs, stream, base, mem) if base else {}
    return base, a, b, sorted(set(a) & set(b))


def _ceiling_lines(runs, stream, ms) -> list[str]:
    """How far keeping alone could take incclip, against the best baseline's final average
    accuracy, paired per seed: ``kept`` is the mean over chunk groups j of R[j][j] (each group as
    it stood right after its own chunk: nothing forgotten, nothing gained later), ``peak`` the
    mean of max_i R[i][j] (each at its best). A method that only keeps what the model knew,
    such as distillation from the model before the chunk, ends at ``kept`` at best, unless it
    also changes how well each chunk is learnt. Empty for a stream with one chunk group (every
    class in the first chunk: instance-incremental)."""
    rows = []
    for mem in ms:
        base, a, b, seeds = _against_best_baseline(runs, stream, mem)
        last_row = a[seeds[0]]["eval"][cls_name(a[seeds[0]])]["task_matrix"][-1] if seeds else []
        if sum(x is not None for x in last_row) < 2:
            continue
        cells = [fmt(*mean_ci([score(a[s], w) for s in seeds])) for w in ("avg", "kept", "peak")]
        for w in ("avg", "kept", "peak"):
            m, h = mean_ci([score(a[s], w) - score(b[s], "avg") for s in seeds])
            cells.append(fmt(m, h))
        rows.append(f"| {_mem_label(mem)} | {base} | " + " | ".join(cells) + f" | {len(seeds)} |")
    if not rows:
        return []
    return [
        "**how far keeping could go: incclip's final accuracy, its ceiling if nothing were "
        "forgotten after each chunk (kept: mean of R[j][j]) or each chunk group stayed at its "
        "best (peak: mean of max_i R[i][j]), each against the best baseline's final accuracy, "
        "paired**",
        "",
        "| memory | best baseline | incclip | kept | peak | incclip − baseline "
        "| kept − baseline | peak − baseline | n |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**not met**")


def acceptance_table(runs, streams) -> str:
    """The benchmark's targets, each computed from the result files: what was measured, the
    target, and whether it is met (mean ± 95 % interval of paired per-seed differences)."""
    lines = ["| stream | memory | target | measured | verdict |", "|---|---|---|---|---|"]

    def mean_of(label, mem, what="avg"):
        rs = cell_runs(runs, stream, label, mem)
        return mean_ci([score(m, what) for m in rs.values()])[0] if rs else math.nan

    for stream in streams:
        inc = {m: cell_runs(runs, stream, "incclip", m) for m in mems(runs, stream)}
        for mem, a in inc.items():
            if not a:
                continue
            title = _mem_title(runs, stream, mem)[7:]
            share = float(mem[3:])
            if share <= 3:
                base = best_baseline(runs, stream, mem)
                if base:
                    b = cell_runs(runs, stream, base, mem)
                    m, h, n = paired(a, b)
                    ok = None if math.isnan(h) else (m >= 0.046 and m - h > 0)
                    lines.append(
                        f"| {stream} | {title} | incclip − best baseline ({base}) ≥ +4.6, interval > 0 "
                        f"| {fmt(m, h)} ({n_note(a, b, n)}) | {_verdict(ok)} |"
                    )
            er = cell_runs(runs, stream, "er", mem)
            if er:
                m, h, n = paired(a, er)
                lines.append(
                    f"| {stream} | {title} | incclip ≥ er − 1 | {fmt(m, h)} ({n_note(a, er, n)}) "
                    f"| {_verdict(m >= -0.01)} |"
                )
            f_inc, f_ft = mean_of("incclip", mem, "forgetting"), mean_of("finetune", mem, "forgetting")
            if not math.isnan(f_ft):
                # where finetune forgets nothing on average (accuracy only rises), a share of its
                # forgetting is no bar: not judged
                ok = f_inc <= 0.6 * f_ft if f_ft > 0 else None
                note = "" if f_ft > 0 else ", finetune forgets nothing: not judged"
                lines.append(
                    f"| {stream} | {title} | forgetting ≤ 0.6 × finetune's ({100 * 0.6 * f_ft:.1f}) "
                    f"| {100 * f_inc:.1f}{note} | {_verdict(ok)} |"
                )
            joint = cell_runs(runs, stream, "joint", mem)
            if joint and abs(share - 12) < 1e-9:
                m, h, n = paired(joint, a)
                lines.append(
                    f"| {stream} | {title} | joint − incclip ≤ 5 | {fmt(m, h)} ({n_note(joint, a, n)}) "
                    f"| {_verdict(m <= 0.05)} |"
                )
            if joint:
                acc = mean_of("incclip", mem) / mean_of("joint", mem)
                cost = mean_of("incclip", mem, "pairs") / mean_of("joint", mem, "pairs")
                lines.append(
                    f"| {stream} | {title} | ≥ 90 % of joint's accuracy at ≤ 1/3 of its pairs "
                    f"| {100 * acc:.0f} % at {100 * cost:.0f} % | {_verdict(acc >= 0.9 and cost <= 1 / 3)} |"
                )
    return "\n".join(lines)


def headline_table(
    sweep: str,
    streams: list[str],
    strategies=("finetune", "lwf", "er", "er_kd", "er_pt", "incclip", "joint"),
) -> str:
    """One row per stream and memory size: each strategy's average accuracy (mean ± 95 %, n),
    incclip − er paired, and retrieval mean recall@1 of er and incclip (the table results.md shows)."""
    runs = load(sweep)
    head = " | ".join(strategies)
    lines = [
        f"| stream | memory | {head} | incclip − er (paired) | retrieval R@1, er / incclip |",
        "|---|---|" + "---|" * len(strategies) + "---|---|",
    ]
    for stream in streams:
        for mem in mems(runs, stream):
            cells = []
            for st in strategies:
                rs = cell_runs(runs, stream, st, mem)
                cells.append(f"{fmt(*mean_ci([score(m, 'avg') for m in rs.values()]))} (n={len(rs)})")
            a, e = cell_runs(runs, stream, "incclip", mem), cell_runs(runs, stream, "er", mem)
            m, h, n = paired(a, e) if a and e else (math.nan, math.nan, 0)
            ret = " / ".join(
                fmt(mean_ci([score(x, "retrieval") for x in r.values()])[0], math.nan) for r in (e, a)
            )
            lines.append(
                f"| {stream} | {_mem_title(runs, stream, mem)[7:]} | "
                + " | ".join(cells)
                + f" | {fmt(m, h)} ({n_note(a, e, n)}) | {ret} |"
            )
    return "\n".join(lines)


def _update_results_md(sweep: str, table: str, results_md: Path, block: str = "headline") -> None:
    """Replace the block between ``<!-- BLOCK:SWEEP:start/end -->`` in docs/results.md, if any."""
    start, end = f"<!-- {block}:{sweep}:start -->", f"<!-- {block}:{sweep}:end -->"
    if not results_md.is_file():
        return
    text = results_md.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        results_md.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def _order(label: str) -> tuple:
    main = ["finetune", "lwf", "er", "er_kd", "er_pt", "incclip", "joint"]
    base = label.split("[")[0]
    return (main.index(base) if base in main else len(main), label)


def _mem_title(runs, stream, mem) -> str:
    if mem == "nomem":
        return "no memory"
    some = next(iter(next(v for k, v in runs.items() if k[0] == stream and k[2] == mem).values()))
    return f"memory {mem[3:]} % ({some['memory_size']} pairs)"


def _compute_lines(runs, stream, ms) -> list[str]:
    mem = ms[0]
    joint = cell_runs(runs, stream, "joint", mem)
    if not joint:
        return []
    ja, jp = (
        mean_ci([score(m, "avg") for m in joint.values()])[0],
        mean_ci([score(m, "pairs") for m in joint.values()])[0],
    )
    lines = [
        "**compute (pairs forwarded and backpropagated, all chunks; training wall time, 1 CPU thread)**",
        "",
        "| strategy | memory | pairs | train s | avg accuracy "
        "| share of joint's accuracy | share of joint's pairs |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in ("finetune", "er", "incclip", "joint"):
        for m in ms:
            rs = cell_runs(runs, stream, label, m)
            if not rs or (label in ("finetune", "joint") and m != ms[0]):
                continue
            a = mean_ci([score(x, "avg") for x in rs.values()])[0]
            p = mean_ci([score(x, "pairs") for x in rs.values()])[0]
            s = mean_ci([score(x, "seconds") for x in rs.values()])[0]
            lines.append(
                f"| {label} | {m[3:] + ' %' if label not in ('finetune', 'joint') else '–'} "
                f"| {p:,.0f} | {s:.0f} "
                f"| {100 * a:.1f} | {a / ja:.2f} | {p / jp:.2f} |"
            )
    return [*lines, ""]


def _retention_lines(runs, stream, ms, base_set, sweep) -> list[str]:
    """ZSCL's measure: the base's zero-shot accuracy on its held-back classes, after the stream,
    as a share of the base's own (per seed: each seed has its own base model)."""
    base_acc = {}
    for f in (RESULTS / sweep / "bases").glob(f"{stream}-seed*.json"):
        base_acc[int(f.stem.rsplit("seed", 1)[1])] = json.loads(f.read_text())["eval"]["base"]["final"][
            "acc1"
        ]
    lines = [
        "**warm start: the base's zero-shot accuracy on its "
        f"held-back classes (`{base_set}`) after the stream**",
        "",
        f"Base models before the stream: acc1 {fmt(*mean_ci(list(base_acc.values())))} (n={len(base_acc)}).",
        "",
        "| strategy | memory | acc1 after the stream | retained, % of the base's acc1 |",
        "|---|---|---|---|",
    ]
    for label in sorted({k[1] for k in runs if k[0] == stream}, key=_order):
        for m in ms:
            rs = cell_runs(runs, stream, label, m)
            if not rs:
                continue
            a, h = mean_ci([score(x, f"eval:{base_set}") for x in rs.values()])
            kept = [score(x, f"eval:{base_set}") / base_acc[s] for s, x in rs.items() if base_acc.get(s)]
            lines.append(f"| {label} | {m[3:]} % | {fmt(a, h)} | {fmt(*mean_ci(kept))} |")
    return [*lines, ""]


def plot_curves(runs, stream, ms, path: Path, *, variants: bool = False) -> None:
    """Average accuracy so far after each chunk, mean and 95 % band over seeds, one panel per
    memory size: the strategies, and with ``variants`` the knob variants (``incclip[kd2]``) too."""
    fig, axes = plt.subplots(1, len(ms), figsize=(4.6 * len(ms), 3.6), squeeze=False, sharey=True)
    labels = sorted({k[1] for k in runs if k[0] == stream and (variants or "[" not in k[1])}, key=_order)
    handles = {}  # one colour per label in every panel; the legend lists every label drawn
    for ax, mem in zip(axes[0], ms, strict=True):
        for i, label in enumerate(labels):
            rs = cell_runs(runs, stream, label, mem)
            if not rs:
                continue
            curves = []
            for m in rs.values():
                R = m["eval"][cls_name(m)]["task_matrix"]
                curves.append(
                    [np.mean([v for v in row[: i + 1] if v is not None]) for i, row in enumerate(R)]
                )
            arr = 100 * np.array(curves)
            x = np.arange(1, arr.shape[1] + 1)  # chunks counted from 1, as the dashboard does
            mean = arr.mean(0)
            (handles[label],) = ax.plot(x, mean, marker="o", ms=3, color=f"C{i % 10}", label=label)
            if len(arr) > 1:
                half = np.array([mean_ci(arr[:, j])[1] for j in range(arr.shape[1])])
                ax.fill_between(x, mean - half, mean + half, color=f"C{i % 10}", alpha=0.15)
        ax.set_title(f"{stream}, {_mem_title(runs, stream, mem)}", fontsize=9)
        ax.set_xlabel("after chunk")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average accuracy so far (points)")
    axes[0][-1].legend(
        [handles[k] for k in labels if k in handles], [k for k in labels if k in handles], fontsize=7
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ceiling(runs, stream, ms, path: Path) -> None:
    """Per memory size: the best baseline's and incclip's final accuracy, and incclip's kept and
    peak ceilings (_ceiling_lines), mean and 95 % interval over the seeds both have; a tick at
    the best baseline + 4.6, the main target."""
    parts = (("baseline", "avg"), ("incclip", "avg"), ("incclip kept", "kept"), ("incclip peak", "peak"))
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(ms), 3.6))
    width = 0.8 / len(parts)
    drawn = []
    for k, mem in enumerate(ms):
        base, a, b, seeds = _against_best_baseline(runs, stream, mem)
        if not seeds:
            continue
        drawn.append(k)
        for i, (name, what) in enumerate(parts):
            cells = b if name == "baseline" else a
            m, h = mean_ci([100 * score(cells[s], what) for s in seeds])
            x = k + (i - (len(parts) - 1) / 2) * width
            label = (f"best baseline ({base})" if name == "baseline" else name) if k == drawn[0] else None
            ax.bar(x, m, width, yerr=0 if math.isnan(h) else h, capsize=2, color=f"C{i}", label=label)
        target = 100 * (mean_ci([score(b[s], "avg") for s in seeds])[0] + TARGET)
        ax.hlines(
            target,
            k - 0.45,
            k + 0.45,
            color="k",
            ls="--",
            lw=1,
            label="baseline + 4.6" if k == drawn[0] else None,
        )
    ax.set_xticks(range(len(ms)), [_mem_title(runs, stream, m) for m in ms], fontsize=8)
    ax.set_ylabel("average accuracy (points)")
    ax.set_title(f"{stream}: how far keeping could go", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(runs, stream, ms, path: Path) -> None:
    others = (*BASELINES, "er_kd", "er_pt", "joint")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(ms)
    for k, mem in enumerate(ms):
        xs, ys, hs = [], [], []
        for i, o in enumerate(others):
            a, b = cell_runs(runs, stream, "incclip", mem), cell_runs(runs, stream, o, mem)
            if a and b:
                m, h, _ = paired(a, b)
                xs.append(i + (k - (len(ms) - 1) / 2) * width)
                ys.append(100 * m)
                hs.append(0 if math.isnan(h) else 100 * h)
        ax.bar(xs, ys, width, yerr=hs, capsize=3, label=_mem_title(runs, stream, mem))
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(4.6, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(others)), [f"− {o}" for o in others])
    ax.set_ylabel("incclip − other (points, 95 % CI)")
    ax.set_title(f"{stream}: paired differences in average accuracy", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compute(runs, stream, ms, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in sorted({k[1] for k in runs if k[0] == stream and "[" not in k[1]}, key=_order):
        for mem in ms if label not in ("finetune", "lwf", "joint") else ms[:1]:
            rs = cell_runs(runs, stream, label, mem)
            if not rs:
                continue
            p = [score(m, "pairs") for m in rs.values()]
            a = [100 * score(m, "avg") for m in rs.values()]
            tag = "" if label in ("finetune", "lwf", "joint") else f" {mem[3:]}%"
            ax.errorbar(
                np.mean(p),
                np.mean(a),
                yerr=mean_ci(a)[1] if len(a) > 1 else 0,
                fmt="o",
                capsize=3,
                label=label + tag,
            )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative pairs processed (log)")
    ax.set_ylabel("average accuracy after the last chunk")
    ax.set_title(f"{stream}: accuracy against compute", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
