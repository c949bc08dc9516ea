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
    "wait": ("service.wait", "wait until the API answers, or serves version N: wait --version N"),
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


# loggers at INFO by default (every other one, kafka-python's included, at WARNING)
OUR_LOGGERS = ("ctp", "service", "__main__")
VERBOSE_FLAGS = {"-v": 1, "--verbose": 1, "-vv": 2}
_verbosity = 0


def verbosity() -> int:
    """How many ``-v`` the command was given (``ctp up`` passes as many to its roles)."""
    return _verbosity


def setup_logging(level: int = 0) -> None:
    """Quiet by default: ctp's own loggers at INFO, third-party ones at WARNING. ``-v``: ours at
    DEBUG, third-party at INFO; ``-vv``: everything at DEBUG."""
    global _verbosity
    _verbosity = level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # once per process
    logging.getLogger().setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(level, 2)])
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if level == 0 else logging.DEBUG)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # -v / --verbose / -vv anywhere before a "--" (no command has a -v of its own)
    end = argv.index("--") if "--" in argv else len(argv)
    level = sum(VERBOSE_FLAGS.get(a, 0) for a in argv[:end])
    argv = [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: ctp [-v|--verbose] COMMAND [ARGS]", "", "commands:"]
        lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
        lines += ["", "-v: more logs (ctp's at DEBUG, third-party at INFO); -vv: everything at DEBUG"]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup_logging(level)
    if argv[0] in PARSERS:
        PARSERS[argv[0]]().parse_args(argv[1:])
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
