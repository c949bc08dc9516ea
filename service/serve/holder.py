"""The model being served, swapped whole when a new version lands: ``ModelHolder``.

One watcher thread does every change, in order: it asks the source for the latest version
(registry: pub/sub wakes it at once, polling every ``interval_s`` is the fallback; or a plain
checkpoint directory), loads a new one with strict weight loading, runs a warm-up batch that
must give finite embeddings, re-embeds the whole gallery with the new model, then assigns the
new snapshot. A version that fails anywhere in that is logged, counted and never tried again;
the old snapshot keeps serving. New gallery chunks are embedded by the current model and
swapped in as a new snapshot of the same version.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from ctp.checkpoint import load_checkpoint
from service.serve.gallery import GalleryIndex, embed_dirs, gallery_dirs
from service.serve.snapshot import Snapshot
from service.serve.sources import VersionRef, VersionSource

logger = logging.getLogger(__name__)

_LOAD_IDS = itertools.count(1)


class SwapListener(Protocol):
    def swapped(self, snapshot: Snapshot, seconds: float) -> None: ...
    def swap_failed(self, version: str, reason: str) -> None: ...
    def gallery_changed(self, size: int) -> None: ...


@dataclass
class HolderStats:
    swaps: int = 0
    failures: int = 0
    failed_versions: list[str] = field(default_factory=list)


class ModelHolder:
    """Owns the served ``snapshot`` and the watcher thread that replaces it.

    ``snapshot`` is None until the first version loads (``/readyz`` answers 503 until then).
    Gallery: every dir of ``gallery_dirs`` and every chunk directory under ``chunks_root``
    (dot-dirs are a store's temp dirs and are skipped), read with ``ctp.data.iter_chunk``, the
    newest ``gallery_max_pairs`` pairs kept; an image that does not decode within the limits is
    left out.
    """

    def __init__(
        self,
        *,
        source: VersionSource,
        device: str | torch.device = "cpu",
        chunks_root: str | Path | None = None,
        gallery_dirs: Sequence[str | Path] = (),
        gallery_max_pairs: int = 1_000_000,
        ann_threshold: int = 200_000,
        interval_s: float = 2.0,
        max_image_pixels: int = 16_000_000,
        max_image_bytes: int = 5_000_000,
        embed_batch_size: int = 256,
        listener: SwapListener | None = None,
    ):
        self.source = source
        self.device = torch.device(device)
        self.chunks_root = Path(chunks_root) if chunks_root is not None else None
        self.fixed_dirs = [Path(d) for d in gallery_dirs]
        self.gallery_max_pairs = gallery_max_pairs
        self.ann_threshold = ann_threshold
        self.interval_s = interval_s
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.embed_batch_size = embed_batch_size
        self.listener = listener
        self.stats = HolderStats()
        self.snapshot: Snapshot | None = None  # read once per request; assigned only by the watcher
        self._current_key: Any = None
        self._failed: set[Any] = set()
        self._known_dirs: list[Path] = []  # gallery dirs in the current index, in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._source_error: str | None = None  # why the source failed, while it does

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ModelHolder:
        self._thread = threading.Thread(target=self._run, name="ctp-model-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.source.close()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self.source.wait(self.interval_s, self._stop)

    def poll_once(self) -> None:
        """One round of the watcher: swap to a new version if any, then grow the gallery."""
        try:
            ref = self.source.latest()
        except Exception as e:  # Redis down, unreadable dir: keep serving
            self._source_failed(e)
            ref = None
        else:
            self._source_answered()
        if ref is not None and ref.key != self._current_key and ref.key not in self._failed:
            self._swap_to(ref)
        if self.snapshot is not None:
            try:
                self._grow_gallery()
            except Exception:
                logger.exception("gallery update failed; will retry")

    def _source_failed(self, e: Exception) -> None:
        """Logged once per outage (then at DEBUG): a Redis away for an hour is one warning."""
        if self._source_error is None:
            logger.warning(
                "cannot read the latest version (%s); serving %s meanwhile, asking again every %.1f s",
                e,
                self.snapshot.version if self.snapshot else "nothing yet",
                self.interval_s,
            )
        else:
            logger.debug("the version source still fails: %s", e)
        self._source_error = str(e)

    def _source_answered(self) -> None:
        if self._source_error is not None:
            logger.info("the version source answers again (it failed with: %s)", self._source_error)
            self._source_error = None

    # -- loading ---------------------------------------------------------------------------------

    def load(self, ref: VersionRef) -> Snapshot:
        """Build a complete snapshot for ``ref`` (warm-up and gallery included); raises on any fault."""
        bundle, meta = load_checkpoint(ref.path, device=self.device)  # strict: all keys, right shapes
        model = bundle.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        dim = int(bundle.config["embed_dim"])
        scale = (
            float(model.logit_scale.exp().clamp(max=100).item()) if hasattr(model, "logit_scale") else 100.0
        )
        snap = Snapshot(
            version=ref.version,
            model=model,
            tokenizer=bundle.tokenizer,
            preprocess=bundle.preprocess_val,
            device=self.device,
            logit_scale=scale,
            meta=meta,
            index=GalleryIndex.empty(dim, self.device, ann_threshold=self.ann_threshold),
            load_id=next(_LOAD_IDS),
        )
        self._warm_up(snap)
        dirs = self.gallery_dirs()
        index = self._embed_dirs(snap, snap.index, dirs)
        self._known_dirs = dirs
        return replace(snap, index=index)

    def _warm_up(self, snap: Snapshot) -> None:
        # One real batch through both towers: first-call allocations happen here, not in a
        # request, and weights that load but compute NaN (a diverged run) are refused.
        size = _image_size(snap.model)
        img = snap.encode_images(torch.zeros(2, 3, size, size))
        txt = snap.encode_texts(["a photo", "warm-up"])
        if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
            raise ValueError("warm-up produced non-finite embeddings")

    def _swap_to(self, ref: VersionRef) -> None:
        t0 = time.perf_counter()
        try:
            snap = self.load(ref)
        except Exception as e:  # any fault refuses the version, never the service
            self._failed.add(ref.key)
            self.stats.failures += 1
            self.stats.failed_versions.append(ref.version)
            logger.error(
                "version %s at %s refused, still serving %s: %s",
                ref.version,
                ref.path,
                self.snapshot.version if self.snapshot else None,
                e,
            )
            if self.listener:
                self.listener.swap_failed(ref.version, str(e))
            return
        seconds = time.perf_counter() - t0
        self.snapshot = snap  # the swap: one reference assignment
        self._current_key = ref.key
        self._ready.set()
        self.stats.swaps += 1
        logger.info(
            "serving version %s (%d gallery items, %.2f s to load)", snap.version, len(snap.index), seconds
        )
        if self.listener:
            self.listener.swapped(snap, seconds)
            self.listener.gallery_changed(len(snap.index))

    # -- gallery ---------------------------------------------------------------------------------

    def gallery_dirs(self) -> list[Path]:
        """The gallery's directories as they are on disk now (``gallery.gallery_dirs``)."""
        return gallery_dirs(self.fixed_dirs, self.chunks_root)

    def _grow_gallery(self) -> None:
        """Embed chunk dirs that appeared; the index keeps the newest ``gallery_max_pairs`` pairs.
        Dirs gone from disk (chunk retention) are forgotten here; their rows leave the index as
        newer ones push them out, or at the next version's load."""
        known = set(self._known_dirs)
        current = self.gallery_dirs()
        new = [d for d in current if d not in known]
        self._known_dirs = [d for d in current if d in known]
        snap = self.snapshot
        if not new or snap is None:
            return
        index = self._embed_dirs(snap, snap.index, new)
        self._known_dirs += new
        if self.snapshot is snap:  # only this thread swaps, so this always holds; kept as a guard
            self.snapshot = replace(snap, index=index)
            logger.info("gallery +%d dirs -> %d items (version %s)", len(new), len(index), snap.version)
            if self.listener:
                self.listener.gallery_changed(len(index))

    def _embed_dirs(self, snap: Snapshot, index: GalleryIndex, dirs: Sequence[Path]) -> GalleryIndex:
        return embed_dirs(
            snap,
            index,
            dirs,
            max_items=self.gallery_max_pairs,
            batch_size=self.embed_batch_size,
            max_image_pixels=self.max_image_pixels,
            max_image_bytes=self.max_image_bytes,
        )


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)
