"""The ``ctp`` command: one entry point, a subcommand per role. Each takes argv (testable).

Fast by rule: this module and every command module import only the standard library (and light
ctp modules) before the command's arguments are parsed, so ``ctp --help`` and every
``ctp COMMAND --help`` answer in well under half a second; torch, Kafka, Redis and pydantic are
imported after parsing, where they are used (``benchmarks/cli_help.py`` measures it). The two
roles whose modules need Kafka or torch at import (``ingest``, ``train``) declare their arguments
here, and are parsed before their module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module with main(argv); imported lazily so `ctp experiment` needs no service deps
COMMANDS = {
    "experiment": ("ctp.experiment", "train a strategy over chunks and measure forgetting"),
    "compare": ("ctp.compare", "compare experiment outputs side by side"),
    "data": ("ctp.streams", "build a dataset stream on disk: data emoji --out DIR (npm emoji art)"),
    "export": ("ctp.export", "write a checkpoint in open_clip's Hub layout (hf-hub:/local-dir:)"),
    "produce": ("service.produce", "post pairs to the topic (shards, JSONL or synthetic)"),
    "ingest": ("service.ingest", "consume pairs from Kafka into chunks (CTP_ settings)"),
    "train": ("service.trainer", "train the model on queued chunks, publish checkpoints"),
    "status": ("service.status", "topic lag, chunks pending, memory size and model versions"),
    "up": (
        "service.local.up",
        "the whole local stack (Kafka, Redis, ingest, trainer, API); --demo streams data",
    ),
    "servers": ("service.local.infra", "start a local Kafka or Redis server: servers {fetch,kafka,redis}"),
    "serve": ("service.serve.api", "serve the newest model over HTTP: classify, retrieve (CTP_ settings)"),
}


def ingest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctp ingest", description="Kafka pairs -> validated chunks -> chunk queue (CTP_ settings)"
    )
    p.add_argument("--burst", action="store_true", help="stop once the topic is drained")
    return p


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctp train", description="chunk queue -> continual training -> checkpoints (CTP_ settings)"
    )
    p.add_argument("--burst", action="store_true", help="stop once the chunk queue is empty")
    p.add_argument("--generator", default="edit", help="pseudo-text generator: edit, captioner or random")
    return p


# commands whose module is heavy at import: parsed here first (--help, a bad argument: no wait)
PARSERS = {"ingest": ingest_parser, "train": train_parser}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: ctp COMMAND [ARGS]", "", "commands:"]
        lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv[0] in PARSERS:
        PARSERS[argv[0]]().parse_args(argv[1:])
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
