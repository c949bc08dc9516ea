"""The README walk-through, command by command, against a real ``ctp up --demo``; and how much
``ctp up`` prints (ctp's own lines only, a bounded number of them).

One stack for the module: ``ctp up --demo`` in a fresh directory, paced so that the first chunk
is trained well after the API is up (the walk-through's first ``/model`` answer is the 503).
The README's commands run verbatim through bash with a ``ctp`` on PATH and no ``CTP_`` variable,
from the directory ``ctp up`` was started in: they find the stack through ``ctp-data/up.json``.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.local.infra import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
MARK = "<!-- walkthrough:model -->"


def readme_steps() -> list[tuple[str, list[str]]]:
    """``(command, the output lines README shows for it)`` of the block after ``MARK``."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(MARK) :].split("```")[1].strip("\n").splitlines()
    steps: list[tuple[str, list[str]]] = []
    for line in block:
        if line.startswith("# "):
            steps[-1][1].append(line[2:])
        else:
            steps.append((line, []))
    return steps


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("walkthrough")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    (bin_dir / "ctp").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m service.cli "$@"\n')
    (bin_dir / "ctp").chmod(0o755)
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTP_")}
    clean.update(PYTHONPATH=str(ROOT), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    up_env = {
        **clean,
        "CTP_MODEL": "ctp-vit-micro-32",
        "CTP_EPOCHS": "1",
        "CTP_CHUNK_SIZE": "45",  # at 1 pair/s: the first chunk after ~45 s
        "CTP_CHUNK_MAX_WAIT_S": "120",
        "CTP_API_PORT": str(port),
        "CTP_WATCH_INTERVAL_S": "0.5",
    }
    log = home / "up.out"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--demo", "--rate", "1"],
            env=up_env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started = time.monotonic()
    try:
        yield {"home": home, "env": clean, "port": port, "log": log, "up": up, "started": started}
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()


def _sh(demo, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = command.replace("localhost:8000", f"localhost:{demo['port']}")
    return subprocess.run(
        ["bash", "-c", command],
        cwd=demo["home"],
        env=demo["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_walkthrough_commands_in_order(demo):
    steps = readme_steps()
    commands = [c for c, _ in steps]
    assert commands[0] == "ctp wait" and "ctp wait --version 1" in commands and commands[-1] == "ctp status"
    model_answers = []
    for command, shown in steps:
        r = _sh(demo, command)
        assert demo["up"].poll() is None, demo["log"].read_text()[-3000:]
        assert r.returncode == 0, (command, r.stdout, r.stderr, demo["log"].read_text()[-3000:])
        out = r.stdout.strip().splitlines()
        if command.startswith("curl"):
            model_answers.append((out, shown))
        elif command == "ctp status":  # from another process, no CTP_ variable: the stack's numbers
            text = r.stdout
            assert "UNAVAILABLE" not in text and "model versions: latest" in text
            assert "memory: " in text and f"of {400} pairs" in text  # the demo trainer's, not 2000
            assert "trainer (pid" in text and "epochs=1" in text
        elif command.startswith("ctp wait --version"):
            assert re.fullmatch(r"version \d+ served at http://127\.0\.0\.1:\d+ \(\d+ chunks\)", out[-1])
    (before, shown_before), (after, shown_after) = model_answers
    assert before == shown_before == ["no model loaded yet"]  # robust before version 1: no KeyError
    assert shown_after == ["1 1"] and re.fullmatch(r"\d+ \d+", after[0]) and int(after[0].split()[0]) >= 1


def test_ctp_up_prints_only_its_own_lines_in_its_first_minute(demo):
    time.sleep(max(0.0, demo["started"] + 60 - time.monotonic()))
    lines = [ln for ln in demo["log"].read_text(errors="replace").splitlines() if ln.strip()]
    assert any(ln.startswith("ctp up: data in ") for ln in lines)
    logged = [ln for ln in lines if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", ln)]
    third_party = [ln for ln in logged if not re.search(r" (ctp|service)[.\w]*: ", ln)]
    assert [ln for ln in third_party if " INFO " in ln or " DEBUG " in ln] == []
    assert "group_id is None" not in "\n".join(lines)
    ours = ("ctp up:", "  ", "status: ", "Ctrl-C")
    assert [ln for ln in lines if not ln.startswith(ours) and ln not in logged] == []
    # the header (~12 lines) and at most one status line per --status-every (10 s) that changed
    assert len(lines) <= 25, "\n".join(lines)
