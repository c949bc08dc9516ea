"""Build open_clip models by name, including ctp's tiny presets, and load pretrained weights.

The tiny presets in ``ctp/model_configs/*.json`` use open_clip's own config format, so any
open_clip model name (``ViT-B-32``...) works the same way. ``pretrained`` is an open_clip tag
(``laion2b_s34b_b79k``, needs the weights in the local cache since nothing is downloaded here),
a local ``.safetensors``/open_clip checkpoint file, or a ctp checkpoint directory.
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

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "ctp-rn-tiny-32"

# Registering once makes the presets visible to open_clip itself, so a ctp checkpoint loads
# with plain ``open_clip.create_model_and_transforms("ctp-vit-tiny-32", pretrained=path)``
# after ``import ctp``.
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class ClipBundle:
    """A model with the callables that must change together with it (hot-swap unit)."""

    model: torch.nn.Module  # open_clip CLIP / CustomTextCLIP / CoCa
    preprocess_train: Callable[[Any], torch.Tensor]  # PIL -> [3, H, W], with augmentation
    preprocess_val: Callable[[Any], torch.Tensor]  # PIL -> [3, H, W]
    tokenizer: Callable[[list[str]], torch.Tensor]  # texts -> LongTensor [N, context_length]
    name: str  # open_clip model name
    config: dict  # open_clip model config (embed_dim, vision_cfg, text_cfg)


def list_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def create_model(
    name: str = DEFAULT_MODEL,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> ClipBundle:
    """Create ``name`` (an open_clip model name) with fresh or pretrained weights.

    ``seed`` makes the random initialisation reproducible without touching global RNG state
    beyond this call.
    """
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown model {name!r}; ctp presets: {list_presets()}, or any open_clip name")
    ckpt_file = None
    tag = None
    if pretrained:
        path = Path(pretrained)
        if path.is_dir():
            ckpt_file = str(path / "model.safetensors")  # ctp checkpoint directory
        elif path.exists():
            ckpt_file = str(path)
        else:
            tag = pretrained  # open_clip hub tag; open_clip resolves it from its cache
    fork = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=tag, device=device
        )
    if ckpt_file is not None:
        from ctp.checkpoint import load_weights

        load_weights(model, ckpt_file, strict=True)
        logger.info("loaded weights from %s", ckpt_file)
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
