"""ctp's tiny model presets by name, without importing open_clip or torch (settings, ``--help``).

``ctp.models`` registers ``MODEL_CONFIG_DIR`` with open_clip when it is imported.
"""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "ctp-rn-tiny-32"


def list_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
