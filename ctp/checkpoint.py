"""Checkpoints: ``model.safetensors`` + ``meta.json`` in a directory, written atomically.

A checkpoint directory is complete or absent: files are written into a temporary sibling
directory, each fsynced, then the directory is renamed into place and its parent fsynced.
Never pickle. ``model.safetensors`` is a plain open_clip state dict, so open_clip loads it with
``pretrained=<dir>/model.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ctp.atomic import atomic_directory, fsync_file

WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone() breaks storage sharing (tied weights), which safetensors refuses to write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``path/`` atomically; an existing checkpoint at ``path`` is replaced whole."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        weights = tmp / WEIGHTS_NAME
        save_file(state_dict_for_save(model), str(weights), metadata={"format": "pt"})
        fsync_file(weights)
        with open(tmp / META_NAME, "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **meta}, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
    return path


def load_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META_NAME
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from e


def load_weights(model: torch.nn.Module, file: str | Path, *, strict: bool = True) -> None:
    """Load a safetensors state dict (ctp or open_clip) into ``model``; errors name the file."""
    file = Path(file)
    if file.is_dir():
        file = file / WEIGHTS_NAME
    try:
        state = load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read weights {file}: {e}") from e
    if next(iter(state), "").startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"weights {file} do not fit the model: {e}") from e
    if strict and (missing or unexpected):
        raise CheckpointError(f"weights {file}: missing {missing}, unexpected {unexpected}")


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"):
    """Build the model named in ``meta.json`` and load the weights: ``(ClipBundle, meta)``."""
    from ctp.models import create_model

    meta = load_meta(path)
    bundle = create_model(meta["model"], device="cpu")
    load_weights(bundle.model, Path(path) / WEIGHTS_NAME, strict=True)
    bundle.model.to(device)
    return bundle, meta
