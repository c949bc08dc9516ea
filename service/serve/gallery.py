"""The retrieval gallery: its directories, item ids, embedded index and thumbnails.

- ``gallery_dirs``: the one directory scan (fixed dirs, then chunk dirs oldest first: by the
  time they were renamed into place); ids follow ``ctp.data.pair_id`` (``KEY.json``'s ``"id"``,
  else ``"{dir name}/{key}"``).
- ``GalleryIndex``: ids, texts and embeddings under one model, searched by cosine similarity.
- ``embed_dirs``: the pairs of some directories embedded by a snapshot's model into a new index
  that keeps the newest ``max_items`` rows (``CTP_GALLERY_MAX_PAIRS``): dirs are read newest
  first and reading stops once the cap is reached, so neither memory nor the embedding work
  grows with the chunks on disk.
- ``GalleryImages``: where each item's image lies on disk, so the API can return it by id
  (dashboard thumbnails).

The index keeps ids, texts and embeddings, not image bytes. ``GalleryImages`` maps an id to
``(shard, byte offset, size, ext)`` by reading the tar headers (and the small ``KEY.json``
members that carry ids) of the same directories the index is built from; a request then reads
just that member's bytes. Memory stays bounded: one small tuple per item, the newest
``max_items`` (the gallery's own cap), and no image is held. Directories are scanned once, when a
lookup misses and a directory not seen before exists (chunks appear whole: ChunkStore renames
them into place). The first item with an id wins.
"""

from __future__ import annotations

import json
import logging
import tarfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ctp.data import IMAGE_EXTS, iter_chunk, pair_id
from ctp.images import ImageDecodeError, decode_image

if TYPE_CHECKING:
    from service.serve.snapshot import Snapshot

logger = logging.getLogger(__name__)

MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_MAX_JSON_BYTES = 64 * 1024  # a sample's KEY.json bigger than this is not read for its id


def gallery_dirs(fixed_dirs: Iterable[Path], chunks_root: Path | None) -> list[Path]:
    """The gallery's directories: the fixed dirs that exist, then the chunk dirs by name (dot-dirs
    are a store's temp dirs and are skipped). The one scan of the holder and of the thumbnails."""
    dirs = [d for d in fixed_dirs if d.is_dir()]
    if chunks_root is not None and chunks_root.is_dir():
        chunks = []
        for p in chunks_root.iterdir():
            try:
                if p.is_dir() and not p.name.startswith("."):
                    chunks.append((p.stat().st_mtime_ns, p.name, p))
            except OSError:  # removed meanwhile (chunk retention)
                continue
        dirs += [p for _, _, p in sorted(chunks)]
    return dirs


class GalleryIndex:
    """Image-text pairs with their embeddings under one model; never mutated once built.

    ``search(query [D], against="images"|"texts", k)`` ranks by cosine similarity: exact (one
    matmul over all rows) below ``ann_threshold`` rows, faiss HNSW (inner product, approximate)
    from there on when faiss is installed; without faiss it stays exact.
    """

    def __init__(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        image_emb: Tensor,
        text_emb: Tensor,
        *,
        ann_threshold: int = 200_000,
        _ann: dict | None = None,
    ):
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

    def extend(
        self, ids: Sequence[str], texts: Sequence[str], image_emb: Tensor, text_emb: Tensor
    ) -> GalleryIndex:
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
        return GalleryIndex(
            self.ids + list(ids),
            self.texts + list(texts),
            new_img,
            new_txt,
            ann_threshold=self.ann_threshold,
            _ann=ann,
        )

    def newest(self, n: int) -> GalleryIndex:
        """This index if it has at most ``n`` rows, else a new one of its last ``n`` (the ANN, if
        any, is built again for them)."""
        if len(self) <= n:
            return self
        if n <= 0:
            return GalleryIndex.empty(
                self.image_emb.shape[1], self.image_emb.device, ann_threshold=self.ann_threshold
            )
        return GalleryIndex(
            self.ids[-n:],
            self.texts[-n:],
            self.image_emb[-n:],
            self.text_emb[-n:],
            ann_threshold=self.ann_threshold,
        )

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


def embed_dirs(
    snap: Snapshot,
    index: GalleryIndex,
    dirs: Sequence[Path],
    *,
    max_items: int,
    batch_size: int,
    max_image_pixels: int,
    max_image_bytes: int,
) -> GalleryIndex:
    """``index`` plus the pairs of ``dirs`` (oldest first) embedded with ``snap``'s model, keeping
    the newest ``max_items`` rows. Dirs are read newest first until ``max_items`` pairs are in,
    ``batch_size`` images at a time (memory holds one dir's bytes and one batch of preprocessed
    images, not the gallery); an image that does not decode within the limits is left out."""
    parts: list[tuple[list[str], list[str], Tensor, Tensor]] = []  # per dir, newest dir first
    total = 0
    for d in reversed(dirs):
        if total >= max_items:
            break
        part = _embed_dir(snap, d, max_items - total, batch_size, max_image_pixels, max_image_bytes)
        if part is not None:
            parts.append(part)
            total += len(part[0])
    if not parts:
        return index.newest(max_items)
    parts.reverse()
    ids = [i for p in parts for i in p[0]]
    texts = [t for p in parts for t in p[1]]
    img_emb = torch.cat([p[2] for p in parts])
    txt_emb = torch.cat([p[3] for p in parts])
    return index.newest(max_items - total).extend(ids, texts, img_emb, txt_emb)


def _embed_dir(
    snap: Snapshot, d: Path, room: int, batch_size: int, max_image_pixels: int, max_image_bytes: int
) -> tuple[list[str], list[str], Tensor, Tensor] | None:
    """The newest ``room`` pairs of ``d`` that decode: ``(ids, texts, image emb, text emb)``."""
    samples = []
    try:
        for s in iter_chunk(d):
            samples.append(s)
    except (OSError, ValueError) as e:  # a damaged shard or a removed dir: keep what was read
        logger.warning("gallery dir %s unreadable: %s", d, e)
    ids: list[str] = []
    texts: list[str] = []
    pending: list[Tensor] = []
    img_parts: list[Tensor] = []
    for s in reversed(samples):  # the newest first, then put back in order
        if len(ids) >= room:
            break
        try:
            pil = decode_image(s.image, key=s.key, max_pixels=max_image_pixels, max_bytes=max_image_bytes)
        except ImageDecodeError as e:
            logger.warning("gallery %s: %s", d, e)
            continue
        ids.append(pair_id(s.meta, d.name, s.key))
        texts.append(s.text)
        pending.append(snap.preprocess(pil))
        if len(pending) == batch_size:
            img_parts.append(snap.encode_images(torch.stack(pending)))
            pending = []
    if pending:
        img_parts.append(snap.encode_images(torch.stack(pending)))
    if not ids:
        return None
    ids.reverse()
    texts.reverse()
    img_emb = torch.cat(img_parts).flip(0)
    txt_emb = torch.cat(
        [snap.encode_texts(texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]
    )
    return ids, texts, img_emb, txt_emb


class GalleryImages:
    def __init__(self, *, max_items: int, max_image_bytes: int):
        self.max_items = max_items
        self.max_image_bytes = max_image_bytes
        self._where: dict[
            str, tuple[Path, int, int, str]
        ] = {}  # id -> (shard, offset, size, ext), oldest first
        self._scanned: set[Path] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._where)

    def read(self, item_id: str, dirs: Iterable[Path]) -> tuple[bytes, str] | None:
        """``(image bytes, media type)`` of ``item_id``, or None (unknown, gone, too big)."""
        with self._lock:
            where = self._where.get(item_id)
            if where is None:
                dirs = list(dirs)
                self._scanned &= set(dirs)  # forget dirs gone from disk
                for d in dirs:
                    if d not in self._scanned:
                        self._scan_dir(d)
                while len(self._where) > self.max_items:  # the newest max_items stay
                    del self._where[next(iter(self._where))]
                where = self._where.get(item_id)
            if where is None:
                return None
            shard, offset, size, ext = where
        if size > self.max_image_bytes:
            return None
        try:
            with open(shard, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:  # the chunk was removed since
            logger.info("gallery image %r unreadable: %s", item_id, e)
            return None
        return (data, MEDIA_TYPES[ext]) if len(data) == size else None

    def _scan_dir(self, d: Path) -> None:
        self._scanned.add(d)
        for shard in sorted(d.glob("*.tar")):
            try:
                self._scan_shard(d, shard)
            except (tarfile.TarError, OSError, EOFError) as e:  # compressed or damaged: no images from it
                logger.warning("gallery shard %s not indexed for images: %s", shard, e)

    def _scan_shard(self, d: Path, shard: Path) -> None:
        images: dict[str, tuple[int, int, str]] = {}  # key -> (offset, size, ext)
        metas: dict[str, dict] = {}  # key -> its KEY.json (for the id)
        with tarfile.open(shard, mode="r:") as tar:  # plain tar only: offsets must be file offsets
            for m in tar:
                if not m.isfile():
                    continue
                head, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                key, ext = (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""
                if ext in IMAGE_EXTS:
                    images.setdefault(key, (m.offset_data, m.size, ext))
                elif ext == "json" and m.size <= _MAX_JSON_BYTES:
                    f = tar.extractfile(m)
                    try:
                        meta = json.loads(f.read()) if f is not None else None
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        meta = None
                    if isinstance(meta, dict):
                        metas[key] = meta
        for key, (offset, size, ext) in images.items():
            self._where.setdefault(pair_id(metas.get(key, {}), d.name, key), (shard, offset, size, ext))
