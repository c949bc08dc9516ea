"""Checkpoints: a directory open_clip itself loads, written atomically.

A checkpoint directory holds ``model.safetensors`` (a plain open_clip state dict),
``open_clip_config.json`` (open_clip's own ``{"model_cfg", "preprocess_cfg"}``, the full model
config, so ``open_clip.create_model_and_transforms("local-dir:<dir>")`` loads it without
``import ctp``) and ``meta.json`` (ctp's record: model name, strategy, chunks, metrics...). It is
complete or absent: the files are written into a temporary sibling directory, each fsynced, then
the directory is renamed into place and its parent fsynced. Files are mode 0644, the directory
0755. Never pickle. Checkpoints from before the config file (``format_version`` 1) still load.

``load_checkpoint`` is the one way to load a checkpoint; it builds the model with
``ctp.models.create_model``, which hands the weights file to open_clip (this module imports
``ctp.models``, never the reverse). ``ctp export`` (``ctp.export``) writes the Hub layout.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from ctp.atomic import atomic_directory, fsync_file
from ctp.models import CheckpointError, ClipBundle, create_model, unwrap

__all__ = [
    "CONFIG_NAME",
    "META_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "load_checkpoint",
    "load_meta",
    "open_clip_config",
    "save_checkpoint",
    "state_dict_for_save",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"
CONFIG_NAME = "open_clip_config.json"  # open_clip's name (local-dir: and hf-hub: read it)
FORMAT_VERSION = 2  # 1: no open_clip_config.json
FILE_MODE, DIR_MODE = 0o644, 0o755


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone() breaks storage sharing (tied weights), which safetensors refuses to write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def open_clip_config(model: torch.nn.Module, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's ``open_clip_config.json`` content: the full model config and the model's
    preprocessing (size, mean, std, interpolation, resize mode), as ``push_to_hf_hub`` writes."""
    preprocess = dict(open_clip.get_model_preprocess_cfg(unwrap(model)))
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` (mode 0644) and fsync it; for files inside an atomic directory."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)


def save_checkpoint(
    path: str | Path, model: torch.nn.Module, meta: dict[str, Any], *, model_cfg: dict[str, Any] | None = None
) -> Path:
    """Write ``path/`` atomically; an existing checkpoint at ``path`` is replaced whole.

    ``model_cfg`` (the open_clip model config) defaults to the config of ``meta["model"]``;
    without either, no ``open_clip_config.json`` is written (ctp cannot load such a checkpoint).
    """
    path = Path(path)
    if model_cfg is None and meta.get("model"):
        model_cfg = open_clip.get_model_config(meta["model"])
    if model_cfg is None:
        logger.warning("checkpoint %s: unknown model %r, no %s written", path, meta.get("model"), CONFIG_NAME)
    with atomic_directory(path) as tmp:
        weights = tmp / WEIGHTS_NAME
        save_file(state_dict_for_save(model), str(weights), metadata={"format": "pt"})
        os.chmod(weights, FILE_MODE)  # safetensors creates the file 0600
        fsync_file(weights)
        if model_cfg is not None:
            write_json(tmp / CONFIG_NAME, open_clip_config(model, model_cfg))
        write_json(tmp / META_NAME, {"format_version": FORMAT_VERSION, **meta})
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes it 0700
    return path


def load_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META_NAME
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from e


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[ClipBundle, dict[str, Any]]:
    """Build the model named in ``meta.json`` with the checkpoint's weights: ``(ClipBundle, meta)``.

    Strict: every key, every shape (``CheckpointError`` otherwise). A stored
    ``open_clip_config.json`` that differs from the named config is logged (plain open_clip
    would build from the stored one).
    """
    path = Path(path)
    meta = load_meta(path)
    name = meta.get("model")
    if not name:
        raise CheckpointError(f"checkpoint metadata {path / META_NAME} names no model")
    bundle = create_model(name, pretrained=path / WEIGHTS_NAME, device=device)
    stored = _stored_model_cfg(path)
    if stored is not None and stored != json.loads(json.dumps(bundle.config)):
        logger.warning(
            "checkpoint %s: %s differs from the %r config ctp built it with", path, CONFIG_NAME, name
        )
    return bundle, meta


def _stored_model_cfg(path: Path) -> dict[str, Any] | None:
    try:
        with open(path / CONFIG_NAME) as f:
            return json.load(f).get("model_cfg")
    except FileNotFoundError:
        return None  # format_version 1
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path / CONFIG_NAME}: {e}") from e
