"""Wall time of ``ctp --help`` and of every ``ctp COMMAND --help`` (target: under 0.5 s each).

    python benchmarks/cli_help.py [--repeat 5] [--ctp PATH]

Each command runs ``--repeat`` times in a fresh interpreter (``python -m service.cli``, or the
installed ``ctp`` script with ``--ctp``); the table gives the best and the median wall time and
the heavy packages the command imported before printing its help (none expected: see
``service/cli.py``). A loaded machine shows in the median more than in the best.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.cli import COMMANDS  # noqa: E402  (light: the table of commands only)

TARGET_S = 0.5
HEAVY = ("torch", "open_clip", "kafka", "redis", "fastapi", "pydantic_settings", "numpy", "matplotlib")
_PROBE = (
    "import sys\nfrom service.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
)


def heavy_imports(args: list[str]) -> list[str]:
    """The heavy packages ``ctp ARGS`` has imported by the time it returns (its help printed)."""
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=_env(), check=False
    )
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    return [m for m in last.split(",") if m]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def time_help(args: list[str], *, repeat: int, ctp: str | None) -> list[float]:
    cmd = [ctp] if ctp else [sys.executable, "-m", "service.cli"]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run([*cmd, *args], capture_output=True, env=_env(), check=False)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd + args)} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per command")
    p.add_argument("--ctp", help="time this `ctp` executable instead of python -m service.cli")
    args = p.parse_args(argv)
    rows = [["--help"]] + [[name, "--help"] for name in COMMANDS]
    print(f"| command | best s | median s | < {TARGET_S} s | heavy imports |")
    print("|---|---|---|---|---|")
    slow = 0
    for row in rows:
        times = time_help(row, repeat=args.repeat, ctp=args.ctp)
        best, median = min(times), statistics.median(times)
        slow += median >= TARGET_S
        heavy = ", ".join(heavy_imports(row)) or "none"
        ok = "yes" if median < TARGET_S else "NO"
        print(f"| ctp {' '.join(row)} | {best:.3f} | {median:.3f} | {ok} | {heavy} |")
    print(f"\n{len(rows) - slow} of {len(rows)} under {TARGET_S} s (median of {args.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
