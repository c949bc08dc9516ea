"""The serving API (FastAPI): ``create_app`` and the ``ctp serve`` entry point."""

from service.serve.api.app import create_app, main

__all__ = ["create_app", "main"]
