"""Where each gallery item's image lies on disk, so the API can return it by id (dashboard thumbnails).

The retrieval index keeps ids, texts and embeddings, not image bytes. ``GalleryImages`` maps an
id to ``(shard, byte offset, size, ext)`` by reading the tar headers (and the small ``KEY.json``
members that carry ids) of the same directories the gallery is built from; a request then reads
just that member's bytes. Memory stays bounded: one small tuple per item, at most ``max_items``
(the gallery's own cap), and no image is held. Directories are scanned once, when a lookup misses
and a directory not seen before exists (chunks appear whole: ChunkStore renames them into place).

Ids follow ``ModelHolder._embed_dirs``: ``KEY.json``'s ``"id"``, else ``"{dir name}/{key}"``;
the first item with an id wins.
"""

from __future__ import annotations

import json
import logging
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path

from ctp.data import IMAGE_EXTS

logger = logging.getLogger(__name__)

MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_MAX_JSON_BYTES = 64 * 1024  # a sample's KEY.json bigger than this is not read for its id


def gallery_dirs(fixed_dirs: Iterable[Path], chunks_root: Path | None) -> list[Path]:
    """The gallery's directories, as ``ModelHolder`` scans them: fixed dirs, then chunk dirs by name."""
    dirs = [d for d in fixed_dirs if d.is_dir()]
    if chunks_root is not None and chunks_root.is_dir():
        dirs += sorted(p for p in chunks_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return dirs


class GalleryImages:
    def __init__(self, *, max_items: int, max_image_bytes: int):
        self.max_items = max_items
        self.max_image_bytes = max_image_bytes
        self._shards: list[Path] = []
        self._where: dict[str, tuple[int, int, int, str]] = {}  # id -> (shard index, offset, size, ext)
        self._scanned: set[Path] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._where)

    def read(self, item_id: str, dirs: Iterable[Path]) -> tuple[bytes, str] | None:
        """``(image bytes, media type)`` of ``item_id``, or None (unknown, gone, too big)."""
        with self._lock:
            where = self._where.get(item_id)
            if where is None:
                for d in dirs:
                    if d not in self._scanned and len(self._where) < self.max_items:
                        self._scan_dir(d)
                where = self._where.get(item_id)
            if where is None:
                return None
            shard, offset, size, ext = self._shards[where[0]], where[1], where[2], where[3]
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
        ids: dict[str, str] = {}
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
                    if isinstance(meta, dict) and "id" in meta:
                        ids[key] = str(meta["id"])
        index = len(self._shards)
        self._shards.append(shard)
        for key, (offset, size, ext) in images.items():
            if len(self._where) >= self.max_items:
                break
            self._where.setdefault(ids.get(key, f"{d.name}/{key}"), (index, offset, size, ext))
