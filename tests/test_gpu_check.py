"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps run on the CPU and write their figures.

The dry run trains ctp-vit-micro-32 for a few steps on the CPU, so the figures say nothing about
speed; what is checked is that every step runs and the JSON a device run returns has its fields.
On the CPU peak memory is None (torch tracks it for CUDA only) and MFU is against a nominal
1 TFLOP/s peak, so it is > 0 but meaningless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "gpu_check.log").is_file()
    fig = json.loads((tmp_path / "gpu_figures.json").read_text())
    assert fig["mode"] == "dry-run"
    assert {name: s["rc"] for name, s in fig["steps"].items() if name in ("env", "step")} == {
        "env": 0,
        "step": 0,
    }
    assert fig["env"]["torch"] and "device" in fig["env"]
    step = fig["step"]
    assert step["model"] == "ctp-vit-micro-32" and step["batch_size"] == 8
    assert step["flops_per_pair"] > 0
    # FlopCounterMode against the ViT formula (on the CPU its SDPA kernel may go uncounted)
    assert 0.8 < step["flops_per_pair_counted"] / step["flops_per_pair_formula"] < 1.25
    for name in ("finetune", "incclip", "open_clip"):
        v = step["variants"][name]
        assert v["pairs_per_s"] > 0, name
        assert v["steps"] == 3, name
        assert "peak_gib" in v and v["peak_gib"] is None, name  # CUDA only
        assert "mfu" in v and v["mfu"] > 0, name  # against the dry run's nominal 1 TFLOP/s
    assert step["variants"]["incclip"]["negatives_per_step"] > 0
    assert fig["sweep"]["rc"] is None and fig["sweep"]["skipped"].startswith("--dry-run")
