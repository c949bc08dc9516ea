"""Build open_clip models by name, including ctp's tiny presets, with fresh or given weights.

The tiny presets in ``ctp/model_configs/*.json`` use open_clip's own config format, so any
open_clip model name (``ViT-B-32``...) works the same way. ``pretrained`` is an open_clip tag
(``laion2b_s34b_b79k``, needs the weights in the local cache since nothing is downloaded here),
a local ``.safetensors`` weights file, or a directory holding one (a ctp checkpoint or an
open_clip ``local-dir``/Hub folder). Weights are always loaded by open_clip itself, so ctp and
plain open_clip build the same model from the same file. A ctp checkpoint *with its metadata*
is loaded by ``ctp.checkpoint.load_checkpoint``, which builds on this module (never the reverse).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import safe_open

from ctp.presets import DEFAULT_MODEL, MODEL_CONFIG_DIR, list_presets

logger = logging.getLogger(__name__)

# Weights files looked for in a directory given as ``pretrained``, first match wins: open_clip's
# Hub name (what ``ctp export`` writes), then ctp's checkpoint name.
WEIGHTS_FILES = ("open_clip_model.safetensors", "model.safetensors")

# Registering once makes the presets visible to open_clip itself, so a ctp checkpoint loads
# with plain ``open_clip.create_model_and_transforms("ctp-vit-tiny-32", pretrained=path)``
# after ``import ctp.models``.
open_clip.add_model_config(MODEL_CONFIG_DIR)


class CheckpointError(RuntimeError):
    """Weights (or a checkpoint) that cannot be read or do not fit the model; names the file."""


@dataclass
class ClipBundle:
    """A model with the callables that must change together with it (hot-swap unit)."""

    model: torch.nn.Module  # open_clip CLIP / CustomTextCLIP / CoCa
    preprocess_train: Callable[[Any], torch.Tensor]  # PIL -> [3, H, W], with augmentation
    preprocess_val: Callable[[Any], torch.Tensor]  # PIL -> [3, H, W]
    tokenizer: Callable[[list[str]], torch.Tensor]  # texts -> LongTensor [N, context_length]
    name: str  # open_clip model name
    config: dict  # open_clip model config (embed_dim, vision_cfg, text_cfg)


def weights_file(pretrained: str | Path) -> Path:
    """The safetensors file a local ``pretrained`` names: the file itself, or the one in a directory."""
    path = Path(pretrained)
    if path.is_dir():
        for name in WEIGHTS_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no weights in {path}: expected one of {list(WEIGHTS_FILES)}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"weights {path}: only .safetensors files are loaded (never pickle)")
    return path


def create_model(
    name: str = DEFAULT_MODEL,
    *,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> ClipBundle:
    """Create ``name`` (an open_clip model name) with fresh or pretrained weights.

    ``seed`` makes the random initialisation reproducible without touching global RNG state
    beyond this call. Local weights must fit ``name`` exactly (open_clip's strict load); a file
    that cannot be read or does not fit raises ``CheckpointError``.
    """
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown model {name!r}; ctp presets: {list_presets()}, or any open_clip name")
    file = None
    if pretrained and Path(pretrained).exists():  # else an open_clip tag (or none)
        file = weights_file(pretrained)
        try:  # reads the header and checks the file covers it: catches truncated/corrupt files
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:  # safetensors raises several types
            raise CheckpointError(f"cannot read weights {file}: {e}") from e
    fork = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        try:
            # open_clip loads the file itself (strict), so no "initialized randomly" warning is
            # logged for weights that are loaded right after
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=str(file) if file is not None else pretrained or None, device=device
            )
        except Exception as e:  # torch's strict load: RuntimeError; open_clip's resizing: AssertionError...
            if file is None:
                raise
            raise CheckpointError(f"weights {file} do not fit the model {name!r}: {e}") from e
    if file is not None:
        logger.info("loaded weights from %s", file)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(
        model=model,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=tokenizer,
        name=name,
        config=dict(config),
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
