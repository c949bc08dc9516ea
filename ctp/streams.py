"""Named streams (synthetic and emoji presets) and the ``ctp data`` command.

ctp data emoji --out DIR [--preset NAME] [--split ...] [--train-vendors V ...]
    [--eval-vendor V] [--categories-per-chunk N] [--max-per-subcategory N]
    [--holdout-categories CAT ...] [--image-size N] [--seed N] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ctp.synthetic imports numpy: `ctp data --help` must not wait for it
    from ctp.synthetic import StreamPaths


def stream_names() -> list[str]:
    from ctp.emoji import PRESETS as EMOJI
    from ctp.synthetic import PRESETS as SYNTHETIC

    return sorted({*SYNTHETIC, *EMOJI})


def stream_kind(name: str) -> str:
    """ "emoji" or "synthetic": the family of the named stream (also its eval sets' name)."""
    from ctp.emoji import PRESETS as EMOJI
    from ctp.synthetic import PRESETS as SYNTHETIC

    if name in EMOJI:
        return "emoji"
    if name in SYNTHETIC:
        return "synthetic"
    raise SystemExit(f"unknown stream {name!r}; choose from {stream_names()}")


@contextmanager
def stream_lock(data_dir: str | Path):
    """An exclusive lock on the stream directory ``data_dir`` (a ``.NAME.lock`` file beside it):
    processes that build the same stream at once (a sweep's parallel cells of one seed) take
    turns, and the second reuses what the first wrote instead of deleting it mid-write."""
    import fcntl

    out = Path(data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_named_stream(name: str, data_dir: str | Path, seed: int = 0) -> StreamPaths:
    """Build (or reuse) the preset ``name`` with ``seed`` under ``data_dir`` (one builder at a time)."""
    with stream_lock(data_dir):
        if stream_kind(name) == "emoji":
            from ctp.emoji import PRESETS, make_emoji_stream

            return make_emoji_stream(data_dir, replace(PRESETS[name], seed=seed))
        from ctp.synthetic import PRESETS, make_stream

        return make_stream(data_dir, replace(PRESETS[name], seed=seed))


def build_parser() -> argparse.ArgumentParser:
    from ctp.emoji import PRESETS, VENDORS, default_cache_dir

    p = argparse.ArgumentParser(prog="ctp data", description="build a dataset stream on disk")
    sub = p.add_subparsers(dest="dataset", required=True)
    e = sub.add_parser(
        "emoji",
        help="continual stream of npm emoji artwork (fetched with npm, cached; vendors' licences)",
        description="Build the emoji stream: chunks of training-vendor art, eval sets of the held-out "
        "vendor's art. Options override the preset.",
    )
    e.add_argument(
        "--out", type=Path, required=True, help="stream directory (reused when the config matches)"
    )
    e.add_argument("--preset", default="emoji-ci-small", choices=sorted(PRESETS))
    e.add_argument("--split", choices=("class-incremental", "instance-incremental"))
    e.add_argument("--train-vendors", nargs="+", choices=VENDORS)
    e.add_argument("--eval-vendor", choices=VENDORS)
    e.add_argument("--categories-per-chunk", type=int)
    e.add_argument("--max-per-subcategory", type=int, help="seeded subsample per subcategory; 0 = all")
    e.add_argument(
        "--holdout-categories",
        nargs="*",
        metavar="CATEGORY",
        help='top-level categories kept out of the stream, e.g. "Food & Drink"',
    )
    e.add_argument("--image-size", type=int)
    e.add_argument("--seed", type=int)
    e.add_argument(
        "--cache-dir", type=Path, default=None, help=f"npm tarball cache (default {default_cache_dir()})"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ctp.emoji import PRESETS, make_emoji_stream

    overrides = {
        k: getattr(args, k)
        for k in (
            "split",
            "train_vendors",
            "eval_vendor",
            "categories_per_chunk",
            "max_per_subcategory",
            "holdout_categories",
            "image_size",
            "seed",
        )
        if getattr(args, k) is not None
    }
    try:
        config = replace(PRESETS[args.preset], **overrides)
    except ValueError as exc:
        raise SystemExit(f"invalid emoji stream options: {exc}") from exc
    paths = make_emoji_stream(args.out, config, cache_dir=args.cache_dir)
    print(json.dumps({"out": str(args.out), "chunks": len(paths.chunks), **paths.counts}))
    return 0
