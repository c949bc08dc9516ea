"""The model being served, swapped whole when a new version lands: ``Snapshot`` and ``ModelHolder``.

A ``Snapshot`` is immutable: model, tokenizer, preprocess, logit scale, retrieval index and
version travel together. ``ModelHolder.snapshot`` is one attribute read; a request reads it once
and finishes on that object, so an answer is always computed by exactly the version it names,
however many swaps happen meanwhile (the old model stays alive while a request holds it).

One watcher thread does every change, in order: it asks the source for the latest version
(registry: pub/sub wakes it at once, polling every ``interval_s`` is the fallback; or a plain
checkpoint directory), loads a new one with strict weight loading, runs a warm-up batch that
must give finite embeddings, re-embeds the whole gallery with the new model, then assigns the
new snapshot. A version that fails anywhere in that is logged, counted and never tried again;
the old snapshot keeps serving. New gallery chunks are embedded by the current model and
swapped in as a new snapshot of the same version.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import redis
import torch
import torch.nn.functional as F
from torch import Tensor

from ctp.checkpoint import META_NAME, WEIGHTS_NAME, CheckpointError, load_checkpoint, load_meta
from ctp.data import iter_chunk
from ctp.evaluate import autocast_for
from ctp.images import ImageDecodeError, decode_image
from service.registry import Registry

logger = logging.getLogger(__name__)

_LOAD_IDS = itertools.count(1)


# ---------------------------------------------------------------------------------------------
# retrieval index


class GalleryIndex:
    """Image-text pairs with their embeddings under one model; never mutated once built.

    ``search(query [D], against="images"|"texts", k)`` ranks by cosine similarity: exact (one
    matmul over all rows) below ``ann_threshold`` rows, faiss HNSW (inner product, approximate)
    from there on when faiss is installed; without faiss it stays exact.
    """

    def __init__(self, ids: Sequence[str], texts: Sequence[str], image_emb: Tensor, text_emb: Tensor,
                 *, ann_threshold: int = 200_000, _ann: dict | None = None):
        if not (len(ids) == len(texts) == image_emb.shape[0] == text_emb.shape[0]):
            raise ValueError("ids, texts and embeddings must have the same length")
        self.ids = list(ids)
        self.texts = list(texts)
        self.image_emb = image_emb  # [N, D] L2-normalised, on the model's device
        self.text_emb = text_emb  # [N, D]
        self.ann_threshold = ann_threshold
        self._ann = _ann if _ann is not None else self._build_ann(image_emb, text_emb)

    @classmethod
    def empty(cls, dim: int, device: torch.device, *, ann_threshold: int = 200_000) -> GalleryIndex:
        z = torch.zeros(0, dim, device=device)
        return cls([], [], z, z.clone(), ann_threshold=ann_threshold)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> str:
        return "hnsw" if self._ann else "exact"

    def _build_ann(self, image_emb: Tensor, text_emb: Tensor) -> dict | None:
        if image_emb.shape[0] < self.ann_threshold:
            return None
        try:
            import faiss
        except ImportError:
            logger.warning("gallery of %d items but faiss is not installed: exact search", image_emb.shape[0])
            return None
        out = {}
        for name, emb in (("images", image_emb), ("texts", text_emb)):
            index = faiss.IndexHNSWFlat(emb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            index.add(emb.float().cpu().numpy())
            out[name] = index
        return out

    def extend(self, ids: Sequence[str], texts: Sequence[str], image_emb: Tensor, text_emb: Tensor) -> GalleryIndex:
        """A new index with these rows appended (this one is left as it is)."""
        new_img = torch.cat([self.image_emb, image_emb])
        new_txt = torch.cat([self.text_emb, text_emb])
        ann = None
        if self._ann is not None:
            import faiss

            ann = {}
            for name, emb in (("images", image_emb), ("texts", text_emb)):
                index = faiss.clone_index(self._ann[name])  # searches of the old copy go on meanwhile
                index.add(emb.float().cpu().numpy())
                ann[name] = index
        return GalleryIndex(self.ids + list(ids), self.texts + list(texts), new_img, new_txt,
                            ann_threshold=self.ann_threshold, _ann=ann)

    def search(self, query: Tensor, *, against: str, k: int) -> list[tuple[int, float]]:
        """Rows nearest to ``query [D]`` (L2-normalised): ``[(row, cosine)]``, best first."""
        k = min(k, len(self))
        if k == 0:
            return []
        if self._ann is not None:
            scores, rows = self._ann[against].search(query.float().cpu().numpy()[None], k)
            return [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
        emb = self.image_emb if against == "images" else self.text_emb
        with torch.inference_mode():
            scores = emb @ query.to(emb.device, emb.dtype)  # [N]
            top = torch.topk(scores, k)
        return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# snapshot


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
        with torch.inference_mode(), autocast_for(self.device):
            return F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``N`` strings -> L2-normalised ``[N, D]`` fp32."""
        with torch.inference_mode(), autocast_for(self.device):
            tokens = self.tokenizer(list(texts)).to(self.device)  # [N, ctx]
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


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


# ---------------------------------------------------------------------------------------------
# sources of versions


@dataclass(frozen=True)
class VersionRef:
    key: Any  # identity of this version at the source: never loaded twice, never retried
    version: str  # the name answers carry
    path: Path


class VersionSource(Protocol):
    def latest(self) -> VersionRef | None: ...
    def wait(self, timeout: float, stop: threading.Event) -> None: ...
    def history(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class RegistrySource:
    """The registry's latest pointer, woken early by its pub/sub channel.

    Pub/sub only shortens the wait: a dropped connection or a missed message costs at most one
    polling interval, because ``latest()`` always reads the pointer itself.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._pubsub: redis.client.PubSub | None = None

    def latest(self) -> VersionRef | None:
        info = self.registry.latest()
        return None if info is None else VersionRef(info.version, str(info.version), info.path)

    def wait(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        try:
            if self._pubsub is None:
                self._pubsub = self.registry.subscribe()
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if self._pubsub.get_message(timeout=min(left, 0.5)) is not None:
                    return
        except (redis.RedisError, OSError) as e:
            logger.warning("registry pub/sub unavailable (%s); polling", e)
            self.close()
            stop.wait(max(0.0, deadline - time.monotonic()))

    def history(self) -> list[dict[str, Any]]:
        return [{"version": str(i.version), "created": i.created, "strategy": i.meta.get("strategy"),
                 "chunks": i.meta.get("chunks"), "metrics": i.meta.get("metrics", {}),
                 "train": i.meta.get("train", {})} for i in self.registry.history()]

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self._pubsub.close()
            self._pubsub = None


class DirectorySource:
    """Checkpoints on disk without Redis: ``root`` is one checkpoint directory, or a directory of
    them (the newest by name wins: the registry's ``v000001`` names sort by version).

    A checkpoint replaced in place (new weights mtime) counts as a new version.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._unreadable: set[Path] = set()  # warned about once each

    def _dirs(self) -> list[Path]:
        if (self.root / META_NAME).is_file():
            return [self.root]
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / META_NAME).is_file())

    def latest(self) -> VersionRef | None:
        dirs = self._dirs()
        if not dirs:
            return None
        path = dirs[-1]
        try:
            mtime = (path / WEIGHTS_NAME).stat().st_mtime_ns
            version = str(load_meta(path).get("version", path.name))
        except (OSError, CheckpointError) as e:  # load_meta raises CheckpointError for a bad meta.json
            if path not in self._unreadable:
                self._unreadable.add(path)
                logger.warning("checkpoint %s unreadable: %s", path, e)
            return VersionRef((str(path), -1), path.name, path)  # fails to load, once
        return VersionRef((str(path), mtime), version, path)

    def wait(self, timeout: float, stop: threading.Event) -> None:
        stop.wait(timeout)

    def history(self) -> list[dict[str, Any]]:
        out = []
        for path in self._dirs():
            try:
                meta = load_meta(path)
            except CheckpointError:
                continue
            out.append({"version": str(meta.get("version", path.name)), "created": None,
                        "strategy": meta.get("strategy"), "chunks": meta.get("chunks"),
                        "metrics": meta.get("metrics", {}), "train": meta.get("train", {})})
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# the holder


class SwapListener(Protocol):
    def swapped(self, snapshot: Snapshot, seconds: float) -> None: ...
    def swap_failed(self, version: str, reason: str) -> None: ...
    def gallery_changed(self, size: int) -> None: ...


@dataclass
class HolderStats:
    swaps: int = 0
    failures: int = 0
    failed_versions: list[str] = field(default_factory=list)
    last_swap_seconds: float = 0.0
    gallery_dirs: int = 0


class ModelHolder:
    """Owns the served ``snapshot`` and the watcher thread that replaces it.

    ``snapshot`` is None until the first version loads (``/readyz`` answers 503 until then).
    Gallery: every chunk directory under ``chunks_root`` (dot-dirs are a store's temp dirs and
    are skipped) and every dir of ``gallery_dirs``, read with ``ctp.data.iter_chunk``; an image
    that does not decode within the limits is left out.
    """

    def __init__(
        self,
        *,
        source: VersionSource,
        device: str | torch.device = "cpu",
        chunks_root: str | Path | None = None,
        gallery_dirs: Sequence[str | Path] = (),
        gallery_max_items: int = 1_000_000,
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
        self.gallery_max_items = gallery_max_items
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
        except Exception as e:  # noqa: BLE001 - Redis down, unreadable dir: keep serving
            logger.warning("cannot read the latest version: %s", e)
            ref = None
        if ref is not None and ref.key != self._current_key and ref.key not in self._failed:
            self._swap_to(ref)
        if self.snapshot is not None:
            try:
                self._grow_gallery()
            except Exception:  # noqa: BLE001
                logger.exception("gallery update failed; will retry")

    # -- loading ---------------------------------------------------------------------------------

    def load(self, ref: VersionRef) -> Snapshot:
        """Build a complete snapshot for ``ref`` (warm-up and gallery included); raises on any fault."""
        bundle, meta = load_checkpoint(ref.path, device=self.device)  # strict: all keys, right shapes
        model = bundle.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        dim = int(bundle.config["embed_dim"])
        scale = float(model.logit_scale.exp().clamp(max=100).item()) if hasattr(model, "logit_scale") else 100.0
        snap = Snapshot(version=ref.version, model=model, tokenizer=bundle.tokenizer, preprocess=bundle.preprocess_val,
                        device=self.device, logit_scale=scale, meta=meta,
                        index=GalleryIndex.empty(dim, self.device, ann_threshold=self.ann_threshold),
                        load_id=next(_LOAD_IDS))
        self._warm_up(snap)
        dirs = self._scan_dirs()
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
        except Exception as e:  # noqa: BLE001 - any fault refuses the version, never the service
            self._failed.add(ref.key)
            self.stats.failures += 1
            self.stats.failed_versions.append(ref.version)
            logger.error("version %s at %s refused, still serving %s: %s", ref.version, ref.path,
                         self.snapshot.version if self.snapshot else None, e)
            if self.listener:
                self.listener.swap_failed(ref.version, str(e))
            return
        seconds = time.perf_counter() - t0
        self.snapshot = snap  # the swap: one reference assignment
        self._current_key = ref.key
        self._ready.set()
        self.stats.swaps += 1
        self.stats.last_swap_seconds = seconds
        self.stats.gallery_dirs = len(self._known_dirs)
        logger.info("serving version %s (%d gallery items, %.2f s to load)", snap.version, len(snap.index), seconds)
        if self.listener:
            self.listener.swapped(snap, seconds)
            self.listener.gallery_changed(len(snap.index))

    # -- gallery ---------------------------------------------------------------------------------

    def _scan_dirs(self) -> list[Path]:
        dirs = [d for d in self.fixed_dirs if d.is_dir()]
        if self.chunks_root is not None and self.chunks_root.is_dir():
            dirs += sorted(p for p in self.chunks_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return dirs

    def _grow_gallery(self) -> None:
        known = set(self._known_dirs)
        new = [d for d in self._scan_dirs() if d not in known]
        snap = self.snapshot
        if not new or snap is None:
            return
        index = self._embed_dirs(snap, snap.index, new)
        self._known_dirs = self._known_dirs + new
        self.stats.gallery_dirs = len(self._known_dirs)
        if self.snapshot is snap:  # only this thread swaps, so this always holds; kept as a guard
            self.snapshot = replace(snap, index=index)
            logger.info("gallery +%d dirs -> %d items (version %s)", len(new), len(index), snap.version)
            if self.listener:
                self.listener.gallery_changed(len(index))

    def _embed_dirs(self, snap: Snapshot, index: GalleryIndex, dirs: Sequence[Path]) -> GalleryIndex:
        """Embed the pairs of ``dirs`` with ``snap``'s model, ``embed_batch_size`` images at a time
        (memory holds one batch of preprocessed images, not the gallery), into a new index."""
        ids: list[str] = []
        texts: list[str] = []
        pending: list[Tensor] = []
        img_parts: list[Tensor] = []
        bs = self.embed_batch_size
        room = self.gallery_max_items - len(index)
        for d in dirs:
            try:
                for s in iter_chunk(d):
                    if len(ids) >= room:
                        break
                    try:
                        pil = decode_image(s.image, key=s.key, max_pixels=self.max_image_pixels,
                                           max_bytes=self.max_image_bytes)
                    except ImageDecodeError as e:
                        logger.warning("gallery %s: %s", d, e)
                        continue
                    ids.append(str(s.meta.get("id", f"{d.name}/{s.key}")))
                    texts.append(s.text)
                    pending.append(snap.preprocess(pil))
                    if len(pending) == bs:
                        img_parts.append(snap.encode_images(torch.stack(pending)))
                        pending = []
            except (OSError, ValueError) as e:  # a damaged shard: keep what was read before it
                logger.warning("gallery dir %s unreadable: %s", d, e)
        if pending:
            img_parts.append(snap.encode_images(torch.stack(pending)))
        if not ids:
            return index
        img_emb = torch.cat(img_parts)
        txt_emb = torch.cat([snap.encode_texts(texts[s:s + bs]) for s in range(0, len(texts), bs)])
        return index.extend(ids, texts, img_emb, txt_emb)


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)
