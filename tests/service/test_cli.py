"""The ``ctp`` command stays fast: no heavy import before a command's arguments are parsed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import COMMANDS
from service.local.infra import free_port

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "open_clip", "kafka", "redis", "fastapi", "pydantic_settings", "matplotlib")
PROBE = """
import json, sys
from service.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def run_probe(args: list[str], env: dict[str, str] | None = None) -> tuple[int, set[str], str]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )
    last = json.loads(r.stderr.strip().splitlines()[-1])
    return last["rc"], set(last["modules"]), r.stdout


@pytest.mark.parametrize("command", ["--help", *COMMANDS])
def test_help_imports_nothing_heavy(command):
    args = [command] if command == "--help" else [command, "--help"]
    rc, modules, out = run_probe(args)
    assert rc == 0
    assert "usage:" in out
    assert [m for m in HEAVY if m in modules] == []
    if command != "data":  # ctp.streams (not ours to change) imports numpy through ctp.synthetic
        assert "numpy" not in modules


def test_status_imports_no_torch(tmp_path):
    """``ctp status`` with nothing listening: it reports both failures, and never loads torch."""
    rc, modules, out = run_probe(
        ["status", "--json"],
        env={
            "CTP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "CTP_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "CTP_DATA_DIR": str(tmp_path),
        },
    )
    status = json.loads(out)
    assert rc == 1 and set(status["errors"]) == {"redis", "kafka"}
    assert "redis" in modules and "kafka" in modules
    assert not {"torch", "open_clip", "numpy"} & modules
