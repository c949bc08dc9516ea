"""``ctp experiment``: train a strategy over a sequence of chunks and measure forgetting.

    ctp experiment (--chunks DIR [DIR ...] | --synthetic NAME | --stream NAME)
        [--eval-classification NAME=DIR ...] [--eval-retrieval NAME=DIR ...]
        --strategy {finetune,er,lwf,incclip,joint,...} [--model NAME] [--epochs N] [--batch-size N]
        [--lr F] [--memory-size N] [--seed N] [--device cpu|cuda] --out DIR

Writes ``DIR/metrics.json``, ``DIR/report.md``, ``DIR/accuracy.png``, a task-matrix heatmap per
classification set, and the final checkpoint in ``DIR/checkpoint``.

Class groups: a chunk sample's ``label`` names a class of a classification set; group j holds
the classes first seen in chunk j, and R[i][j] is the accuracy on group j after chunk i. Without
labels (and for retrieval, scored by the mean of both recall@1) every example is in group 0, so
the summary metrics follow the whole set: avg = a_T, forgetting = max_{i<T} a_i - a_T,
BWT = a_T - a_0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

# light imports only: `ctp experiment --help` must not wait for torch (run() imports the rest)
from ctp.config import GENERATORS, TrainConfig
from ctp.data import load_classification_set, load_retrieval_set, read_chunk
from ctp.memory import POLICIES, create_memory
from ctp.presets import DEFAULT_MODEL
from ctp.strategies import STRATEGIES, get_strategy

logger = logging.getLogger(__name__)
# the parts of a chunk report that train (ChunkReport: the chunk's update, the balanced pass)
_TRAINED = ("train", "balance")


def _named_dir(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctp experiment", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--chunks", nargs="+", type=Path, metavar="DIR", help="chunk directories, in training order"
    )
    src.add_argument("--synthetic", metavar="NAME", help="a synthetic stream preset (ctp.synthetic.PRESETS)")
    src.add_argument(
        "--stream",
        metavar="NAME",
        help="a synthetic or emoji stream preset (ctp.synthetic.PRESETS, ctp.emoji.PRESETS)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the --synthetic/--stream stream is generated (cached); default ~/.cache/ctp/synthetic",
    )
    p.add_argument("--eval-classification", nargs="*", type=_named_dir, default=[], metavar="NAME=DIR")
    p.add_argument("--eval-retrieval", nargs="*", type=_named_dir, default=[], metavar="NAME=DIR")
    p.add_argument("--strategy", required=True, choices=sorted(STRATEGIES))
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or ctp preset")
    p.add_argument("--pretrained", default=None, help="open_clip tag, weights file or ctp checkpoint dir")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="epochs per chunk")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--memory-size", type=int, default=200, help="replay memory capacity in pairs")
    p.add_argument("--memory-policy", choices=POLICIES, default="class_balanced")
    p.add_argument("--generator", choices=GENERATORS, default="edit", help="pseudo-text generator")
    p.add_argument("--kd-weight", type=float, default=None, help="override the strategy's KD weight")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a Strategy or TrainConfig field, e.g. --set kd_temperature=4 (repeatable)",
    )
    p.add_argument("--no-checkpoint", action="store_true", help="do not write the final checkpoint (sweeps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    return p


def _coerce(value: str, like):
    if isinstance(like, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"expected true/false, got {value!r}")
        return value.lower() in ("true", "1")
    if like is None:  # optional floats (merge_alpha)
        return None if value.lower() == "none" else float(value)
    return type(like)(value)


def split_overrides(items: list[str]) -> tuple[dict, dict]:
    """``FIELD=VALUE`` strings -> (Strategy overrides, TrainConfig overrides), typed like the defaults."""
    from dataclasses import fields

    from ctp.strategies import Strategy

    kinds = {f.name: ("strategy", f.default) for f in fields(Strategy) if f.name != "name"}
    kinds.update({f.name: ("train", f.default) for f in fields(TrainConfig)})
    out: dict[str, dict] = {"strategy": {}, "train": {}}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in kinds:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(kinds)}")
        kind, like = kinds[key]
        out[kind][key] = _coerce(value, like)
    return out["strategy"], out["train"]


def default_data_dir() -> Path:
    return Path(os.environ.get("CTP_CACHE", Path.home() / ".cache" / "ctp")) / "synthetic"


def init_distributed(device: str) -> tuple[int, str]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group; returns (rank, device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return (dist.get_rank() if dist.is_initialized() else 0), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), device


def run(args: argparse.Namespace) -> dict:
    # Every rank runs the same continual loop (same memory decisions, same evaluation); DDP
    # splits each chunk's batches between ranks, and only rank 0 writes files.
    import torch

    from ctp.checkpoint import save_checkpoint
    from ctp.continual import ContinualLearner
    from ctp.models import create_model
    from ctp.pseudo_texts import create_generator
    from ctp.tracking import EvalTracker

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, args.device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    eval_cls = dict(args.eval_classification)
    eval_ret = dict(args.eval_retrieval)
    if args.synthetic:
        from ctp.synthetic import PRESETS, make_stream

        if args.synthetic not in PRESETS:
            raise SystemExit(f"unknown synthetic stream {args.synthetic!r}; choose from {sorted(PRESETS)}")
        config = replace(PRESETS[args.synthetic], seed=args.seed)
        data_dir = (args.data_dir or default_data_dir()) / f"{args.synthetic}-seed{args.seed}"
        stream = make_stream(data_dir, config)
        chunk_dirs = stream.chunks
        eval_cls.setdefault("synthetic", stream.classification)
        eval_ret.setdefault("synthetic_retrieval", stream.retrieval)
    elif args.stream:
        from ctp.streams import make_named_stream, stream_kind

        kind = stream_kind(args.stream)
        data_dir = (args.data_dir or default_data_dir()) / f"{args.stream}-seed{args.seed}"
        stream = make_named_stream(args.stream, data_dir, args.seed)
        chunk_dirs = stream.chunks
        eval_cls.setdefault(kind, stream.classification)
        eval_ret.setdefault(f"{kind}_retrieval", stream.retrieval)
        if getattr(stream, "base_classification", None) is not None:  # held-back classes (warm start)
            eval_cls.setdefault(f"{kind}_base", stream.base_classification)
    else:
        chunk_dirs = args.chunks
    for d in chunk_dirs:
        if not Path(d).is_dir():
            raise SystemExit(f"chunk directory not found: {d}")

    strategy_over, train_over = split_overrides(args.overrides)
    strategy = get_strategy(args.strategy, kd_weight=args.kd_weight)
    strategy = replace(strategy, **strategy_over)
    bundle = create_model(args.model, pretrained=args.pretrained, device=args.device, seed=args.seed)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress and rank == 0,
    )
    config = replace(config, **train_over)
    memory = create_memory(max_items=args.memory_size, policy=args.memory_policy)
    generator = create_generator(args.generator) if strategy.pseudo_texts else None
    learner = ContinualLearner(
        bundle=bundle,
        strategy=strategy,
        memory=memory,
        generator=generator,
        config=config,
        pretrained=bool(args.pretrained),
    )

    tracker = EvalTracker(
        {name: load_classification_set(d) for name, d in eval_cls.items()},
        {name: load_retrieval_set(d) for name, d in eval_ret.items()},
    )
    chunk_reports = []
    t_start = time.perf_counter()
    for i, chunk_dir in enumerate(chunk_dirs):
        samples = read_chunk(chunk_dir)
        if not samples:
            raise SystemExit(f"chunk {chunk_dir} holds no samples")
        report = learner.learn_chunk(samples, chunk_id=Path(chunk_dir).name)
        chunk_reports.append(report.to_dict())
        evals = tracker.after_chunk(bundle, [s.label for s in samples], device=args.device)
        logger.info("after chunk %d: %s", i, {n: e["final"] for n, e in evals.items()})
    evals = tracker.summary()
    metrics = {
        "strategy": strategy.name,
        "chunks": len(chunk_dirs),
        "model": args.model,
        "seed": args.seed,
        "generator": args.generator if strategy.pseudo_texts else None,
        "memory_size": args.memory_size,
        "memory_policy": args.memory_policy,
        "train_config": asdict(config),
        "strategy_config": asdict(strategy),
        "seconds": time.perf_counter() - t_start,
        # compute spent learning (evaluation left out): pairs forwarded + backpropagated, and the
        # wall time of the chunk updates with their preparation and pseudo-text generation
        "compute": {
            "pairs": sum(c[part]["pairs"] for c in chunk_reports for part in _TRAINED if c.get(part)),
            "train_seconds": sum(
                c[part]["seconds"] + c[part]["prepare_seconds"]
                for c in chunk_reports
                for part in _TRAINED
                if c.get(part)
            )
            + sum(c["pseudo_seconds"] for c in chunk_reports),
        },
        "eval": evals,
        "chunk_reports": chunk_reports,
    }
    if rank != 0:
        return metrics
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if args.no_checkpoint:
        write_report(out, metrics)
        return metrics
    save_checkpoint(
        out / "checkpoint",
        bundle.model,
        {
            "model": args.model,
            "config": bundle.config,
            "version": len(chunk_dirs),
            "chunks": len(chunk_dirs),
            "strategy": strategy.name,
            "metrics": {n: e["final"] for n, e in evals.items()},
        },
    )
    write_report(out, metrics)
    return metrics


def write_report(out: Path, metrics: dict) -> None:
    from ctp.metrics import format_task_matrix
    from ctp.plots import plot_accuracy_curves, plot_task_matrix

    lines = [
        f"# ctp experiment: {metrics['strategy']}",
        "",
        f"{metrics['chunks']} chunks, model `{metrics['model']}`, seed {metrics['seed']}, "
        f"memory {metrics['memory_size']} ({metrics['memory_policy']}), "
        f"{metrics['seconds']:.0f} s in all.",
        "",
    ]
    for name, e in metrics["eval"].items():
        lines += [f"## {name} ({e['kind']})", ""]
        keys = list(e["final"])
        lines.append("| after chunk | " + " | ".join(keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        for i, m in enumerate(e["after_chunk"]):
            lines.append(f"| {i} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
        lines += [
            "",
            f"average accuracy {_fmt(e['avg_accuracy'])}, forgetting {_fmt(e['forgetting'])}, "
            f"BWT {_fmt(e['bwt'])} (docs/design.md definitions).",
            "",
        ]
        if "task_matrix" in e:
            lines += [
                "Task matrix R[i][j] (row: after chunk i; column: classes first seen in chunk j):",
                "",
                "```",
                format_task_matrix(e["task_matrix"]),
                "```",
                "",
                f"![task matrix](task_matrix_{name}.png)",
                "",
            ]
            plot_task_matrix(
                e["task_matrix"], out / f"task_matrix_{name}.png", title=f"{metrics['strategy']}: {name}"
            )
    if metrics["eval"]:
        plot_accuracy_curves({metrics["strategy"]: metrics}, out / "accuracy.png")
        lines += ["![accuracy after each chunk](accuracy.png)", ""]
    else:
        lines += ["No eval sets were given (--eval-classification / --eval-retrieval).", ""]
    lines += [
        "## Chunks",
        "",
        "| chunk | steps | pairs/s | loss | kd | pseudo kept | pseudo s | memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in metrics["chunk_reports"]:
        t = c["train"]
        lines.append(
            f"| {c['index']} | {t['steps']} | {t['pairs_per_second']:.0f} | {t['loss']:.3f} | "
            f"{t['loss_kd']:.3f} | {c['pseudo'].get('kept', 0)} | {c['pseudo_seconds']:.1f} | "
            f"{c['memory_items']} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics = run(args)
    for name, e in metrics["eval"].items():
        print(
            f"{name}: final {json.dumps({k: round(v, 4) for k, v in e['final'].items()})} "
            f"avg_accuracy={_fmt(e['avg_accuracy'])} forgetting={_fmt(e['forgetting'])} bwt={_fmt(e['bwt'])}"
        )
    print(f"wrote {args.out / 'metrics.json'}")
    return 0
