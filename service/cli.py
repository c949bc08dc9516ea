"""The ``ctp`` command: one entry point, a subcommand per role. Each takes argv (testable)."""

from __future__ import annotations

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
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
