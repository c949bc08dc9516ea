"""Data contracts on disk: chunks (WebDataset shards of pairs) and eval sets (CLIP_benchmark wds).

A chunk is a directory of ``*.tar`` shards; per sample ``KEY.{jpg,png,webp}``, ``KEY.txt`` and an
optional ``KEY.json`` (``{"label": ..., "id": ..., ...}``). A classification eval set is
``classnames.txt``, ``zeroshot_classification_templates.txt`` and ``test/*.tar`` with
``KEY.{jpg,png,webp}`` + ``KEY.cls``; a retrieval eval set is ``test/*.tar`` with an image and
``KEY.txt`` (one caption a line). Both have ``test/nshards.txt`` and ``dataset_type.txt``
(``classification`` / ``retrieval``), so CLIP_benchmark reads them as ``wds/NAME`` with
``--dataset_root DIR``; sets written before ``dataset_type.txt`` still load here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctp.atomic import fsync_dir, write_text_atomic

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One image-text pair as stored in a chunk (image kept encoded; decoded when used)."""

    key: str  # WebDataset key, unique within the chunk
    image: bytes  # encoded JPEG/PNG/WebP bytes
    text: str  # caption
    label: str | None = None  # class name, when the producer gave one
    meta: dict = field(default_factory=dict)  # rest of KEY.json (id, ...)
    ext: str = "png"  # image extension in the shard


def pair_id(meta: dict, group: str, key: str) -> str:
    """A pair's id: its ``meta["id"]`` when it has one, else ``"{group}/{key}"``, where ``group``
    names the chunk (directory) that holds it. The one id rule of the gallery and ``ctp produce``."""
    return str(meta.get("id") or f"{group}/{key}")


@dataclass
class ClassificationSet:
    classnames: list[str]  # class index -> name
    templates: list[str]  # prompt templates with "{c}"
    images: list[bytes]  # encoded images
    targets: list[int]  # class index per image
    keys: list[str]


@dataclass
class RetrievalSet:
    images: list[bytes]  # encoded images
    captions: list[list[str]]  # true captions per image (>= 1)
    keys: list[str]


# Fixed tar header fields: the same samples must give byte-identical shards (cacheable, diffable).
_TAR_MODE = 0o644
_BLOCK = 512


def _tar_header(name: str, size: int) -> bytes:
    """One tar member header: a plain ustar block (mode 644, owner 0, mtime 0) when the name
    fits in 100 ASCII bytes, else tarfile's PAX header. Built by hand because tarfile spends
    ~30 µs a member on it, most of an ingest chunk write."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not raw.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
            size,
            0,
            _TAR_MODE,
            0,
            0,
            "",
            "",
        )
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(_BLOCK)
    h[0 : len(raw)] = raw
    h[100:108] = b"%07o\0" % _TAR_MODE
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8  # checksum field counts as spaces while summing
    h[156:157] = tarfile.REGTYPE
    h[257:265] = tarfile.POSIX_MAGIC  # "ustar\0" + "00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _check_key(key: str) -> None:
    # WebDataset splits a member name at the first '.' into key and extension; a '/' would make
    # the member a path inside the tar.
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: must be non-empty without '.' or '/'")


def _natural_key(path: Path) -> list:
    # "10.tar" after "9.tar" (CLIP_benchmark shard names); zero-padded names sort the same either way.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _shard_paths(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"no such shard directory: {directory}")
    return sorted((p for p in directory.glob("*.tar") if p.is_file()), key=_natural_key)


class _ShardWriter:
    """Streams samples into tar shards; each shard becomes visible only once complete and synced.

    A reader globbing ``*.tar`` never sees a partial shard: it is written as ``.NAME.tar.tmp`` and
    renamed when full.
    """

    def __init__(self, out_dir: Path, *, shard_size: int, name: Callable[[int], str]) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.name = name
        self.paths: list[Path] = []
        self._keys: set[str] = set()
        self._file = None
        self._tmp: Path | None = None
        self._count = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; ``members`` maps extension -> bytes."""
        _check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._file is None:
            self._open()
        assert self._file is not None
        for ext in sorted(members):
            data = members[ext]
            self._file.write(_tar_header(f"{key}.{ext}", len(data)))
            self._file.write(data)
            self._file.write(bytes(-len(data) % _BLOCK))
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def close(self) -> list[Path]:
        if self._file is not None:
            self._finish()
        return self.paths

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._file = self._tmp = None

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _open(self) -> None:
        final = self.out_dir / self.name(len(self.paths))
        self._tmp = final.with_name(f".{final.name}.tmp")
        # Kept open across add() calls; _finish() or abort() closes it.
        self._file = open(self._tmp, "wb")  # noqa: SIM115
        self._count = 0

    def _finish(self) -> None:
        assert self._file is not None and self._tmp is not None
        self._file.write(bytes(2 * _BLOCK))  # end of archive
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / self.name(len(self.paths))
        os.replace(self._tmp, final)
        fsync_dir(self.out_dir)  # makes the rename itself durable
        self.paths.append(final)
        self._file = self._tmp = None
        self._count = 0


def _sample_members(sample: Sample) -> dict[str, bytes]:
    ext = sample.ext.lower()
    if ext not in IMAGE_EXTS:
        raise ValueError(f"sample {sample.key!r}: image extension {sample.ext!r} not in {IMAGE_EXTS}")
    if "label" in sample.meta:
        raise ValueError(f"sample {sample.key!r}: meta must not contain 'label' (it is Sample.label)")
    members = {ext: sample.image, "txt": sample.text.encode("utf-8")}
    if sample.label is not None or sample.meta:
        payload = dict(sample.meta)
        if sample.label is not None:
            payload["label"] = sample.label
        members["json"] = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


def write_shards(
    samples: Iterable[Sample], out_dir: str | Path, *, shard_size: int = 1000, prefix: str = "shard"
) -> list[Path]:
    """Write ``samples`` as WebDataset shards ``out_dir/{prefix}-000000.tar``, ...; return their paths.

    Each shard is written to a temp file, fsynced, renamed into place and the directory fsynced, so
    a crash leaves only complete shards. Keys must be unique and contain no '.' or '/'. Streams:
    at most one shard is open at a time. Existing shards in ``out_dir`` are overwritten by name,
    never deleted.
    """
    out = Path(out_dir)
    with _ShardWriter(out, shard_size=shard_size, name=lambda i: f"{prefix}-{i:06d}.tar") as writer:
        for sample in samples:
            writer.add(sample.key, _sample_members(sample))
        paths = writer.close()
    logger.debug("wrote %d shards to %s", len(paths), out)
    return paths


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is the directory plus the base name up to its first '.'.
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def _iter_tar_groups(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample, in order of first appearance in the shard."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if not ext:
                    continue
                fileobj = tar.extractfile(member)
                assert fileobj is not None
                group = groups.setdefault(key, {})
                if ext in group:
                    raise ValueError(f"shard {shard}: sample {key!r} has two {ext!r} members")
                group[ext] = fileobj.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"shard {shard}: unreadable tar: {exc}") from exc
    yield from groups.items()


def _image_member(shard: Path, key: str, group: dict[str, bytes]) -> tuple[str, bytes]:
    found = [ext for ext in IMAGE_EXTS if ext in group]
    if not found:
        raise ValueError(f"shard {shard}: sample {key!r} has no image (one of {IMAGE_EXTS})")
    if len(found) > 1:
        raise ValueError(f"shard {shard}: sample {key!r} has several images {found}")
    return found[0], group[found[0]]


def iter_chunk(chunk_dir: str | Path) -> Iterator[Sample]:
    """Yield the samples of a chunk: its ``*.tar`` shards in sorted order, samples in shard order."""
    for shard in _shard_paths(Path(chunk_dir)):
        for key, group in _iter_tar_groups(shard):
            ext, image = _image_member(shard, key, group)
            if "txt" not in group:
                raise ValueError(f"shard {shard}: sample {key!r} has no caption (.txt)")
            meta: dict = {}
            if "json" in group:
                try:
                    meta = json.loads(group["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"shard {shard}: sample {key!r} has invalid json: {exc}") from exc
                if not isinstance(meta, dict):
                    raise ValueError(f"shard {shard}: sample {key!r} json is not an object")
            label = meta.pop("label", None)
            try:
                text = group["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"shard {shard}: sample {key!r} caption is not utf-8: {exc}") from exc
            yield Sample(
                key=key,
                image=image,
                text=text,
                label=None if label is None else str(label),
                meta=meta,
                ext=ext,
            )


def read_chunk(chunk_dir: str | Path) -> list[Sample]:
    """All samples of a chunk, in order (see ``iter_chunk``)."""
    return list(iter_chunk(chunk_dir))


# CLIP_benchmark's wds loader reads test/{0..N-1}.tar with N from test/nshards.txt, and the set's
# kind from dataset_type.txt ("retrieval"; "classification" when the file is missing).
_EVAL_SPLIT = "test"
_CLASSNAMES = "classnames.txt"
_TEMPLATES = "zeroshot_classification_templates.txt"
_DATASET_TYPE = "dataset_type.txt"
# CLIP_benchmark's DataLoader has 4 workers by default and webdataset hands each worker whole
# shards: a worker without a shard fails ("fewer shards than workers"). So an eval set gets at
# least this many shards when it has that many samples (else pass --num_workers <= nshards).
MIN_EVAL_SHARDS = 4


def _check_line(kind: str, text: str) -> None:
    if not text.strip() or "\n" in text or "\r" in text:
        raise ValueError(f"{kind} must be a non-empty single line, got {text!r}")


def _write_eval_shards(
    out_dir: Path, items: Iterable[tuple[str, dict[str, bytes]]], *, count: int, shard_size: int, kind: str
) -> None:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shard_size = max(1, min(shard_size, count // MIN_EVAL_SHARDS))  # >= MIN_EVAL_SHARDS shards
    split_dir = out_dir / _EVAL_SPLIT
    with _ShardWriter(split_dir, shard_size=shard_size, name=lambda i: f"{i}.tar") as writer:
        for key, members in items:
            writer.add(key, members)
        paths = writer.close()
    write_text_atomic(split_dir / "nshards.txt", f"{len(paths)}\n")
    write_text_atomic(out_dir / _DATASET_TYPE, f"{kind}\n")


def _eval_key(i: int) -> str:
    return f"s{i:07d}"


def write_classification_set(
    out_dir: str | Path,
    *,
    classnames: list[str],
    templates: list[str],
    images: list[bytes],
    targets: list[int],
    ext: str = "png",
    shard_size: int = 1000,
) -> Path:
    """Write a CLIP_benchmark wds classification set; returns ``out_dir``.

    ``shard_size`` is an upper bound: sets of at least ``MIN_EVAL_SHARDS`` samples get at least
    that many shards (CLIP_benchmark's default 4 workers each need one).
    """
    out = Path(out_dir)
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if ext.lower() not in IMAGE_EXTS:
        raise ValueError(f"image extension {ext!r} not in {IMAGE_EXTS}")
    for name in classnames:
        _check_line("class name", name)
    for template in templates:
        _check_line("template", template)
        if "{c}" not in template:
            raise ValueError(f"template {template!r} has no '{{c}}'")
    for t in targets:
        if not 0 <= t < len(classnames):
            raise ValueError(f"target {t} out of range for {len(classnames)} classes")
    out.mkdir(parents=True, exist_ok=True)
    _write_eval_shards(
        out,
        (
            (_eval_key(i), {ext.lower(): img, "cls": f"{t}".encode()})
            for i, (img, t) in enumerate(zip(images, targets, strict=True))
        ),
        count=len(images),
        shard_size=shard_size,
        kind="classification",
    )
    write_text_atomic(out / _CLASSNAMES, "".join(f"{c}\n" for c in classnames))
    write_text_atomic(out / _TEMPLATES, "".join(f"{t}\n" for t in templates))
    return out


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_classification_set(directory: str | Path) -> ClassificationSet:
    """Load a classification set written by ``write_classification_set`` (or CLIP_benchmark wds)."""
    root = Path(directory)
    classnames = _read_lines(root / _CLASSNAMES)
    templates = _read_lines(root / _TEMPLATES)
    images: list[bytes] = []
    targets: list[int] = []
    keys: list[str] = []
    for shard in _shard_paths(root / _EVAL_SPLIT):
        for key, group in _iter_tar_groups(shard):
            _, image = _image_member(shard, key, group)
            if "cls" not in group:
                raise ValueError(f"shard {shard}: sample {key!r} has no class index (.cls)")
            try:
                target = int(group["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError) as exc:
                raise ValueError(f"shard {shard}: sample {key!r} has a bad .cls: {exc}") from exc
            if not 0 <= target < len(classnames):
                raise ValueError(
                    f"shard {shard}: sample {key!r} class {target} not in [0, {len(classnames)})"
                )
            images.append(image)
            targets.append(target)
            keys.append(key)
    return ClassificationSet(
        classnames=classnames, templates=templates, images=images, targets=targets, keys=keys
    )


def write_retrieval_set(
    out_dir: str | Path,
    *,
    images: list[bytes],
    captions: list[list[str]],
    ext: str = "png",
    shard_size: int = 1000,
) -> Path:
    """Write a CLIP_benchmark wds retrieval set: ``test/*.tar`` with an image and ``KEY.txt``
    (one caption a line), ``dataset_type.txt`` = ``retrieval``; shards as ``write_classification_set``."""
    out = Path(out_dir)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
    if ext.lower() not in IMAGE_EXTS:
        raise ValueError(f"image extension {ext!r} not in {IMAGE_EXTS}")
    for caps in captions:
        if not caps:
            raise ValueError("every image needs at least one caption")
        for cap in caps:
            _check_line("caption", cap)
    out.mkdir(parents=True, exist_ok=True)
    _write_eval_shards(
        out,
        (
            (_eval_key(i), {ext.lower(): img, "txt": "\n".join(caps).encode("utf-8")})
            for i, (img, caps) in enumerate(zip(images, captions, strict=True))
        ),
        count=len(images),
        shard_size=shard_size,
        kind="retrieval",
    )
    return out


def load_retrieval_set(directory: str | Path) -> RetrievalSet:
    """Load a retrieval set written by ``write_retrieval_set``."""
    root = Path(directory)
    images: list[bytes] = []
    captions: list[list[str]] = []
    keys: list[str] = []
    for shard in _shard_paths(root / _EVAL_SPLIT):
        for key, group in _iter_tar_groups(shard):
            _, image = _image_member(shard, key, group)
            if "txt" not in group:
                raise ValueError(f"shard {shard}: sample {key!r} has no captions (.txt)")
            caps = [c.strip() for c in group["txt"].decode("utf-8").splitlines() if c.strip()]
            if not caps:
                raise ValueError(f"shard {shard}: sample {key!r} has an empty caption file")
            images.append(image)
            captions.append(caps)
            keys.append(key)
    return RetrievalSet(images=images, captions=captions, keys=keys)
