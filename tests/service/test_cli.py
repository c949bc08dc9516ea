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


def test_logging_is_quiet_by_default_and_verbose_on_request():
    import logging

    from service.cli import setup_logging

    root = logging.getLogger().level
    try:
        setup_logging(0)
        assert not logging.getLogger("kafka.conn").isEnabledFor(logging.INFO)
        assert logging.getLogger("kafka.conn").isEnabledFor(logging.WARNING)
        assert logging.getLogger("service.ingest").isEnabledFor(logging.INFO)
        assert not logging.getLogger("service.ingest").isEnabledFor(logging.DEBUG)
        setup_logging(1)
        assert logging.getLogger("kafka.conn").isEnabledFor(logging.INFO)
        assert logging.getLogger("ctp.train").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("kafka.conn").isEnabledFor(logging.DEBUG)
        setup_logging(2)
        assert logging.getLogger("kafka.conn").isEnabledFor(logging.DEBUG)
    finally:
        setup_logging(0)
        logging.getLogger().setLevel(root)


def test_verbose_flags_are_taken_anywhere_before_a_double_dash(monkeypatch):
    import service.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "setup_logging", lambda level: seen.setdefault("level", level))
    monkeypatch.setattr("service.wait.main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["-v", "wait", "--timeout", "1", "--verbose"]) == 0
    assert seen == {"level": 2, "argv": ["--timeout", "1"]}


class _FakeApi:
    """A real HTTP server answering /model as the API does: 503 until ``version`` is set."""

    def __init__(self):
        import http.server
        import threading

        self.version = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if outer.version is None:
                    code, body = 503, {"error": "not_ready", "reason": "no model loaded yet"}
                else:
                    code, body = 200, {"model_version": str(outer.version), "chunks": outer.version}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_wait_for_the_api_and_a_version(tmp_path, monkeypatch, capsys):
    import threading

    from service.wait import main as wait_main

    monkeypatch.setenv("CTP_DATA_DIR", str(tmp_path))
    closed = f"http://127.0.0.1:{free_port()}"
    assert wait_main(["--api", closed, "--timeout", "0.5", "--interval", "0.1"]) == 1
    assert "does not answer" in capsys.readouterr().err
    api = _FakeApi()
    try:
        assert wait_main(["--api", api.url, "--timeout", "5"]) == 0  # it answers: enough without --version
        assert "503: no model loaded yet" in capsys.readouterr().out
        assert wait_main(["--api", api.url, "--version", "1", "--timeout", "0.5", "--interval", "0.1"]) == 1
        assert "no version 1" in capsys.readouterr().err
        timer = threading.Timer(0.5, lambda: setattr(api, "version", 2))
        timer.start()
        assert wait_main(["--api", api.url, "--version", "2", "--timeout", "10", "--interval", "0.1"]) == 0
        assert capsys.readouterr().out.strip() == f"version 2 served at {api.url} (2 chunks)"
        # no --api: the URL the running ctp up recorded in the data dir
        (tmp_path / "up.json").write_text(json.dumps({"pid": os.getpid(), "api_url": api.url}))
        assert wait_main(["--version", "2", "--timeout", "5"]) == 0
        assert api.url in capsys.readouterr().out
    finally:
        api.close()
