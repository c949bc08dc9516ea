"""The serving API (FastAPI): ``create_app`` and the ``ctp serve`` entry point.

The app (FastAPI, the model holder, torch) is imported on first use, so ``ctp serve --help``
answers at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.serve.api.app import create_app

__all__ = ["create_app", "main"]


def __getattr__(name: str):
    if name == "create_app":
        from service.serve.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """``ctp serve [--host H] [--port P] [--checkpoint-dir DIR]``: the API with the CTP_ settings."""
    import argparse

    p = argparse.ArgumentParser(prog="ctp serve", description="serve the newest model: classify, retrieve")
    p.add_argument("--host", help="default CTP_API_HOST")
    p.add_argument("--port", type=int, help="default CTP_API_PORT")
    p.add_argument(
        "--checkpoint-dir",
        help="serve checkpoints from this dir (no Redis); default CTP_SERVE_CHECKPOINT_DIR",
    )
    p.add_argument(
        "--log-level", help="uvicorn's log level (default: warning; info with ctp -v: every request)"
    )
    args = p.parse_args(argv)

    import logging

    import uvicorn

    from service.cli import verbosity
    from service.serve.api.app import create_app
    from service.serve.api.deadlines import server_config
    from service.settings import load_settings

    overrides = {
        k: v
        for k, v in (
            ("api_host", args.host),
            ("api_port", args.port),
            ("serve_checkpoint_dir", args.checkpoint_dir),
        )
        if v is not None
    }
    s = load_settings(**overrides)
    logging.getLogger(__name__).info(
        "serving on http://%s:%d (API docs at /docs, dashboard at /)", s.api_host, s.api_port
    )
    config = server_config(
        create_app(s),
        s,
        log_level=args.log_level or ("info" if verbosity() else "warning"),
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    return 0
