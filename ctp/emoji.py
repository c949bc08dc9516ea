"""A real-image continual stream from the emoji artwork that ships in npm packages.

Source, fetched at run time with ``npm pack`` into a cache outside the repository and never
committed: ``emoji-datasource-{apple,google,twitter,facebook}@16.0.0`` (``package/emoji.json``
and the 64 px PNGs under ``package/img/<vendor>/64/``) and ``emojilib@4.0.3``
(``package/dist/emoji-en-US.json``: emoji -> keywords). The packages' code and data are MIT, but
the images keep their vendors' licences, as the emoji-datasource README states: Apple images ©
Apple Inc., not licensed for commercial use; Google (Noto) images Apache 2.0; Twitter (Twemoji)
images CC-BY 4.0; Facebook images © Facebook, Inc., no clear licensing. The built stream holds
those images: keep it for local experiments, never commit or redistribute it.

Classes are the emoji subcategories written as words ("animal-mammal" -> "animal mammal").
Only base emoji are used: skin-tone variations are left out, and so is the "Component"
category (bare skin tones and hair styles). Training pairs show the art of ``train_vendors``;
classification and retrieval eval sets show the same emoji as drawn by ``eval_vendor``, whose
art never appears in a chunk. Captions come from the emoji's name and its emojilib keywords and
never name the vendor. ``make_emoji_stream`` writes chunks and eval sets in the on-disk formats
of ``ctp.data`` with the caching rules of ``ctp.synthetic.make_stream``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ctp.data import Sample, write_classification_set, write_retrieval_set, write_shards
from ctp.images import encode_image
from ctp.synthetic import StreamPaths, cached_stream

logger = logging.getLogger(__name__)

VENDORS = ("apple", "google", "twitter", "facebook")
DATASOURCE_VERSION = "16.0.0"
EMOJILIB_VERSION = "4.0.3"
_SOURCE_SIZE = 64  # the img/<vendor>/64/ PNGs
_EMOJI_JSON = "package/emoji.json"
_EMOJILIB_JSON = "package/dist/emoji-en-US.json"
_DROPPED_CATEGORIES = ("Component",)

# Subcategory names whose dashes-to-spaces reading is not plain English.
_CLASSNAME_OVERRIDES = {
    "alphanum": "letters and numbers",
    "av-symbol": "audio video symbol",
    "hand-prop": "hand holding something",
    "face-neutral-skeptical": "face neutral or skeptical",
    "other-object": "other object",
    "other-symbol": "other symbol",
}

# Training caption phrasings; fields: name, a (article for name), keywords, sub, a_sub. Every
# phrasing names the emoji's group: zero-shot classification asks for the group by name, and with
# the group in one phrasing of seven (format 1) joint training from scratch stayed near chance.
# The emoji's own name and keywords keep the captions varied.
CAPTION_TEMPLATES = (
    "{name}, {a_sub} {sub} emoji",
    "an emoji of {a} {name}, from the {sub} group",
    "{a} {name} emoji ({sub})",
    "{sub}: {name}, {keywords}",
    "{a_sub} {sub} emoji: {name}",
    "an emoji of {a} {name}, {keywords}, {sub}",
    "{a} {name} icon, {sub}",
)
_KEYWORD_TEMPLATES = frozenset(i for i, t in enumerate(CAPTION_TEMPLATES) if "{keywords}" in t)

# Few templates: every prompt is re-encoded after each chunk, and with ~100 classes the text
# side is a good part of an evaluation on a 2-core CPU. They read like the training captions
# ("..., a clothing emoji", "... from the clothing group"), as CLIP's "a photo of a {c}." reads
# like alt text.
CLASSIFICATION_TEMPLATES = (
    "a {c} emoji.",
    "an emoji from the {c} group.",
    "{c}.",
)

_FORMAT_VERSION = 3  # bump when images, captions or layout change, so cached streams are regenerated


@dataclass(frozen=True)
class EmojiConfig:
    split: str = "class-incremental"  # "class-incremental": one group of categories per chunk;
    # "instance-incremental": as many chunks, each mixing all categories
    train_vendors: tuple[str, ...] = ("apple", "google", "twitter")  # art in the chunks
    eval_vendor: str = "facebook"  # art of the eval sets, never in a chunk
    categories_per_chunk: int = 1  # class-incremental: top-level categories per chunk
    max_per_subcategory: int = 0  # seeded subsample of emoji per subcategory; 0 = all
    top_subcategories: int = 0  # keep only the N subcategories with the most emoji; 0 = all
    # leave out the N largest subcategories first (then top_subcategories of the rest): streams
    # of other classes than the top ones, e.g. a validation stream beside a test stream
    skip_subcategories: int = 0
    # what a class-incremental chunk is made of: whole top-level "category" groups, or
    # "subcategory" groups (one class each), ``categories_per_chunk`` of them a chunk
    chunk_by: str = "category"
    holdout_categories: tuple[str, ...] = ()  # never in the stream; written as the base set
    image_size: int = 64  # side of the square RGB images, pixels
    seed: int = 0  # drives selection, category order, captions and chunk assignment
    datasource_version: str = DATASOURCE_VERSION  # emoji-datasource-<vendor> npm version
    emojilib_version: str = EMOJILIB_VERSION  # emojilib npm version

    def __post_init__(self) -> None:
        # Lists (from JSON or argparse) become tuples: the config stays hashable and comparable.
        object.__setattr__(self, "train_vendors", tuple(self.train_vendors))
        object.__setattr__(self, "holdout_categories", tuple(self.holdout_categories))
        if self.split not in ("class-incremental", "instance-incremental"):
            raise ValueError(
                f"split must be 'class-incremental' or 'instance-incremental', got {self.split!r}"
            )
        for v in (*self.train_vendors, self.eval_vendor):
            if v not in VENDORS:
                raise ValueError(f"unknown vendor {v!r}; expected one of {VENDORS}")
        if not self.train_vendors:
            raise ValueError("train_vendors must name at least one vendor")
        if len(set(self.train_vendors)) != len(self.train_vendors):
            raise ValueError(f"train_vendors has repeats: {self.train_vendors}")
        if self.eval_vendor in self.train_vendors:
            raise ValueError(f"eval_vendor {self.eval_vendor!r} must not be a training vendor")
        if self.categories_per_chunk < 1:
            raise ValueError(f"categories_per_chunk must be >= 1, got {self.categories_per_chunk}")
        if self.chunk_by not in ("category", "subcategory"):
            raise ValueError(f"chunk_by must be 'category' or 'subcategory', got {self.chunk_by!r}")
        if self.top_subcategories < 0:
            raise ValueError(f"top_subcategories must be >= 0 (0 = all), got {self.top_subcategories}")
        if self.skip_subcategories < 0:
            raise ValueError(f"skip_subcategories must be >= 0, got {self.skip_subcategories}")
        if self.max_per_subcategory < 0:
            raise ValueError(f"max_per_subcategory must be >= 0 (0 = all), got {self.max_per_subcategory}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")

    @property
    def vendors(self) -> tuple[str, ...]:
        return (*self.train_vendors, self.eval_vendor)


PRESETS: dict[str, EmojiConfig] = {
    # all base emoji, 3 training vendors, one category a chunk (9 chunks)
    "emoji-class-incremental": EmojiConfig(),
    "emoji-instance-incremental": EmojiConfig(split="instance-incremental"),
    # benchmark-sized for a 2-core CPU: <= 6 emoji per subcategory, 2 training vendors (1096 pairs;
    # 3 epochs of ctp-rn-tiny-32 over the 9 chunks train in about a minute)
    "emoji-ci-small": EmojiConfig(train_vendors=("apple", "google"), max_per_subcategory=6),
    "emoji-ii-small": EmojiConfig(
        split="instance-incremental", train_vendors=("apple", "google"), max_per_subcategory=6
    ),
    # The CPU benchmark's real-image stream: the 10 largest subcategories (<= 50 emoji each), two
    # new classes a chunk over 5 chunks, apple + google + twitter art (about 1,300 pairs, ~130 a
    # class: enough for the tiny model to learn from scratch on a CPU), eval on facebook art.
    "emoji-ci-10": EmojiConfig(
        max_per_subcategory=50, top_subcategories=10, chunk_by="subcategory", categories_per_chunk=2
    ),
    # its instance-incremental twin: the same 10 classes and art, as many chunks (5), each mixing
    # all 10 classes
    "emoji-ii-10": EmojiConfig(
        split="instance-incremental",
        max_per_subcategory=50,
        top_subcategories=10,
        chunk_by="subcategory",
        categories_per_chunk=2,
    ),
    # the same stream after a base model pretrained on the next 6 largest subcategories
    "emoji-ci-10-warm": EmojiConfig(
        max_per_subcategory=50,
        top_subcategories=16,
        chunk_by="subcategory",
        categories_per_chunk=2,
        holdout_categories=(
            "food-prepared",
            "geometric",
            "person-fantasy",
            "time",
            "person-gesture",
            "person",
        ),
    ),
    # The continual benchmark's longer real-image stream: the 16 largest subcategories (<= 30 emoji each),
    # two new classes a chunk over 8 chunks, apple + google art (about 950 pairs), eval on facebook
    # art. A 98-way stream of a few pairs per class leaves a model trained from scratch on a CPU
    # near chance; 16 classes of 60 pairs each is learnable in minutes and keeps the stream long.
    "emoji-ci-16": EmojiConfig(
        train_vendors=("apple", "google"),
        max_per_subcategory=30,
        top_subcategories=16,
        chunk_by="subcategory",
        categories_per_chunk=2,
    ),
    "emoji-ii-16": EmojiConfig(
        split="instance-incremental",
        train_vendors=("apple", "google"),
        max_per_subcategory=30,
        top_subcategories=16,
        chunk_by="subcategory",
        categories_per_chunk=2,
    ),
    # warm start: the next 8 largest subcategories are held back as the base set (pretraining a
    # base model on them), the 16 of emoji-ci-16 are the stream
    "emoji-ci-16-warm": EmojiConfig(
        train_vendors=("apple", "google"),
        max_per_subcategory=30,
        top_subcategories=24,
        chunk_by="subcategory",
        categories_per_chunk=2,
        holdout_categories=(
            "place-building",
            "sport",
            "face-concerned",
            "heart",
            "tool",
            "household",
            "av-symbol",
            "game",
        ),
    ),
    # The warm-start VALIDATION stream (knobs are chosen here, never on emoji-ci-16-warm): the same
    # shape as emoji-ci-16-warm on other classes, the subcategories ranked 25-48 by size (16-23
    # emoji each; the test streams use ranks 1-24), the 8 smallest of them held back as the base
    # set. These classes are smaller, so three vendors' art: about 55 pairs a class, as the test
    # stream's 60 (with two, 37 a class, every strategy ended at chance at 1 % memory on seed 100).
    # About 880 stream pairs, 324 base pairs.
    "emoji-ci-16-warm-val": EmojiConfig(
        train_vendors=("apple", "google", "twitter"),
        max_per_subcategory=30,
        skip_subcategories=24,
        top_subcategories=24,
        chunk_by="subcategory",
        categories_per_chunk=2,
        holdout_categories=(
            "face-smiling",
            "face-neutral-skeptical",
            "food-sweet",
            "computer",
            "emotion",
            "transport-air",
            "mail",
            "transport-sign",
        ),
    ),
    # The instance-incremental VALIDATION stream on real images (knobs for streams of known
    # classes are chosen here, never on emoji-ii-10): emoji-ii-10's shape on the subcategories
    # ranked 25-34 by size (16-23 emoji each; the test streams use ranks 1-24), three vendors' art
    # as emoji-ci-16-warm-val (about 60 pairs a class, 5 chunks each mixing all 10 classes).
    "emoji-ii-10-val": EmojiConfig(
        split="instance-incremental",
        train_vendors=("apple", "google", "twitter"),
        max_per_subcategory=30,
        skip_subcategories=24,
        top_subcategories=10,
        chunk_by="subcategory",
        categories_per_chunk=2,
    ),
    # as emoji-ci-small, with two categories held out as a base set for a warm-start model
    "emoji-ci-small-base": EmojiConfig(
        train_vendors=("apple", "google"),
        max_per_subcategory=6,
        holdout_categories=("Animals & Nature", "Food & Drink"),
    ),
}


@dataclass
class EmojiStreamPaths(StreamPaths):
    category_order: list[list[str]] = field(default_factory=list)  # categories of each chunk
    base_chunks: list[Path] = field(default_factory=list)  # pairs of holdout_categories (empty: none)
    base_classification: Path | None = None  # their classes, eval-vendor art

    def dirs(self) -> list[Path]:
        base = [self.base_classification] if self.base_classification else []
        return [*super().dirs(), *self.base_chunks, *base]

    counts: dict = field(default_factory=dict)  # as in stream.json


# --- source packages -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$CTP_CACHE/npm``, else ``~/.cache/ctp/npm``: outside the repository."""
    return Path(os.environ.get("CTP_CACHE", Path.home() / ".cache" / "ctp")) / "npm"


def _tarball_name(package: str, version: str) -> str:
    # npm pack's file name: scope dropped into the name, "@scope/pkg" -> "scope-pkg-VERSION.tgz"
    return f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_tarball(package: str, version: str, cache_dir: str | Path | None = None) -> Path:
    """The cached ``npm pack`` tarball of ``package@version``, fetching it on first use.

    Fetches into a temp directory inside the cache and renames into place, so an interrupted
    fetch leaves no partial tarball. Raises SystemExit with a message when npm is missing or fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / _tarball_name(package, version)
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            f"npm is needed to fetch {package}@{version} (not in {cache}); install Node.js/npm, "
            f"or put {path.name} there yourself"
        )
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s@%s into %s", package, version, cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", f"{package}@{version}", "--silent", "--pack-destination", tmp],
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SystemExit(f"npm pack {package}@{version} failed: {exc}") from exc
        got = Path(tmp) / path.name
        if proc.returncode != 0 or not got.is_file():
            detail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise SystemExit(f"npm pack {package}@{version} failed (exit {proc.returncode}): {detail}")
        os.replace(got, path)
    return path


def datasource_package(vendor: str) -> str:
    return f"emoji-datasource-{vendor}"


@dataclass(frozen=True)
class Emoji:
    image: str  # file name under img/<vendor>/64/, e.g. "1f600.png"
    char: str  # the emoji itself
    name: str  # lower-case name, e.g. "grinning face"
    category: str  # top-level category, e.g. "Smileys & Emotion"
    subcategory: str  # raw subcategory, e.g. "face-smiling"
    classname: str  # subcategory as words, e.g. "face smiling"
    keywords: tuple[str, ...]  # emojilib keywords (cleaned, without the name)
    sort_order: int

    @property
    def code(self) -> str:
        return self.image.rsplit(".", 1)[0]


def subcategory_words(subcategory: str) -> str:
    """ "animal-mammal" -> "animal mammal", "arts & crafts" -> "arts and crafts", "alphanum" -> ..."""
    if subcategory in _CLASSNAME_OVERRIDES:
        return _CLASSNAME_OVERRIDES[subcategory]
    words = subcategory.replace("&", " and ").replace("-", " ").replace("_", " ")
    return " ".join(words.lower().split())


def _clean_text(text: str) -> str:
    text = text.replace("\u00a0", " ").replace("_", " ").replace("\u2019", "'")
    return " ".join(text.lower().split())


def _clean_keywords(raw: list[str], name: str) -> tuple[str, ...]:
    out: list[str] = []
    for kw in raw:
        kw = _clean_text(str(kw))
        # emoticons (":D", "^^") and the name itself say nothing new
        if not re.search(r"[a-z]", kw) or kw == name or kw in out:
            continue
        out.append(kw)
    return tuple(out)


def _char(unified: str) -> str:
    return "".join(chr(int(cp, 16)) for cp in unified.split("-"))


def parse_catalog(
    entries: list[dict], emojilib: dict[str, list[str]], vendors: tuple[str, ...]
) -> list[Emoji]:
    """Base emoji of ``emoji.json`` ``entries`` that have art for every one of ``vendors``.

    Skin-tone variations (``skin_variations``) are not read and the "Component" category is
    dropped. Keywords are emojilib's for the fully qualified or the non-qualified character.
    Sorted by ``sort_order``.
    """
    out = []
    for e in entries:
        if e.get("category") in _DROPPED_CATEGORIES or not e.get("category") or not e.get("subcategory"):
            continue
        if not e.get("image") or not e.get("name"):
            continue
        if not all(e.get(f"has_img_{v}") for v in vendors):
            continue
        char = _char(e["unified"])
        raw = emojilib.get(char)
        if raw is None and e.get("non_qualified"):
            raw = emojilib.get(_char(e["non_qualified"]))
        name = _clean_text(e["name"])
        out.append(
            Emoji(
                image=e["image"],
                char=char,
                name=name,
                category=e["category"],
                subcategory=e["subcategory"],
                classname=subcategory_words(e["subcategory"]),
                keywords=_clean_keywords(list(raw or []), name),
                sort_order=int(e.get("sort_order", 0)),
            )
        )
    out.sort(key=lambda em: (em.sort_order, em.image))
    owners: dict[str, str] = {}
    for em in out:  # two subcategories reading the same would merge two classes
        if owners.setdefault(em.classname, em.subcategory) != em.subcategory:
            raise ValueError(
                f"subcategories {owners[em.classname]!r} and {em.subcategory!r} both read {em.classname!r}"
            )
    return out


def _read_member(tgz: Path, name: str) -> bytes:
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            f = tar.extractfile(name)
            if f is None:
                raise KeyError(name)
            return f.read()
    except (KeyError, tarfile.TarError, OSError, EOFError) as exc:
        raise SystemExit(f"{tgz}: cannot read {name}: {exc}") from exc


def render(png: bytes, image_size: int = _SOURCE_SIZE) -> bytes:
    """RGBA art composited onto white, resized to ``image_size`` if needed, as RGB PNG bytes."""
    with Image.open(io.BytesIO(png)) as img:
        rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return encode_image(rgb, "png")


def read_vendor_images(tgz: Path, vendor: str, images: set[str], image_size: int) -> dict[str, bytes]:
    """``render``ed art of ``vendor`` for the file names ``images``, read in one pass over ``tgz``."""
    prefix = f"package/img/{vendor}/{_SOURCE_SIZE}/"
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or not member.name.startswith(prefix):
                    continue
                base = member.name[len(prefix) :]
                if base in images and base not in out:
                    f = tar.extractfile(member)
                    assert f is not None
                    out[base] = render(f.read(), image_size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SystemExit(f"{tgz}: unreadable tarball: {exc}") from exc
    missing = sorted(images - set(out))
    if missing:
        raise SystemExit(f"{tgz}: no {prefix} art for {len(missing)} emoji, e.g. {missing[:5]}")
    return out


# --- stream ----------------------------------------------------------------------------------


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


_SELECT_STREAM, _ORDER_STREAM, _CAPTION_STREAM, _TRAIN_STREAM, _BASE_STREAM = 1, 2, 3, 4, 5


def _article(word: str) -> str:
    return "an" if word[:1] in tuple("aeiou") else "a"


def make_caption(emoji: Emoji, rng: np.random.Generator) -> str:
    """One training caption of ``emoji`` in a phrasing (and with keywords) drawn from ``rng``."""
    choices = [i for i in range(len(CAPTION_TEMPLATES)) if emoji.keywords or i not in _KEYWORD_TEMPLATES]
    template = CAPTION_TEMPLATES[choices[int(rng.integers(len(choices)))]]
    keywords = ""
    if emoji.keywords:
        count = min(len(emoji.keywords), int(rng.integers(1, 4)))
        picks = sorted(rng.choice(len(emoji.keywords), size=count, replace=False))
        keywords = ", ".join(emoji.keywords[int(i)] for i in picks)
    return template.format(
        name=emoji.name,
        a=_article(emoji.name),
        keywords=keywords,
        sub=emoji.classname,
        a_sub=_article(emoji.classname),
    )


def select_emoji(catalog: list[Emoji], config: EmojiConfig) -> list[Emoji]:
    """The ``top_subcategories`` largest subcategories after the ``skip_subcategories`` largest
    (ties: catalog order), then at most ``max_per_subcategory`` emoji of each (seeded), in
    catalog order."""
    if config.top_subcategories or config.skip_subcategories:
        sizes: dict[str, int] = {}
        for em in catalog:
            sizes[em.subcategory] = sizes.get(em.subcategory, 0) + 1
        order = list(sizes)
        ranked = sorted(order, key=lambda sub: (-sizes[sub], order.index(sub)))[config.skip_subcategories :]
        top = set(ranked[: config.top_subcategories or None])
        catalog = [em for em in catalog if em.subcategory in top]
    if not config.max_per_subcategory:
        return list(catalog)
    rng = _rng(config.seed, _SELECT_STREAM)
    by_sub: dict[str, list[int]] = {}
    for i, em in enumerate(catalog):
        by_sub.setdefault(em.subcategory, []).append(i)
    keep: set[int] = set()
    for idx in by_sub.values():  # insertion order = catalog order: deterministic
        if len(idx) <= config.max_per_subcategory:
            keep.update(idx)
        else:
            keep.update(
                idx[int(j)] for j in rng.choice(len(idx), size=config.max_per_subcategory, replace=False)
            )
    return [em for i, em in enumerate(catalog) if i in keep]


def _categories(emoji: list[Emoji]) -> list[str]:
    return list(dict.fromkeys(em.category for em in emoji))


def chunk_unit(em: Emoji, config: EmojiConfig) -> str:
    """The group an emoji is chunked (and held out) by: its category or its subcategory."""
    return em.category if config.chunk_by == "category" else em.subcategory


def _classes(emoji: list[Emoji]) -> list[str]:
    return list(dict.fromkeys(em.classname for em in emoji))


def _pair(em: Emoji, vendor: str, images: dict[str, dict[str, bytes]], caption: str) -> Sample:
    return Sample(
        key="pending",
        image=images[vendor][em.image],
        text=caption,
        label=em.classname,
        meta={"id": f"emoji-{em.code}-{vendor}", "emoji": em.char, "category": em.category},
    )


def _keyed(samples: list[Sample], prefix: str, rng: np.random.Generator) -> list[Sample]:
    perm = rng.permutation(len(samples))
    return [replace(samples[int(i)], key=f"{prefix}-{k:06d}") for k, i in enumerate(perm)]


def _plan(config: EmojiConfig, stream_categories: list[str]) -> list[list[str]]:
    """Categories of each chunk: the stream categories shuffled by the seed, grouped."""
    perm = _rng(config.seed, _ORDER_STREAM).permutation(len(stream_categories))
    order = [stream_categories[int(i)] for i in perm]
    n = math.ceil(len(order) / config.categories_per_chunk)
    return [order[j * config.categories_per_chunk : (j + 1) * config.categories_per_chunk] for j in range(n)]


def build_chunks(
    config: EmojiConfig, emoji: list[Emoji], images: dict[str, dict[str, bytes]]
) -> tuple[list[list[Sample]], list[list[str]], list[list[str]]]:
    """(samples per chunk, categories per chunk, classes first seen per chunk) of the stream emoji."""
    categories = list(dict.fromkeys(chunk_unit(em, config) for em in emoji))
    plan = _plan(config, categories)
    # Captions are drawn in catalog x vendor order, the same for both splits.
    crng = _rng(config.seed, _CAPTION_STREAM)
    pairs = [(em, _pair(em, v, images, make_caption(em, crng))) for em in emoji for v in config.train_vendors]
    if config.split == "class-incremental":
        chunks = []
        for j, cats in enumerate(plan):
            mine = [s for em, s in pairs if chunk_unit(em, config) in cats]
            chunks.append(_keyed(mine, f"c{j:03d}", _rng(config.seed, _TRAIN_STREAM, j)))
        class_order = [_classes([em for em in emoji if chunk_unit(em, config) in cats]) for cats in plan]
        return chunks, plan, class_order
    # Instance-incremental: each category's pairs, shuffled, are dealt round the chunks with one
    # running counter, so chunks are the same size and every chunk mixes the categories.
    rng = _rng(config.seed, _TRAIN_STREAM)
    dealt: list[list[Sample]] = [[] for _ in plan]
    k = int(rng.integers(len(plan)))
    for cat in categories:
        mine = [s for em, s in pairs if chunk_unit(em, config) == cat]
        for i in rng.permutation(len(mine)):
            dealt[k % len(plan)].append(mine[int(i)])
            k += 1
    chunks = [_keyed(c, f"c{j:03d}", rng) for j, c in enumerate(dealt)]
    cats_seen = [sorted({s.meta["category"] for s in c}, key=_categories(emoji).index) for c in chunks]
    return chunks, cats_seen, [_classes(emoji)] + [[] for _ in plan[1:]]


def _write_classification(out: Path, emoji: list[Emoji], vendor_images: dict[str, bytes]) -> None:
    classes = _classes(emoji)
    write_classification_set(
        out,
        classnames=classes,
        templates=list(CLASSIFICATION_TEMPLATES),
        images=[vendor_images[em.image] for em in emoji],
        targets=[classes.index(em.classname) for em in emoji],
    )


def _stream_paths(out: Path, record: dict) -> EmojiStreamPaths:
    base = record.get("base") or {}
    return EmojiStreamPaths(
        chunks=[out / c for c in record["chunks"]],
        classification=out / record["classification"],
        retrieval=out / record["retrieval"],
        class_order=[list(g) for g in record["class_order"]],
        category_order=[list(g) for g in record["category_order"]],
        base_chunks=[out / c for c in base.get("chunks", [])],
        base_classification=out / base["classification"] if base else None,
        counts=dict(record["counts"]),
    )


def load_sources(
    config: EmojiConfig, cache_dir: str | Path | None = None, *, fetch: Callable[..., Path] = npm_tarball
) -> tuple[list[Emoji], dict[str, Path]]:
    """(catalog for the config's vendors, vendor -> datasource tarball), fetching what is missing."""
    tarballs = {v: fetch(datasource_package(v), config.datasource_version, cache_dir) for v in config.vendors}
    lib_tgz = fetch("emojilib", config.emojilib_version, cache_dir)
    try:
        entries = json.loads(_read_member(tarballs[config.vendors[0]], _EMOJI_JSON))
        emojilib = json.loads(_read_member(lib_tgz, _EMOJILIB_JSON))
    except json.JSONDecodeError as exc:
        raise SystemExit(f"invalid JSON in the emoji packages: {exc}") from exc
    return parse_catalog(entries, emojilib, config.vendors), tarballs


def make_emoji_stream(
    out_dir: str | Path,
    config: EmojiConfig | str = "emoji-ci-small",
    *,
    cache_dir: str | Path | None = None,
    fetch: Callable[..., Path] = npm_tarball,
) -> EmojiStreamPaths:
    """Write the emoji stream of ``config`` (or a PRESETS name) under ``out_dir``; reuse it if there.

    Layout: ``chunks/chunk_000/`` ..., ``eval/classification/``, ``eval/retrieval/``, with
    holdout categories also ``base/chunks/chunk_000/`` and ``base/eval/classification/``, and
    ``stream.json`` (config, class and category order, counts), written last: a stream
    interrupted mid-way is regenerated, after deleting ``chunks/``, ``eval/`` and ``base/``.
    The same config always gives byte-identical files. ``cache_dir`` holds the npm tarballs
    (default ``default_cache_dir()``); ``fetch(package, version, cache_dir)`` returns one.
    """
    if isinstance(config, str):
        config = PRESETS[config]
    out = Path(out_dir)
    manifest = out / "stream.json"
    wanted = json.loads(json.dumps({"format": _FORMAT_VERSION, "config": asdict(config)}))
    cached = cached_stream(out, wanted, _stream_paths, "emoji")
    if cached is not None:
        return cached

    catalog, tarballs = load_sources(config, cache_dir, fetch=fetch)
    chosen = select_emoji(catalog, config)
    known = list(dict.fromkeys(chunk_unit(em, config) for em in chosen))
    unknown = [c for c in config.holdout_categories if c not in known]
    if unknown:
        raise ValueError(f"unknown holdout categories {unknown}; the {config.chunk_by} groups are {known}")
    stream = [em for em in chosen if chunk_unit(em, config) not in config.holdout_categories]
    base = [em for em in chosen if chunk_unit(em, config) in config.holdout_categories]
    if not stream:
        raise ValueError("no categories left for the stream after holdout_categories")

    logger.info("generating emoji stream in %s: %s", out, config)
    for sub in ("chunks", "eval", "base"):
        shutil.rmtree(out / sub, ignore_errors=True)
    wanted_images = {em.image for em in chosen}
    images = {v: read_vendor_images(tarballs[v], v, wanted_images, config.image_size) for v in config.vendors}

    chunks, category_order, class_order = build_chunks(config, stream, images)
    chunk_dirs = []
    for j, samples in enumerate(chunks):
        chunk_dir = out / "chunks" / f"chunk_{j:03d}"
        write_shards(samples, chunk_dir)
        chunk_dirs.append(chunk_dir)
    held_out = images[config.eval_vendor]
    _write_classification(out / "eval" / "classification", stream, held_out)
    write_retrieval_set(
        out / "eval" / "retrieval",
        images=[held_out[em.image] for em in stream],
        captions=[[em.name] for em in stream],
    )
    counts = {
        "emoji": len(stream),
        "classes": len(_classes(stream)),
        "pairs_per_chunk": [len(c) for c in chunks],
        "pairs": sum(len(c) for c in chunks),
        "eval_images": len(stream),
    }
    record = {
        **wanted,
        "sources": {
            **{datasource_package(v): config.datasource_version for v in config.vendors},
            "emojilib": config.emojilib_version,
        },
        "classnames": _classes(stream),
        "class_order": class_order,
        "category_order": category_order,
        "chunks": [str(p.relative_to(out)) for p in chunk_dirs],
        "classification": "eval/classification",
        "retrieval": "eval/retrieval",
        "counts": counts,
    }
    if base:
        crng = _rng(config.seed, _CAPTION_STREAM, 1)
        pairs = [_pair(em, v, images, make_caption(em, crng)) for em in base for v in config.train_vendors]
        base_dir = out / "base" / "chunks" / "chunk_000"
        write_shards(_keyed(pairs, "b000", _rng(config.seed, _BASE_STREAM)), base_dir)
        _write_classification(out / "base" / "eval" / "classification", base, held_out)
        record["base"] = {
            "categories": _categories(base),
            "classnames": _classes(base),
            "chunks": [str(base_dir.relative_to(out))],
            "classification": "base/eval/classification",
        }
        counts.update(base_emoji=len(base), base_classes=len(_classes(base)), base_pairs=len(pairs))
    tmp = manifest.with_name(".stream.json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return _stream_paths(out, record)
