"""One loaded model version, immutable (``Snapshot``), and the label embedding cache (``LabelCache``).

A ``Snapshot`` is immutable: model, tokenizer, preprocess, logit scale, retrieval index and
version travel together. ``ModelHolder.snapshot`` is one attribute read; a request reads it once
and finishes on that object, so an answer is always computed by exactly the version it names,
however many swaps happen meanwhile (the old model stays alive while a request holds it).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ctp.evaluate import encode_images, encode_texts
from service.serve.gallery import GalleryIndex


@dataclass(frozen=True)
class Snapshot:
    """Everything one answer needs, for one model version. Frozen: swap the object, never edit it."""

    version: str
    model: torch.nn.Module  # eval mode, no grads
    tokenizer: Callable[[list[str]], Tensor]
    preprocess: Callable[..., Tensor]  # PIL -> [3, H, W]
    device: torch.device
    logit_scale: float  # exp(logit_scale) of the model, for the softmax over labels
    meta: dict[str, Any]
    index: GalleryIndex
    load_id: int = 0  # unique per load in this process: tells apart two loads of one version name
    loaded_at: float = field(default_factory=time.time)

    def encode_images(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> L2-normalised ``[B, D]`` fp32."""
        with torch.inference_mode():
            return encode_images(self.model, images, device=self.device)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``N`` strings -> L2-normalised ``[N, D]`` fp32."""
        with torch.inference_mode():
            return encode_texts(
                self.model, self.tokenizer(list(texts)), device=self.device
            )  # tokens [N, ctx]


class LabelCache:
    """LRU of label text embeddings keyed by ``(version, template, label)``; thread-safe.

    The API uses ``(snapshot.version, snapshot.load_id)`` as the version part, so a checkpoint
    reloaded under the same name never reuses embeddings of the weights it replaced.
    """

    def __init__(self, max_entries: int = 65_536):
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[Any, str, str], Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, str, str]) -> Tensor | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[Any, str, str], value: Tensor) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
