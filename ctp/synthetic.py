"""A synthetic image-caption stream with compositional structure, for CPU tests and benchmarks.

Each image is one shape (the class) with a colour, a size, a position and a background, drawn
with small random jitter; its caption names the shape and some of the other attributes in one of
several phrasings. ``make_stream`` writes a class- or instance-incremental sequence of chunks
plus classification and retrieval eval sets in the on-disk formats of ``ctp.data``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctp.data import Sample, write_classification_set, write_retrieval_set, write_shards
from ctp.images import encode_image

logger = logging.getLogger(__name__)

# Polygons in unit coordinates (x right, y down, shape within [-1, 1]^2). A shape is a list of
# (polygon, additive); non-additive parts are cut out of the parts drawn before them.
Part = tuple[list[tuple[float, float]], bool]


def _ngon(n: int, *, radius: float = 1.0, start: float = -math.pi / 2, cx: float = 0.0, cy: float = 0.0):
    return [
        (
            cx + radius * math.cos(start + 2 * math.pi * i / n),
            cy + radius * math.sin(start + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _ellipse(rx: float, ry: float, *, cx: float = 0.0, cy: float = 0.0, n: int = 48):
    return [
        (cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n)
    ]


def _rect(x0: float, y0: float, x1: float, y1: float):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _rotated(points, angle: float):
    c, s = math.cos(angle), math.sin(angle)
    return [(c * x - s * y, s * x + c * y) for x, y in points]


def _star(points: int, inner: float):
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * i / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _semicircle():
    # Flat side down, centred vertically: the arc spans y in [-0.6, 0.4].
    pts = [(math.cos(a), 0.4 + math.sin(a)) for a in np.linspace(math.pi, 2 * math.pi, 33)]
    return pts


# Order matters: the first ``num_classes`` are used, so the most distinct silhouettes come first
# (hexagon and pentagon are hard to tell from a circle at 32x32 when small, hence last).
SHAPES: dict[str, list[Part]] = {
    "circle": [(_ellipse(1.0, 1.0), True)],
    "square": [(_rect(-0.85, -0.85, 0.85, 0.85), True)],
    "triangle": [([(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)], True)],
    "star": [(_star(5, 0.4), True)],
    "cross": [
        (_rotated(_rect(-1.15, -0.24, 1.15, 0.24), math.pi / 4), True),
        (_rotated(_rect(-1.15, -0.24, 1.15, 0.24), -math.pi / 4), True),
    ],
    "plus": [(_rect(-1.0, -0.3, 1.0, 0.3), True), (_rect(-0.3, -1.0, 0.3, 1.0), True)],
    "ring": [(_ellipse(1.0, 1.0), True), (_ellipse(0.55, 0.55), False)],
    "diamond": [([(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)], True)],
    "heart": [
        (_ellipse(0.52, 0.52, cx=-0.46, cy=-0.38), True),
        (_ellipse(0.52, 0.52, cx=0.46, cy=-0.38), True),
        ([(-0.96, -0.22), (0.96, -0.22), (0.0, 0.95)], True),
    ],
    "arrow": [(_rect(-1.0, -0.22, 0.05, 0.22), True), ([(0.0, -0.75), (1.0, 0.0), (0.0, 0.75)], True)],
    "crescent": [(_ellipse(1.0, 1.0), True), (_ellipse(0.82, 0.82, cx=0.5, cy=-0.1), False)],
    "hourglass": [
        ([(-0.85, -1.0), (0.85, -1.0), (0.12, 0.0), (0.85, 1.0), (-0.85, 1.0), (-0.12, 0.0)], True)
    ],
    "semicircle": [(_semicircle(), True)],
    "frame": [(_rect(-0.9, -0.9, 0.9, 0.9), True), (_rect(-0.5, -0.5, 0.5, 0.5), False)],
    "chevron": [([(-1.0, 0.2), (0.0, -0.8), (1.0, 0.2), (1.0, 0.8), (0.0, -0.2), (-1.0, 0.8)], True)],
    "bar": [(_rect(-1.0, -0.24, 1.0, 0.24), True)],
    "ellipse": [(_ellipse(1.0, 0.55), True)],
    "trapezoid": [([(-1.0, 0.6), (1.0, 0.6), (0.45, -0.6), (-0.45, -0.6)], True)],
    "hexagon": [(_ngon(6, start=0.0), True)],
    "pentagon": [(_ngon(5), True)],
}

# Saturated colours, all visible on every background below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 80, 235),
    "yellow": (245, 215, 0),
    "orange": (250, 130, 0),
    "purple": (150, 40, 210),
    "pink": (255, 110, 190),
    "cyan": (0, 205, 215),
}
SIZES: dict[str, float] = {"small": 0.2, "large": 0.34}  # radius as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {  # unit direction from the image centre
    "center": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "top": (0.0, -1.0),
    "bottom": (0.0, 1.0),
}
BACKGROUNDS = ("black", "white", "noisy", "striped")

_POSITION_PHRASE = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_POSITION_SHORT = {
    "center": "center",
    "left": "left side",
    "right": "right side",
    "top": "top",
    "bottom": "bottom",
}

# Caption phrasings; fields: a (article for the next word), size, color, shape, pos, pos_short, bg.
CAPTION_TEMPLATES = (
    "{a} {size} {color} {shape} {pos} over a {bg} background",
    "{color} {shape}, {size}, {pos_short}",
    "there is {a} {size} {color} {shape} {pos}",
    "a picture of {a} {color} {shape} {pos} on a {bg} background",
    "{size} {color} {shape}, {pos_short}, {bg} background",
    "{a} {color} {shape} drawn on a {bg} background",
    "the {shape} is {color} and {size}",
    "{a} {shape}",
    "{a} {color} {shape}",
    "a picture of {a} {shape}",
    "there is {a} {shape} here",
)
# How often each phrasing is used. Like real alt-text, most captions are about the object and
# say little else: with a few classes per chunk and richer nuisance attributes, captions that all
# spell out colour, position and background let a small model match pairs without ever
# learning the shapes (measured: zero-shot accuracy near chance after 20 epochs).
CAPTION_WEIGHTS = (1, 1, 1, 1, 1, 1, 1, 3, 3, 2, 1)
_CAPTION_P = np.array(CAPTION_WEIGHTS, dtype=float) / sum(CAPTION_WEIGHTS)
# Phrasings that name every attribute: retrieval captions should single out their image.
_FULL_TEMPLATES = (0, 3, 4)

# No "a {c}": it would read "a arrow", "a ellipse", unlike any training caption.
CLASSIFICATION_TEMPLATES = (
    "the {c}.",
    "a photo of the {c}.",
    "a picture of the {c}.",
    "the {c} shape.",
    "a drawing of the {c}.",
    "a small {c}.",
    "a large {c}.",
    "a colored {c} on a background.",
)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges at 32x32
_MAX_RETRIEVAL_IMAGES = 500
_FORMAT_VERSION = 3  # bump when drawing or layout changes, so cached streams are regenerated


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = 16  # shapes used, the first num_classes of SHAPES (at most len(SHAPES))
    image_size: int = 32  # side of the square RGB images, pixels
    train_per_class: int = 150  # training pairs per class over the whole stream
    eval_per_class: int = 40  # classification eval images per class
    num_chunks: int = 4  # chunks in the stream
    split: str = "class-incremental"  # "class-incremental": disjoint class groups per chunk;
    # "instance-incremental": every chunk holds every class
    seed: int = 0  # drives class order, attributes and jitter
    # A background kind (of BACKGROUNDS) that only the eval images have: training pairs draw from
    # the others, eval images are all drawn on it. A style shift between training and evaluation,
    # as the emoji streams evaluate on a vendor's art never trained on. None: every set draws from all.
    eval_background: str | None = None

    def __post_init__(self) -> None:
        if self.split not in ("class-incremental", "instance-incremental"):
            raise ValueError(
                f"split must be 'class-incremental' or 'instance-incremental', got {self.split!r}"
            )
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {self.num_classes}")
        if self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {self.num_chunks}")
        if self.split == "class-incremental" and self.num_chunks > self.num_classes:
            raise ValueError(f"class-incremental needs num_chunks <= num_classes, got {self.num_chunks}")
        if self.split == "instance-incremental" and self.train_per_class < self.num_chunks:
            raise ValueError("instance-incremental needs train_per_class >= num_chunks")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.eval_per_class < 1 or self.train_per_class < 1:
            raise ValueError("train_per_class and eval_per_class must be >= 1")
        if self.eval_background is not None and self.eval_background not in BACKGROUNDS:
            raise ValueError(
                f"eval_background must be one of {BACKGROUNDS} or None, got {self.eval_background!r}"
            )

    def train_backgrounds(self) -> tuple[str, ...]:
        return tuple(b for b in BACKGROUNDS if b != self.eval_background)

    def eval_backgrounds(self) -> tuple[str, ...]:
        return BACKGROUNDS if self.eval_background is None else (self.eval_background,)

    def record(self) -> dict:
        """The config as a stream's manifest records it. A field added later is recorded only when
        it differs from its default, so streams built before it still count as built."""
        out = asdict(self)
        if out["eval_background"] is None:
            del out["eval_background"]
        return out


PRESETS: dict[str, SyntheticConfig] = {
    "class-incremental": SyntheticConfig(),
    "instance-incremental": SyntheticConfig(split="instance-incremental"),
    # 8 classes, 2 new ones a chunk: the benchmark stream that trains on a 2-core CPU in minutes
    "class-incremental-small": SyntheticConfig(num_classes=8, train_per_class=200, eval_per_class=50),
    # the same world and size with every class in every chunk (the validation stream of knobs
    # that should tell new classes from new instances of known ones)
    "instance-incremental-small": SyntheticConfig(
        num_classes=8, train_per_class=200, eval_per_class=50, split="instance-incremental"
    ),
    # 16 classes over 8 chunks, 60 pairs a class (960 pairs): long enough that a fixed memory
    # falls to a small share of the stream, small enough for many seeds on a 2-core CPU
    "class-incremental-long": SyntheticConfig(
        num_classes=16, num_chunks=8, train_per_class=60, eval_per_class=20
    ),
    "instance-incremental-long": SyntheticConfig(
        num_classes=16, num_chunks=8, train_per_class=60, eval_per_class=20, split="instance-incremental"
    ),
    # instance-incremental-small with a style shift: trained on black, white and noisy backgrounds,
    # evaluated on striped ones only (a diagnostic: do the strategies rank on it as on the emoji
    # streams, which evaluate on art never trained on, or as on the unshifted twin?)
    "instance-incremental-small-shift": SyntheticConfig(
        num_classes=8,
        train_per_class=200,
        eval_per_class=50,
        split="instance-incremental",
        eval_background="striped",
    ),
    "tiny": SyntheticConfig(num_classes=4, num_chunks=2, train_per_class=40, eval_per_class=10),
}


@dataclass
class StreamPaths:
    chunks: list[Path]  # chunk directories in training order
    classification: Path  # classification eval set (all classes)
    retrieval: Path  # retrieval eval set
    class_order: list[list[str]]  # classes first seen in each chunk (empty lists possible)

    def dirs(self) -> list[Path]:
        """Every directory the stream consists of (all must exist for a cached stream to count)."""
        return [*self.chunks, self.classification, self.retrieval]


def cached_stream(
    out: Path, wanted: dict, load: Callable[[Path, dict], StreamPaths], kind: str
) -> StreamPaths | None:
    """The stream under ``out`` if its ``stream.json`` records ``wanted`` and every directory is
    there; else None, with a stale manifest removed (the caller regenerates the stream)."""
    manifest = out / "stream.json"
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        record = {}
    if {k: record.get(k) for k in wanted} == wanted:
        try:
            paths = load(out, record)
        except (KeyError, TypeError):
            paths = None
        if paths is not None and all(p.is_dir() for p in paths.dirs()):
            logger.info("reusing %s stream in %s", kind, out)
            return paths
    manifest.unlink()
    return None


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 background."""
    if kind == "black":
        return np.full((size, size, 3), rng.integers(0, 30), dtype=np.uint8)
    if kind == "white":
        return np.full((size, size, 3), rng.integers(225, 256), dtype=np.uint8)
    if kind == "noisy":
        grey = rng.normal(125.0, 38.0, size=(size, size, 1))
        return np.clip(np.repeat(grey, 3, axis=2), 0, 255).astype(np.uint8)
    if kind == "striped":
        period = int(rng.integers(4, 9))
        yy, xx = np.mgrid[0:size, 0:size]
        coord = (xx, yy, xx + yy, xx - yy)[int(rng.integers(0, 4))]  # vertical/horizontal/diagonal
        phase = int(rng.integers(0, period))
        dark, light = int(rng.integers(50, 90)), int(rng.integers(150, 200))
        stripes = np.where(((coord + phase) % period) < period // 2, dark, light).astype(np.uint8)
        return np.repeat(stripes[:, :, None], 3, axis=2)
    raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")


def shape_mask(
    shape: str,
    *,
    image_size: int = 32,
    center: tuple[float, float] = (0.5, 0.5),
    radius: float = 0.3,
    angle: float = 0.0,
) -> Image.Image:
    """Anti-aliased coverage mask (mode "L") of ``shape``; center and radius are fractions of the side."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    big = image_size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = center[0] * big, center[1] * big, radius * big
    for points, additive in SHAPES[shape]:
        pts = [(cx + r * x, cy + r * y) for x, y in _rotated(points, angle)]
        draw.polygon(pts, fill=255 if additive else 0)
    return mask.reduce(_SUPERSAMPLE)


def draw_image(
    shape: str,
    *,
    color: str,
    size: str,
    position: str,
    background: str,
    rng: np.random.Generator,
    image_size: int = 32,
) -> Image.Image:
    """One RGB image of the named attributes, with jitter in place, scale, angle, colour and background."""
    base_radius = SIZES[size]
    radius = base_radius * float(rng.uniform(0.9, 1.1))
    # Off-centre positions move the shape about as far as it can go while staying inside the
    # image, but at least 0.12 of the side so that large shapes still show where they are.
    offset = min(0.24, max(0.12, 0.5 - radius - 0.02))
    dx, dy = POSITIONS[position]
    cx = 0.5 + dx * offset + float(rng.uniform(-0.03, 0.03))
    cy = 0.5 + dy * offset + float(rng.uniform(-0.03, 0.03))
    angle = float(rng.uniform(-0.15, 0.15))  # about +-9 degrees: orientation stays recognisable
    mask = shape_mask(shape, image_size=image_size, center=(cx, cy), radius=radius, angle=angle)
    rgb = np.clip(np.array(COLORS[color], dtype=np.int16) + rng.integers(-20, 21, size=3), 0, 255).astype(
        np.uint8
    )
    fg = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in rgb))
    bg = Image.fromarray(_background(background, image_size, rng))
    return Image.composite(fg, bg, mask)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(attrs: dict[str, str], template: int) -> str:
    """Caption ``attrs`` (shape, color, size, position, background) with ``CAPTION_TEMPLATES[template]``."""
    fmt = CAPTION_TEMPLATES[template]
    first = fmt.split("{a}", 1)[1].split()[0] if "{a}" in fmt else "{shape}"
    fields = {
        "shape": attrs["shape"],
        "color": attrs["color"],
        "size": attrs["size"],
        "pos": _POSITION_PHRASE[attrs["position"]],
        "pos_short": _POSITION_SHORT[attrs["position"]],
        "bg": attrs["background"],
    }
    fields["a"] = _article(first.format(**fields))
    return fmt.format(**fields)


def _sample_attrs(
    shape: str, rng: np.random.Generator, backgrounds: tuple[str, ...] = BACKGROUNDS
) -> dict[str, str]:
    return {
        "shape": shape,
        "color": list(COLORS)[int(rng.integers(len(COLORS)))],
        "size": list(SIZES)[int(rng.integers(len(SIZES)))],
        "position": list(POSITIONS)[int(rng.integers(len(POSITIONS)))],
        "background": backgrounds[int(rng.integers(len(backgrounds)))],
    }


def generate_pairs(
    classes: list[str],
    n: int,
    rng: np.random.Generator,
    image_size: int = 32,
    *,
    key_prefix: str = "pair",
    progress: str | None = None,
    backgrounds: tuple[str, ...] = BACKGROUNDS,
) -> list[Sample]:
    """``n`` pairs per class of ``classes``, in random order; keys ``{key_prefix}-000000``, ...

    Label is the shape name; meta holds color, size, position and background. Images are PNG and
    pairwise distinct (a rare exact repeat is redrawn).
    """
    order = [c for c in classes for _ in range(n)]
    rng.shuffle(order)
    seen: set[bytes] = set()
    samples: list[Sample] = []
    from tqdm.auto import tqdm  # here, not at import: `ctp data --help` stays fast

    for i, shape in enumerate(tqdm(order, desc=progress or "synthetic pairs", disable=len(order) < 300)):
        attrs = _sample_attrs(shape, rng, backgrounds)
        while True:
            image = encode_image(draw_image(rng=rng, image_size=image_size, **_draw_kwargs(attrs)), "png")
            digest = hashlib.sha1(image).digest()
            if digest not in seen:
                seen.add(digest)
                break
        caption = make_caption(attrs, int(rng.choice(len(CAPTION_TEMPLATES), p=_CAPTION_P)))
        meta = {k: attrs[k] for k in ("color", "size", "position", "background")}
        samples.append(Sample(key=f"{key_prefix}-{i:06d}", image=image, text=caption, label=shape, meta=meta))
    return samples


def _draw_kwargs(attrs: dict[str, str]) -> dict[str, str]:
    return {k: attrs[k] for k in ("shape", "color", "size", "position", "background")}


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    # Independent streams per purpose: eval images never share draws with training images.
    return np.random.default_rng([seed, stream, index])


_TRAIN_STREAM, _EVAL_STREAM, _ORDER_STREAM = 1, 2, 3


def _class_groups(config: SyntheticConfig) -> tuple[list[str], list[list[str]]]:
    classes = list(SHAPES)[: config.num_classes]
    shuffled = [classes[i] for i in _rng(config.seed, _ORDER_STREAM).permutation(len(classes))]
    if config.split == "class-incremental":
        groups = [list(g) for g in np.array_split(np.array(shuffled, dtype=object), config.num_chunks)]
    else:
        groups = [shuffled] + [[] for _ in range(config.num_chunks - 1)]
    return classes, groups


def _chunk_samples(
    config: SyntheticConfig, classes: list[str], groups: list[list[str]]
) -> list[list[Sample]]:
    if config.split == "class-incremental":
        return [
            generate_pairs(
                group,
                config.train_per_class,
                _rng(config.seed, _TRAIN_STREAM, j),
                config.image_size,
                key_prefix=f"c{j:03d}",
                progress=f"chunk {j}",
                backgrounds=config.train_backgrounds(),
            )
            for j, group in enumerate(groups)
        ]
    rng = _rng(config.seed, _TRAIN_STREAM)
    pool = generate_pairs(
        groups[0],
        config.train_per_class,
        rng,
        config.image_size,
        key_prefix="p",
        progress="pairs",
        backgrounds=config.train_backgrounds(),
    )
    # Stratified: each class's pairs are dealt over the chunks, so every chunk holds every class.
    chunks: list[list[Sample]] = [[] for _ in range(config.num_chunks)]
    for shape in groups[0]:
        mine = [s for s in pool if s.label == shape]
        for j, part in enumerate(np.array_split(np.arange(len(mine)), config.num_chunks)):
            chunks[j].extend(mine[i] for i in part)
    out = []
    for j, chunk in enumerate(chunks):
        perm = rng.permutation(len(chunk))
        out.append([_rekey(chunk[i], f"c{j:03d}-{k:06d}") for k, i in enumerate(perm)])
    return out


def _rekey(sample: Sample, key: str) -> Sample:
    return Sample(
        key=key, image=sample.image, text=sample.text, label=sample.label, meta=sample.meta, ext=sample.ext
    )


def _write_eval(out: Path, config: SyntheticConfig, classes: list[str]) -> None:
    rng = _rng(config.seed, _EVAL_STREAM)
    pairs = generate_pairs(
        classes,
        config.eval_per_class,
        rng,
        config.image_size,
        key_prefix="e",
        progress="eval",
        backgrounds=config.eval_backgrounds(),
    )
    write_classification_set(
        out / "classification",
        classnames=classes,
        templates=list(CLASSIFICATION_TEMPLATES),
        images=[s.image for s in pairs],
        targets=[classes.index(s.label) for s in pairs],
    )
    # pairs are already in random order, so the first ones cover the classes about evenly.
    chosen = pairs[:_MAX_RETRIEVAL_IMAGES]
    captions = []
    for s in chosen:
        attrs = {"shape": s.label, **s.meta}
        count = int(rng.integers(1, 3))
        picks = rng.choice(len(_FULL_TEMPLATES), size=count, replace=False)
        captions.append([make_caption(attrs, _FULL_TEMPLATES[int(t)]) for t in picks])
    write_retrieval_set(out / "retrieval", images=[s.image for s in chosen], captions=captions)


def _stream_paths(out: Path, record: dict) -> StreamPaths:
    return StreamPaths(
        chunks=[out / c for c in record["chunks"]],
        classification=out / record["classification"],
        retrieval=out / record["retrieval"],
        class_order=[list(g) for g in record["class_order"]],
    )


def make_stream(out_dir: str | Path, config: SyntheticConfig | str = "tiny") -> StreamPaths:
    """Write the stream of ``config`` (or a PRESETS name) under ``out_dir``; reuse it if already there.

    Layout: ``chunks/chunk_000/`` ..., ``eval/classification/``, ``eval/retrieval/``, ``stream.json``.
    The same config always gives byte-identical files. ``stream.json`` is written last, so a stream
    interrupted mid-way is regenerated; regeneration deletes ``chunks/`` and ``eval/`` first.
    """
    if isinstance(config, str):
        config = PRESETS[config]
    out = Path(out_dir)
    manifest = out / "stream.json"
    wanted = {"format": _FORMAT_VERSION, "config": config.record()}
    cached = cached_stream(out, wanted, _stream_paths, "synthetic")
    if cached is not None:
        return cached

    logger.info("generating synthetic stream in %s: %s", out, config)
    for sub in ("chunks", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    classes, groups = _class_groups(config)
    chunk_dirs = []
    for j, samples in enumerate(_chunk_samples(config, classes, groups)):
        chunk_dir = out / "chunks" / f"chunk_{j:03d}"
        write_shards(samples, chunk_dir)
        chunk_dirs.append(chunk_dir)
    _write_eval(out / "eval", config, classes)

    record = {
        **wanted,
        "classnames": classes,
        "class_order": groups,
        "chunks": [str(p.relative_to(out)) for p in chunk_dirs],
        "classification": "eval/classification",
        "retrieval": "eval/retrieval",
    }
    tmp = manifest.with_name(".stream.json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return _stream_paths(out, record)
