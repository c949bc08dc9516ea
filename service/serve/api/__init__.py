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
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)

    import uvicorn

    from service.serve.api.app import create_app
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
    uvicorn.run(
        create_app(s),
        host=s.api_host,
        port=s.api_port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0
